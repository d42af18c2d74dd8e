"""The instance's cgroup tree under the cgroup2 mount: agents/<name> leaves and a daemon leaf.

The BPF programs attach to the tree's top, so they see the agents and never the rest of the host
(unless a deployment chooses a wider capture scope)."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


class CgroupError(RuntimeError):
    pass


# Where Interlock mounts the cgroup2 hierarchy itself when none is visible in its mount namespace.
PRIVATE_CGROUP2 = Path("/run/interlock-cgroup2")


def _mounted_cgroup2(mounts: str) -> Path | None:
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


def cgroup2_mount(mounts: str = "/proc/mounts") -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts, …/unified on hybrid ones.

    Where this mount namespace shows none (`ip netns exec` remounts /sys without it; some
    containers), root mounts the hierarchy itself at PRIVATE_CGROUP2: cgroup v2 has a single
    hierarchy, so every mount of it shows the same cgroups, ids and files."""
    found = _mounted_cgroup2(mounts)
    if found is not None:
        return found
    if mounts == "/proc/mounts" and os.geteuid() == 0:
        PRIVATE_CGROUP2.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "cgroup2", "cgroup2", str(PRIVATE_CGROUP2)], capture_output=True, text=True)
        if r.returncode == 0 or _mounted_cgroup2(mounts) is not None:
            return _mounted_cgroup2(mounts) or PRIVATE_CGROUP2
        raise CgroupError(f"no cgroup2 filesystem is visible here and mounting one at {PRIVATE_CGROUP2} failed "
                          f"({r.stderr.strip()}); the kernel needs cgroup v2 (CONFIG_CGROUPS, cgroup_no_v1 is not needed)")
    raise CgroupError("no cgroup2 filesystem is visible here; run as root (interlock mounts it itself) or enter the "
                      "host's mount namespace (nsenter --net=/run/netns/NAME instead of ip netns exec)")


def cgroup_id(path: Path) -> int:
    """A cgroup v2 id is its directory's inode number (what bpf_get_current_cgroup_id returns)."""
    return os.stat(path).st_ino


def ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def move(pid: int, path: Path) -> None:
    (path / "cgroup.procs").write_text(f"{pid}\n")


def procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def cgroup_of(pid: int, mount: Path) -> Path | None:
    """The cgroup v2 directory a process is in."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return None


@contextmanager
def frozen(path: Path, timeout: float = 2.0):
    """Freeze every process of a cgroup for the duration (cgroup v2 freezer, Linux 5.2), and yield
    whether they all stopped in time. The previous freeze state comes back afterwards."""
    knob = path / "cgroup.freeze"
    try:
        was = knob.read_text().strip()
        knob.write_text("1")
    except OSError:
        yield False
        return
    try:
        deadline = time.monotonic() + timeout
        done = False
        while not done and time.monotonic() < deadline:
            done = "frozen 1" in (path / "cgroup.events").read_text()
            if not done:
                time.sleep(0.005)
        yield done
    finally:
        knob.write_text(was or "0")


INSTANCE_XATTR = "trusted.interlock.instance"


def mark_instance(root: Path, instance: str) -> bool:
    """Label an instance's cgroup root with its name (a trusted.* xattr: only root can set or
    read it), so any daemon can tell that a process belongs to some Interlock instance."""
    try:
        os.setxattr(root, INSTANCE_XATTR, instance.encode())
        return True
    except OSError:
        return False


def instance_of(cgroup: Path, mount: Path) -> tuple[str, Path] | None:
    """(instance name, its cgroup root) when `cgroup` is inside an instance's tree, else None."""
    path = cgroup
    while True:
        try:
            return os.getxattr(path, INSTANCE_XATTR).decode(errors="replace"), path
        except OSError:
            pass
        if path == mount or mount not in path.parents:
            return None
        path = path.parent


def remove_tree(path: Path, park: Path) -> None:
    """Remove a cgroup tree bottom-up, parking any process still inside in `park`."""
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _drain(child, park)
        child.rmdir()
    _drain(path, park)
    path.rmdir()


def _drain(path: Path, park: Path) -> None:
    for pid in procs(path):
        try:
            move(pid, park)
        except OSError:
            pass
