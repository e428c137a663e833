"""Ingest by pull and by DICOMweb against plain C-STORE into triage, measured in one run.

The same synthetic DX instances (default 100 of 1024x1024, 16-bit) reach a fresh
`triage serve` four ways, in alternating rounds:

- ``c-store``: DCMTK storescu pushes them over one association (the peer baseline);
- ``stow-rs``: dicomweb-client POSTs them to /dicomweb/studies, 10 per request;
- ``c-move``:  `triage pull` finds them in Orthanc (C-FIND) and has Orthanc C-MOVE them
  to the daemon's listener;
- ``c-get``:   the same with C-GET (Orthanc sends back on the retrieve's association and
  `triage pull` takes each through the listener's durable path);
- ``c-get dry``: `triage pull --dry-run`: the command's start and its queries only, to
  show how much of a pull figure is not the transfer.

Each figure is wall time until every instance is durable and recorded (the pull figures
include `triage pull`'s start and its queries), and the ratio is throughput against
c-store. triage runs with durability on (fsync of file and directory).

    .venv/bin/python bench/pull_stow.py [--n 100] [--size 1024] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest import free_port, make_instances, send, wait_idle, wait_port  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123"
ORTHANC = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


class Pacs:
    """Orthanc in a temp dir holding the instances, knowing triage as AE TRIAGE."""

    def __init__(self, root: Path) -> None:
        self.root, self.http, self.dicom = root, free_port(), free_port()
        root.mkdir(parents=True)
        cfg = {"Name": "bench", "StorageDirectory": str(root / "db"),
               "IndexDirectory": str(root / "db"), "HttpPort": self.http,
               "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "Plugins": [],
               "SaveJobs": False, "StorageCompression": False}
        (root / "orthanc.json").write_text(json.dumps(cfg))
        exe = next((e for e in ORTHANC if Path(e).exists()), "Orthanc")
        self.proc = subprocess.Popen([exe, str(root / "orthanc.json")], cwd=root,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.http)
        wait_port(self.dicom)

    def call(self, method: str, path: str, body: bytes | None = None) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body,
                                     method=method)
        urllib.request.urlopen(req, timeout=120).read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def config(work: Path, port: int, web: int, pacs: Pacs, pull: str | None) -> Path:
    """The daemon's config (ORTHANC may C-STORE to it); with ``pull``, the pull command's."""
    text = (f'[dicom]\nport = {port}\npeers = {{ORTHANC = ["127.0.0.1"]}}\n'
            f'[web]\nport = {web}\ntoken = "{TOKEN}"\n'
            f'[storage]\ndata_dir = "{work / "var"}"\nmin_free_mb = 0\n'
            '[logging]\nlevel = "WARNING"\n')
    if pull:
        text += (f'[[pull.sources]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
                 f'port = {pacs.dicom}\nretrieve = "{pull}"\ntimeout_s = 600\n')
    path = work / f"{pull or 'serve'}.toml"
    path.write_text(text)
    return path


def stow(web: int, files: list[Path], batch: int = 10) -> None:
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    client = DICOMwebClient(url=f"http://127.0.0.1:{web}/dicomweb", timeout=600,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    for i in range(0, len(files), batch):
        answer = client.store_instances([dcmread(f) for f in files[i:i + batch]])
        if "FailedSOPSequence" in answer:
            raise RuntimeError("STOW-RS refused instances")


def one(mode: str, files: list[Path], work: Path, pacs: Pacs) -> float:
    """Ingest ``files`` into a fresh daemon by ``mode``; return wall seconds."""
    port, web = free_port(), free_port()
    serve_cfg = config(work, port, web, pacs, None)
    pacs.call("PUT", "/modalities/triage",
              json.dumps({"AET": "TRIAGE", "Host": "127.0.0.1", "Port": port}).encode())
    proc = subprocess.Popen([str(REPO / ".venv/bin/triage"), "serve", "--config", str(serve_cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_idle(proc.pid)
        t0 = time.perf_counter()
        if mode == "c-store":
            send(port, "TRIAGE", files)
        elif mode == "stow-rs":
            stow(web, files)
        else:
            r = subprocess.run([str(REPO / ".venv/bin/triage"), "pull", "--config",
                                str(config(work, port, web, pacs, mode.removesuffix(" dry")
                                           )), "--source", "pacs",
                                *(["--dry-run"] if mode.endswith("dry") else [])],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"triage pull failed: {r.stdout[-400:]} {r.stderr[-400:]}")
        dt = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    n = sum(1 for _ in (work / "var" / "spool").glob("??/*/*.dcm"))
    if n != (0 if mode.endswith("dry") else len(files)):
        raise RuntimeError(f"{mode}: triage stored {n} of {len(files)}")
    shutil.rmtree(work / "var")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "triage-bench-ingest")
    args = ap.parse_args()
    files = make_instances(args.cache / f"src-{args.n}-{args.size}", args.n, args.size)
    # Today's date, so a pull's default lookback (1 day) finds them.
    from pydicom import dcmread

    today = time.strftime("%Y%m%d")
    for f in files:
        ds = dcmread(f)
        if ds.StudyDate != today:
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
            ds.save_as(f)
    mb = sum(f.stat().st_size for f in files) / 1e6
    # "c-get dry": `triage pull --dry-run`, its start and queries without the retrieve.
    modes = ("c-store", "stow-rs", "c-move", "c-get", "c-get dry")
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        pacs = Pacs(Path(tmp) / "orthanc")
        try:
            for f in files:
                pacs.call("POST", "/instances", f.read_bytes())
            for r in range(args.rounds):
                for mode in modes:
                    dt = one(mode, files, Path(tmp), pacs)
                    times[mode].append(dt)
                    print(f"round {r + 1} {mode:9s} {dt:7.2f} s  {mb / dt:8.1f} MB/s  "
                          f"{len(files) / dt:7.1f} inst/s", flush=True)
        finally:
            pacs.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{len(files)} instances, {args.size}x{args.size} 16-bit, {mb:.0f} MB, median of "
          f"{args.rounds} round(s); triage fsync on; Orthanc {ORTHANC[0]} as the PACS")
    for mode in modes:
        print(f"{mode:9s} {med[mode]:7.2f} s {mb / med[mode]:8.1f} MB/s  {len(files) / med[mode]:7.1f} inst/s  "
              f"ratio to c-store (throughput) {med['c-store'] / med[mode]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
