"""The HTTP handler's per-request shortcuts give what the long way gives: the `http` event's data
written directly equals the recorder's JSON encoding, and the per-connection decision cache serves
only allowed decisions, only under the policy they were made under."""

from __future__ import annotations

import json

import pytest

from policy.engine import Destination, load
from policy.model import Decision, Operation, Verdict
from proxy.gate import DecisionCache
from proxy.http.handler import http_record

POLICY = """\
default: deny
targets:
  web: {address: "10.0.0.2", port: 80}
rules:
  - name: no-admin
    target: web
    path: "/admin/*"
    decision: deny
  - name: no-debug
    target: web
    header: {x-debug: "on"}
    decision: deny
  - name: web-ok
    target: web
    decision: allow
"""


@pytest.mark.parametrize("text", ["/small", "é/ü\u2028", 'a"b\\c', "\x00\x1f\x7f", "GET", "x" * 600, "😀", ""])
def test_http_record_is_the_recorders_json(text):
    fields = {"method": text[:16], "host": text, "path": text, "status": 200, "up": 17, "down": 1 << 40,
              "outcome": text, "ms": 0.1 + 0.2, "verdict": "allow", "rule": text}
    assert http_record(**fields) == json.dumps(fields, sort_keys=True)
    assert json.loads(http_record(**fields)) == fields


def test_decision_cache_keeps_allows_only_and_only_under_their_policy(tmp_path):
    first, second = (load(tmp_path / "p.yaml", POLICY), load(tmp_path / "p.yaml", POLICY))
    cache = DecisionCache()
    op = Operation("http", "GET", ("10.0.0.2/small",))
    allow, deny = Decision(Verdict.ALLOW, "web-ok", "r"), Decision(Verdict.DENY, "no-admin", "r")
    assert cache.get(first, ("a",)) is None
    cache.put(first, ("a",), op, allow, "{}")
    cache.put(first, ("b",), op, deny, "{}")
    assert cache.get(first, ("a",)) == (op, allow, "{}")
    assert cache.get(first, ("b",)) is None, "a refusal is judged and recorded every time"
    assert cache.get(second, ("a",)) is None, "a reloaded policy is a new generation"
    assert cache.get(first, ("a",)) is None, "and the old one's entries are gone"


def test_the_decision_depends_on_no_attribute_the_shape_leaves_out(tmp_path):
    """The HTTP shape keys on the headers rules name (Policy.attribute_names); a header no rule
    names changes no decision."""
    policy = load(tmp_path / "p.yaml", POLICY)
    assert policy.attribute_names() == ("header.x-debug", "path")
    dest = Destination("10.0.0.2", 80, (), "http")

    def decide(**attrs: str) -> str:
        op = Operation("http", "GET", ("10.0.0.2/small",), attributes={"path": "/small", **attrs})
        return policy.decide("bot", dest, op).rule

    assert decide() == decide(**{"header.user-agent": "x"}) == "web-ok"
    assert decide(**{"header.x-debug": "on"}) == "no-debug"


def test_remembered_text_stays_small():
    """The caches on the request path keep only short agent-chosen text: a kept-alive agent sending
    heads of 64 KiB must not make them hold megabytes."""
    from proxy import naming
    from proxy.http import handler

    naming._host_only.cache_clear()
    handler._recorded_path_cached.cache_clear()
    long_host, long_target = "a" * 5000 + ".example", "/" + "x" * 5000
    assert naming.host_only(long_host.upper() + ":443") == long_host
    assert handler._recorded_path(long_target, long_target, "") == long_target[:500]
    assert naming._host_only.cache_info().currsize == 0 and handler._recorded_path_cached.cache_info().currsize == 0
    assert naming.host_only("WWW.Example.:8080") == "www.example" and naming._host_only.cache_info().currsize == 1
