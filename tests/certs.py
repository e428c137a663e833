"""Throw-away certificates for TLS tests, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certs(root: Path, client: bool = False) -> dict[str, Path]:
    """A CA, a server certificate for localhost and 127.0.0.1 and, with ``client``, a client
    certificate signed by the same CA. Returns {name: path}."""
    root.mkdir(parents=True, exist_ok=True)
    p = {n: root / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem",
                               "ext.cnf", "client.key", "client.csr", "client.pem")}
    p["ext.cnf"].write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")

    def ssl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]))
    names = ["server", "client"] if client else ["server"]
    for name in names:
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(p[f"{name}.key"]), "-out", str(p[f"{name}.csr"]))
        ssl("x509", "-req", "-in", str(p[f"{name}.csr"]), "-CA", str(p["ca.pem"]), "-CAkey",
            str(p["ca.key"]), "-CAcreateserial", "-days", "2", "-extfile", str(p["ext.cnf"]),
            "-out", str(p[f"{name}.pem"]))
    return p
