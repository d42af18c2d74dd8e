"""PostgreSQL cancel keys across proxy workers (`workers:`).

The proxy re-keys `BackendKeyData`: the agent gets a random key and the proxy keeps, per key,
the server's real key, the server's address and the session's handler. A `CancelRequest`
(PostgreSQL protocol, 55.2.7 "Canceling Requests in Progress") comes on a new connection, which
`SO_REUSEPORT` may hand to any worker, while the key map lives in the worker that relays the
session. So the key names its worker: `issue_key` draws it uniformly among the keys whose value
modulo the number of workers is the worker's index (log2(workers) bits of the key carry no
secret; a 4-byte key keeps 31 of its 32 random bits with two workers). The worker that accepted
the cancel judges and records it as always (its connection's identity, the `cancel`
operation); only when the policy lets it through does it ask the owning worker, over that
worker's unix socket in the root-only shared dir (proxy/workers.py), to `claim` the key: give up a
held statement and answer with the server's key and address. The asking worker sends the real
CancelRequest itself. A key no worker issued cancels nothing; an owning worker that is gone (or
does not answer within `connect_timeout`) cancels nothing either: the cancel is refused, on
record (fail closed).

A cancel only goes where it was sent: the policy judged it for the destination the agent dialled
(its `cancel` rules may name a target), so a key whose session is at another address or port
is refused before anything happens (`Elsewhere`), never forwarded to where no rule looked. A
client sends its CancelRequest to the address its session connected to (libpq, psycopg, asyncpg,
JDBC all do).

Between workers, one JSON line each way: {"pid": int, "key": hex, "addr": str, "port": int} →
{"found": false}, {"found": false, "elsewhere": true} or
{"found": true, "addr": str, "port": int, "key": hex, "hold_canceled": bool}.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import struct
import weakref
from pathlib import Path
from typing import Protocol

# (backend pid, key this proxy issued) → (server address, port, the server's key, the session's handler)
KEYS: dict[tuple[int, bytes], tuple[str, int, bytes, weakref.ref]] = {}
LINE_LIMIT = 4096  # bytes of one request or answer between workers
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Holding(Protocol):
    def cancel_hold(self) -> bool: ...


class OwnerGone(Exception):
    """The worker whose key it is cannot be asked: nothing is cancelled."""


class Elsewhere(Exception):
    """The key's session is at another destination than the cancel was sent to (and judged for):
    nothing is cancelled, no hold is given up."""


def issue_key(length: int, worker: int = 0, workers: int = 1) -> bytes:
    """A random key of `length` bytes (4 in protocol 3.0, up to 256 in 3.2) whose big-endian value
    modulo `workers` is `worker`, uniform among such keys."""
    if workers <= 1:
        return secrets.token_bytes(length)
    top = 256 ** length
    return (secrets.randbelow(top // workers) * workers + worker).to_bytes(length, "big")


def owner_of(key: bytes, workers: int) -> int:
    """The worker that issued `key` (any key names one; only the issuer's map can hold it)."""
    return int.from_bytes(key, "big") % workers if workers > 1 else 0


def remember(pid: int, key: bytes, addr: str, port: int, server_key: bytes, handler: Holding) -> None:
    KEYS[(pid, key)] = (addr, port, server_key, weakref.ref(handler))


def forget(pid: int, key: bytes) -> None:
    KEYS.pop((pid, key), None)


def claim(pid: int, key: bytes, dest: tuple[str, int]) -> tuple[str, int, bytes, bool] | None:
    """This worker's answer for a key: (server address, port, server's key, whether a held
    statement was given up), or None for a key it did not issue (or whose session ended).
    Raises Elsewhere, giving nothing up, when `dest` (where the cancel was sent) is not the
    session's server."""
    found = KEYS.get((pid, key))
    if found is None:
        return None
    addr, port, server_key, ref = found
    if (addr, port) != (dest[0], dest[1]):
        raise Elsewhere(_elsewhere(dest))
    owner = ref()
    return addr, port, server_key, owner is not None and owner.cancel_hold()


def socket_path(shared: Path, worker: int) -> Path:
    return shared / f"cancel-{worker}.sock"


async def claim_anywhere(pid: int, key: bytes, worker: int, workers: int, shared: Path | None,
                         timeout: float, dest: tuple[str, int]) -> tuple[str, int, bytes, bool] | None:
    """`claim` in the worker that issued the key: this one, or a sibling over its socket.
    Raises OwnerGone when that sibling cannot be asked, Elsewhere as `claim` does."""
    owner = owner_of(key, workers)
    if owner == worker or shared is None:
        return claim(pid, key, dest)
    path = socket_path(shared, owner)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
            try:
                ask = {"pid": pid, "key": key.hex(), "addr": dest[0], "port": dest[1]}
                writer.write(json.dumps(ask).encode() + b"\n")
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError) as e:
        raise OwnerGone(f"proxy worker {owner}, which holds that key's session, cannot be asked "
                        f"({e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__}): "
                        "nothing was cancelled") from None
    try:
        answer = json.loads(line)
        if answer.get("elsewhere"):
            raise Elsewhere(_elsewhere(dest))
        if not answer.get("found"):
            return None
        return str(answer["addr"]), int(answer["port"]), bytes.fromhex(answer["key"]), bool(answer["hold_canceled"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise OwnerGone(f"proxy worker {owner} gave no usable answer: nothing was cancelled") from None


def _elsewhere(dest: tuple[str, int]) -> str:
    return f"CancelRequest sent to {dest[0]}:{dest[1]} for a session with another server: it is judged where it is sent and goes nowhere else"


async def serve(shared: Path, worker: int) -> asyncio.AbstractServer:
    """This worker's socket for its siblings' claims (in the root-only shared dir; the peer must
    also run as our uid, checked with SO_PEERCRED). A predecessor's socket file is replaced."""
    path = socket_path(shared, worker)
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(_answer, str(path), limit=LINE_LIMIT)
    os.chmod(path, 0o600)
    return server


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        sock = writer.get_extra_info("socket")
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.geteuid():
            return
        async with asyncio.timeout(5):
            req = json.loads(await reader.readline())
        dest = (str(req["addr"]), int(req["port"]))  # a request without one is not answered
        try:
            found = claim(int(req["pid"]), bytes.fromhex(req["key"]), dest)
            answer = {"found": False} if found is None else {
                "found": True, "addr": found[0], "port": found[1], "key": found[2].hex(), "hold_canceled": found[3]}
        except Elsewhere:
            answer = {"found": False, "elsewhere": True}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
    except (OSError, TimeoutError, ValueError, KeyError, TypeError):
        pass  # the asking worker reads no answer: it refuses the cancel
    finally:
        writer.close()
