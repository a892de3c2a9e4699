"""The TLS refusal log (psik_api_server.auth.tls_refusals): once per address and reason per
window, then how many more there were. The real handshake is in tests/contract/test_tls.py."""

from __future__ import annotations

import logging
import ssl

import pytest

from psik_api_server.auth.tls_refusals import RefusalLog, describe


def test_the_same_refusal_is_logged_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RefusalLog(window=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="psik_api_server.tls"):
        for _ in range(5):
            log.refused("10.0.0.7", "the client certificate is not trusted")
        log.refused("10.0.0.8", "the client certificate is not trusted")  # another address
        log.refused("10.0.0.7", "the client presented no certificate")  # another reason
        now[0] = 61.0
        log.refused("10.0.0.7", "the client certificate is not trusted")
    assert [r.getMessage() for r in caplog.records] == [
        "TLS handshake with 10.0.0.7 refused: the client certificate is not trusted",
        "TLS handshake with 10.0.0.8 refused: the client certificate is not trusted",
        "TLS handshake with 10.0.0.7 refused: the client presented no certificate",
        "TLS handshake with 10.0.0.7 refused: the client certificate is not trusted"
        " (4 more like this in the last 60 s)",
    ]


def test_reasons_are_said_in_words() -> None:
    unverified = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unverified.verify_message = "unable to get local issuer certificate"
    assert (
        describe(unverified)
        == "the client certificate is not trusted (unable to get local issuer certificate)"
    )
    missing = ssl.SSLError(1, "peer did not return a certificate")
    missing.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert describe(missing) == "the client presented no certificate"
