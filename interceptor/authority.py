"""Who may ask the daemon what: decided from the kernel's word about the peer of the control
socket, never from the request.

- Root, or a member of `operator_group`, that is not itself an agent: every request about
  enrolment (enroll, relabel, unenroll) and the full status.
- Root that is not an agent: rearm and down as well.
- Everyone else, agents of any uid included: ping and a short health status. An agent is a
  process in an agent cgroup of this or any other instance, a process whose cgroup or tgid an
  agent selector enrolled, or a process running as a selected uid: it can never change any
  enrolment, whatever its uid.
"""

from __future__ import annotations

import grp
from dataclasses import dataclass

ENROLMENT_OPS = frozenset({"enroll", "unenroll"})
ROOT_OPS = frozenset({"rearm", "down"})
OPEN_OPS = frozenset({"ping", "status"})


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a control connection, as of its connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    agent: str | None = None  # why it counts as an agent ("enrolled as agent 'bot'"), else None
    gone: bool = False  # the process had exited before the daemon could look at it

    def describe(self) -> str:
        return f"pid {self.pid}, uid {self.uid}"


def resolve_group(value: str | int | None) -> int | None:
    """The operator group's gid: a number is taken as is, a name is looked up (KeyError if none)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    return grp.getgrnam(str(value)).gr_gid


def is_operator(caller: Caller, operator_gid: int | None) -> bool:
    return caller.uid == 0 or (operator_gid is not None and
                               (caller.gid == operator_gid or operator_gid in caller.groups))


def refusal(op: str, caller: Caller, operator_gid: int | None) -> str | None:
    """None when `caller` may make request `op`; else the one-line reason it may not."""
    if op in OPEN_OPS:
        return None
    if op not in ENROLMENT_OPS | ROOT_OPS:
        return f"unknown request '{op}'"
    if caller.gone:
        return f"the requesting process ({caller.describe()}) exited before it could be checked"
    if caller.agent is not None:
        return (f"the requesting process ({caller.describe()}) is an agent ({caller.agent}): an agent can never "
                f"change enrolment or the daemon's state")
    if op in ROOT_OPS:
        return None if caller.uid == 0 else f"'{op}' needs root (you are uid {caller.uid})"
    if is_operator(caller, operator_gid):
        return None
    who = (f"root or a member of the operator group (gid {operator_gid})" if operator_gid is not None
           else "root (no operator_group is configured)")
    return f"'{op}' needs {who}; you are uid {caller.uid}"


def may_see_details(caller: Caller, operator_gid: int | None) -> bool:
    """Agents, selectors and pids in `status`: for the callers who may change them."""
    return not caller.gone and caller.agent is None and is_operator(caller, operator_gid)
