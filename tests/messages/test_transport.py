"""The transports against independent peers: MLLP (plain and TLS) to the hl7-package RIS, HTTP
to the fhir.resources-validating endpoint (tests/ris_peers.py)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_certs
from tests.messages.facts_for_tests import facts
from tests.ris_peers import FhirServer, MllpRis
from triage.messages.facts import DELIVERED, REFUSED, RETRY
from triage.messages.fhir import build_bundle, encode
from triage.messages.hl7 import Endpoints, build_oru, read_ack
from triage.messages.transport import MllpConnection, TransportError, client_context, post_bundle

ORU = build_oru(facts(), Endpoints())
CONTROL = facts().control_id


@pytest.fixture
def ris() -> Iterator[MllpRis]:
    peer = MllpRis().start()
    yield peer
    peer.stop()


def test_one_connection_carries_messages_one_at_a_time(ris: MllpRis) -> None:
    codes = iter(["AA", "AE", "AR"])
    ris.answer = lambda m: next(codes)
    with MllpConnection("127.0.0.1", ris.port, 10) as conn:
        states = [read_ack(conn.exchange(ORU), CONTROL).state for _ in range(3)]
    assert states == [DELIVERED, RETRY, REFUSED]
    assert [str(m.segment("MSH")[10]) for m in ris.received] == [CONTROL] * 3


def test_nothing_listening_and_no_answer_are_transport_errors(ris: MllpRis) -> None:
    closed = MllpRis()  # never started
    with pytest.raises(TransportError, match="cannot connect"):
        MllpConnection("127.0.0.1", closed.port, 5).__enter__()
    ris.answer = lambda m: "hold"
    with MllpConnection("127.0.0.1", ris.port, 0.5) as conn, \
            pytest.raises(TransportError, match="no answer"):
        conn.exchange(ORU)


def test_mllp_over_tls_checks_the_ris_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs["server.pem"], certs["server.key"])
    peer = MllpRis(tls=server).start()
    try:
        good = client_context(str(certs["ca.pem"]))
        with MllpConnection("localhost", peer.port, 10, good) as conn:
            assert read_ack(conn.exchange(ORU), CONTROL).state == DELIVERED
        other = make_certs(tmp_path / "other")
        with pytest.raises(TransportError):
            MllpConnection("localhost", peer.port, 10,
                           client_context(str(other["ca.pem"]))).__enter__()
        assert len(peer.received) == 1
    finally:
        peer.stop()


def test_fhir_answers_map_to_outcomes() -> None:
    server = FhirServer().start()
    try:
        body = encode(build_bundle(facts()))
        assert post_bundle(server.url, body, 10, bearer_token="x").state == DELIVERED
        server.unavailable = True
        out = post_bundle(server.url, body, 10)
        assert (out.state, out.status, out.text) == (RETRY, 503, "HTTP 503: server busy")
        server.unavailable = False
        bad = post_bundle(server.url, '{"resourceType": "Bundle", "type": 7}', 10)
        assert bad.state == REFUSED and bad.status == 400 and "invalid Bundle" in bad.text
        assert len(server.bundles) == 1
    finally:
        server.stop()
    assert post_bundle(server.url, body, 5).state == RETRY  # nothing listens any more
