"""Bulk pass-through in the kernel: socket → pipe → socket with splice(2), one thread per direction.

An opaque connection (no protocol handler looks at its bytes) that has moved more than
`SPLICE_AFTER` bytes is taken off the event loop: both transports stop reading, their write
buffers drain, and two threads splice the duplicated descriptors until each direction ends.
The bytes never enter Python, and os.splice releases the GIL while it blocks."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable

SPLICE_AFTER = 1 << 20  # bytes relayed on the loop before a connection moves to splice
CHUNK = 1 << 20
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_MORE", 4)


def available() -> bool:
    return hasattr(os, "splice")


class Splice:
    """Both directions of one connection; `done(up, down, error)` is called on the loop at the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, agent_fd: int, upstream_fd: int,
                 done: Callable[[int, int, str | None], None]):
        self.loop = loop
        self.a = os.dup(agent_fd)
        self.b = os.dup(upstream_fd)
        # Blocking for the threads; the transports are paused with empty buffers, so the loop
        # does not touch these sockets again until it closes them.
        os.set_blocking(self.a, True)
        os.set_blocking(self.b, True)
        self.done = done
        self.moved = {"up": 0, "down": 0}
        self.error: str | None = None
        self._left = 2
        self._lock = threading.Lock()
        for name, src, dst in (("up", self.a, self.b), ("down", self.b, self.a)):
            threading.Thread(target=self._pump, args=(name, src, dst), daemon=True,
                             name=f"splice-{name}").start()

    def _pump(self, name: str, src: int, dst: int) -> None:
        r, w = os.pipe()
        try:
            while True:
                n = os.splice(src, w, CHUNK, flags=_FLAGS)
                if n == 0:
                    _shutdown(dst, socket.SHUT_WR)
                    break
                self.moved[name] += n
                while n:
                    n -= os.splice(r, dst, n, flags=_FLAGS)
        except OSError as e:
            self.error = self.error or f"{name}: {e.strerror or e}"
            _shutdown(src, socket.SHUT_RDWR)
            _shutdown(dst, socket.SHUT_RDWR)
        finally:
            os.close(r)
            os.close(w)
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                os.close(self.a)
                os.close(self.b)
                self.loop.call_soon_threadsafe(self.done, self.moved["up"], self.moved["down"], self.error)


def _shutdown(fd: int, how: int) -> None:
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(how)
    except OSError:
        pass
    finally:
        s.close()
