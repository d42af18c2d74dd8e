"""Hostile input to the recorder that the shape checks alone did not cover: JSON nested past the
parser's recursion limit (unauthenticated on /v1/join, a host's cert on /v1/ingest and the answer
channel), a non-finite long-poll wait, and approval records whose host-set numbers are not numbers.
Each is refused with a 4xx and a stored refusal (or rendered), never a 500 or a busy loop."""

from __future__ import annotations

import json
import re
import time

import pytest
from central_kit import call, last_refusal_id, refusals

from lab.central import Central, Client

DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.fixture(scope="module")
def recorder(lab, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("web") / "web.yaml"
    cfg.write_text("origin: https://recorder.test:8443\n"
                   "oidc: {issuer: 'http://127.0.0.1:9', client_id: interlock-approvals}\n"
                   "approvers: {groups: [dba]}\n")
    with Central(lab.b, web_config=cfg) as rec:
        yield rec


def test_deeply_nested_json_is_refused_not_a_500(recorder, joined):
    h = joined()
    anon = Client(recorder.url, recorder.ca_pem)
    mark = last_refusal_id(recorder)
    deep_join = b'{"token": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    r1 = call(recorder, anon, "POST", "/v1/join", deep_join)
    r2 = call(recorder, h.client, "POST", "/v1/ingest", DEEP)
    r3 = call(recorder, h.client, "POST", "/v1/decisions/ack", DEEP)
    assert [r1.status, r2.status, r3.status] == [400, 400, 400], (r1.body[:200], r2.body[:200], r3.body[:200])
    assert [s for s, _, _ in refusals(recorder, mark)] == [400, 400, 400]
    assert "internal error" not in recorder.log.read_text()
    assert h.ingest(h.records(2)).status == 200  # control: the same host's good batch is stored


def test_a_nested_record_body_is_stored_as_text(recorder, joined):
    """A body is the host's text, stored verbatim: nesting deeper than the parser goes is no reason
    for a 500 (the derived index simply has no session for it)."""
    h = joined()
    body = "[" * 100_000 + "]" * 100_000
    r = h.ingest(h.extend([("approval", body), ("session-open", body)]))
    assert r.status == 200, r.body[:300]
    assert recorder.psql(f"SELECT count(*) FROM records WHERE host_id = '{h.host_id}'") == "2"


@pytest.mark.parametrize("wait", ["nan", "-nan", "-inf"])
def test_a_non_finite_poll_wait_is_refused_or_bounded(recorder, joined, wait):
    h = joined()
    t0 = time.monotonic()
    r = h.get(f"/v1/decisions?wait={wait}")
    if wait == "-inf":  # clamped to no wait at all: answered at once, empty
        assert r.status == 200 and r.json() == {"decisions": []}
    else:
        assert r.status == 400 and "seconds" in r.json()["error"], r.body
        assert time.monotonic() - t0 < 30


def test_an_approval_with_non_numeric_times_does_not_break_the_pending_list(recorder, joined):
    """A host (root on it) writes what its approval records say; a bad timeout_at on one host's
    approval must not take the page down for every other host's approvals."""
    from central.web.app import _ts
    from central.web.store import _approval

    bad = [{"timeout_at": "soon"}, {"timeout_at": [1]}, {"timeout_at": 1e999}, {"timeout_at": {"a": 1}}]
    assert _ts(None) == "" and _ts(0) == "1970-01-01 00:00:00 UTC"
    for extra in bad:
        assert _ts(extra["timeout_at"]) == "" and _ts(1e300) == ""
        row = {"body": json.dumps({"id": "a1", "status": "pending", **extra}), "host": "h-x", "seq": 1}
        a = _approval(row)
        assert a["time_left"] >= 0 and a["time_left"] != float("inf")
    for objects in (5, -1.5, True, {"a": 1}, "t1"):  # the pending list joins them: each is shown as one item
        a = _approval({"body": json.dumps({"id": "a1", "status": "pending", "objects": objects}), "host": "h-x", "seq": 1})
        assert a["objects"] == [objects]
    assert _approval({"body": json.dumps({"id": "a1", "objects": '["t1", "t2"]'}), "host": "h", "seq": 1})["objects"] == ["t1", "t2"]


def test_a_hosts_approval_id_cannot_point_the_answer_at_another_hosts_approval():
    """Approval ids are the host's: one chosen as '../h-victim/ID' must stay one path segment in the
    page's forms and links, so an approver's click answers the approval shown, nothing else."""
    from urllib.parse import urljoin

    import jinja2

    from central.web.app import FILTERS, HERE

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters.update(FILTERS)
    evil = {"id": "../h-victim/ap1", "host": "h-evil", "host_name": "h-evil", "session": "../../logout",
            "summary": "SELECT 1", "time_left": 60, "decision": None}
    html = env.get_template("_pending.html").render(approvals=[evil], csrf="t", prefix="/ui")
    actions = re.findall(r'action="([^"]+)"', html) + re.findall(r'href="([^"]+)"', html)
    assert len(actions) == 4
    for a in actions:
        resolved = urljoin("https://recorder.test/ui/", a)
        assert resolved.startswith("https://recorder.test/ui/approvals/h-evil/") or \
            resolved.startswith("https://recorder.test/ui/sessions/h-evil/"), resolved
    assert "h-victim/ap1" not in html.replace("%2F", "/").replace("../h-victim/ap1", "")  # only as the encoded id


def test_an_integer_past_a_floats_range_in_a_derived_field_is_stored(recorder, joined):
    """A session's `started` or an approval's `timeout_at` of 10**400 (JSON allows it) used to end
    the batch in a 500 (OverflowError converting it for the derived index), so that host's chain
    could never move on; the record is stored and the index holds no value for it."""
    h = joined()
    big = "1" + "0" * 400
    recs = h.extend([("approval", '{"id": "ap-big", "session": "s1", "status": "pending", "timeout_at": BIG}'.replace("BIG", big)),
                     ("session-open", '{"id": "s-big", "agent": "bot", "started": BIG, "bytes_up": BIG}'.replace("BIG", big))])
    r = h.ingest(recs)
    assert r.status == 200, r.body[:300]
    assert recorder.psql(f"SELECT timeout_at IS NULL FROM approvals WHERE host_id = '{h.host_id}'") == "t"
    assert recorder.psql(f"SELECT started IS NULL, bytes_up IS NULL FROM sessions WHERE host_id = '{h.host_id}'") == "t|t"


def test_a_body_trickled_a_byte_at_a_time_is_cut_off_and_recorded(recorder):
    """Slowloris without credentials: a join body that never completes used to hold its connection
    for good (4,080 of them took every file descriptor of the recorder here, and the hosts' shipping
    with them). Now the body has BODY_SECONDS to arrive, then 408 and a stored refusal."""
    import socket
    import ssl

    from central.app import BODY_SECONDS
    from lab.central import in_host

    mark = last_refusal_id(recorder)

    def trickle() -> bytes:
        ctx = ssl.create_default_context(cafile=str(recorder.ca_pem))
        ctx.check_hostname = False
        with ctx.wrap_socket(socket.create_connection((recorder.host.addr4, recorder.port), timeout=10)) as s:
            s.sendall(b"POST /v1/join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            s.settimeout(1.0)
            t0, got = time.monotonic(), b""
            while time.monotonic() - t0 < BODY_SECONDS * 4:
                try:
                    s.sendall(b" ")
                    got += s.recv(4096)
                    if got:
                        return got
                except TimeoutError:
                    continue
                except OSError:
                    return got
            return got

    reply = in_host(recorder.host, trickle)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert [s for s, _, _ in refusals(recorder, mark)] == [408]
    anon = Client(recorder.url, recorder.ca_pem)  # control: a join body sent at once is read and judged
    r = call(recorder, anon, "POST", "/v1/join", {"token": "il1.x", "csr": "x", "signing_key": "x"})
    assert r.status == 401
