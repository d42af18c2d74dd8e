"""Where one instance keeps its state: the state dir, the run files, the cgroup tree, the pins.

Several instances run side by side (the tests start many), each named by its config and each
with its own state dir, cgroup root, bpffs pin dir, nft table and ports."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from interceptor.cgroups import cgroup2_mount

DEFAULT_STATE_DIR = Path("/var/lib/interlock")
DEFAULT_RUN_DIR = Path("/run/interlock")
BPFFS = Path("/sys/fs/bpf")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclass
class Layout:
    state_dir: Path
    run_dir: Path
    instance: str
    cgroup_root: Path
    capture_cgroup: Path  # where the hooks attach: cgroup_root or an ancestor

    @classmethod
    def build(cls, state_dir: Path | None, instance: str, cgroup_root: str,
              capture_cgroup: str | None = None) -> Layout:
        if state_dir is None:
            state, run = DEFAULT_STATE_DIR, DEFAULT_RUN_DIR
        else:
            state, run = Path(state_dir), Path(state_dir) / "run"
        mount = cgroup2_mount()
        root = mount / cgroup_root.strip("/")
        scope = root if capture_cgroup is None else mount / capture_cgroup.strip("/")
        return cls(state, run, instance, root, scope)

    @property
    def db(self) -> Path:
        return self.state_dir / "recorder.db"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def instance_file(self) -> Path:
        return self.run_dir / "instance.json"

    @property
    def last_instance_file(self) -> Path:
        """The same facts kept in the state dir after `down`, so the CLI still names the
        instance that ran here (the run dir's copy is removed with the daemon)."""
        return self.state_dir / "instance.json"

    @property
    def identities_file(self) -> Path:
        """Agents' bound OIDC identities (identity/agents.py): the daemon writes, the proxy reads."""
        return self.run_dir / "identities.json"

    @property
    def ca_cert(self) -> Path:
        """Public copies of the CA certificate and the trust bundle, readable by agents of any uid
        (the state dir is root-only)."""
        return self.run_dir / "ca.pem"

    @property
    def ca_bundle(self) -> Path:
        return self.run_dir / "ca-bundle.pem"

    @property
    def pin_dir(self) -> Path:
        return BPFFS / "interlock" / self.instance

    @property
    def agents_cgroup(self) -> Path:
        return self.cgroup_root / "agents"

    @property
    def daemon_cgroup(self) -> Path:
        return self.cgroup_root / "daemon"

    @property
    def nft_table(self) -> str:
        return "interlock" if self.instance == "default" else f"interlock-{self.instance}"

    def agent_cgroup(self, agent: str) -> Path:
        return self.agents_cgroup / agent


@dataclass
class InstanceInfo:
    """What a running daemon publishes in its run dir for the CLI verbs to find it."""

    instance: str
    daemon_pid: int
    proxy_pid: int
    proxy_port: int
    dns_port: int
    cgroup_root: str
    capture_cgroup: str
    netns: str
    state_dir: str
    ca_cert: str = ""  # the interception CA and the bundle (system CAs + ours) `interlock run` trusts
    ca_bundle: str = ""
    ptrace_guard: str = ""  # the defence in force (interceptor/ptrace_guard.py): `interlock run` reads it
    proxy_pids: list[int] = field(default_factory=list)  # every proxy worker (proxy_pid: the first)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> InstanceInfo:
        return cls(**json.loads(path.read_text()))
