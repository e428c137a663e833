"""Where the CPU went in a py-spy profile of the daemon, per pipeline stage.

Reads py-spy's raw (collapsed-stack) output, e.g. from ``bench/e2e.py --profile DIR``,
and attributes each sample to the first stage whose marker appears in its stack,
reading the stage list from the top. Prints samples and share per stage and process.

    .venv/bin/python bench/profile_summary.py runs/prof/raw.txt [--rate 100]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

# (stage, markers): a sample belongs to the first stage with a marker in its stack.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("imports (process start)", ("_find_and_load",)),
    ("ingest: receive and spool", ("dicom_io/spool.py", "dicom_io/scp.py", "pynetdicom/")),
    ("decode: parse header", ("read_file_header",)),
    ("decode: parse dataset", ("read_dataset",)),
    ("decode: pixel data", ("raw_pixels",)),
    ("decode: reduce (box average)", ("box_average",)),
    ("decode: modality LUT + VOI window", ("apply_modality_lut", "_voi (")),
    ("preprocess: display copy", ("display_copy",)),
    ("preprocess: guard input", ("guard_input",)),
    ("preprocess: MONAI chain", ("transforms.py", "monai/")),
    ("decode: other", ("prepare (triage/imaging/prepare.py",)),
    ("guard", ("guard.py",)),
    ("inference", ("scoring.py", "onnxruntime")),
    ("heatmaps", ("heatmap.py",)),
    ("record result", ("_record (", "outbox.py")),
    ("worklist render", ("render_worklist", "worklist.py", "jinja2/")),
    ("claims and leases", ("leases.py",)),
    ("scheduler and sweeps", ("apscheduler/", "complete_due", "daemon.py")),
    ("database other", ("sqlalchemy/",)),
    ("pool: pickling and queues", ("multiprocessing/", "concurrent/futures")),
]


# Leaf frames of a thread that waits (py-spy does not always see such a thread as idle).
WAITING = ("_worker (concurrent/futures/thread.py", "wait (threading.py", "_recv_bytes (",
           "wait_result_broken_or_wakeup (", "select (", "poll (")


def stage_of(stack: str) -> str:
    """Return the stage a collapsed stack belongs to."""
    leaf = stack.rsplit(";", 1)[-1]
    if leaf.startswith(WAITING):
        return "waiting (not CPU)"
    for name, markers in STAGES:
        if any(m in stack for m in markers):
            return name
    return "other"


def process_of(stack: str) -> str:
    """'daemon' or 'decoder' (a forkserver child), from the stack's process frames."""
    return "decoder" if "forkserver" in stack else "daemon"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy's samples per second")
    args = ap.parse_args()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in args.profile.read_text().splitlines():
        m = re.match(r"(.*) (\d+)$", line)
        if m:
            counts[(process_of(m[1]), stage_of(m[1]))] += int(m[2])
    waiting = sum(n for (_, stage), n in counts.items() if stage == "waiting (not CPU)")
    total = sum(counts.values()) - waiting or 1
    print(f"{'process':8} {'stage':36} {'CPU s':>7} {'share':>6}")
    for (proc, stage), n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if stage != "waiting (not CPU)":
            print(f"{proc:8} {stage:36} {n / args.rate:7.2f} {100 * n / total:5.1f}%")
    print(f"{'':8} {'total':36} {total / args.rate:7.2f}")
    print(f"{'':8} {'(threads seen waiting, left out)':36} {waiting / args.rate:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
