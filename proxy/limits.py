"""What one agent may hold of the proxy: open connections per agent, and how long a connection
may sit without a byte either way.

Every accepted connection counts against its agent until it is closed; past the agent's cap it
is refused with a reset and a session row saying why, so one agent flooding the proxy uses up
its own share and never another agent's (file descriptors included: the proxy raises its soft
RLIMIT_NOFILE to the hard limit at start). Idle connections are found by a sweep that compares
byte counters, so the relay's per-read path does no extra work."""

from __future__ import annotations

import asyncio
import resource
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from interceptor.config import Config
    from proxy.relay import AgentSide
    from proxy.workers import SharedCounts


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Limits:
    """Per-agent connection counts and the idle sweep."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, shared: SharedCounts | None = None,
                 agent_id: Callable[[str], int] | None = None):
        self.per_agent = config.max_connections_per_agent
        self.idle = config.idle_timeout
        self.loop = loop
        self.open: Counter[str] = Counter()
        self.conns: set[AgentSide] = set()
        self.fd_limit = raise_fd_limit()
        self._sweeper: asyncio.TimerHandle | None = None
        # With several proxy workers the cap counts every worker's connections (proxy/workers.py).
        self.shared = shared if self.per_agent else None
        self.agent_id = agent_id

    def admit(self, conn: AgentSide) -> bool:
        """Count the connection against its agent; False when the agent is at its cap (over all
        workers)."""
        agent = conn.rec.agent
        if self.shared is not None:
            if not self.shared.admit(self.agent_id(agent), self.per_agent):
                return False
        elif self.per_agent and self.open[agent] >= self.per_agent:
            return False
        self.open[agent] += 1
        self.conns.add(conn)
        if self.idle and self._sweeper is None:
            self._sweeper = self.loop.call_later(self._period, self._sweep)
        return True

    def release(self, conn: AgentSide) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            agent = conn.rec.agent
            self.open[agent] -= 1
            if self.shared is not None:
                self.shared.release(self.agent_id(agent))
            if self.open[agent] <= 0:
                del self.open[agent]

    @property
    def _period(self) -> float:
        return max(0.05, min(self.idle / 4, 30.0))

    def _sweep(self) -> None:
        """Close connections that moved no byte since the sweep before last (idle ≥ idle_timeout
        give or take a period) and are not waiting for a human or spliced."""
        self._sweeper = None
        now = self.loop.time()
        for conn in list(self.conns):
            counts = (conn.rec.bytes_up, conn.rec.bytes_down)
            if counts != conn.idle_mark or conn.holding or conn.splicing:
                conn.idle_mark, conn.idle_since = counts, now
            elif now - conn.idle_since >= self.idle:
                conn.close("idle", f"no bytes either way for {self.idle:g}s (idle_timeout)")
        if self.conns:
            self._sweeper = self.loop.call_later(self._period, self._sweep)
