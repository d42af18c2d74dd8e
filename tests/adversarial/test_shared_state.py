"""The proxy workers' shared state on /dev/shm (proxy/workers.py) against an agent that plants
something at its predictable path before the daemon starts: /dev/shm is world-writable, the path
is a hash of the run dir. An agent's symlink to its own directory used to be taken for the shared
directory (rmtree refuses a symlink, mkdir(exist_ok) accepts one), so the workers' name bindings,
connection counts and policy generation lived in a directory the agent could rename and replace
files in. Now the daemon clears what it finds without following it and makes the directory itself."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from proxy import workers

AGENT = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups"]


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(workers.shared_dir(d))], check=False)


@pytest.fixture
def agent_dir(tmp_path):
    d = tmp_path / "agent"
    d.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chown(d, 65533, 65533)
    return d


def _as_agent(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENT, *cmd], capture_output=True, text=True)


@pytest.mark.parametrize("plant", ["symlink", "directory", "file"])
def test_what_an_agent_plants_at_the_shared_path_is_not_used(run_dir, agent_dir, plant):
    d = workers.shared_dir(run_dir)
    assert str(d).startswith("/dev/shm/")
    cmd = {"symlink": ["ln", "-s", str(agent_dir), str(d)], "directory": ["mkdir", "-m", "777", str(d)],
           "file": ["touch", str(d)]}[plant]
    assert _as_agent(*cmd).returncode == 0
    workers.reset(run_dir, 2)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert os.listdir(agent_dir) == []  # nothing of the daemon's landed in the agent's directory
    assert set(os.listdir(d)) >= {"commit-hold", "conns", "names-version", "names.db", "policy-generation"}
    # the agent can neither replace the shared files nor the directory holding them
    assert _as_agent("mv", str(d / "names.db"), str(d / "n2")).returncode != 0
    assert _as_agent("mv", str(d), str(d) + "-gone").returncode != 0
    assert (d / "names.db").exists()


def test_control_a_fresh_start_makes_the_private_directory(run_dir):
    workers.reset(run_dir, 1)
    st = os.lstat(workers.shared_dir(run_dir))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    workers.remove(run_dir)
    assert not os.path.lexists(workers.shared_dir(run_dir))
