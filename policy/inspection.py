"""Which connections the policy can only honour by reading them.

A connection the proxy cannot read (the classifier found no protocol in the agent's first bytes,
or found one the proxy has no parser for) is relayed as opaque bytes and judged by `connect`
alone. That is only sound where every rule that could apply to it is a `connect` rule: if the
same bytes could be PostgreSQL to a PostgreSQL server, a rule on statements (`risk: [drop]`,
`operation: read`, `decision: mask`) or on HTTP requests (`path: /admin/*`) would go unheard.

`opaque_refusal` answers, for one agent, destination and label, whether relaying unread would
dodge such a rule, and names the rule. Rules are read in file order, as `decide` does, so a
rule shadowed by an earlier catch-all allow does not count.
"""

from __future__ import annotations

from policy.engine import Agent, Destination, Policy, Rule
from policy.model import Verdict

INSPECTED: dict[str, frozenset[str]] = {
    "http": frozenset({"http", "aws"}),
    "tls": frozenset({"http", "aws"}),
    "postgres": frozenset({"postgres"}),
}
"""Classifier labels the proxy parses, and the protocols of the operations its handlers judge."""

COULD_BE: dict[str, tuple[str, ...]] = {
    # Unrecognised bytes: a lenient server may still take them as any protocol we parse.
    "tcp": tuple(INSPECTED),
    # HTTP/2 with prior knowledge is HTTP that we do not parse.
    "http2": ("http",),
}

_CACHE: dict[tuple, str | None] = {}


def needs_reading(rule: Rule) -> bool:
    """A rule keyed on more than the connection: operations other than connect, objects, risks,
    request attributes, or masking."""
    if rule.risks or rule.objects or rule.attributes or rule.verdict is Verdict.MASK:
        return True
    return any(p not in ("connect", "*") for p in rule.operations)


def _for(rule: Rule, who: Agent, targets: set[str]) -> bool:
    if not rule.applies_to(who):
        return False
    return "*" in rule.targets or bool(targets.intersection(rule.targets))


def _unread_rule(policy: Policy, who: Agent, dest: Destination, label: str, explicit: bool) -> str | None:
    """The first rule that would need reading `label` at `dest`, or None when connect decides all."""
    targets = {t.name for t in policy.targets_for(dest)}
    ops = INSPECTED.get(label, frozenset()) | {label}
    for rule in policy.rules:
        if not _for(rule, who, targets):
            continue
        if rule.protocols:
            if ops.isdisjoint(rule.protocols):
                continue
        elif explicit:
            continue  # a label we never parse: only rules that name it are about it
        if needs_reading(rule) or rule.verdict is not Verdict.ALLOW:
            return rule.name  # a refusal or hold of `connect` under this protocol counts too
        if "*" in rule.operations and (not rule.protocols or ops <= set(rule.protocols)):
            return None  # a catch-all allow: every operation is decided without reading
        # an allow of `connect` only: the operations after it go on down the list
    if policy.default is Verdict.DENY and label in INSPECTED:
        return "default"  # operations past connect would meet the default deny
    return None


def _says_tcp(policy: Policy, rule_name: str) -> bool:
    """The rule that allowed the connection names plain tcp (itself or all of its targets)."""
    rule = next((r for r in policy.rules if r.name == rule_name), None)
    if rule is None:
        return False
    if "tcp" in rule.protocols:
        return True
    named = [policy.targets.get(t) for t in rule.targets if t != "*"]
    return bool(named) and "*" not in rule.targets and all(t is not None and t.protocol == "tcp" for t in named)


def opaque_refusal(policy: Policy, agent: str, dest: Destination, label: str, allowed_by: str) -> str | None:
    """Why a connection labelled `label`, allowed at connect by rule `allowed_by`, must not be
    relayed unread: the name of the rule it would dodge; None when relaying it is sound.

    `label` "tcp" (nothing recognised) and "http2" are judged against every protocol they could
    be; another label without a parser only against rules that name it in `protocol:`. A "tcp"
    connection allowed by a rule that names tcp (`protocol: tcp`, or targets with
    `protocol: tcp`) is relayed: the operator said so."""
    ident = policy.identity(agent)
    key = (id(policy), agent, dest, label, allowed_by, ident.key if ident is not None else None)
    hit = _CACHE.get(key, _MISS)
    if hit is not _MISS:
        return hit  # type: ignore[return-value]
    out = None
    if not (label == "tcp" and _says_tcp(policy, allowed_by)):
        who = policy.agent(agent)
        for could in COULD_BE.get(label, (label,)):
            d = Destination(dest.address, dest.port, dest.names, could)
            out = _unread_rule(policy, who, d, could, explicit=could not in INSPECTED)
            if out is not None:
                break
    if len(_CACHE) > 4096:
        _CACHE.clear()
    _CACHE[key] = out
    return out


_MISS = object()
