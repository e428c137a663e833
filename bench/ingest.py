"""Ingest benchmark: DCMTK storescu -> DCMTK storescp vs storescu -> triage serve.

Sends the same set of synthetic 2048x2048 16-bit DX instances (default 200)
over one association to each receiver, in alternating rounds, and prints MB/s
and instances/s for each plus the ratio triage/storescp. triage runs with
durability on (fsync of file and directory, SQLite synchronous=FULL); storescp
writes files without fsync, so the comparison is conservative for triage.

    .venv/bin/python bench/ingest.py [--n 200] [--size 2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests import synth  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_instances(out: Path, n: int, size: int) -> list[Path]:
    """Write ``n`` DX instances of size x size, 16-bit, in a handful of studies (cached)."""
    files = sorted(out.glob("*.dcm"))
    if len(files) == n:
        return files
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = synth.phantom(size, size, bits_stored=16, seed=0)
    rng = np.random.default_rng(1)
    spec = synth.SynthSpec(rows=size, columns=size, bits_stored=16)
    study = generate_uid()
    for i in range(n):
        if i % 4 == 0:
            study = generate_uid()
        px = base.copy()
        px[:64, :64] = rng.integers(0, 65535, (64, 64), dtype=np.uint16)  # unique content
        synth.write(synth.make_dataset(spec, pixels=px, study_uid=study), out / f"{i:05d}.dcm")
    return sorted(out.glob("*.dcm"))


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def _tree_cpu(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants (from /proc)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def wait_idle(pid: int, timeout: float = 120.0) -> None:
    """Wait until the daemon's process tree uses under 5 % of a core over a second."""
    deadline = time.time() + timeout
    last = _tree_cpu(pid)
    while time.time() < deadline:
        time.sleep(1.0)
        now = _tree_cpu(pid)
        if now - last < 0.05:
            return
        last = now


def send(port: int, called: str, files: list[Path]) -> float:
    """Send every file over one association; return wall seconds."""
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or "Store Failed" in r.stderr:
        raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
    return dt


def run_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        dt = send(port, "STORESCP", files)
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(list(out.iterdir())) == len(files), "storescp did not write every file"
    shutil.rmtree(out)
    return dt


def run_triage(files: list[Path], work: Path, fsync: bool = True) -> float:
    data = work / "triage-var"
    port = free_port()
    cfg = work / "bench.toml"
    cfg.write_text(f'[dicom]\nport = {port}\n[web]\nport = {free_port()}\n'
                   f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 0\nfsync = {str(fsync).lower()}\n'
                   '[logging]\nlevel = "WARNING"\n')
    proc = subprocess.Popen([str(REPO / ".venv/bin/triage"), "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_idle(proc.pid)  # the decoder processes import torch and MONAI as the daemon starts
        dt = send(port, "TRIAGE", files)
    finally:
        proc.terminate()
        proc.wait(60)
    n = sum(1 for _ in (data / "spool").glob("??/*/*.dcm"))
    assert n == len(files), f"triage stored {n} of {len(files)}"
    shutil.rmtree(data)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-fsync", action="store_true",
                    help="run triage with storage.fsync = false (crash-safe, not power-cut-safe)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "triage-bench-ingest")
    args = ap.parse_args()
    files = make_instances(args.cache / f"src-{args.n}-{args.size}", args.n, args.size)
    mb = sum(f.stat().st_size for f in files) / 1e6
    times: dict[str, list[float]] = {"storescp": [], "triage": []}
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        for r in range(args.rounds):
            for name in ("storescp", "triage"):
                dt = (run_storescp(files, Path(tmp)) if name == "storescp"
                      else run_triage(files, Path(tmp), fsync=not args.no_fsync))
                times[name].append(dt)
                print(f"round {r + 1} {name:9s} {dt:7.2f} s  {mb / dt:8.1f} MB/s  "
                      f"{len(files) / dt:7.1f} inst/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{len(files)} instances, {args.size}x{args.size} 16-bit, {mb:.0f} MB, "
          f"median of {args.rounds} round(s), one association each; triage fsync "
          f"{'off' if args.no_fsync else 'on'}")
    for name in ("storescp", "triage"):
        print(f"{name:9s} {mb / med[name]:8.1f} MB/s  {len(files) / med[name]:7.1f} instances/s")
    print(f"ratio triage/storescp (throughput): {med['storescp'] / med['triage']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
