"""Raw-protocol PostgreSQL clients the cancel tests run as an unprivileged agent (CancelRequest:
PostgreSQL protocol docs, "Canceling Requests in Progress"): the agent's side only; the tests
check the server's side themselves."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from lab.instance import Instance
from lab.testing import SLOWDOWN

REPO = Path(__file__).resolve().parent.parent
UNPRIVILEGED = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]

# A session over the raw protocol that leaves its key (as the proxy gave it) in a file, then runs
# one long statement; what it got: error codes, or "EOF"/"reset" when the proxy went away.
SESSION = """
    import json, socket, time
    from proxy.postgres import wire
    s = socket.create_connection(("{host}", {port}), timeout=300 * {slow})
    r = wire.FrameReader("backend")
    def until_ready():
        got = []
        while not any(isinstance(m, wire.ReadyForQuery) for m in got):
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return got + ["reset"]
            if not data:
                return got + ["EOF"]
            r.feed(data); got += list(r.messages())
        return got
    s.sendall(wire.startup_message({{"user": "postgres", "database": "postgres"}}))
    key = next(m for m in until_ready() if isinstance(m, wire.BackendKeyData))
    open("{share}/key.json", "w").write(json.dumps({{"pid": key.pid, "key": key.key.hex()}}))
    s.sendall(wire.query(f"select pg_sleep({{150 * {slow}}}) /* {marker} */"))
    got = until_ready()
    print(json.dumps([m.code if isinstance(m, wire.ErrorResponse) else m for m in got
                      if isinstance(m, wire.ErrorResponse) or m in ("EOF", "reset")]))
"""


def agent_py(inst: Instance, code: str, agent: str = "bot", **fmt) -> dict | list:
    """Run `code` (formatted with `fmt`; `slow` defaults to SLOWDOWN) as `agent` under uid 65533;
    it prints one JSON line last, which is returned. AssertionError when it printed none."""
    fmt.setdefault("slow", SLOWDOWN)
    src = textwrap.dedent(code).format(**fmt)
    r = inst.agent([*UNPRIVILEGED, sys.executable, "-"], agent=agent, timeout=300 * SLOWDOWN, cwd=REPO, input=src)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"no result: rc={r.returncode} stdout={r.stdout[-2000:]} stderr={r.stderr[-3000:]}") from None
