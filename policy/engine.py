"""The policy: agents, targets and rules, and the one function every protocol asks.

decide(agent, destination, operation) walks the rules in file order and the first that matches
wins; nothing matching means the file's `default` (deny unless the file says otherwise). File
order is what an operator reads top to bottom, so it is what decides."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from policy.document import LineDict, PolicyError, read
from policy.model import Decision, Operation, Verdict

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
DEFAULT_APPROVAL_TIMEOUT = 300.0
# A connection from another host into an agent's listening socket (proxy/inbound.py). Only rules
# that name this operation literally match it, and the file's `default` never allows it: an
# agent accepts a connection from outside only where a rule says so (docs/POLICY.md).
INBOUND = "inbound"


def parse_duration(text: str | int | float) -> float:
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ValueError(f"'{text}' is not a duration (examples: 30s, 5m, 2h, 30d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Destination:
    """Where a connection goes, as the proxy knows it: address, port, names, protocol."""

    address: str
    port: int
    names: tuple[str, ...] = ()  # SNI, Host header, names the agent resolved to this address
    protocol: str = "tcp"


@dataclass
class Agent:
    name: str
    groups: tuple[str, ...] = ()
    # The agent's verified OIDC identity as flattened claims (identity/agents.py), None without one.
    claims: dict | None = None


IDENTITY_RULE = "identity"  # the rule name of a refusal for an invalid or expired identity token


def _no_identity(agent: str) -> None:
    return None


_identity_source: Callable[[str], object | None] = _no_identity


def set_identity_source(source: Callable[[str], object | None] | None) -> None:
    """Where every policy of this process finds agents' bound identities (the proxy: its
    identity.agents.IdentityBook.get); None: no agent has one. A Policy's own identity_of wins."""
    global _identity_source
    _identity_source = source or _no_identity


def identity_matches(wanted: tuple[tuple[str, tuple[str, ...]], ...], claims: dict | None) -> bool:
    """Every claim a rule names is present and one of its values matches one of the globs
    (case-sensitive: subjects and repository names are). No identity matches no such rule."""
    if claims is None:
        return False
    for name, pats in wanted:
        value = claims.get(name)
        if value is None:
            return False
        values = value if isinstance(value, list) else (value,)
        if not any(fnmatch.fnmatchcase(v, p) for v in values for p in pats):
            return False
    return True


@dataclass
class Target:
    name: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hostnames: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    protocol: str | None = None
    # The stored credential the proxy logs in with, and the role it logs in as: one value, or a
    # mapping from agent name, group:NAME or "*" to a value (see Policy.for_agent).
    credentials: str | dict[str, str] | None = None
    upstream_user: str | dict[str, str] | None = None
    tls: str = "intercept"  # or "passthrough": not decrypted (pinned certificates), judged by SNI

    def matches(self, dest: Destination) -> bool:
        if self.ports and dest.port not in self.ports:
            return False
        if self.protocol and self.protocol != dest.protocol:
            return False
        if not self.networks and not self.hostnames:
            return True
        try:
            ip = ipaddress.ip_address(dest.address)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in self.networks if net.version == ip.version):
            return True
        return self.names_match(dest.names)

    def names_match(self, names: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatch(n.lower(), h) for n in names for h in self.hostnames)


@dataclass
class Rule:
    name: str
    line: int
    verdict: Verdict
    agents: tuple[str, ...] = ("*",)
    targets: tuple[str, ...] = ("*",)
    operations: tuple[str, ...] = ("*",)
    objects: tuple[str, ...] = ()
    risks: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    timeout: float | None = None
    mask: tuple[str, ...] = ()
    reason: str = ""
    # Request attributes (HTTP method, host, path, query, header.NAME) -> globs, all must match.
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # True: only operations on objects this session created itself; False: only the others (an
    # operation that does not say counts as not created in the session); None: either.
    created_in_session: bool | None = None
    # The agent's identity claims -> globs, all must match (`identity:`; see identity_matches).
    identity: tuple[tuple[str, tuple[str, ...]], ...] = ()
    approvers: dict | None = None  # approve only: {"groups": [...], "four_eyes": bool}

    def applies_to(self, agent: Agent) -> bool:
        """The rule's agent conditions: its `agent:` names/groups and its `identity:` claims."""
        if "*" not in self.agents and agent.name not in self.agents and \
                not any(f"group:{g}" in self.agents for g in agent.groups):
            return False
        return not self.identity or identity_matches(self.identity, agent.claims)

    @property
    def whole_connection(self) -> bool:
        """True when the rule names no operation detail: it matches the connection and every
        operation on it alike, so one approval of the connection is its one approval."""
        return self.operations == ("*",) and not self.objects and not self.risks and not self.attributes

    def matches(self, agent: Agent, target_names: set[str], op: Operation) -> bool:
        if op.action == INBOUND and INBOUND not in self.operations:
            return False
        if not self.applies_to(agent):
            return False
        if "*" not in self.targets and not target_names.intersection(self.targets):
            return False
        if self.protocols and op.protocol not in self.protocols:
            return False
        if not any(fnmatch.fnmatchcase(op.action.lower(), pat) for pat in self.operations):
            return False
        if self.objects and not any(fnmatch.fnmatchcase(o.lower(), pat) for o in op.objects for pat in self.objects):
            return False
        if self.risks and not set(self.risks).intersection(op.risks):
            return False
        if self.created_in_session is not None and \
                (op.attributes.get("created_in_session") == "1") is not self.created_in_session:
            return False
        for name, pats in self.attributes:
            value = op.attributes.get(name)
            if value is None:
                return False
            folded = value if name in _CASE_SENSITIVE else value.lower()
            if not any(fnmatch.fnmatchcase(folded, p) for p in pats):
                return False
        return True


@dataclass
class Policy:
    source: str
    agents: dict[str, Agent] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    default: Verdict = Verdict.DENY
    # agent name -> its bound identity (identity.agents.AgentIdentity: .claims, .key, .refusal())
    # or None; None here: the process's source (set_identity_source), which the proxy sets.
    identity_of: Callable[[str], object | None] | None = field(default=None, repr=False, compare=False)
    _identity_keys: dict = field(default_factory=dict, repr=False, compare=False)  # agent -> binding key of the memo
    # decide() is a pure function of its inputs and the (never mutated) loaded policy, and a
    # protocol handler asks it the same question for every statement or request: remember answers.
    _memo: dict = field(default_factory=dict, repr=False, compare=False)
    _attr_names: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    _targets_memo: dict = field(default_factory=dict, repr=False, compare=False)

    def targets_for(self, dest: Destination) -> list[Target]:
        """The targets dest is in, in file order. Remembered like decide(): every new connection
        asks it, and Target.matches parses the address (ipaddress) each time."""
        hit = self._targets_memo.get(dest)
        if hit is None:
            hit = tuple(t for t in self.targets.values() if t.matches(dest))
            if len(self._targets_memo) >= 8192:
                self._targets_memo.clear()
            self._targets_memo[dest] = hit
        return list(hit)

    def for_agent(self, value: str | dict[str, str] | None, agent: str) -> str | None:
        """A per-agent target setting: the value itself, or the mapping's entry for the agent's
        name, else its first group (as group:NAME), else "*"."""
        if value is None or isinstance(value, str):
            return value
        if agent in value:
            return value[agent]
        who = self.agents.get(agent)
        for g in who.groups if who else ():
            if f"group:{g}" in value:
                return value[f"group:{g}"]
        return value.get("*")

    def attribute_names(self) -> tuple[str, ...]:
        """The operation attributes any rule names (method, path, header.NAME, …), sorted: a
        decision depends on these attributes of an operation and on no other (see decide), so
        they are what a cache of decisions keys on besides action, objects and risks."""
        names = self._attr_names
        if names is None:
            names = self._attr_names = tuple(sorted({n for r in self.rules for n, _ in r.attributes}))
        return names

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def identity(self, agent: str):
        """The agent's bound OIDC identity (identity/agents.py AgentIdentity), or None."""
        return (self.identity_of or _identity_source)(agent)

    def decide(self, agent: str, dest: Destination, op: Operation) -> Decision:
        """The first matching rule's decision. A destination known by several names is judged
        under each name alone and the most restrictive answer wins: which of an address's names
        a connection "means" is the agent's to choose, so no name may lend it a looser rule.
        An agent whose identity token is invalid or expired is refused everything (rule identity)."""
        ident = self.identity(agent)
        if ident is not None:
            refused = ident.refusal()
            if refused is not None:
                return Decision(Verdict.DENY, IDENTITY_RULE, refused)
        if self._identity_keys.get(agent) != (bound := ident.key if ident is not None else None):
            self._memo.clear()  # decided under another identity of this agent: never served again
            self._identity_keys[agent] = bound
        if len(dest.names) > 1:
            return max((self.decide(agent, Destination(dest.address, dest.port, (n,), dest.protocol), op)
                        for n in dest.names), key=lambda d: _STRICTNESS[d.verdict])
        names = self.attribute_names()
        key = (agent, dest, op.protocol, op.action, op.objects, op.risks, op.attributes.get("created_in_session"),
               *(op.attributes.get(n) for n in names))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._decide(agent, dest, op)
            if len(self._memo) >= 8192:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def may_permit(self, agent: str, dest: Destination, protocol: str, actions: tuple[str, ...]) -> bool:
        """Whether this policy could let the agent do any of `actions` at dest: the default is not
        deny, or an allow/approve/mask rule that can apply to the agent, the destination's targets
        and the protocol has an operation glob matching one of them (its objects, risks and other
        conditions aside). A protocol may then open a session that can do none of them (PostgreSQL:
        read-only on the server). Rules with request attributes (HTTP keys) never apply here."""
        if self.default is not Verdict.DENY:
            return True
        who = self.agent(agent)
        names = {t.name for t in self.targets_for(dest)}
        for rule in self.rules:
            if rule.verdict is Verdict.DENY or rule.attributes:
                continue
            if not rule.applies_to(who):
                continue
            if "*" not in rule.targets and not names.intersection(rule.targets):
                continue
            if rule.protocols and protocol not in rule.protocols:
                continue
            if any(fnmatch.fnmatchcase(a, pat) for a in actions for pat in rule.operations):
                return True
        return False

    def agent(self, name: str) -> Agent:
        """The agent as rules see it: the file's groups and its bound identity's claims."""
        who = self.agents.get(name) or Agent(name)
        ident = self.identity(name)
        return Agent(who.name, who.groups, ident.claims) if ident is not None else who

    def _decide(self, agent: str, dest: Destination, op: Operation) -> Decision:
        who = self.agent(agent)
        if op.protocol == "dns" and op.action != "connect":
            # A DNS query goes to Interlock's resolver, not to a target: it is judged against
            # the targets its name names (by hostname; their ports and addresses do not apply).
            names = {t.name for t in self.targets.values() if t.names_match(dest.names)}
        else:
            names = {t.name for t in self.targets_for(dest)}
        for rule in self.rules:
            if rule.matches(who, names, op):
                return Decision(rule.verdict, rule.name, rule.reason or f"rule '{rule.name}' ({self.source}:{rule.line})",
                                mask=rule.mask, approval_timeout=rule.timeout or (
                                    DEFAULT_APPROVAL_TIMEOUT if rule.verdict is Verdict.APPROVE else None),
                                approvers=rule.approvers)
        if op.action == INBOUND:
            return Decision(Verdict.DENY, "default", "no rule allows inbound connections to this agent and port")
        return Decision(self.default, "default", f"no rule matched; the policy's default is {self.default.value}")


_STRICTNESS = {Verdict.ALLOW: 0, Verdict.MASK: 1, Verdict.APPROVE: 2, Verdict.DENY: 3}


# ---- loading -------------------------------------------------------------------------------

_RULE_KEYS = {"name", "agent", "target", "operation", "object", "risk", "protocol", "decision", "timeout", "mask", "reason",
              "method", "host", "path", "query", "header", "created_in_session", "identity", "approvers"}
_TARGET_KEYS = {"address", "cidr", "hostname", "port", "protocol", "credentials", "upstream_user", "tls"}
_TLS_MODES = ("intercept", "passthrough")
# Rule keys over request attributes; path and query compare as written, the rest case-folded.
_ATTRIBUTE_KEYS = ("method", "host", "path", "query")
_CASE_SENSITIVE = frozenset({"path", "query"})
_AGENT_KEYS = {"groups"}
# Process selectors live in the daemon's config (its `agents:` list), not in a policy.
_SELECTOR_KEYS = {"exe", "uid", "cgroup"}


def _strings(value, where: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if not isinstance(v, str | int) or isinstance(v, bool):
            problems.append(f"{where}: expected text, got {v!r}")
        else:
            out.append(str(v))
    return tuple(out)


def _per_agent(spec: dict, key: str, target: str, where: str, problems: list[str]) -> str | dict[str, str] | None:
    """A target key that is text, or a mapping from agent name / group:NAME / * to text."""
    value = spec.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    problems.append(f"{where}: target '{target}': '{key}' must be text or map agent names, group:NAME or * to text")
    return None


def _identity(spec: dict, rule: str, at_key, problems: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A rule's `identity:` — claim names (flattened: `kubernetes.io.namespace`) to glob(s)."""
    value = spec.get("identity")
    if value is None:
        return ()
    where = at_key(spec, "identity")
    if not isinstance(value, dict) or not value:
        problems.append(f"{where}: rule '{rule}': 'identity' must map claim names to globs, e.g. "
                        "identity: {sub: \"repo:org/app:*\"}")
        return ()
    out = []
    for claim, pats in value.items():
        globs = _strings(pats, where, problems)
        if not isinstance(claim, str) or not claim or not globs:
            problems.append(f"{where}: rule '{rule}': identity claim {claim!r} needs a name and at least one glob")
            continue
        out.append((claim, globs))
    return tuple(out)


def _approvers(spec: dict, rule: str, verdict, at_key, problems: list[str]) -> dict | None:
    """A hold's `approvers: {groups: [..], four_eyes: bool}` (who may answer it, on the central page)."""
    value = spec.get("approvers")
    if value is None:
        return None
    where = at_key(spec, "approvers")
    if verdict != Verdict.APPROVE.value:
        problems.append(f"{where}: rule '{rule}': 'approvers' is for decision: approve only")
    if not isinstance(value, dict) or set(value) - {"groups", "four_eyes"}:
        problems.append(f"{where}: rule '{rule}': 'approvers' must be a mapping of groups (list) and four_eyes (true/false)")
        return None
    groups = _strings(value.get("groups"), where, problems)
    four_eyes = value.get("four_eyes", False)
    if not isinstance(four_eyes, bool):
        problems.append(f"{where}: rule '{rule}': approvers.four_eyes must be true or false")
        four_eyes = False
    return {"groups": list(groups), "four_eyes": four_eyes}


def load(path: Path | str, text: str | None = None) -> Policy:
    """Parse and validate a policy; raise PolicyError listing every problem with its line."""
    doc = read(path, text)
    src = str(path)
    problems: list[str] = []
    pol = Policy(source=src)

    def at(node, fallback: int = 1) -> str:
        return f"{src}:{getattr(node, 'line', fallback)}"

    def at_key(node, key) -> str:
        """FILE:LINE of `key` in a mapping: each problem names the line it is on."""
        return f"{src}:{node.line_of(key)}" if isinstance(node, LineDict) else at(node)

    for key in doc:
        if key not in ("agents", "targets", "rules", "default"):
            problems.append(f"{at_key(doc, key)}: unknown top-level key '{key}' (known: agents, targets, rules, default)")
    default = doc.get("default", "deny")
    if default not in ("allow", "deny"):
        problems.append(f"{at_key(doc, 'default')}: 'default' must be allow or deny, got {default!r}")
    else:
        pol.default = Verdict(default)

    agents = doc.get("agents") or {}
    if not isinstance(agents, dict):
        problems.append(f"{at_key(doc, 'agents')}: 'agents' must map agent names to settings")
        agents = {}
    for name, spec in agents.items():
        spec = spec or LineDict()
        if not isinstance(spec, dict):
            problems.append(f"{at(agents)}: agent '{name}' must be a mapping")
            continue
        for k in sorted(set(spec) - _AGENT_KEYS):
            hint = " (process selectors belong in the daemon config's agents: list)" if k in _SELECTOR_KEYS else ""
            problems.append(f"{at_key(spec, k) if spec else at(agents)}: agent '{name}': unknown key '{k}' "
                            f"(known: {', '.join(sorted(_AGENT_KEYS))}){hint}")
        pol.agents[name] = Agent(name, _strings(spec.get("groups"), at(spec, agents.line), problems))

    targets = doc.get("targets") or {}
    if not isinstance(targets, dict):
        problems.append(f"{at_key(doc, 'targets')}: 'targets' must map target names to settings")
        targets = {}
    for name, spec in targets.items():
        if not isinstance(spec, dict):
            problems.append(f"{at(targets)}: target '{name}' must be a mapping")
            continue
        where = at(spec)
        for k in sorted(set(spec) - _TARGET_KEYS):
            problems.append(f"{at_key(spec, k)}: target '{name}': unknown key '{k}' (known: {', '.join(sorted(_TARGET_KEYS))})")
        nets = []
        for a in _strings(spec.get("address"), where, problems) + _strings(spec.get("cidr"), where, problems):
            try:
                nets.append(ipaddress.ip_network(a, strict=False))
            except ValueError:
                problems.append(f"{where}: target '{name}': '{a}' is not an address or CIDR")
        ports = []
        for p in _strings(spec.get("port"), where, problems):
            if not p.isdigit() or not 1 <= int(p) <= 65535:
                problems.append(f"{where}: target '{name}': port '{p}' is not 1..65535")
            else:
                ports.append(int(p))
        tls = spec.get("tls", "intercept")
        if tls not in _TLS_MODES:
            problems.append(f"{where}: target '{name}': 'tls' must be intercept or passthrough, got {tls!r}")
            tls = "intercept"
        pol.targets[name] = Target(
            name, tuple(nets), tuple(h.lower() for h in _strings(spec.get("hostname"), where, problems)),
            tuple(ports), spec.get("protocol"), _per_agent(spec, "credentials", name, where, problems),
            _per_agent(spec, "upstream_user", name, where, problems), tls)

    rules = doc.get("rules") or []
    if not isinstance(rules, list):
        problems.append(f"{at_key(doc, 'rules')}: 'rules' must be a list")
        rules = []
    seen: set[str] = set()
    for i, spec in enumerate(rules):
        if not isinstance(spec, dict):
            problems.append(f"{at(rules)}: rules[{i}] must be a mapping")
            continue
        where = at(spec)
        name = str(spec.get("name") or f"rule-{i + 1}")
        if name in seen:
            problems.append(f"{where}: rule name '{name}' is used twice")
        seen.add(name)
        for k in sorted(set(spec) - _RULE_KEYS):
            problems.append(f"{at_key(spec, k)}: rule '{name}': unknown key '{k}' (known: {', '.join(sorted(_RULE_KEYS))})")
        # Every problem of a rule is reported, not only the first: go on after each one.
        verdict = spec.get("decision")
        valid_verdict = verdict in {v.value for v in Verdict}
        if not valid_verdict:
            problems.append(f"{at_key(spec, 'decision')}: rule '{name}': 'decision' must be allow, deny, approve or mask, "
                            f"got {verdict!r}")
        timeout = None
        if "timeout" in spec:
            try:
                timeout = parse_duration(spec["timeout"])
            except ValueError as e:
                problems.append(f"{at_key(spec, 'timeout')}: rule '{name}': timeout: {e}")
            if valid_verdict and verdict != Verdict.APPROVE.value:
                problems.append(f"{at_key(spec, 'timeout')}: rule '{name}': 'timeout' is for decision: approve only")
        if verdict == Verdict.MASK.value and not spec.get("mask"):
            problems.append(f"{at_key(spec, 'decision')}: rule '{name}': decision mask needs a 'mask:' list "
                            f"(detectors such as email, or column:NAME / JSON field names)")
        if "mask" in spec and valid_verdict and verdict != Verdict.MASK.value:
            problems.append(f"{at_key(spec, 'mask')}: rule '{name}': 'mask' is for decision: mask only")
        rule_targets = _strings(spec.get("target"), where, problems) or ("*",)
        for t in rule_targets:
            if t != "*" and t not in pol.targets:
                problems.append(f"{at_key(spec, 'target')}: rule '{name}': unknown target '{t}' "
                                f"(defined: {', '.join(pol.targets) or 'none'})")
        rule_agents = _strings(spec.get("agent"), where, problems) or ("*",)
        attributes = [(k, tuple(v if k in _CASE_SENSITIVE else v.lower() for v in _strings(spec.get(k), where, problems)))
                      for k in _ATTRIBUTE_KEYS if k in spec]
        created = spec.get("created_in_session")
        if created is not None and not isinstance(created, bool):
            problems.append(f"{at_key(spec, 'created_in_session')}: rule '{name}': 'created_in_session' must be true "
                            f"or false, got {created!r}")
            created = None
        headers = spec.get("header") or {}
        if not isinstance(headers, dict):
            problems.append(f"{where}: rule '{name}': 'header' must map header names to globs")
            headers = {}
        attributes += [(f"header.{str(h).lower()}", tuple(v.lower() for v in _strings(v, where, problems)))
                       for h, v in headers.items()]
        identity = _identity(spec, name, at_key, problems)
        approvers = _approvers(spec, name, verdict, at_key, problems)
        if verdict == Verdict.MASK.value and INBOUND in (o.lower() for o in _strings(spec.get("operation"), where, [])):
            problems.append(f"{at_key(spec, 'decision')}: rule '{name}': inbound connections are relayed unread, "
                            "so they cannot be masked (use allow, deny or approve)")
        if not valid_verdict:
            continue
        pol.rules.append(Rule(
            name=name, line=getattr(spec, "line", 0), verdict=Verdict(verdict), agents=rule_agents,
            targets=rule_targets,
            operations=tuple(o.lower() for o in _strings(spec.get("operation"), where, problems)) or ("*",),
            objects=tuple(o.lower() for o in _strings(spec.get("object"), where, problems)),
            risks=_strings(spec.get("risk"), where, problems),
            protocols=_strings(spec.get("protocol"), where, problems),
            timeout=timeout, mask=_strings(spec.get("mask"), where, problems),
            reason=str(spec.get("reason") or ""), attributes=tuple(attributes), created_in_session=created,
            identity=identity, approvers=approvers))
    if problems:
        raise PolicyError(problems)
    return pol


EMBEDDED_DEFAULT = Path(__file__).with_name("default.yaml")


def load_default() -> Policy:
    return load(EMBEDDED_DEFAULT)
