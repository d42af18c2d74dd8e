"""Putting a running process tree into an agent cgroup, and taking it out again, without ever
enrolling the wrong thing.

Refused, each with a one-line reason: a pid that does not exist, PID 1, a kernel thread, the
init of any PID namespace, this instance's daemon and proxy (and anything in its daemon
cgroup, so their children too), any process of another Interlock instance (a cgroup below a
root labelled with another instance's name), and a tree that contains any of these.

The move is repeated until the tree is stable (a child forked while its parent was being moved
would otherwise stay behind); then, with the agent cgroup frozen, the tree's sockets from before
the move are neutralised (`presockets`). If one cannot be, every moved process goes back where it
was."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from interceptor import cgroups, presockets
from interceptor.procinfo import NoSuchProcess, ProcFacts, descendants, facts

MAX_PASSES = 20


class Refused(Exception):
    """The request cannot be carried out; the message is the one line the operator sees."""


@dataclass
class Scope:
    """What the checks need to know about this instance."""

    instance: str
    mount: Path
    cgroup_root: Path
    agents_cgroup: Path
    daemon_cgroup: Path
    own_pids: frozenset[int]  # the daemon's and the proxy's pids


def check_target(pid: int, scope: Scope) -> None:
    """Raise Refused when `pid` itself must never be enrolled."""
    try:
        f = facts(pid)
    except NoSuchProcess:
        raise Refused(f"no process {pid}") from None
    why = target_refusal(f)
    if why:
        raise Refused(why)
    check_member(pid, scope, f.comm)


def target_refusal(f: ProcFacts) -> str | None:
    """Why a process is never an agent by its nature (init, kernel thread), or None."""
    if f.pid == 1:
        return "pid 1 is the host's init: enrolling it would put every process on the host under the agent"
    if f.kthread or f.pid == 2:
        return f"pid {f.pid} ({f.comm}) is a kernel thread: it makes no connections of its own to capture"
    if f.ns_pid == 1:
        return (f"pid {f.pid} ({f.comm}) is PID 1 of its own PID namespace (a container's init): "
                f"enrol the process inside it instead")
    return None


def check_member(pid: int, scope: Scope, comm: str = "") -> None:
    """Raise Refused when `pid` belongs to Interlock itself (this instance or another)."""
    label = f"pid {pid}" + (f" ({comm})" if comm else "")
    if pid in scope.own_pids:
        raise Refused(f"{label} is instance {scope.instance}'s own daemon or proxy")
    cg = cgroups.cgroup_of(pid, scope.mount)
    if cg is None:
        return
    if cg == scope.daemon_cgroup or scope.daemon_cgroup in cg.parents:
        raise Refused(f"{label} runs in instance {scope.instance}'s daemon cgroup (the daemon, the proxy or a child of them)")
    owner = cgroups.instance_of(cg, scope.mount)
    if owner is not None and owner[1] != scope.cgroup_root:
        raise Refused(f"{label} belongs to another Interlock instance, '{owner[0]}' (cgroup {owner[1]})")
    if (cg == scope.cgroup_root or scope.cgroup_root in cg.parents) and not (
            cg == scope.agents_cgroup or scope.agents_cgroup in cg.parents):
        raise Refused(f"{label} runs in instance {scope.instance}'s own cgroup tree ({cg})")


def tree_of(pid: int, tree: bool, scope: Scope) -> list[int]:
    """The processes an enrol of `pid` would move; Refused if any of them must not be."""
    pids = descendants(pid) if tree else [pid]
    for p in pids[1:]:
        try:
            f = facts(p)
        except NoSuchProcess:
            continue
        try:
            check_member(p, scope, f.comm)
        except Refused as e:
            raise Refused(f"the tree of pid {pid} contains {e}; enrol a smaller tree") from None
    return pids


def move_tree(pid: int, target: Path, tree: bool, scope: Scope) -> dict[int, Path]:
    """Move the tree into `target` until no process of it is left outside; {pid: where it was}.

    On Refused, whatever was moved is already back where it was."""
    moved: dict[int, Path] = {}
    try:
        for _ in range(MAX_PASSES):
            todo = [p for p in (tree_of(pid, tree, scope) if tree else [pid]) if p not in moved]
            if not todo:
                return moved
            for p in todo:
                origin = cgroups.cgroup_of(p, scope.mount)
                if origin is None:
                    continue
                if p != pid:
                    check_member(p, scope)
                try:
                    cgroups.move(p, target)
                except (ProcessLookupError, FileNotFoundError):
                    continue
                moved[p] = origin
            if not tree:
                return moved
        raise Refused(f"the tree of pid {pid} kept forking while it was being moved ({len(moved)} processes so far)")
    except Refused:
        restore(moved)
        raise
    except OSError as e:
        restore(moved)
        raise Refused(f"cannot move pid {pid}: {e.strerror or e}") from None


def restore(moved: dict[int, Path]) -> None:
    """Put processes back into the cgroups they came from (best effort: some may have exited)."""
    for p, origin in moved.items():
        try:
            cgroups.move(p, origin)
        except OSError:
            pass


def neutralise_or_restore(pid: int, moved: dict[int, Path], mark: int, target: Path) -> tuple[list[presockets.PreSocket], bool]:
    """After the move: make the tree's earlier inet sockets harmless, or undo the enrol.

    For a tree of several processes the target cgroup is frozen meanwhile, so no process of it
    can pass a socket to one already looked at. Returns (the sockets, whether the freeze took). Refused (the tree back
    where it was) when any socket could not be marked."""
    pids = list(moved) or [pid]
    if len(pids) > 1:
        with cgroups.frozen(target) as still:
            found = presockets.neutralise(pids, mark)
    else:  # one process (`interlock run`): no other process of the tree to hand a socket to
        still, found = True, presockets.neutralise(pids, mark)
    failed = [s for s in found if s.action == "failed"]
    if failed:
        restore(moved)
        raise Refused(f"pid {pid} not enrolled: {len(failed)} socket(s) it opened before cannot be closed: "
                      + "; ".join(s.line() for s in failed))
    return found, still
