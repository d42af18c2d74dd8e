"""psycopg 3's own test suite as the judge of the PostgreSQL relay: run it direct against a lab
PostgreSQL and again through the capture path (the same client enrolled with `interlock run`,
an allow-everything policy), and print what passes direct but not through Interlock.

psycopg's source is never part of this repository: fetch it yourself and pin the release that
matches the installed psycopg (`git archive 3.3.4 tests | tar -x -C /work/psycopg-src`). Run as
root (the lab builds network namespaces and cgroups):

    python -m lab.psycopg_suite --src /work/psycopg-src [--tls] [--only direct|interlock]
        [--timeout 60] [-- PYTEST ARGS, e.g. -x -k copy tests/test_copy.py]

Both runs use their own database on the same server, pytest-timeout bounds each test (a hang
counts as a failure), and the JUnit XML of each run is kept in --out. Exit status 1 when a test
passes direct and fails through Interlock.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from lab.instance import Instance
from lab.netns import Lab
from lab.postgres import Postgres
from lab.testing import instance_name

POLICY = "default: allow\n"  # allow everything: the relay itself is what is judged
# --core: the modules that exercise the wire (libpq, connections, cursors, COPY, pipelines,
# prepared statements, transactions, SQL composition, escaping), in their synchronous form;
# the whole suite takes hours on a loaded 2-core host.
CORE = ["tests/pq", "tests/test_connection.py", "tests/test_connection_info.py", "tests/test_conninfo_attempts.py",
        "tests/test_cursor.py", "tests/test_cursor_common.py", "tests/test_cursor_client.py",
        "tests/test_cursor_raw.py", "tests/test_cursor_server.py", "tests/test_copy.py", "tests/test_pipeline.py",
        "tests/test_prepared.py", "tests/test_transaction.py", "tests/test_tpc.py", "tests/test_sql.py",
        "tests/test_errors.py", "tests/test_notify.py", "tests/test_concurrency.py", "tests/test_query.py",
        "tests/test_rows.py", "tests/test_adapt.py", "tests/test_psycopg_dbapi20.py", "tests/types/test_string.py",
        "tests/types/test_array.py", "tests/types/test_json.py"]
# --sync: the async modules repeat the sync ones over asyncio and take most of the suite's time;
# the pool needs psycopg_pool, crdb CockroachDB, test_typing mypy.
SYNC_ONLY = ["--ignore-glob=*_async.py", "--ignore-glob=*_async_*.py", "--ignore=tests/pool", "--ignore=tests/crdb",
             "--ignore=tests/test_typing.py"]


def outcomes(junit: Path) -> dict[str, str]:
    """test id → passed / failed / error / skipped, from a pytest JUnit XML file."""
    out: dict[str, str] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "error" in kinds:
            out[tid] = "error"
        elif "failure" in kinds:
            out[tid] = "failed"
        elif "skipped" in kinds:
            out[tid] = "skipped"
        else:
            out[tid] = "passed"
    return out


def counts(results: dict[str, str]) -> dict[str, int]:
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for v in results.values():
        c[v] += 1
    return c


def _pytest(src: Path, dsn: str, junit: Path, timeout: int, extra: list[str]) -> list[str]:
    # PYTHONPATH: psycopg's `tests` package, not this repository's
    return ["env", f"PYTHONPATH={src}", sys.executable, "-m", "pytest", "-q", f"--timeout={timeout}",
            f"--test-dsn={dsn}", f"--junitxml={junit}", "-o", f"cache_dir={junit.parent / 'cache'}",
            "-W", "ignore::pytest.PytestUnraisableExceptionWarning", *extra]


def run(args: argparse.Namespace) -> int:
    src = Path(args.src).resolve()
    out = Path(args.out or tempfile.mkdtemp(prefix="interlock-psycopg-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, str]] = {}
    certdir = Path(tempfile.mkdtemp(prefix="interlock-psycopg-cert-"))
    with Lab() as lab:
        settings = _tls_settings(certdir) if args.tls else None
        with Postgres(lab.b, settings=settings) as pg:
            for db in ("psycopg_direct", "psycopg_interlock"):
                pg.psql(f"CREATE DATABASE {db}")
            ssl = " sslmode=require" if args.tls else " sslmode=disable"
            base = f"host={lab.b.addr4} port={pg.port} user=postgres connect_timeout=10{ssl}"
            if args.only in (None, "direct"):
                junit = out / "direct.xml"
                cmd = _pytest(src, f"{base} dbname=psycopg_direct", junit, args.timeout, args.pytest)
                print("direct:", " ".join(cmd[5:]), flush=True)
                with open(out / "direct.log", "w") as log:
                    lab.a.run(cmd, cwd=src,
                              capture_output=False, stdout=log, stderr=log, timeout=None)
                results["direct"] = outcomes(junit)
            if args.only in (None, "interlock"):
                policy = out / "policy.yaml"
                policy.write_text(POLICY)
                with Instance(lab.a, instance_name("psy"), proxy_port=15721, dns_port=15773,
                              policy=str(policy)) as inst:
                    junit = out / "interlock.xml"
                    cmd = _pytest(src, f"{base} dbname=psycopg_interlock", junit, args.timeout, args.pytest)
                    print("through interlock:", " ".join(cmd[5:]), flush=True)
                    with open(out / "interlock.log", "w") as log:
                        inst.agent(cmd, cwd=src, capture_output=False, stdout=log, stderr=log, timeout=None)
                    shutil.copy(inst.log, out / "daemon.log")
                results["interlock"] = outcomes(out / "interlock.xml")
    shutil.rmtree(certdir, ignore_errors=True)
    return report(results, out)


def report(results: dict[str, dict[str, str]], out: Path) -> int:
    for name, res in results.items():
        c = counts(res)
        print(f"{name:>10}: {len(res)} tests, " + ", ".join(f"{v} {k}" for k, v in c.items()))
    if len(results) < 2:
        return 0
    d, i = results["direct"], results["interlock"]
    worse = sorted(t for t, v in d.items() if v == "passed" and i.get(t, "missing") in ("failed", "error", "missing"))
    better = sorted(t for t, v in i.items() if v == "passed" and d.get(t) in ("failed", "error"))
    print(f"passed direct, not through Interlock: {len(worse)}")
    for t in worse:
        print(f"  {i.get(t, 'missing'):>7}  {t}")
    if better:
        print(f"passed through Interlock, not direct: {len(better)}")
        for t in better:
            print(f"  {t}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "worse.txt").write_text("".join(t + "\n" for t in worse))
    print(f"JUnit XML and daemon log in {out}")
    return 1 if worse else 0


def _tls_settings(directory: Path) -> dict[str, str]:
    """A self-signed server certificate: the TLS the agent asks for is then real end to end."""
    import datetime as dt
    import pwd

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab-postgres")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    crt, kf = directory / "server.crt", directory / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    pw = pwd.getpwnam("postgres")
    for f in (directory, crt, kf):
        os.chown(f, pw.pw_uid, pw.pw_gid)
    os.chmod(kf, 0o600)
    return {"ssl": "on", "ssl_cert_file": str(crt), "ssl_key_file": str(kf)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="psycopg source tree (its tests/ directory is run)")
    p.add_argument("--out", help="directory for JUnit XML and logs (default: a new temp dir)")
    p.add_argument("--only", choices=("direct", "interlock"), help="run one side only")
    p.add_argument("--tls", action="store_true", help="server with TLS, clients with sslmode=require")
    p.add_argument("--timeout", type=int, default=60, help="seconds per test before it counts as hung")
    p.add_argument("--core", action="store_true", help="only the wire-heavy modules (see CORE), not slow ones")
    p.add_argument("--sync", action="store_true",
                   help="every synchronous module (not *_async, not the pool, CockroachDB or mypy ones), not slow ones")
    p.add_argument("--compare", nargs=2, metavar=("DIRECT_XML", "INTERLOCK_XML"),
                   help="only compare two JUnit XML files from earlier runs")
    p.add_argument("pytest", nargs="*", help="pytest arguments after --")
    args = p.parse_args(argv)
    if args.core:
        args.pytest = ["-m", "not slow and not timing", *args.pytest, *CORE]
    elif args.sync:
        args.pytest = ["-m", "not slow and not timing", *SYNC_ONLY, *args.pytest]
    # SIGTERM unwinds like Ctrl-C: the lab, the server and the instance are removed on the way out.
    # Only in this process: a forked helper (pyroute2's NetNS) must not unwind our stack and
    # tear the lab down under us.
    main_pid = os.getpid()

    def on_term(signum: int, _frame: object) -> None:
        if os.getpid() == main_pid:
            sys.exit(143)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_term)
    if args.compare:
        return report({"direct": outcomes(Path(args.compare[0])), "interlock": outcomes(Path(args.compare[1]))},
                      Path(args.out or "."))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
