"""Checking hosts' audit chains as a verifier outside the host: from an export file or a recorder's export API.

An export (`interlock export`, or `GET /v1/export` of the central recorder) is JSON Lines: for each
host a line {"type": "host", "host", "name", "key"} and then that host's records and checkpoints
(recorder.records.to_json) in seq order. `verify_host` recomputes the chain with
recorder.records.verify_chain and adds what a verifier needs beyond it:

- the key: a pinned key (`--host-key HOST=HEX`, taken from the host itself) is used instead of the
  copy that came with the export, and a differing copy is itself a finding (`key-mismatch`): whoever
  holds the store could otherwise register a key of their own and re-sign a rewritten history;
- the end of the chain: a validly signed checkpoint past the last record means the records up to it
  were removed from the end (verify_chain only looks at checkpoints over records it has);
- what a person needs to find the record: its kind and the session it belongs to.

Limits: a host's whole section, or records at the end together with every checkpoint over them,
can vanish without a trace here; only a head seen earlier (or the host's own spool) shows that.
This module imports nothing of the proxy, the daemon or the central service."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from recorder.records import Checkpoint, Finding, Record, from_json, public_key_from_hex, verify_chain

PROBLEMS_ORDER = {"key-mismatch": 0, "changed": 1, "removed": 1, "inserted": 1, "bad-checkpoint": 2, "unsigned": 3}


class ExportError(ValueError):
    """The export is not well-formed JSON Lines of this format; the message names the line."""


@dataclass
class HostChain:
    """One host's section of an export: its registered key (hex, as the source gave it) and items."""

    host: str
    name: str
    key: str
    records: list[Record] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    """A Finding with what locates it for a person: the record's kind and session, when known."""

    host: str
    seq: int
    problem: str
    detail: str
    kind: str = ""
    session: str = ""

    def as_dict(self) -> dict:
        return {"host": self.host, "seq": self.seq, "problem": self.problem, "kind": self.kind,
                "session": self.session, "detail": self.detail}


@dataclass
class HostReport:
    """The verdict on one host: `problems` empty means every record is there, unchanged and signed."""

    host: str
    name: str
    records: int
    checkpoints: int
    first_seq: int
    last_seq: int
    signed_to: int
    key_source: str  # "pinned" or "server"/"export" (the copy that came with the records)
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"host": self.host, "name": self.name, "ok": self.ok, "records": self.records,
                "checkpoints": self.checkpoints, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "signed_to": self.signed_to, "key": self.key_source,
                "problems": [p.as_dict() for p in self.problems]}


def parse_export(lines: Iterable[str | bytes], source: str = "export") -> Iterator[HostChain]:
    """Host sections from export lines (blank lines skipped), in file order.

    Raises ExportError naming `source` and the line number for a line that is not JSON, an item
    that is not a host line, record or checkpoint, a record before any host line, or a host whose
    section appears twice."""
    current: HostChain | None = None
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ExportError(f"{source}, line {n}: not JSON ({e})") from None
        if isinstance(obj, dict) and obj.get("type") == "host":
            if current is not None:
                yield current
            host = obj.get("host")
            if not isinstance(host, str) or not host or not isinstance(obj.get("key"), str):
                raise ExportError(f"{source}, line {n}: a host line needs \"host\" and \"key\" (text)")
            if host in seen:
                raise ExportError(f"{source}, line {n}: host {host!r} appears twice")
            seen.add(host)
            current = HostChain(host, str(obj.get("name") or ""), obj["key"])
            continue
        try:
            item = from_json(obj)
        except ValueError as e:
            raise ExportError(f"{source}, line {n}: {e}") from None
        if current is None:
            raise ExportError(f"{source}, line {n}: a {obj.get('type')} before any host line")
        (current.records if isinstance(item, Record) else current.checkpoints).append(item)
    if current is not None:
        yield current


def session_of(rec: Record) -> str:
    """The session a record belongs to: a session row's id, an event's or approval's session."""
    d = rec.data()
    value = d.get("id") if rec.kind.startswith("session-") else d.get("session")
    return value if isinstance(value, str) else ""


def verify_host(chain: HostChain, pinned_key: str | None = None, key_source: str = "export",
                stored_head: int | None = None) -> HostReport:
    """Recompute `chain` (records in the order given) and locate every break, first break first.

    `stored_head`: where the store's own bookkeeping says the chain ends (the recorder's
    chain_heads, read before the export): records missing below it were removed from the end."""
    problems: list[Problem] = []
    key_hex = chain.key
    if pinned_key is not None:
        if pinned_key.lower() != chain.key.lower():
            problems.append(Problem(chain.host, 0, "key-mismatch",
                                    f"the {key_source}'s copy of the host's key ({chain.key[:16]}…) is not the pinned "
                                    f"key ({pinned_key[:16]}…): checked with the pinned one"))
        key_hex, key_source = pinned_key, "pinned"
    try:
        key = public_key_from_hex(key_hex)
    except ValueError as e:
        problems.append(Problem(chain.host, 0, "key-mismatch", f"the host's key is not usable: {e}"))
        return _report(chain, key_source, problems, signed_to=0)
    # read from the start: a chain that does not begin at seq 1 has lost its beginning ("removed")
    findings = verify_chain(chain.host, chain.records, chain.checkpoints, key)
    by_seq = {r.seq: r for r in chain.records}
    last = max((r.seq for r in chain.records), default=0)
    signed_to = max((c.seq for c in chain.checkpoints if c.host == chain.host and c.seq <= last
                     and c.verify(key) and c.seq in by_seq and by_seq[c.seq].hash == c.head), default=0)
    beyond = [c for c in chain.checkpoints if c.host == chain.host and c.seq > last and c.verify(key)]
    if beyond:
        top = max(c.seq for c in beyond)
        span = f"seq {last + 1}" if top == last + 1 else f"seqs {last + 1}..{top}"
        findings.append(Finding(chain.host, last + 1, "removed", f"{span} missing at the end: the host signed its "
                                f"chain head at seq {top}"))
    elif stored_head is not None and stored_head > last:
        span = f"seq {last + 1}" if stored_head == last + 1 else f"seqs {last + 1}..{stored_head}"
        findings.append(Finding(chain.host, last + 1, "removed", f"{span} missing at the end: the {key_source} "
                                f"recorded its chain head at seq {stored_head}"))
    for f in findings:
        rec = by_seq.get(f.seq)
        problems.append(Problem(f.host, f.seq, f.problem, f.detail, rec.kind if rec else "", session_of(rec) if rec else ""))
    problems.sort(key=lambda p: (PROBLEMS_ORDER.get(p.problem, 9), p.seq))
    return _report(chain, key_source, problems, signed_to)


def _report(chain: HostChain, key_source: str, problems: list[Problem], signed_to: int) -> HostReport:
    seqs = [r.seq for r in chain.records]
    return HostReport(chain.host, chain.name, len(chain.records), len(chain.checkpoints), min(seqs, default=0),
                      max(seqs, default=0), signed_to, key_source, problems)


def parse_pins(specs: Iterable[str]) -> dict[str, str]:
    """`HOST=HEX` pins (HOST: a host id or name) as {host: key hex}; ValueError says which is wrong."""
    pins: dict[str, str] = {}
    for spec in specs:
        host, sep, key = spec.partition("=")
        if not sep or not host:
            raise ValueError(f"--host-key takes HOST=HEX (the host's public key, 64 hex digits), got {spec!r}")
        try:
            public_key_from_hex(key.strip())
        except ValueError as e:
            raise ValueError(f"--host-key {host}: {e}") from None
        pins[host] = key.strip().lower()
    return pins


def pin_for(pins: dict[str, str], chain: HostChain) -> str | None:
    return pins.get(chain.host) or (pins.get(chain.name) if chain.name else None)
