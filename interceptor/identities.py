"""The daemon's side of agent identities: validating workload tokens at enrolment, binding them
to agents, re-reading selectors' token files, and saying when one expires.

Bindings go to Layout.identities_file before the enrolment they belong to takes effect, so the
proxy judges the first connection of a newly enrolled process with its identity (identity/agents.py).
One agent name carries one identity at a time: a process never joins an agent whose running
processes carry another identity (or none), so no process borrows an identity it did not present."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from identity import agents as bindings_file
from identity.agents import AgentIdentity, flatten
from identity.oidc import DEFAULT_ALGORITHMS, Issuer, TokenError, Verifier, unverified
from interceptor.config import Config
from interceptor.enrolment import Refused

RETRY_INTERVAL = 10.0  # seconds between attempts to validate a selector's token that failed for want of the issuer


class Identities:
    def __init__(self, config: Config, path: Path, record: Callable[..., object]):
        self.config = config
        self.path = path
        self.record = record  # Recorder.event
        ident = config.identity
        self.verifier = Verifier([Issuer(i.issuer, tuple(i.audience), i.jwks_uri,
                                         tuple(i.algorithms) if i.algorithms else DEFAULT_ALGORITHMS)
                                  for i in ident.issuers], leeway=ident.leeway) if ident else None
        self.lock = threading.RLock()
        self.bound: dict[str, AgentIdentity] = {}
        self.selectors = {a.name: a for a in config.agents}
        self._files: dict[str, tuple] = {}  # selector agent -> (stat of its token file, last try)
        self._expired_said: set[tuple] = set()
        try:
            self.bound = bindings_file.load(path)
        except (OSError, ValueError, TypeError):
            self.bound = {}
        # Selectors' bindings come from the config again; run-time ones stay while their agent runs.
        self.bound = {k: v for k, v in self.bound.items() if v.source == "run" and k not in self.selectors}

    def validate(self, agent: str, token: str, source: str, token_file: str | None = None) -> AgentIdentity:
        """The identity a token proves, or Refused with what failed (recorded as identity-refused)."""
        if self.verifier is None:
            raise Refused("this daemon accepts no identity tokens: its config has no 'identity:' issuers")
        try:
            claims = self.verifier.validate(token)
        except TokenError as e:
            self.record("identity-refused", {"agent": agent, "via": source, "reason": e.reason, "error": str(e),
                                             "token": unverified(token), "token_file": token_file}, durable=True)
            raise Refused(f"identity token refused: {e}") from None
        return AgentIdentity(agent=agent, iss=claims["iss"], sub=claims["sub"], exp=float(claims["exp"]),
                             claims=flatten(claims, self.config.identity.claims), source=source, token_file=token_file)

    def for_token(self, agent: str, token: str | None) -> AgentIdentity | None:
        """The identity a token sent with an enrolment proves (validated now: it may fetch the
        issuer's keys, so call it outside the daemon's lock), None without a token, or Refused."""
        sel = self.selectors.get(agent)
        if sel is not None and sel.identity_token:
            raise Refused(f"agent '{agent}' takes its identity from the daemon config ({sel.identity_token}); "
                          "choose another agent name")
        if sel is not None and token:
            raise Refused(f"agent '{agent}' is a selector of the daemon config, which binds no identity to it; "
                          "choose another agent name for a process with an identity token")
        return self.validate(agent, token, "run") if token else None

    def check(self, agent: str, new: AgentIdentity | None, running: list[int]) -> None:
        """Refused when a process with identity `new` (or none) must not join agent `agent`, whose
        cgroup holds `running` (not the one being enrolled). Call it under the daemon's lock, with
        the binding written before that lock is released: two enrolments never both pass it."""
        current = self.bound.get(agent)
        if not running:
            return
        if current is None and new is not None:
            raise Refused(f"agent '{agent}' has {len(running)} process(es) enrolled without an identity; "
                          "choose another agent name for a process with an identity token")
        if current is not None and new is None:
            raise Refused(f"agent '{agent}' carries the identity {current.sub!r} ({current.iss}) of its running "
                          "processes: give the same identity token (--identity-token) or choose another agent name")
        if current is not None and (current.iss, current.sub) != (new.iss, new.sub):
            raise Refused(f"agent '{agent}' carries the identity {current.sub!r} ({current.iss}) of its running "
                          f"processes, not {new.sub!r}: choose another agent name")

    def set(self, agent: str, ident: AgentIdentity | None) -> AgentIdentity | None:
        """Bind (or unbind) and write the file; returns the previous binding (for a rollback)."""
        with self.lock:
            before = self.bound.get(agent)
            if ident is None:
                self.bound.pop(agent, None)
            else:
                self.bound[agent] = ident
            if before is not ident:
                self.save()
            return before

    def save(self) -> None:
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            bindings_file.save(self.path, self.bound)

    def watch_once(self) -> None:
        """Selectors' token files (read again when they change: a kubelet rotates them) and
        expiries (each recorded once)."""
        now = time.time()
        for name, sel in self.selectors.items():
            if sel.identity_token:
                self._selector(name, sel.identity_token, now)
        for name, ident in list(self.bound.items()):
            key = (name, ident.key)
            if not ident.error and ident.exp <= now and key not in self._expired_said:
                self._expired_said.add(key)
                self.record("identity-expired", {"agent": name, "sub": ident.sub, "iss": ident.iss, "exp": ident.exp,
                                                 "source": ident.source,
                                                 "effect": "new connections of this agent are refused"}, durable=True)

    def _selector(self, agent: str, path: str, now: float) -> None:
        try:
            st = os.stat(path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError as e:
            seen = ("missing", e.errno)
        last = self._files.get(agent)
        current = self.bound.get(agent)
        retry = current is not None and current.error and "cannot fetch" in current.error and \
            last is not None and now - last[1] >= RETRY_INTERVAL
        if last is not None and last[0] == seen and not retry:
            return
        self._files[agent] = (seen, now)
        try:
            with open(path) as f:
                token = f.read(65536).strip()
            ident = self.validate(agent, token, "selector", path)
        except OSError as e:
            ident = AgentIdentity(agent=agent, source="selector", error=f"cannot read {path}: {e.strerror}", token_file=path)
            self.record("identity-refused", {"agent": agent, "via": "selector", "reason": "unreadable",
                                             "error": ident.error, "token_file": path}, durable=True)
        except Refused as e:
            ident = AgentIdentity(agent=agent, source="selector", error=str(e).removeprefix("identity token refused: "),
                                  token_file=path)
        else:
            self.record("identity-bound", {"agent": agent, "via": "selector", "token_file": path,
                                           "identity": ident.record()}, durable=True)
        if current is None or current.error != ident.error or current.key[:3] != ident.key[:3]:
            self.set(agent, ident)
