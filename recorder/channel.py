"""The host's outbound channel to the central recorder for approvers' answers (no inbound port).

A daemon thread long-polls `GET /v1/decisions` over HTTPS with the host's mTLS certificate (the files
`interlock join` wrote: recorder.join.HostFiles), applies each answer to the local store exactly as
`interlock approve/deny` does (recorder.approvals.decide: the proxy's hold poller releases or refuses
the agent within APPROVAL_POLL), and acks it with the outcome. Nothing else changes on the host: when
the recorder cannot be reached a hold times out into a refusal as it always did, and root's CLI
keeps working against the same store (whichever answer lands first wins; the other is told so).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from recorder import approvals
from recorder.join import HostFiles

log = logging.getLogger("interlock.recorder.channel")
WAIT = 20.0  # seconds the recorder may hold one poll open
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
NO_PAGE_RETRY = 60.0  # seconds between looks while the recorder serves no approval page (404)


class NoPage(Exception):
    """The recorder answers 404 to /v1/decisions: it was started without --web."""


class DecisionChannel:
    """apply(answer) -> result text is approvals.decide on the host's store by default."""

    def __init__(self, files: HostFiles, db_path: Path, wait: float = WAIT):
        self.files = files
        self.db_path = db_path
        self.wait = wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.applied = 0
        self.page: bool | None = None  # False while the recorder answers that it serves no page
        self._live: http.client.HTTPSConnection | None = None
        u = urlsplit(files.server)
        self._host, self._port = u.hostname or "", u.port or 443
        self._ctx = files.client_context()

    def start(self) -> DecisionChannel:
        self._thread = threading.Thread(target=self._run, name="interlock-decisions", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        live = self._live
        if live is not None and live.sock is not None:  # end a long poll in flight now, not in WAIT seconds
            try:
                live.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _conn(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self._host, self._port, context=self._ctx, timeout=self.wait + 15)

    def _run(self) -> None:
        failures = 0
        conn: http.client.HTTPSConnection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._live = self._conn()
                    conn.connect()
                    self.connected, failures = True, 0
                answers = self._request(conn, "GET", f"/v1/decisions?wait={self.wait:g}")["decisions"]
                self.page = True
                if answers:
                    results = [{"approval": a["approval"], "result": self.apply(a)} for a in answers]
                    self._request(conn, "POST", "/v1/decisions/ack", {"results": results})
            except NoPage:
                if self.page is not False:
                    log.info("recorder channel: %s serves no approval page; looking again every %.0f s",
                             self.files.server, NO_PAGE_RETRY)
                self.page = False
                self._stop.wait(NO_PAGE_RETRY)
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as e:
                if conn is not None:
                    conn.close()
                conn = None
                if self.connected or failures == 0:
                    log.warning("recorder channel: %s (holds still time out into refusals; root's CLI still answers)", e)
                self.connected = False
                self._stop.wait(BACKOFF[min(failures, len(BACKOFF) - 1)])
                failures += 1
        if conn is not None:
            conn.close()

    def _request(self, conn: http.client.HTTPSConnection, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        payload = r.read()
        if r.status == 404:
            raise NoPage()
        if r.status != 200:
            raise http.client.HTTPException(f"{method} {path}: HTTP {r.status} {payload[:200]!r}")
        return json.loads(payload)

    def apply(self, answer: dict) -> str:
        """Record one answer in the host's store; the outcome ('approved', 'denied', or why not)."""
        try:
            r = approvals.decide(self.db_path, str(answer["approval"]), bool(answer["approve"]), str(answer["by"]),
                                 float(answer["for_seconds"]) if answer.get("for_seconds") else None,
                                 note=str(answer.get("note") or ""))
        except approvals.ApprovalError as e:
            return f"not applied: {e}"
        self.applied += 1
        log.info("approval %s %s by %s (from the recorder)", r["id"], r["status"], r["by"])
        return r["status"]


def wait_connected(channel: DecisionChannel, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if channel.connected:
            return True
        time.sleep(0.05)
    return channel.connected
