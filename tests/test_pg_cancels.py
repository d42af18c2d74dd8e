"""Cancel keys across proxy workers (proxy/postgres/cancels.py): a key names the worker that issued
it, and a sibling's claim goes over that worker's unix socket; a key nobody issued, or whose
worker is gone, cancels nothing. The end-to-end test with real workers, psycopg and PostgreSQL
is tests/test_pg_cancel_workers.py."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from proxy.postgres import cancels


class Session:
    def __init__(self, holding: bool):
        self.holding = holding
        self.asked = 0

    def cancel_hold(self) -> bool:
        self.asked += 1
        return self.holding


@pytest.mark.parametrize("length", [4, 32, 256])
@pytest.mark.parametrize("workers", [1, 2, 3, 8, 64])
def test_a_key_names_its_worker(length, workers):
    for worker in range(workers):
        keys = {cancels.issue_key(length, worker, workers) for _ in range(50)}
        assert len(keys) == 50, "random, not derived from the worker alone"
        assert all(len(k) == length and cancels.owner_of(k, workers) == worker for k in keys)


def test_every_worker_is_named_evenly_by_a_forged_key():
    # a forged key routes to some worker like any other; only the issuer's map can hold it
    owners = [cancels.owner_of(os.urandom(4), 2) for _ in range(2000)]
    assert 800 < owners.count(0) < 1200


def _claim(key: bytes, worker: int, shared: Path | None, pid: int = 4242):
    return asyncio.run(cancels.claim_anywhere(pid, key, worker, 2, shared, 10, ("10.0.0.2", 5432)))


def test_a_sibling_claims_its_key_over_its_socket_and_nothing_else():
    shared = Path(tempfile.mkdtemp(prefix="interlock-cancels-"))
    os.chmod(shared, 0o700)
    held, idle = Session(holding=True), Session(holding=False)
    key1 = cancels.issue_key(4, 1, 2)
    key1b = cancels.issue_key(4, 1, 2)
    cancels.remember(4242, key1, "10.0.0.2", 5432, b"REAL", held)
    cancels.remember(4243, key1b, "10.0.0.2", 5433, b"RL2!", idle)

    async def scenario():
        server = await cancels.serve(shared, 1)  # "worker 1" (its map is this process's KEYS)
        try:
            assert (os.stat(cancels.socket_path(shared, 1)).st_mode & 0o777) == 0o600
            got = [await cancels.claim_anywhere(4242, key1, 0, 2, shared, 10, ("10.0.0.2", 5432)),
                   await cancels.claim_anywhere(4243, key1b, 0, 2, shared, 10, ("10.0.0.2", 5433)),
                   await cancels.claim_anywhere(4243, key1, 0, 2, shared, 10, ("10.0.0.2", 5433)),  # right key, wrong backend
                   await cancels.claim_anywhere(4242, cancels.issue_key(4, 1, 2), 0, 2, shared, 10,
                                                ("10.0.0.2", 5432))]  # forged
            return got
        finally:
            server.close()
            await server.wait_closed()

    try:
        got = asyncio.run(scenario())
        assert got[0] == ("10.0.0.2", 5432, b"REAL", True) and held.asked == 1
        assert got[1] == ("10.0.0.2", 5433, b"RL2!", False) and idle.asked == 1
        assert got[2] is None and got[3] is None
        # the session ended: its key is gone
        cancels.forget(4242, key1)
        assert cancels.claim(4242, key1, ("10.0.0.2", 5432)) is None
    finally:
        cancels.forget(4242, key1)
        cancels.forget(4243, key1b)
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_a_gone_owner_cancels_nothing():
    shared = Path(tempfile.mkdtemp(prefix="interlock-cancels-"))
    key1 = cancels.issue_key(4, 1, 2)
    session = Session(holding=True)
    cancels.remember(7, key1, "10.0.0.2", 5432, b"REAL", session)
    try:
        # worker 0 gets a key worker 1 issued; worker 1 has no socket (dead, not yet restarted)
        with pytest.raises(cancels.OwnerGone, match="worker 1"):
            _claim(key1, 0, shared, pid=7)
        # a socket file nobody listens on (the worker was killed): the same
        import socket as _s
        dead = _s.socket(_s.AF_UNIX)
        dead.bind(str(cancels.socket_path(shared, 1)))
        dead.close()
        with pytest.raises(cancels.OwnerGone):
            _claim(key1, 0, shared, pid=7)
        assert session.asked == 0, "the map of this process is not the owner's: never consulted"
        # the worker that issued it answers for itself without a socket
        assert _claim(key1, 1, shared, pid=7) == ("10.0.0.2", 5432, b"REAL", True)
    finally:
        cancels.forget(7, key1)
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_one_worker_uses_no_socket():
    key = cancels.issue_key(4)
    session = Session(holding=False)
    cancels.remember(9, key, "10.0.0.2", 5432, b"REAL", session)
    try:
        dest = ("10.0.0.2", 5432)
        assert asyncio.run(cancels.claim_anywhere(9, key, 0, 1, None, 10, dest)) == ("10.0.0.2", 5432, b"REAL", False)
        assert asyncio.run(cancels.claim_anywhere(9, os.urandom(4), 0, 1, None, 10, dest)) is None
    finally:
        cancels.forget(9, key)


def test_a_cancel_sent_to_another_server_gives_nothing_up():
    # the cancel was judged for where the agent sent it: a key whose session is elsewhere is
    # refused by its owner, locally and over the socket, before any hold is given up
    shared = Path(tempfile.mkdtemp(prefix="interlock-cancels-"))
    os.chmod(shared, 0o700)
    held = Session(holding=True)
    key1 = cancels.issue_key(4, 1, 2)
    cancels.remember(4244, key1, "10.0.0.2", 5432, b"REAL", held)

    async def scenario():
        server = await cancels.serve(shared, 1)
        try:
            for dest in (("10.0.0.2", 5433), ("10.0.0.3", 5432)):
                with pytest.raises(cancels.Elsewhere, match="another server"):
                    await cancels.claim_anywhere(4244, key1, 0, 2, shared, 10, dest)
                with pytest.raises(cancels.Elsewhere):
                    cancels.claim(4244, key1, dest)
            assert held.asked == 0
            # the control: sent where the session is, the same key gives the hold up
            return await cancels.claim_anywhere(4244, key1, 0, 2, shared, 10, ("10.0.0.2", 5432))
        finally:
            server.close()
            await server.wait_closed()

    try:
        assert asyncio.run(scenario()) == ("10.0.0.2", 5432, b"REAL", True) and held.asked == 1
    finally:
        cancels.forget(4244, key1)
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()
