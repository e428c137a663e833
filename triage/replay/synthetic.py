"""``triage archive build``: a realistic, labelled DICOM archive from an image-only data set.

Each manifest image becomes one study of one synthetic patient: a frontal
image (CR or DX; PA or AP) and, for some studies, a lateral decoy in a second
series that gating must leave out. Headers vary the way real archives do:
MONOCHROME1 (stored inverted) or MONOCHROME2, 12 to 16 bits stored, a
realistic matrix, uncompressed, JPEG-LS lossless or JPEG 2000 lossless
encoding, and sometimes a full-range window or a linear VOI LUT. Studies
arrive on working days between 08:00 and 18:00 (StudyDate/StudyTime). Names
and IDs are synthetic. The same inputs and seed give byte-identical files.

Every choice for study ``k`` comes from ``numpy.random.default_rng([seed, k])``
(:func:`plan`), so building is order-free and can run in parallel.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import hashlib
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, generate_uid

from dicom_io import writers
from triage.core.errors import InputError
from triage.manifest import read_labelled_rows

log = logging.getLogger(__name__)

SYNTAXES = ("explicit", "jpegls", "j2k")
MANUFACTURERS = ("Synthetic Radiography Co", "Example Imaging Systems", "Placeholder Medical")
DAY_START_H, DAY_END_H = 8, 18
LABEL_COLUMNS = ("StudyInstanceUID", "AccessionNumber", "label", "split", "source")


@dataclass(frozen=True)
class Source:
    """One labelled image of the manifest."""

    path: Path
    rel: str
    label: int
    split: str
    sha256: str


@dataclass(frozen=True)
class StudyPlan:
    """Everything about one synthetic study except its pixels (pure, from the seed)."""

    index: int
    modality: str
    photometric: str
    bits_stored: int
    syntax: str
    voi: str  # "none" | "window" | "lut"
    view: str
    lateral: bool
    manufacturer: str
    sex: str
    age_years: int
    rows: int
    columns: int
    when: _dt.datetime
    age_in_header: bool = True  # False: no PatientAge or PatientBirthDate (the guard decides)


def read_manifest(manifest: Path, images: Path, split: str | None) -> list[Source]:
    """Return the manifest's images (``path,label,split,sha256``), only ``split`` if given.

    Raises InputError on a missing file or column, or a label other than 0/1.
    """
    out = []
    for r in read_labelled_rows(manifest):
        s = (r.get("split") or "").strip()
        if split is None or s == split:
            out.append(Source(images / r["path"], r["path"], int(r["label"]), s,
                              (r.get("sha256") or "").strip()))
    if not out:
        raise InputError(f"manifest {manifest} has no images" + (f" in split {split!r}" if split else ""))
    return out


def working_slots(n: int, start: _dt.date, per_day: int, rng: np.random.Generator) -> list[_dt.datetime]:
    """Return ``n`` arrival times, ``per_day`` per working day from ``start``, 08:00-18:00, sorted."""
    out: list[_dt.datetime] = []
    day = start
    while len(out) < n:
        if day.weekday() < 5:
            k = min(per_day, n - len(out))
            secs = np.sort(rng.integers(0, (DAY_END_H - DAY_START_H) * 3600, k))
            base = _dt.datetime.combine(day, _dt.time(DAY_START_H))
            out += [base + _dt.timedelta(seconds=int(s)) for s in secs]
        day += _dt.timedelta(days=1)
    return out


def plan(index: int, seed: int, matrix: int, when: _dt.datetime) -> StudyPlan:
    """Return the header choices of study ``index`` (pure, deterministic in ``seed``)."""
    rng = np.random.default_rng([seed, index])
    aspect = float(rng.choice([1.0, 0.85, 1.2]))
    return StudyPlan(
        index=index, modality=str(rng.choice(["CR", "DX"])),
        photometric="MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
        bits_stored=int(rng.choice([12, 14, 15, 16])), syntax=str(rng.choice(SYNTAXES)),
        voi=str(rng.choice(["none", "window", "lut"], p=[0.6, 0.25, 0.15])),
        view="PA" if rng.random() < 0.8 else "AP", lateral=bool(rng.random() < 0.2),
        manufacturer=str(rng.choice(MANUFACTURERS)), sex=str(rng.choice(["F", "M"])),
        age_years=int(rng.integers(1, 6)), rows=matrix,
        columns=max(2, round(matrix * aspect / 2) * 2), when=when)


def to_stored(grey8: np.ndarray, rows: int, columns: int, bits: int) -> np.ndarray:
    """Return an 8-bit grey image resampled (bicubic) to rows x columns at ``bits`` bits.

    MONOCHROME2 sense, uint16 in [0, 2**bits - 1].
    """
    im = Image.fromarray(grey8.astype(np.float32)).resize((columns, rows), Image.Resampling.BICUBIC)
    x = np.clip(np.asarray(im, dtype=np.float64) / 255.0, 0.0, 1.0)
    return np.rint(x * (2 ** bits - 1)).astype(np.uint16)


def load_grey(src: Source) -> np.ndarray:
    """Return the source image as 8-bit grey. Raises InputError on a bad file or checksum."""
    try:
        data = src.path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image {src.path}: {e}") from e
    if src.sha256 and hashlib.sha256(data).hexdigest() != src.sha256:
        raise InputError(f"image {src.rel}: sha256 does not match the manifest")
    with Image.open(src.path) as im:
        arr = np.asarray(im.convert("RGB" if im.mode not in ("L", "I;16") else im.mode))
    return arr[..., 0] if arr.ndim == 3 else arr


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["triage-archive", str(seed), *map(str, parts)]))


def _voi(ds: Dataset, p: StudyPlan) -> None:
    """Add a full-range window or a linear VOI LUT (so the picture is not clipped)."""
    top = 2 ** p.bits_stored
    if p.voi == "window":
        ds.WindowCenter, ds.WindowWidth = top / 2, top
        ds.VOILUTFunction = "LINEAR"
    elif p.voi == "lut":
        item = Dataset()
        item.LUTDescriptor = [top % 65536, 0, 12]  # 0 entries means 65536
        item.LUTExplanation = "LINEAR FULL RANGE"
        lut = np.rint(np.arange(top) * (4095 / (top - 1))).astype("<u2")
        item.add_new("LUTData", "OW", lut.tobytes())
        ds.VOILUTSequence = [item]


def _headers(ds: Dataset, p: StudyPlan, seed: int, series: int, lateral: bool) -> None:
    pid = f"{seed % 1000:03d}{p.index:06d}"
    ds.PatientName = f"SYNTHETIC^P{pid}"
    ds.PatientID = f"SYN{pid}"
    ds.PatientSex = p.sex
    if p.age_in_header:
        ds.PatientBirthDate = (p.when.date() - _dt.timedelta(days=365 * p.age_years + 100)
                               ).strftime("%Y%m%d")
        ds.PatientAge = f"{p.age_years:03d}Y"
    ds.AccessionNumber = f"A{seed % 100:02d}{p.index:07d}"
    ds.StudyID = str(p.index + 1)
    ds.StudyDescription = "XR CHEST" + (" 2 VIEWS" if p.lateral else " 1 VIEW")
    ds.SeriesDescription = "CHEST LAT" if lateral else f"CHEST {p.view}"
    ds.SeriesNumber, ds.InstanceNumber = series, 1
    ds.SeriesDate = ds.ContentDate = ds.StudyDate
    ds.SeriesTime = ds.ContentTime = ds.StudyTime
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
    spacing = round(250.0 / p.rows, 4)
    ds.PixelSpacing = [spacing, spacing]
    ds.BurnedInAnnotation = "NO"


def _encode(ds: Dataset, syntax: str) -> None:
    # Keep our deterministic SOP Instance UID (pydicom would otherwise draw a new one).
    if syntax == "jpegls":
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
    elif syntax == "j2k":
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)


def instance(p: StudyPlan, stored: np.ndarray, seed: int, lateral: bool) -> Dataset:
    """Return one encoded instance of study ``p`` (frontal, or the lateral decoy)."""
    spec = writers.ImageSpec(
        rows=p.rows, columns=p.columns, bits_stored=p.bits_stored, modality=p.modality,
        sop_class_uid=writers.CR_STORAGE if p.modality == "CR" else writers.DX_PRESENTATION,
        photometric=p.photometric, view_position="LL" if lateral else p.view,
        manufacturer=p.manufacturer)
    series = 2 if lateral else 1
    ds = writers.image_dataset(spec, stored, study_uid=_uid(seed, p.index, "study"),
                            series_uid=_uid(seed, p.index, "series", series),
                            sop_uid=_uid(seed, p.index, "image", series), when=p.when)
    _headers(ds, p, seed, series, lateral)
    _voi(ds, p)
    _encode(ds, p.syntax)
    return ds


def build_study(src: Source, p: StudyPlan, seed: int, out: Path) -> tuple[str, str]:
    """Write study ``p`` under ``out``; return (StudyInstanceUID, AccessionNumber)."""
    stored = to_stored(load_grey(src), p.rows, p.columns, p.bits_stored)
    folder = out / f"P{seed % 1000:03d}{p.index:06d}" / f"ST{p.index:06d}"
    frontal = instance(p, stored, seed, lateral=False)
    writers.write_file(frontal, folder / "SE1" / "IM1.dcm")
    if p.lateral:
        decoy = np.ascontiguousarray(stored[:, ::-1])  # any picture: gating must leave it out
        writers.write_file(instance(p, decoy, seed, lateral=True), folder / "SE2" / "IM1.dcm")
    return str(frontal.StudyInstanceUID), str(frontal.AccessionNumber)


def _build_one(args: tuple[Source, StudyPlan, int, Path]) -> tuple[str, str]:
    return build_study(*args)


@dataclass(frozen=True)
class BuildOptions:
    """What ``triage archive build`` makes."""

    images: Path
    manifest: Path
    out: Path
    split: str | None = None
    limit: int | None = None
    matrix: int = 2048
    seed: int = 0
    start: _dt.date = _dt.date(2025, 1, 6)
    per_day: int = 80
    workers: int = 1
    ages: bool = True  # False: headers carry no age (to measure the input guard's image check)


def select(sources: Sequence[Source], limit: int | None, seed: int) -> list[Source]:
    """Return ``limit`` sources chosen at random (deterministically), in manifest order; all if None."""
    if limit is None or limit >= len(sources):
        return list(sources)
    rng = np.random.default_rng([seed, 7])
    return [sources[i] for i in sorted(rng.choice(len(sources), limit, replace=False))]


def build(opts: BuildOptions) -> Path:
    """Build the archive under ``opts.out`` and its labels CSV ``opts.out/labels.csv``.

    Returns the labels CSV's path. Raises InputError on bad inputs or options.
    """
    if opts.matrix < 64 or opts.per_day < 1 or opts.workers < 1:
        raise InputError("--matrix must be >= 64, --per-day and --workers >= 1")
    sources = select(read_manifest(opts.manifest, opts.images, opts.split), opts.limit, opts.seed)
    order = np.random.default_rng([opts.seed, 1]).permutation(len(sources))
    slots = working_slots(len(sources), opts.start, opts.per_day, np.random.default_rng([opts.seed, 2]))
    when = {int(k): slots[rank] for rank, k in enumerate(order)}
    jobs = [(s, dataclasses.replace(plan(k, opts.seed, opts.matrix, when[k]), age_in_header=opts.ages),
             opts.seed, opts.out)
            for k, s in enumerate(sources)]
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.workers == 1:
        ids = [_build_one(j) for j in jobs]
    else:
        # forkserver: forking a process that already runs threads (onnxruntime's, a test
        # runner's) can copy a held lock into the child, which then waits forever.
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(opts.workers, mp_context=ctx) as pool:
            ids = list(pool.map(_build_one, jobs, chunksize=4))
    labels = opts.out / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(LABEL_COLUMNS)
        w.writerows((uid, acc, s.label, s.split, s.rel) for (uid, acc), s in zip(ids, sources, strict=True))
    log.info("built %d studies under %s; labels in %s", len(ids), opts.out, labels)
    return labels
