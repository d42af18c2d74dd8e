"""A real OpenID Connect provider for tests and the demo: oidc-provider-mock (PyPI) in its own process,
on loopback or on a lab host's address, with predefined users (claims as given, e.g. groups), nonces required.

    with OIDCProvider([{"sub": "alice", "email": "alice@example.com", "groups": ["dba"]}]) as idp:
        idp.issuer                  # http://127.0.0.1:PORT (also the discovery base)
        idp.id_token("alice", client_id="interlock-web")   # an ID token via the real code flow
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import httpx

from lab.central import in_host
from lab.netns import Host
from lab.testing import SLOWDOWN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OIDCProvider:
    def __init__(self, users: list[dict], port: int | None = None, token_max_age: int = 3600, host: Host | None = None):
        self.users = users
        self.host = host  # a lab host: listen on its address, in its namespace
        self.port = port or (9400 if host else free_port())
        self.token_max_age = token_max_age
        self.proc: subprocess.Popen | None = None

    @property
    def issuer(self) -> str:
        return f"http://{self.host.addr4 if self.host else '127.0.0.1'}:{self.port}"

    def _call(self, fn, *args, **kw):
        return in_host(self.host, fn, *args, **kw) if self.host else fn(*args, **kw)

    def start(self, timeout: float = 30) -> OIDCProvider:
        cmd = [sys.executable, "-W", "ignore", "-m", "oidc_provider_mock", "--host", self.host.addr4 if self.host else "127.0.0.1",
               "--port", str(self.port),
               "--require-nonce", "true", "--token-max-age", str(self.token_max_age)]
        for u in self.users:
            cmd += ["--user-claims", json.dumps(u)]
        popen = self.host.popen if self.host else subprocess.Popen
        self.proc = popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + timeout * SLOWDOWN
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oidc-provider-mock exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if self._call(httpx.get, self.issuer + "/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"oidc-provider-mock did not answer on {self.issuer} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> OIDCProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def id_token(self, sub: str, client_id: str, redirect_uri: str = "https://automation.invalid/cb") -> str:
        return self._call(self._id_token, sub, client_id, redirect_uri)

    def _id_token(self, sub: str, client_id: str, redirect_uri: str) -> str:
        """An ID token for `sub`, obtained through the provider's own code flow (with PKCE) as a
        script would: what automation sends as a bearer token."""
        verifier = secrets.token_urlsafe(32)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        q = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": "openid email profile",
             "state": "s", "nonce": secrets.token_urlsafe(8), "code_challenge": challenge, "code_challenge_method": "S256"}
        with httpx.Client(timeout=10) as c:
            r = c.post(self.issuer + "/oauth2/authorize", params=q, data={"sub": sub})
            code = parse_qs(urlsplit(r.headers["location"]).query)["code"][0]
            t = c.post(self.issuer + "/oauth2/token", data={"grant_type": "authorization_code", "code": code,
                                                             "redirect_uri": redirect_uri, "client_id": client_id,
                                                             "client_secret": "x", "code_verifier": verifier})
            t.raise_for_status()
            return t.json()["id_token"]
