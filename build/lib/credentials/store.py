"""The credential store: named secrets, encrypted at rest, in the instance's state dir.

Agents never see these: the proxy uses them to log in upstream (PostgreSQL), to re-sign
requests (AWS SigV4) or to add a bearer/basic header. The key file and the sealed file are
0600 in a 0700 directory; the secret values never appear in the recordings or on a command
line (the CLI reads them from stdin)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

KINDS = {
    "postgres": ("user", "password"),
    "aws": ("access_key_id", "secret_access_key"),
    "bearer": ("token",),
    "basic": ("user", "password"),
}
OPTIONAL = {"aws": ("session_token", "placeholder_access_key_id", "placeholder_secret_access_key"), "postgres": ("methods",)}


class CredentialError(ValueError):
    pass


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class CredentialStore:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.key_file = self.dir / "credentials.key"
        self.sealed = self.dir / "credentials.sealed"
        self._cache: tuple[float, dict] | None = None

    def _fernet(self, create: bool) -> Fernet | None:
        if not self.key_file.exists():
            if not create:
                return None
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(self.key_file, Fernet.generate_key())
        return Fernet(self.key_file.read_bytes().strip())

    def _load(self) -> dict[str, dict]:
        if not self.sealed.exists():
            return {}
        mtime = self.sealed.stat().st_mtime
        if self._cache and self._cache[0] == mtime:
            return self._cache[1]
        f = self._fernet(create=False)
        if f is None:
            raise CredentialError(f"{self.key_file} is missing: the sealed credentials cannot be opened")
        try:
            data = json.loads(f.decrypt(self.sealed.read_bytes()))
        except InvalidToken:
            raise CredentialError(f"{self.sealed} does not open with {self.key_file}") from None
        self._cache = (mtime, data)
        return data

    def _save(self, data: dict[str, dict]) -> None:
        f = self._fernet(create=True)
        _write_private(self.sealed, f.encrypt(json.dumps(data, sort_keys=True).encode()))
        self._cache = None

    def put(self, name: str, kind: str, fields: dict[str, str]) -> None:
        if kind not in KINDS:
            raise CredentialError(f"unknown kind '{kind}' (known: {', '.join(KINDS)})")
        missing = [k for k in KINDS[kind] if not fields.get(k)]
        if missing:
            raise CredentialError(f"a {kind} credential needs {', '.join(missing)}")
        unknown = set(fields) - set(KINDS[kind]) - set(OPTIONAL.get(kind, ()))
        if unknown:
            raise CredentialError(f"a {kind} credential has no field(s) {', '.join(sorted(unknown))}")
        data = dict(self._load())
        data[name] = {"kind": kind, **fields}
        self._save(data)

    def get(self, name: str) -> dict | None:
        return self._load().get(name)

    def delete(self, name: str) -> bool:
        data = dict(self._load())
        if data.pop(name, None) is None:
            return False
        self._save(data)
        return True

    def listing(self) -> list[dict]:
        """Names and kinds, and the non-secret fields: what an operator may see."""
        public = {"user", "access_key_id", "placeholder_access_key_id", "methods"}
        return [{"name": n, "kind": v["kind"], **{k: v[k] for k in v if k in public}}
                for n, v in sorted(self._load().items())]
