"""OIDC issuers for tests, each a real process on loopback (of the test's namespace or a lab host's):

- `MockProvider`: oidc-provider-mock (PyPI), a real OpenID provider; `token()` runs its
  authorization code flow (as a browser-less client would) and returns the ID token it issued.
- `KeyIssuer`: an issuer whose keys the test holds: a discovery document and a JWKS served by
  `python -m http.server`; `sign()` makes tokens with any claims (expired, wrong audience, …).

`python -m lab.oidc token ISSUER SUB AUDIENCE [NONCE]` prints an ID token of a MockProvider: run
it on the lab host where the provider listens."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lab.netns import Host
from lab.testing import SLOWDOWN, stop_process

REDIRECT = "http://127.0.0.1/callback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(run, url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout * SLOWDOWN
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the issuer for {url} exited {proc.returncode}")
        r = run([sys.executable, "-c", "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)", url])
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url} does not answer after {timeout}s")


def _runner(host: Host | None):
    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        if host is not None:
            return host.run(cmd)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return run


def _popen(host: Host | None, cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    if host is not None:
        return host.popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    return subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)


class MockProvider:
    """oidc-provider-mock on 127.0.0.1 of `host` (None: this process's namespace)."""

    def __init__(self, host: Host | None = None, port: int | None = None, users: list[dict] = (),
                 token_max_age: int = 3600):
        self.host, self.port = host, port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkdtemp(prefix="oidc-mock-")) / "provider.log"
        cmd = [sys.executable, "-m", "oidc_provider_mock", "-H", "127.0.0.1", "-p", str(self.port),
               "--token-max-age", str(token_max_age)]
        for u in users:
            cmd += ["--user-claims", json.dumps(u)]
        self.proc = _popen(host, cmd, self.log)
        _wait_http(_runner(host), self.issuer + "/.well-known/openid-configuration", self.proc)

    def token(self, sub: str, audience: str, nonce: str | None = None) -> str:
        """An ID token the provider issues to client `audience` for user `sub` (code flow)."""
        r = _runner(self.host)([sys.executable, "-m", "lab.oidc", "token", self.issuer, sub, audience, *([nonce] if nonce else [])])
        if r.returncode != 0:
            raise RuntimeError(f"no token from {self.issuer}: {r.stderr[-1000:]}")
        return r.stdout.strip()

    def stop(self) -> None:
        stop_process(self.proc)


def code_flow_token(issuer: str, sub: str, audience: str, nonce: str | None = None) -> str:
    """The authorization code flow against oidc-provider-mock: authorize as `sub`, redeem the code."""
    import httpx

    params = {"client_id": audience, "redirect_uri": REDIRECT, "response_type": "code", "scope": "openid email",
              "state": "lab"}
    if nonce:
        params["nonce"] = nonce
    r = httpx.post(f"{issuer}/oauth2/authorize", params=params, data={"sub": sub}, timeout=10)
    code = parse_qs(urlparse(r.headers["location"]).query)["code"][0]
    t = httpx.post(f"{issuer}/oauth2/token", data={"grant_type": "authorization_code", "code": code,
                                                   "redirect_uri": REDIRECT, "client_id": audience,
                                                   "client_secret": "lab"}, timeout=10)
    t.raise_for_status()
    return t.json()["id_token"]


class KeyIssuer:
    """An issuer whose signing keys the test holds, serving its discovery document and JWKS."""

    def __init__(self, host: Host | None = None, port: int | None = None):
        self.host, self.port = host, port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="oidc-keys-"))
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        keys = []
        for kid, k, alg in (("rsa-1", self.rsa, "RS256"), ("ec-1", self.ec, "ES256")):
            jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(k.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        self.jwks = {"keys": keys}
        (self.dir / ".well-known").mkdir()
        (self.dir / ".well-known" / "openid-configuration").write_text(json.dumps(
            {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks.json", "id_token_signing_alg_values_supported": ["RS256", "ES256"]}))
        (self.dir / "jwks.json").write_text(json.dumps(self.jwks))
        self.proc = _popen(host, [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                  "--directory", str(self.dir)], self.dir / "server.log")
        _wait_http(_runner(host), self.issuer + "/jwks.json", self.proc)

    def claims(self, sub: str, audience: str, lifetime: float = 600, **extra) -> dict:
        now = int(time.time())
        return {"iss": self.issuer, "sub": sub, "aud": audience, "iat": now, "nbf": now, "exp": now + lifetime, **extra}

    def sign(self, claims: dict, alg: str = "RS256", key=None, kid: str | None = "rsa-1") -> str:
        """A compact JWS of `claims`; by default with the issuer's RSA key under its kid."""
        if key is None:
            key = self.ec if alg.startswith("ES") else self.rsa
            kid = "ec-1" if alg.startswith("ES") else kid
        headers = {"kid": kid} if kid else {}
        return jwt.encode(claims, key, algorithm=alg, headers=headers)

    def stop(self) -> None:
        stop_process(self.proc)


def main(argv: list[str]) -> int:
    if len(argv) >= 4 and argv[0] == "token":
        print(code_flow_token(argv[1], argv[2], argv[3], argv[4] if len(argv) > 4 else None))
        return 0
    print("usage: python -m lab.oidc token ISSUER SUB AUDIENCE [NONCE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
