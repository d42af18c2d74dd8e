"""`make deb`: the Debian package builds, holds what a fleet install needs, runs from its own
paths, and systemd accepts its unit. The package is unpacked (dpkg-deb -x) and run inside a
private mount namespace where /opt/interlock is the package's, so the host is not touched."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run([str(ROOT / "pkg" / "build-deb.sh"), str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unpacked(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def in_package_namespace(root: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` where /opt/interlock is the unpacked package's (a private mount namespace)."""
    setup = f"mount -t tmpfs none /opt && mkdir /opt/interlock && mount --bind {root}/opt/interlock /opt/interlock && cd / && "
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the package's own code
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", setup + script],
                          capture_output=True, text=True, timeout=120, env=env)


def test_control_fields_and_conffile(deb):
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True, check=True).stdout
    assert "Package: interlock" in info and "python3-bpfcc" in info and "nftables" in info
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    assert b"conffiles" in conffiles


def test_contents_are_where_a_fleet_install_expects_them(deb):
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./opt/interlock/venv/bin/interlock", "./usr/bin/interlock -> /opt/interlock/venv/bin/interlock",
                 "./lib/systemd/system/interlock.service", "./etc/interlock/config.yaml",
                 "./usr/share/doc/interlock/THREAT-MODEL.md"):
        assert path in listing, path
    assert "root/root" in listing and " 0/0 " not in listing.replace("root/root", "")


def test_no_path_of_the_build_is_left_inside(unpacked):
    r = subprocess.run(["grep", "-rlI", "interlock-deb-", str(unpacked)], capture_output=True, text=True)
    assert r.stdout == "", r.stdout


def test_the_installed_cli_runs_from_opt_with_debians_bcc(unpacked):
    r = in_package_namespace(unpacked, "/opt/interlock/venv/bin/interlock --version && "
                                       "/opt/interlock/venv/bin/python -c 'import bcc, proxy, policy; print(proxy.__file__)'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("interlock ") and "/opt/interlock/venv/lib/" in r.stdout


def test_systemd_accepts_the_unit_and_rejects_a_broken_one(unpacked, tmp_path):
    unit = unpacked / "lib/systemd/system/interlock.service"
    r = in_package_namespace(unpacked, f"systemd-analyze verify {unit}")
    assert r.returncode == 0, r.stdout + r.stderr
    # the control: the same check refuses a unit whose command does not exist
    broken = tmp_path / "interlock.service"
    broken.write_text(unit.read_text().replace("/opt/interlock/venv/bin/interlock", "/opt/interlock/venv/bin/nope"))
    r = in_package_namespace(unpacked, f"systemd-analyze verify {broken}")
    assert r.returncode != 0
