"""Real DICOM peers for the tests: DCMTK's storescp and Orthanc, each on free loopback ports.

Both run as child processes of the test in its temp dir and are stopped at
teardown. Orthanc gets a generated JSON configuration (no plugins but, where asked,
DICOMweb; no remote access, no authentication, loopback only) and is queried
through its REST API.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import free_port, port_open, wait_for

ORTHANC_PATHS = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def _exe(name: str, package: str, candidates: tuple[str, ...] = ()) -> str:
    exe = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if exe is None:
        pytest.fail(f"{name} is not installed (Debian package {package}; "
                    "scripts/system-deps.sh installs it)")
    return exe


@dataclass
class StoreScp:
    """DCMTK storescp writing every received instance to its own file (+uf), so that a second
    C-STORE of the same SOP Instance UID shows up as a second file."""

    root: Path
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def out(self) -> Path:
        """Where received instances land."""
        return self.root / "received"

    def start(self) -> StoreScp:
        """Start listening; returns self once the port accepts connections."""
        self.out.mkdir(parents=True, exist_ok=True)
        log = (self.root / "storescp.log").open("ab")
        self.proc = subprocess.Popen(
            [_exe("storescp", "dcmtk"), "-aet", self.ae_title, "-od", str(self.out), "+uf",
             "-fe", ".dcm", *self.extra, str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, timeout=30)
        assert self.proc.poll() is None, (self.root / "storescp.log").read_text()
        return self

    def stop(self) -> None:
        """Stop listening."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    def files(self) -> list[Path]:
        """Every instance received so far (one file per C-STORE)."""
        return sorted(p for p in self.out.glob("*.dcm") if p.is_file())

    def received(self) -> Counter[str]:
        """How many times each SOP Instance UID was received."""
        return Counter(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                       for p in self.files())


def dicomweb_plugin() -> str:
    """The Debian orthanc-dicomweb plugin's library; fails the test when it is not installed."""
    for path in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                 "/usr/lib/orthanc/libOrthancDicomWeb.so"):
        if Path(path).exists():
            return path
    pytest.fail("the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb; "
                "scripts/system-deps.sh installs it)")


@dataclass
class Orthanc:
    """Orthanc as the PACS, in a temp dir, on free DICOM and HTTP ports."""

    root: Path
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    # DICOMweb: the Debian orthanc-dicomweb plugin, serving /dicom-web/ (and its STOW-RS client).
    dicomweb: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more configuration keys
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The REST API (and Orthanc Explorer at /app/explorer.html)."""
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The generated configuration."""
        return {
            "Name": "triage-test-pacs", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "Plugins": [],
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "DicomCheckCalledAet": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "RegisteredUsers": {}, "DicomAlwaysAllowStore": True,
            "OverwriteInstances": False, "StableAge": 1, "HttpDescribeErrors": True,
            "DicomModalities": {}, "OrthancPeers": {}, "SaveJobs": False, "MetricsEnabled": False,
            **({"Plugins": [dicomweb_plugin()],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {}}}
               if self.dicomweb else {}),
            **self.extra,
        }

    def start(self) -> Orthanc:
        """Start Orthanc; returns self once its REST API answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        log = (self.root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([_exe("Orthanc", "orthanc", ORTHANC_PATHS), str(cfg)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError("Orthanc exited:\n" + (self.root / "orthanc.log").read_text())
            try:
                return bool(self.get("/system")) and port_open(self.dicom_port)
            except OSError:
                return False

        wait_for(up, timeout=60, interval=0.2)
        return self

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, as its service does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send ``body`` (as JSON; bytes as they are) to a REST resource; return the JSON answer."""
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        """Make a DICOM node known to Orthanc (who may query and retrieve, and where C-MOVE sends)."""
        self.call("PUT", f"/modalities/{name}", {"AET": ae_title, "Host": host, "Port": port})

    def upload(self, paths: list[Path]) -> None:
        """Store DICOM files into Orthanc over its REST API."""
        for path in paths:
            self.call("POST", "/instances", path.read_bytes())

    def get(self, path: str) -> Any:
        """GET a REST resource and return its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource and return its body."""
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return bytes(r.read())

    def sop_uids(self) -> Counter[str]:
        """How many stored instances carry each SOP Instance UID (Orthanc keeps one per UID)."""
        out: Counter[str] = Counter()
        for iid in self.get("/instances"):
            out[self.get(f"/instances/{iid}/simplified-tags")["SOPInstanceUID"]] += 1
        return out
