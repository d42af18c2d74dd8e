"""The instance's cgroup tree under the cgroup2 mount: agents/<name> leaves and a daemon leaf.

The BPF programs attach to the tree's top, so they see the agents and never the rest of the host
(unless a deployment chooses a wider capture scope)."""

from __future__ import annotations

import os
from pathlib import Path


class CgroupError(RuntimeError):
    pass


def cgroup2_mount(mounts: str = "/proc/mounts") -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts, …/unified on hybrid ones."""
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise CgroupError("no cgroup2 filesystem is mounted; mount one: mount -t cgroup2 none /sys/fs/cgroup")


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
