"""The recorder's database down: hosts get a prompt 503 to retry (never a hang, never a 200)."""

from __future__ import annotations

import pytest
from central_kit import join

from lab.central import Central


@pytest.fixture(scope="module")
def recorder(lab):  # its own: this test stops the database
    with Central(lab.b) as rec:
        yield rec


def test_database_down_is_a_503_the_shipper_can_retry(recorder, tmp_path):
    h = join(recorder, tmp_path, "while-down")
    assert h.ingest(h.records(3)).status == 200  # control
    recorder.pg.stop()
    # (a hang would end in the client's own timeout, an exception, not a status)
    replies = [h.ingest(h.records(2)), h.get("/v1/head"), h.ingest(h.sent[-2:])]
    assert [r.status for r in replies] == [503, 503, 503]
    assert all("unavailable" in r.json()["error"] for r in replies)
    health = h.get("/healthz")
    assert health.status == 503
