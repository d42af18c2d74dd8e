"""PostgreSQL for the central recorder: versioned migrations and the connection pool.

Migrations are central/migrations/NNNN_name.sql, applied in order, each in its own transaction and
recorded in `schema_migrations` with the file's SHA-256; a session-level advisory lock makes two
instances starting at once apply each migration exactly once (the second waits, then finds it done).
A migration whose file changed after it was applied is an error, not silently skipped."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x696E746C6B726563  # "intlkrec": the advisory lock every instance takes to migrate
DSN_ENV = "INTERLOCK_RECORDER_DATABASE"


class StoreError(Exception):
    """The store cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(directory: Path = MIGRATIONS) -> list[Migration]:
    out = []
    for f in sorted(directory.glob("*.sql")):
        m = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", f.name)
        if not m:
            raise StoreError(f"{f}: migration files are named NNNN_name.sql")
        out.append(Migration(int(m.group(1)), m.group(2), f.read_text()))
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise StoreError(f"{directory}: two migrations share a version")
    return out


def dsn_from(value: str | None) -> str:
    dsn = value or os.environ.get(DSN_ENV)
    if not dsn:
        raise StoreError(f"no database: pass --database DSN or set {DSN_ENV} (e.g. 'host=db.example dbname=interlock user=recorder')")
    return dsn


def connect(dsn: str) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise StoreError(f"cannot connect to PostgreSQL ({_one_line(e)}): check --database / {DSN_ENV} and that the server is up") from None


def migrate(dsn: str, directory: Path = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet applied; returns the names applied now (empty: up to date)."""
    wanted = migrations(directory)
    applied_now = []
    with connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                         " sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
            done = {v: (n, h) for v, n, h in conn.execute("SELECT version, name, sha256 FROM schema_migrations")}
            for m in wanted:
                if m.version in done:
                    if done[m.version][1] != m.sha256:
                        raise StoreError(f"migration {m.version:04d}_{m.name} changed after it was applied: "
                                         "add a new migration instead of editing an applied one")
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute("INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                                 (m.version, m.name, m.sha256))
                applied_now.append(f"{m.version:04d}_{m.name}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def check_schema(conn: psycopg.Connection) -> None:
    """Raise StoreError unless every migration shipped with this version is applied."""
    try:
        have = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
    except psycopg.errors.UndefinedTable:
        have = set()
    missing = [f"{m.version:04d}_{m.name}" for m in migrations() if m.version not in have]
    if missing:
        raise StoreError(f"the database lacks migrations {', '.join(missing)}: run 'interlock recorder serve' "
                         "(it migrates at start) or 'interlock recorder init --database DSN'")


# Per-connection scratch tables for the set-wise upserts of derived rows (ON COMMIT DELETE ROWS:
# empty at the start of every transaction).
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_sessions (LIKE sessions) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_approvals (LIKE approvals) ON COMMIT DELETE ROWS;
"""


async def _configure(conn: psycopg.AsyncConnection) -> None:
    await conn.set_autocommit(True)
    await conn.execute(_STAGING)


def pool(dsn: str, min_size: int = 2, max_size: int = 10) -> AsyncConnectionPool:
    """The pool a recorder process uses (open it with `await pool.open()`)."""
    return AsyncConnectionPool(dsn, min_size=min_size, max_size=max_size, open=False, configure=_configure,
                               kwargs={"connect_timeout": 10}, timeout=10, name="interlock-recorder")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
