"""``triage benchmark --few-shot``: N-way K-shot episodes with prototype classification.

What is measured is what ``triage adapt`` does in the daemon: embed K support
images per class, take each class's unit-length mean embedding as its
prototype (:mod:`triage.inference.prototypes`), and give each query image the
nearest prototype's class. An episode's accuracy is the share of its queries
classed correctly; a figure is the mean over many episodes with a 95 %
t-interval.

Classes and data:

- paediatric normal / bacterial / viral pneumonia, from the file names of the
  Kermany et al. set (``personN_bacteria_M``, ``personN_virus_M``, normals
  ``IM-…`` / ``NORMAL2-IM-…``). The patient-level split is made again from the
  shipped model's card (seed and fractions, :func:`triage.training.splits.write_split`)
  and must reproduce the card's sha256, so no encoder is evaluated on images the
  shipped model was trained on: episodes are drawn from ``holdout``, trained
  encoders learn from ``train`` only. Within an episode every image comes from a
  different patient, so support and query never share one.
- adult COVID-19 against adult normal, from ``cxr-adult-224``'s ``val`` split.
  These two classes come from different hospitals, so accuracy there measures a
  hospital shortcut as much as disease; the set has no patient identifiers.

Encoders: the shipped model's ``embedding`` (its card's chain, through
:func:`triage.imaging.prepare.prepare`), an untrained MobileNetV2 (the floor),
and MobileNetV2, SqueezeNet 1.1 and EfficientNet-Lite0 trained from scratch as
prototypical networks (Snell et al., 2017) on 3-way episodes of the ``train``
part at a small CPU budget. The episode sampler, the statistics and the Markdown
are pure; the rest reads images and trains.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.core.errors import InputError
from triage.inference.prototypes import normalise, prototype_of

log = logging.getLogger(__name__)

SECTION = "## Few-shot"
PAEDIATRIC = ("normal", "bacteria", "virus")
ADULT = ("covid", "normal")
ADULT_CITATION = ("COVID-19 Radiography Database (Chowdhury et al., IEEE Access 2020; Rahman et "
                  "al., Comput Biol Med 2021)")
TRAINED = ("mobilenet_v2", "squeezenet1_1", "efficientnet_lite0")
ENCODERS = ("shipped", "untrained_mobilenet_v2", *TRAINED)


@dataclass(frozen=True)
class Item:
    """One labelled image: its file, class, patient and part of the split."""

    path: Path
    cls: str
    patient: str
    part: str


@dataclass(frozen=True)
class Task:
    """An episode family: which data set, which classes, how many shots and queries."""

    key: str
    title: str
    source: str  # "paediatric" | "adult"
    classes: tuple[str, ...]
    k_shot: int
    n_query: int = 15


TASKS = (
    Task("p3w1s", "paediatric normal / bacterial / viral, 3-way 1-shot", "paediatric",
         PAEDIATRIC, 1),
    Task("p3w5s", "paediatric normal / bacterial / viral, 3-way 5-shot", "paediatric",
         PAEDIATRIC, 5),
    Task("bv2w5s", "paediatric bacterial / viral, 2-way 5-shot", "paediatric",
         ("bacteria", "virus"), 5),
    Task("a2w5s", "adult COVID-19 / normal (two hospitals), 2-way 5-shot", "adult", ADULT, 5),
)


@dataclass(frozen=True)
class Episode:
    """Per class (in ``classes`` order): the support and the query item indices."""

    classes: tuple[str, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Budget:
    """What the trained encoders got: input size, episodes, shots, optimiser, seed."""

    input_size: int = 64
    train_episodes: int = 300
    train_way: int = 3
    train_shot: int = 5
    train_query: int = 10
    lr: float = 1e-3
    seed: int = 20261210
    threads: int = 2
    eval_episodes: int = 600
    adult_per_class: int = 300


# --- pure: episodes and statistics ---------------------------------------------------------------


def by_class_and_patient(items: Sequence[Item], part: str | None,
                         classes: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """Return {class: {patient: item indices}} for the items of ``part`` (None: every part)."""
    out: dict[str, dict[str, list[int]]] = {c: {} for c in classes}
    for i, it in enumerate(items):
        if it.cls in out and (part is None or it.part == part):
            out[it.cls].setdefault(it.patient, []).append(i)
    return out


def sample_episode(rng: np.random.Generator, pool: Mapping[str, Mapping[str, Sequence[int]]],
                   classes: Sequence[str], k_shot: int, n_query: int) -> Episode:
    """Draw one episode: per class ``k_shot`` support and ``n_query`` query images, one image
    per patient and no patient twice in the episode, so support and query never share one.

    Raises InputError when a class has too few patients left.
    """
    used: set[str] = set()
    support, query = [], []
    for c in classes:
        patients = sorted(p for p in pool[c] if p not in used)
        need = k_shot + n_query
        if len(patients) < need:
            raise InputError(f"class {c!r} has {len(patients)} patients; an episode needs {need}")
        chosen = [patients[j] for j in rng.choice(len(patients), need, replace=False)]
        used.update(chosen)
        picks = [int(pool[c][p][int(rng.integers(len(pool[c][p])))]) for p in chosen]
        support.append(tuple(picks[:k_shot]))
        query.append(tuple(picks[k_shot:]))
    return Episode(tuple(classes), tuple(support), tuple(query))


def episode_accuracy(embeddings: np.ndarray, ep: Episode) -> float:
    """Return the share of ``ep``'s queries whose nearest prototype is their own class."""
    protos = np.stack([prototype_of(embeddings[list(s)]) for s in ep.support])
    q_idx = [i for q in ep.query for i in q]
    truth = np.repeat(np.arange(len(ep.query)), [len(q) for q in ep.query])
    q = normalise(embeddings[q_idx])
    d = ((q[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
    return float(np.mean(np.argmin(d, axis=1) == truth))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Return (mean, low, high): the mean and its two-sided Student t interval."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        raise InputError("an interval needs two or more values")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    m = float(v.mean())
    return m, m - half, m + half


def evaluate(embeddings: np.ndarray, items: Sequence[Item], task: Task, part: str | None,
             episodes: int, seed: int) -> dict[str, Any]:
    """Return a task's episode accuracies summarised: mean, 95 % t-interval, sd, n.

    The episodes depend only on ``seed``, the items and the task, so every encoder
    is measured on the same episodes.
    """
    from tqdm import tqdm

    pool = by_class_and_patient(items, part, task.classes)
    rng = np.random.default_rng(seed)
    acc = [episode_accuracy(embeddings, sample_episode(rng, pool, task.classes, task.k_shot,
                                                       task.n_query))
           for _ in tqdm(range(episodes), desc=f"episodes {task.key}", unit="ep", leave=False)]
    m, lo, hi = t_interval(acc)
    return {"mean": m, "ci95": [lo, hi], "sd": float(np.std(acc, ddof=1)), "episodes": episodes,
            "chance": 1.0 / len(task.classes)}


# --- the data ------------------------------------------------------------------------------------


def split_items(manifest: Path, data_root: Path, seed: int, val_fraction: float,
                holdout_fraction: float) -> tuple[list[Item], str]:
    """Return the paediatric items with their class, patient and part of the patient-level
    split made with ``seed`` and the fractions, and the sha256 of that split file."""
    from triage.training.splits import subtype, write_split
    from triage.training.train import file_sha256

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "patient-split.csv"
        write_split(manifest, out, seed, val_fraction, holdout_fraction)
        sha = file_sha256(out)
        with out.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    items = [Item(data_root / r["path"], subtype(r["path"]), r["patient"], r["split"])
             for r in rows]
    return items, sha


def card_split(card: Mapping[str, Any], manifest: Path, data_root: Path) -> tuple[list[Item], str]:
    """Return the paediatric items split as the card's model was (and the split's sha256).

    Raises InputError when the card records no split, or the split made again from
    its seed and fractions is not the one it records (the wrong manifest, another seed):
    the shipped encoder could then be evaluated on images it was trained on.
    """
    rec = card.get("split") or {}
    if "seed" not in rec or "fractions" not in rec:
        raise InputError("the model card records no patient-level split (split.seed, "
                         "split.fractions): cannot tell which images it was trained on")
    fr = rec["fractions"]
    items, sha = split_items(manifest, data_root, int(rec["seed"]), float(fr["val"]),
                             float(fr["holdout"]))
    want = rec.get("split_manifest_sha256")
    if want is None or sha != want:
        raise InputError(f"the split made again from {manifest} with the card's seed "
                         f"{rec['seed']} has sha256 {sha[:12]}, not the card's "
                         f"{str(want)[:12]}: not the data the model was trained on")
    return items, sha


def adult_items(manifest: Path, data_root: Path | None, per_class: int, seed: int) -> list[Item]:
    """Return up to ``per_class`` images of each adult class from the manifest's ``val`` split
    (a fixed random choice). Each image is its own "patient": the set names none."""
    root = data_root or manifest.parent
    try:
        with manifest.open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split") == "val"]
    except OSError as e:
        raise InputError(f"cannot read {manifest}: {e.strerror or e}") from e
    out = []
    rng = np.random.default_rng(seed)
    for cls in ADULT:
        mine = [r for r in rows if ("covid" in r.get("finding", "").lower()) == (cls == "covid")]
        pick = sorted(rng.choice(len(mine), min(per_class, len(mine)), replace=False)) if mine else []
        out += [Item(root / mine[i]["path"], cls, mine[i]["path"], "val") for i in pick]
    return out


# --- the encoders (torch from here on) -----------------------------------------------------------


def build_encoder(key: str) -> Any:
    """Return an untrained encoder (1 grey channel in, pooled features out) for ``key``."""
    import torch.nn as nn

    import triage.training.compat  # noqa: F401  (must precede torchvision and timm)

    if key == "mobilenet_v2":
        from triage.training.train import build_model

        m = build_model(1.0, 0.0, 1)
        m.classifier = nn.Identity()
        return m
    if key == "squeezenet1_1":
        from torchvision.models import squeezenet1_1

        from triage.training.benchmark import _grey_conv

        s = squeezenet1_1(weights=None)
        s.features[0] = _grey_conv(s.features[0], 1)
        return nn.Sequential(s.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if key == "efficientnet_lite0":
        import timm

        return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0, in_chans=1)
    raise InputError(f"unknown encoder {key!r}; choose from {', '.join(TRAINED)}")


def _chains(pre: Any, size: int) -> tuple[Any, Any, Any]:
    """Return (deterministic prefix, eval rest, train rest) of the one preprocessing chain."""
    from triage.imaging.transforms import InputSpec, build_transforms, cache_size, split_cached

    if cache_size(pre, InputSpec(size)) != size:
        raise InputError("few-shot training caches at the input size: set aug_crop_scale to 1")
    prefix, rest = split_cached(build_transforms(pre, InputSpec(size), train=False))
    _, train_rest = split_cached(build_transforms(pre, InputSpec(size), train=True))
    return prefix, rest, train_rest


def cache(items: Sequence[Item], prefix: Callable[[Any], Any], pre: Any, desc: str) -> Any:
    """Return the deterministic chain's output for every item, as one (N, 1, S, S) tensor.

    Raises InputError when an item cannot be read (the data sets here are clean).
    """
    from triage.training.train import Sample, cache_images

    kept: list[Any] = []
    x, _ = cache_images([Sample(it.path, 0, it.part) for it in items], prefix, pre, desc, kept)
    if len(kept) != len(items):
        raise InputError(f"{desc}: {len(items) - len(kept)} image(s) could not be read")
    return x


def embed_torch(net: Any, x: Any, rest: Callable[[Any], Any], batch: int = 128) -> np.ndarray:
    """Return ``net``'s embeddings of cached images ``x`` after the chain's ``rest`` (eval mode)."""
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.stack([torch.as_tensor(rest(im)).float() for im in x[i:i + batch]])
            out.append(net(xb).float().numpy())
    return np.concatenate(out)


def proto_loss(z: Any, n_way: int, k_shot: int, n_query: int, scale: Any) -> Any:
    """Return the prototypical loss of embeddings ``z`` (support then query, class-major)."""
    import torch
    import torch.nn.functional as F

    u = F.normalize(z, dim=1)
    s = u[:n_way * k_shot].reshape(n_way, k_shot, -1)
    protos = F.normalize(s.mean(1), dim=1)
    q = u[n_way * k_shot:]
    logits = -scale * torch.cdist(q, protos) ** 2
    target = torch.arange(n_way).repeat_interleave(n_query)
    return F.cross_entropy(logits, target)


def train_encoder(key: str, items: Sequence[Item], x_train: Any, train_rest: Callable[[Any], Any],
                  budget: Budget) -> tuple[Any, dict[str, Any]]:
    """Train ``key`` from scratch as a prototypical network on ``budget.train_episodes``
    episodes of ``items`` (their cached images ``x_train``); return (net, its record)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(budget.seed)
    net = build_encoder(key)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    opt = torch.optim.Adam([*net.parameters(), scale], lr=budget.lr)
    pool = by_class_and_patient(items, None, PAEDIATRIC)
    rng = np.random.default_rng(budget.seed)
    losses, t0 = [], time.monotonic()
    net.train()
    for _ in tqdm(range(budget.train_episodes), desc=f"train {key}", unit="ep", leave=False):
        classes = [PAEDIATRIC[i] for i in sorted(rng.choice(len(PAEDIATRIC), budget.train_way,
                                                            replace=False))]
        ep = sample_episode(rng, pool, classes, budget.train_shot, budget.train_query)
        idx = [i for s in ep.support for i in s] + [i for q in ep.query for i in q]
        xb = torch.stack([torch.as_tensor(train_rest(x_train[i])).float() for i in idx])
        loss = proto_loss(net(xb), budget.train_way, budget.train_shot, budget.train_query, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    seconds = time.monotonic() - t0
    tail = losses[-max(1, len(losses) // 10):]
    return net, {"train_seconds": seconds, "first_loss": losses[0] if losses else None,
                 "last_loss_mean": float(np.mean(tail)) if tail else None,
                 "params": sum(p.numel() for p in net.parameters())}


def embed_shipped(model_path: Path, card: Mapping[str, Any], items: Sequence[Item],
                  threads: int, desc: str) -> np.ndarray:
    """Return the shipped model's embeddings of ``items`` after its card's chain, exactly as
    the daemon prepares an image (:func:`triage.imaging.prepare.prepare`)."""
    from tqdm import tqdm

    from triage.imaging.prepare import init, prepare
    from triage.inference.model import onnx_session, run_session

    init(dict(card))
    xs = []
    for it in tqdm(items, desc=desc, unit="img", leave=False):
        p = prepare(0, str(it.path))
        if p.x is None:
            raise InputError(f"{it.path}: {p.reason}")
        xs.append(p.x)
    sess = onnx_session(model_path, threads)
    return run_session(sess, np.stack(xs), outputs=("embedding",))["embedding"]


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Data:
    """The items each stage uses: training (paediatric ``train``), paediatric evaluation
    (``holdout``) and adult evaluation (``val``)."""

    train: list[Item]
    holdout: list[Item]
    adult: list[Item]
    split_sha256: str


def load_data(card: Mapping[str, Any], manifest: Path, data_root: Path | None,
              adult_manifest: Path | None, budget: Budget) -> Data:
    """Return the items, the paediatric split checked against the card (see :func:`card_split`)."""
    items, sha = card_split(card, manifest, data_root or manifest.parent)
    adult = adult_items(adult_manifest, None, budget.adult_per_class, budget.seed) \
        if adult_manifest else []
    return Data([it for it in items if it.part == "train"],
                [it for it in items if it.part == "holdout"], adult, sha)


def _evaluate_all(emb: Mapping[str, np.ndarray], data: Data, tasks: Sequence[Task],
                  budget: Budget) -> dict[str, Any]:
    out = {}
    for t in tasks:
        if t.source == "adult" and not data.adult:
            continue
        items = data.adult if t.source == "adult" else data.holdout
        out[t.key] = evaluate(emb[t.source], items, t, None, budget.eval_episodes,
                              budget.seed + 1)
    return out


def run(card: Mapping[str, Any], model_path: Path, data: Data, pre: Any, budget: Budget,
        encoders: Sequence[str] = ENCODERS, tasks: Sequence[Task] = TASKS) -> list[dict[str, Any]]:
    """Measure every encoder on every task; return one row per encoder."""
    import torch
    from tqdm import tqdm

    torch.set_num_threads(budget.threads)
    rows = []
    eval_sets = {"paediatric": data.holdout, "adult": data.adult}
    prefix, rest, train_rest = _chains(pre, budget.input_size)
    sets = {"train": data.train, **eval_sets}
    cached: dict[str, Any] = {}

    def images(name: str) -> Any:
        if name not in cached:
            cached[name] = cache(sets[name], prefix, pre, f"cache {name}")
        return cached[name]

    for key in tqdm(encoders, desc="few-shot", unit="encoder"):
        t0 = time.monotonic()
        record: dict[str, Any] = {"encoder": key}
        if key == "shipped":
            emb = {s: embed_shipped(model_path, card, its, budget.threads, f"embed {s}")
                   for s, its in eval_sets.items() if its}
            record["input_size"] = int(card["input"]["size"])
        else:
            # prepare.init (the shipped encoder) and the image cache set one thread per
            # process; training and embedding get the budget's.
            torch.set_num_threads(budget.threads)
            if key == "untrained_mobilenet_v2":
                torch.manual_seed(budget.seed)
                net = build_encoder("mobilenet_v2")
                record["train_seconds"] = 0.0
            else:
                net, info = train_encoder(key, data.train, images("train"), train_rest, budget)
                record.update(info)
            emb = {s: embed_torch(net, images(s), rest) for s, its in eval_sets.items() if its}
            record["torch_threads"] = torch.get_num_threads()
            record["input_size"] = budget.input_size
        record["tasks"] = _evaluate_all(emb, data, tasks, budget)
        record["seconds"] = time.monotonic() - t0
        log.info("%s: %s (%.0f s)", key, ", ".join(f"{k} {v['mean']:.3f}"
                                                    for k, v in record["tasks"].items()),
                 record["seconds"])
        rows.append(record)
    return rows


def counts(data: Data) -> dict[str, dict[str, int]]:
    """Return images and patients per class in each evaluation and training set (pure)."""
    out = {}
    for name, its in (("train", data.train), ("holdout", data.holdout), ("adult val", data.adult)):
        out[name] = {c: sum(1 for it in its if it.cls == c) for c in sorted({i.cls for i in its})}
        out[name]["patients"] = len({it.patient for it in its})
    return out


# --- the report -----------------------------------------------------------------------------------


NAMES = {"shipped": "MobileNetV2, the shipped model's embedding (144 px, trained on the binary task)",
         "untrained_mobilenet_v2": "MobileNetV2, untrained (random weights; the floor)",
         "mobilenet_v2": "MobileNetV2, prototypical network",
         "squeezenet1_1": "SqueezeNet 1.1, prototypical network",
         "efficientnet_lite0": "EfficientNet-Lite0 (timm), prototypical network"}


def _cell(r: Mapping[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{r['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def render_section(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """Return the ``## Few-shot`` section of docs/benchmarks.md (pure)."""
    b, n_query = settings["budget"], settings["tasks"][0]["n_query"]
    tasks = [t for t in TASKS if any(t.key in r["tasks"] for r in rows)]
    c = settings["counts"]
    lines = [SECTION, "",
             "Prototype classification as `triage adapt` does it (docs/few-shot.md): the "
             "unit-length mean embedding of K support images per class, each query to the nearest "
             "one. Cells: mean episode accuracy over "
             f"{b['eval_episodes']} episodes with its 95 % t-interval; the same episodes for every "
             "encoder. Every image in an episode comes from a different patient, so support and "
             f"query never share one; {n_query} queries per class.", "",
             "- Paediatric classes (Kermany et al. 2018, CC BY 4.0, doi:10.17632/rscbjbr9sj.2; the "
             "class from the file name): episodes from the `holdout` part of the patient-level "
             "split made again from the shipped card's seed and fractions (sha256 "
             f"`{settings['split_sha256'][:12]}`, the card's), which no encoder was trained on. "
             f"Holdout: {_counts(c['holdout'])}. The split takes `personN` as one patient "
             "whether the file says bacteria or virus (many numbers carry both), so an episode "
             "never puts one person number on both sides.",
             "- Adult COVID-19 against adult normal (" + ADULT_CITATION + "; `val` split, "
             f"{b['adult_per_class']} images per class drawn at random; {_counts(c['adult val'], False)}). "
             "**The two classes come from different hospitals** (normals from the RSNA/NIH "
             "collection, COVID-19 from several others), so this accuracy measures a hospital "
             "shortcut as much as disease; the set names no patients, so each image counts as its "
             "own patient and one patient's images may sit on both sides of an episode.",
             "- Encoders trained here: from scratch (`pretrained=False`), one grey channel, as "
             f"prototypical networks on {b['train_episodes']} episodes of "
             f"{b['train_way']}-way {b['train_shot']}-shot ({b['train_query']} queries per class) "
             f"from the `train` part only ({_counts(c['train'])}), at {b['input_size']} px, with "
             f"the shipped training augmentation, Adam lr {b['lr']}, a learned distance scale, "
             f"seed {b['seed']}, {b['threads']} CPU threads. That is a small CPU budget: these "
             "rows say what a few minutes of episodic training buys, not what the architectures "
             "can do.", "",
             "| encoder | " + " | ".join(t.title for t in tasks) + " | training time |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        cells = [_cell(r["tasks"][t.key]) if t.key in r["tasks"] else "n/a" for t in tasks]
        train = r.get("train_seconds")
        lines.append(f"| {NAMES.get(r['encoder'], r['encoder'])} | " + " | ".join(cells)
                     + f" | {'–' if not train else f'{train / 60:.1f} min'} |")
    lines += ["", "Chance is 0.333 for 3-way and 0.500 for 2-way episodes. The interval is "
              "over episodes drawn from these holdout images; it includes neither the variation "
              "another set of holdout patients would bring nor that between training runs "
              "(a rerun with another thread count moved a trained row's figures by up to 0.08). "
              "Device: "
              f"{settings['device']}; wall time of the whole run {settings['wall_minutes']:.1f} min "
              "(on cores shared with other jobs).", "",
              "Regenerate (writes this section and the JSON):", "", "```sh",
              str(settings["command"]), "```", ""]
    return "\n".join(lines)


def _counts(c: Mapping[str, int], patients: bool = True) -> str:
    parts = [f"{v} {k}" for k, v in c.items() if k != "patients"]
    return ", ".join(parts) + " images" + (f", {c.get('patients', 0)} patients" if patients else "")


def write_reports(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                  md_path: str | Path, json_path: str | Path) -> None:
    """Write the JSON results and the ``## Few-shot`` section of the Markdown (other sections
    are left as they are)."""
    from triage.training.benchmark import merge_section
    from triage.training.export import write_json

    write_json(json_path, {"settings": dict(settings), "results": list(rows)})
    md = Path(md_path)
    existing = md.read_text() if md.exists() else None
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(merge_section(existing, render_section(rows, settings), SECTION))
    tmp.replace(md)


def settings_of(budget: Budget, data: Data, command: str, device: str,
                wall_minutes: float, tasks: Sequence[Task] = TASKS) -> dict[str, Any]:
    """Return the record of what produced a run (pure)."""
    return {"budget": dataclasses.asdict(budget), "split_sha256": data.split_sha256,
            "counts": counts(data), "command": command, "device": device,
            "wall_minutes": wall_minutes, "tasks": [dataclasses.asdict(t) for t in tasks]}
