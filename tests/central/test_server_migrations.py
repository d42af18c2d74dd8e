"""Versioned migrations: applied in order, once, also when several recorder instances start at once."""

from __future__ import annotations

import shutil
import threading

import pytest

from central import db


def _fresh(rec, name: str) -> str:
    rec.psql(f"CREATE DATABASE {name}")
    return rec.pg.conninfo(dbname=name)


def test_migrations_apply_once(recorder):
    dsn = _fresh(recorder, "mig_once")
    first = db.migrate(dsn)
    assert first == [f"{m.version:04d}_{m.name}" for m in db.migrations()] and first
    assert db.migrate(dsn) == []
    with db.connect(dsn) as conn:
        db.check_schema(conn)
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(first)


def test_instances_starting_at_once_apply_each_migration_once(recorder):
    dsn = _fresh(recorder, "mig_race")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def go():
        try:
            results.append(db.migrate(dsn))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(len(r) for r in results) == [0, 0, 0, 0, len(db.migrations())]
    with db.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT version) FROM schema_migrations").fetchone() == (len(db.migrations()),) * 2


def test_serve_processes_racing_on_an_empty_database(recorder):
    """Two `recorder migrate` processes at once (what two instances do at start) on a fresh database."""
    import subprocess
    import sys

    dsn = _fresh(recorder, "mig_proc")
    procs = [subprocess.Popen([sys.executable, "-m", "central", "migrate", "--database", dsn], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sorted(o for o, _ in outs).count("schema up to date\n") == 2


def test_an_edited_applied_migration_is_an_error(recorder, tmp_path):
    dsn = _fresh(recorder, "mig_edit")
    d = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS, d)
    db.migrate(dsn, d)
    f = sorted(d.glob("*.sql"))[0]
    f.write_text(f.read_text() + "\n-- edited\n")
    with pytest.raises(db.StoreError, match="changed after it was applied"):
        db.migrate(dsn, d)


def test_cli_without_a_database_says_how_to_give_one(recorder, monkeypatch):
    monkeypatch.delenv(db.DSN_ENV, raising=False)
    r = recorder.cli("hosts", check=False)
    assert r.returncode == 2 and "--database" in r.stderr and "Traceback" not in r.stderr
