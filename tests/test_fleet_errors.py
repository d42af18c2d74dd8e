"""How an operator's CLI names a recorder's refusal, whichever way TLS 1.3 delivers it.

A TLS 1.3 server verifies the client certificate after the client's handshake is done, so a refusal
reaches the client as an alert, a clean close, or — when the request was still unread on the
server — a TCP reset. All three must say which certificate to replace (tests/test_central_read.py
shows it against a real recorder; which of the three arrives there is a race)."""

from __future__ import annotations

import errno
from pathlib import Path

import aiohttp
import pytest

from recorder.fleet import Fleet, OperatorCredentials

CREDS = OperatorCredentials(Path("/ops/operator.crt"), Path("/ops/operator.key"), Path("/ops/ca.pem"))


@pytest.mark.parametrize("error", [
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"),
    aiohttp.ClientOSError(errno.EPIPE, "Broken pipe"),
], ids=["closed", "reset", "broken-pipe"])
def test_a_refusal_after_the_handshake_names_the_operator_certificate(error):
    said = str(Fleet("https://recorder.test:8443", CREDS)._explain(error))
    assert "operator certificate /ops/operator.crt" in said and "interlock recorder operator" in said, said


def test_other_os_errors_are_not_blamed_on_the_certificate():
    said = str(Fleet("https://recorder.test:8443", CREDS)._explain(aiohttp.ClientOSError(errno.ENOSPC, "No space")))
    assert "certificate" not in said and "No space" in said, said
