"""Identities bound to agents: which verified OIDC identity an agent's processes carry.

The daemon validates a workload's token at enrolment (identity/oidc.py) and writes every
agent's binding to one file (root, 0600, replaced atomically) before it answers; the proxy
reads the file again whenever it changed, so the first connection of a just-enrolled process
already carries its identity. One agent name carries at most one identity at a time.

A binding's claims are flattened: nested objects join their keys with "." (Kubernetes:
`kubernetes.io.namespace`), lists stay lists of text, other scalars become text. Rules match
them (`identity: {sub: "repo:org/app:*"}`) and records carry them (`record()`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Per-token bookkeeping, not who the workload is: never an attribute, never recorded.
NOT_ATTRIBUTES = frozenset({"jti", "iat", "nbf", "exp", "nonce", "at_hash", "c_hash", "auth_time"})
MAX_CLAIMS_BYTES = 8192  # a binding's claims as recorded on every session row


def flatten(claims: Mapping, keep: Iterable[str] | None = None) -> dict[str, str | list[str]]:
    """Claims as rule attributes: {"a": {"b": 1}} -> {"a.b": "1"}; lists of scalars stay lists.
    With `keep`, only those names (after flattening) and iss/sub. Per-token claims are dropped."""
    out: dict[str, str | list[str]] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            out[prefix] = [_text(v) for v in value if not isinstance(v, Mapping | list)]
        elif value is not None:
            out[prefix] = _text(value)

    for k, v in claims.items():
        if k not in NOT_ATTRIBUTES:
            walk(str(k), v)
    if keep is not None:
        wanted = set(keep) | {"iss", "sub"}
        out = {k: v for k, v in out.items() if k in wanted}
    return out


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass
class AgentIdentity:
    """An agent's identity: issuer, subject, when it expires, its claims as attributes.

    `error` is set when the agent's token was refused (a selector's token file): the agent is
    captured all the same, and every connection of it is refused with that reason."""

    agent: str
    iss: str = ""
    sub: str = ""
    exp: float = 0.0
    claims: dict = field(default_factory=dict)
    source: str = "run"  # "run" (interlock run/enroll --identity-token) or "selector" (daemon config)
    bound_at: float = field(default_factory=time.time)
    error: str | None = None
    token_file: str | None = None  # selectors: where the daemon reads the token again

    def refusal(self, now: float | None = None) -> str | None:
        """Why the agent's connections are refused now (token invalid or expired), or None."""
        if self.error:
            return f"the identity token of agent '{self.agent}' was refused: {self.error}"
        if self.exp <= (time.time() if now is None else now):
            return (f"the identity token of agent '{self.agent}' (sub {self.sub!r}) expired at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(self.exp))}; its new connections are refused "
                    "until it has a valid token")
        return None

    @property
    def key(self) -> tuple:
        """What decisions depend on (a memo key part): same key, same identity."""
        return self.iss, self.sub, self.exp, self.error, self.bound_at

    def record(self) -> dict:
        """What every record of this agent carries (no token, no per-token claims)."""
        out = {"iss": self.iss, "sub": self.sub, "exp": self.exp, "claims": self.claims}
        if self.error:
            out["error"] = self.error
        return out

    def record_json(self) -> str:
        text = json.dumps(self.record(), sort_keys=True, separators=(",", ":"))
        if len(text) > MAX_CLAIMS_BYTES:
            text = json.dumps({"iss": self.iss, "sub": self.sub, "exp": self.exp, "claims_truncated": True},
                              sort_keys=True, separators=(",", ":"))
        return text


def save(path: Path, bindings: Mapping[str, AgentIdentity]) -> None:
    """Write every binding (root, 0600), replacing the file atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"agents": {k: asdict(v) for k, v in bindings.items()}}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, AgentIdentity]:
    """The bindings in the file; {} when there is none. A damaged file raises ValueError."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {name: AgentIdentity(**spec) for name, spec in raw.get("agents", {}).items()}


class IdentityBook:
    """The proxy's view of the bindings file: `refresh()` re-reads it when it changed (a stat),
    `get(agent)` is a dict lookup. A file that cannot be read refuses every bound agent: the
    previous bindings are kept, each marked with the error (fail closed)."""

    def __init__(self, path: Path):
        self.path = path
        self.bindings: dict[str, AgentIdentity] = {}
        self._seen: tuple | None = None
        self.refresh()

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        except OSError as e:
            seen = ("error", str(e))
        if seen == self._seen:
            return
        self._seen = seen
        if seen is None:
            self.bindings = {}
            return
        try:
            self.bindings = load(self.path)
        except (OSError, ValueError, TypeError) as e:
            self.bindings = {k: AgentIdentity(**{**asdict(v), "error": f"the identity bindings cannot be read: {e}"})
                             for k, v in self.bindings.items()}

    def get(self, agent: str) -> AgentIdentity | None:
        return self.bindings.get(agent)
