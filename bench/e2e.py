"""End-to-end benchmark: storescu -> triage serve -> scored result in SQLite.

Sends N single-image studies of 2048x2048 12-bit DX with DCMTK storescu to a
fresh `triage serve` (shipped model, durable ingest, decoder processes), and
measures until the last result is stored. Two scenarios run in one go:
uncompressed only, and a mix of uncompressed, JPEG 2000 and JPEG-LS. By default
the studies arrive in one burst (throughput); with ``--rate`` they arrive one
association at a time at that many studies per second (latency under a steady
load, the figure that matters in a reading room).

Prints studies/s end to end, p50/p95 latency from study completion to result,
mean time per stage, and the ratio of end-to-end throughput to the bare ingest
throughput measured in the same run (the time storescu took to send).

    .venv/bin/python bench/e2e.py [--studies 40] [--size 2048] [--quiet 2] [--rate 5] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless  # noqa: E402

from bench.ingest import free_port, wait_idle, wait_port  # noqa: E402
from tests import synth  # noqa: E402

FLAGS = {ExplicitVRLittleEndian: (), JPEG2000Lossless: ("-R", "-xv"), JPEGLSLossless: ("-R", "-xt")}


def build(out: Path, n: int, size: int, mixed: bool) -> dict[str, list[Path]]:
    """Write (or reuse) n single-image studies; return them grouped by transfer syntax."""
    groups: dict[str, list[Path]] = {}
    cycle = [ExplicitVRLittleEndian, JPEG2000Lossless, ExplicitVRLittleEndian, JPEGLSLossless] if mixed \
        else [ExplicitVRLittleEndian]
    base = synth.phantom(size, size, bits_stored=12, seed=0)
    rng = np.random.default_rng(0)
    for i in range(n):
        ts = cycle[i % len(cycle)]
        p = out / f"{i:04d}_{ts.name.split()[0]}.dcm"
        if not p.exists():
            px = base.copy()
            px[:32, :32] = rng.integers(0, 4095, (32, 32), dtype=np.uint16)
            ds = synth.make_dataset(synth.SynthSpec(rows=size, columns=size, bits_stored=12), pixels=px)
            if ts != ExplicitVRLittleEndian:
                ds.compress(ts)
            out.mkdir(parents=True, exist_ok=True)
            synth.write(ds, p)
        groups.setdefault(ts, []).append(p)
    return groups


def _send(port: int, ts: str, files: list[Path]) -> None:
    r = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "TRIAGE", *FLAGS[ts],
                        "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True)
    if r.returncode != 0 or "Store Failed" in r.stderr:
        raise RuntimeError(r.stderr[-400:])


def run(groups: dict[str, list[Path]], work: Path, quiet: float, model: str | None,
        profile: Path | None = None, rate: float | None = None) -> dict[str, float]:
    data, port = work / "var", free_port()
    cfg = work / "e2e.toml"
    cfg.write_text(f'[dicom]\nport = {port}\n[web]\nport = {free_port()}\n'
                   f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 0\n'
                   f'[studies]\nquiet_period_s = {quiet}\nsweep_interval_s = 0.1\n'
                   '[worker]\nprocesses = 2\npoll_interval_s = 0.05\n'
                   '[logging]\nlevel = "WARNING"\n'
                   # The synthetic phantom is no child's radiograph: the guard runs and
                   # warns but lets it through, so every study is scored with its heatmap.
                   '[guard]\npopulation_from_image = "warn"\nout_of_distribution = "warn"\n'
                   'population_header = "warn"\n'
                   + (f'[model]\npath = "{model}"\n' if model else ""))
    proc = subprocess.Popen([str(REPO / ".venv/bin/triage"), "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = sum(len(v) for v in groups.values())
    try:
        wait_port(port, timeout=120)
        wait_idle(proc.pid)  # the decoder processes import torch and MONAI as the daemon starts
        spy = None
        if profile is not None:  # sample the daemon and its decoder processes (collapsed stacks)
            spy = subprocess.Popen([str(REPO / ".venv/bin/py-spy"), "record", "--pid", str(proc.pid),
                                    "--subprocesses", "--rate", "100", "--format", "raw",
                                    "-o", str(profile)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(1)
        t0 = time.time()
        if rate is None:  # a burst: each transfer syntax's files over one association
            for ts, files in groups.items():
                _send(port, ts, files)
        else:  # steady arrival: one study (one association) every 1/rate seconds
            for i, (ts, f) in enumerate(sorted(((ts, f) for ts, fs in groups.items() for f in fs),
                                               key=lambda tf: tf[1].name)):
                time.sleep(max(0.0, t0 + i / rate - time.time()))
                _send(port, ts, [f])
        t_ingest = time.time()
        db = data / "triage.sqlite"
        while True:
            with sqlite3.connect(db) as c:
                done = c.execute("SELECT count(*) FROM results").fetchone()[0]
            if done >= n:
                break
            if time.time() - t0 > 1800:
                raise RuntimeError(f"only {done} of {n} results after 30 min")
            time.sleep(0.05)
        t_end = time.time()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT r.created_at, s.completed_at, s.last_received_at, r.timings, r.state "
                             "FROM results r JOIN studies s ON s.id = r.study_id").fetchall()
    finally:
        proc.terminate()
        proc.wait(120)
    lat = sorted(r[0] - r[1] for r in rows)
    lat_quiet = sorted(r[0] - (r[2] + quiet) for r in rows)
    timings = [json.loads(r[3]) for r in rows]
    return {
        "n": n, "scored": sum(r[4] == "scored" for r in rows),
        "e2e_studies_s": n / (t_end - t0 - quiet),
        "ingest_studies_s": n / (t_ingest - t0),
        "p50_s": statistics.median(lat), "p95_s": float(np.percentile(lat, 95)),
        "p95_beyond_quiet_s": float(np.percentile(lat_quiet, 95)),
        **{f"mean_{k}": statistics.mean(t[k] for t in timings)
           for k in ("decode_s", "infer_s", "heatmap_s", "decode_cpu_s")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--quiet", type=float, default=2.0, help="studies.quiet_period_s for the run")
    ap.add_argument("--model", default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "triage-bench-e2e")
    ap.add_argument("--rate", type=float, default=None,
                    help="steady arrival: send one study every 1/RATE s (default: one burst)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="write py-spy collapsed stacks of the daemon per scenario into this folder")
    args = ap.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    for name, mixed in (("uncompressed", False), ("mixed raw/J2K/JPEG-LS", True)):
        groups = build(args.cache / f"{'mix' if mixed else 'raw'}-{args.size}", args.studies, args.size, mixed)
        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            prof = None if args.profile is None else args.profile / f"{'mix' if mixed else 'raw'}.txt"
            r = run(groups, Path(tmp), args.quiet, args.model, prof, args.rate)
        arrival = "in one burst" if args.rate is None else f"arriving steadily at {args.rate:g} studies/s"
        print(f"\n== {name}: {r['n']} single-image studies, {args.size}x{args.size} 12-bit, "
              f"{arrival}, quiet period {args.quiet} s ({r['scored']} scored)")
        print(f"end to end       {r['e2e_studies_s']:6.2f} studies/s (quiet period subtracted once)")
        print(f"bare ingest      {r['ingest_studies_s']:6.2f} studies/s (storescu send time)")
        print(f"ratio e2e/ingest {r['e2e_studies_s'] / r['ingest_studies_s']:6.2f}")
        print(f"latency completion->result p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s; "
              f"p95 beyond quiet period {r['p95_beyond_quiet_s']:.2f} s")
        print(f"stage means per batch: decode {r['mean_decode_s']:.3f} s (CPU {r['mean_decode_cpu_s']:.3f} s "
              f"per study), infer {r['mean_infer_s']:.3f} s, heatmap {r['mean_heatmap_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
