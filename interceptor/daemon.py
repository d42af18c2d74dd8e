"""The daemon: sets up the capture, supervises the proxy, watches for tampering.

Everything it installs outlives it on purpose (cgroup attachments, pinned maps, the nft table):
a dead daemon means agents' connections hit a closed port, never the network. A restarted
daemon adopts what is there; `interlock down` is the only thing that removes it."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

from interceptor import authority, bpf_loader, cgroups, enrolment, firewall, proxies, ptrace_guard
from interceptor.bpf_types import GUARD_SYSCALLS, ExecEvent, GuardEvent, Settings
from interceptor.bpf_types import Path as BpfPath
from interceptor.config import Config
from interceptor.control import peer_credentials, peer_groups, receive
from interceptor.identities import Identities
from interceptor.layout import InstanceInfo, Layout, valid_name
from interceptor.procinfo import NoSuchProcess, descendants, pid_of_pidfd
from proxy import workers as proxy_workers
from recorder.store import Recorder

REFUSALS_PER_SECOND = 20  # recorded one by one per uid; beyond, counted (a local user cannot flood the recorder)
CONTROL_TIMEOUT = 10.0  # seconds a control client may take to send its request
INBOUND_COUNTER_INTERVAL = 1.0  # seconds between reads of the inbound refusal counters


class DaemonError(RuntimeError):
    pass


# The agent id of the ptrace guard's self-test process (real agent ids count up from 1).
GUARD_PROBE_AGENT = 0xFFFFFFFF


def netns_id() -> str:
    return os.readlink("/proc/self/ns/net")


class Daemon:
    def __init__(self, config: Config, layout: Layout):
        self.config = config
        self.layout = layout
        self.lock = threading.RLock()
        self.recorder: Recorder | None = None
        self.datapath: bpf_loader.Datapath | None = None
        self.workers: list[proxies.Worker] = []  # the proxy processes (config.workers)
        self.lockdown_reason: str | None = None
        self.stopping = threading.Event()
        self.teardown_requested = False
        self.backstop: firewall.Backstop | None = None
        self.nft_expected: firewall.Snapshot | None = None  # the table as installed, compared whole
        self.agent_ids: dict[str, int] = {}
        self.server: socketserver.BaseServer | None = None
        self.operator_gid: int | None = None
        self.origins: dict[int, Path] = {}  # enrolled pid -> the cgroup it came from (for unenroll)
        self.refusal_budget: dict[int, tuple[int, int, int]] = {}  # uid -> (second, recorded, suppressed)
        self.inbound_seen: dict[str, int] = {}
        self.inbound_next = 0.0
        self.ptrace_defence: ptrace_guard.Defence | None = None
        self._guard_seen: set[tuple[int, int, int]] = set()
        self.shipping = None  # recorder.shipper.Shipping when `recorder:` is configured
        self.identities: Identities | None = None
        self.shipping = None  # recorder.shipper.Shipping when `recorder:` is configured

    # ---- setup -------------------------------------------------------------------------

    def start(self) -> None:
        lay, cfg = self.layout, self.config
        try:
            self.operator_gid = authority.resolve_group(cfg.operator_group)
        except KeyError:
            raise DaemonError(f"operator_group '{cfg.operator_group}': no such group (create it with groupadd, "
                              f"or give a numeric gid)") from None
        self._check_selector_scope()
        self._prepare_shipping()
        for d in (lay.state_dir, lay.run_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(lay.state_dir, 0o700)
        cgroups.ensure(lay.agents_cgroup)
        cgroups.ensure(lay.daemon_cgroup)
        cgroups.mark_instance(lay.cgroup_root, cfg.instance)
        cgroups.move(os.getpid(), lay.daemon_cgroup)
        self.recorder = Recorder(lay.db, who="daemon")
        self._journal()
        self.recorder.db["agents"].create({"id": int, "name": str}, pk="id", if_not_exists=True)
        self.agent_ids = {r["name"]: r["id"] for r in self.recorder.db["agents"].rows}
        self.lockdown_reason = self._saved_lockdown()
        # Agents' OIDC identities: written before the proxy starts, so it never judges without them.
        self.identities = Identities(cfg, lay.identities_file, self.recorder.event)
        self.identities.save()  # (re)written: selectors' bindings come from the config again
        self.identities.watch_once()

        self.datapath = bpf_loader.Datapath(lay.pin_dir, lay.capture_cgroup)
        self.datapath.compile()
        self._write_settings()
        for name in {p.name for p in lay.agents_cgroup.iterdir() if p.is_dir()} | {a.name for a in cfg.agents}:
            self.ensure_agent(name)
        self._load_selectors()
        self._choose_ptrace_defence()
        self.datapath.attach()
        if any(a.exe or a.uid for a in cfg.agents):
            try:
                self.datapath.attach_lineage()
            except (RuntimeError, OSError) as e:
                raise DaemonError(f"cannot enroll by exe/uid selector: {e}") from None
        self._adopt_enrolled()

        mount = cgroups.cgroup2_mount()
        self.backstop = firewall.Backstop(
            table=lay.nft_table, agents_cgroup=lay.agents_cgroup,
            cgroup_level=len(lay.agents_cgroup.relative_to(mount).parts), mark=cfg.mark,
            proxy_port=cfg.proxy_port, dns_port=cfg.dns_port, inbound_port=cfg.inbound_port)
        self.nft_expected = firewall.install(self.backstop)
        self.inbound_seen = firewall.inbound_refusals(lay.nft_table)
        self.datapath.open_exec_events(self._on_exec)
        recording = self.datapath.open_guard_events(self._on_guard)
        self._start_proxy()
        self._publish()
        if self.shipping is not None:
            self.shipping.start()
        self.recorder.event("daemon-start", {"pid": os.getpid(), "instance": cfg.instance,
                                             "lockdown": self.lockdown_reason})
        d = self.ptrace_defence
        self.recorder.event("ptrace-guard", {"defence": d.name, "detail": d.detail, "covers_all": d.covers_all,
                                             "refusals_recorded": recording})
        if not d.covers_all:
            print(f"interlock daemon: warning: ptrace guard: {d.name}: {d.detail}", file=sys.stderr, flush=True)

    def _check_selector_scope(self) -> None:
        """exe/uid selectors enrol a process at exec, but only the capture cgroup's hooks see its
        sockets: with the default scope (the instance's own tree, where no such process starts)
        every socket it makes before the daemon moves it would escape. Refuse that; a narrower
        scope than the whole host is allowed, and its outsiders are recorded, not enrolled."""
        named = [a.name for a in self.config.agents if a.exe or a.uid]
        if not named:
            return
        if self.config.capture_cgroup is None:
            raise DaemonError(
                f"agents {', '.join(named)} use exe/uid selectors, but the hooks cover only the instance's own "
                f"cgroup ({self.layout.cgroup_root}), where no selected process starts: set capture_cgroup: / "
                "(the whole host) so no socket of a selected process is made before capture")
        if self.layout.capture_cgroup != cgroups.cgroup2_mount():
            print(f"interlock daemon: warning: exe/uid selectors apply only to processes that start below "
                  f"capture_cgroup {self.layout.capture_cgroup}; others are recorded (selector-outside-scope), "
                  "not enrolled. capture_cgroup: / covers the whole host", file=sys.stderr, flush=True)

    def _prepare_shipping(self) -> None:
        """With `recorder:` configured the host must have joined it (before anything is installed)."""
        if self.config.recorder is None:
            return
        from recorder.join import JoinError
        from recorder.shipper import Shipping, prepare_files

        try:
            self.shipping = Shipping(self.layout.db, prepare_files(self.layout.state_dir, self.config.recorder.server))
        except (JoinError, OSError, ValueError) as e:
            raise DaemonError(str(e)) from None

    def _journal(self) -> None:
        """Journal triggers while shipping is configured; none otherwise (nothing would drain them)."""
        from recorder import journal

        try:
            if self.shipping is not None:
                self.shipping.install(self.recorder.conn)
            elif journal.installed(self.recorder.conn):
                journal.uninstall(self.recorder.conn)
        except journal.JournalError as e:
            raise DaemonError(str(e)) from None

    def _write_settings(self) -> None:
        cfg = self.config
        bpf_loader.write_settings(self.layout.pin_dir, Settings(
            proxy_port=_be16(cfg.proxy_port), dns_port=_be16(cfg.dns_port), mark=cfg.mark,
            lockdown=1 if self.lockdown_reason else 0))

    def _saved_lockdown(self) -> str | None:
        f = self.layout.state_dir / "lockdown"
        return f.read_text().strip() or "unknown" if f.exists() else None

    def ensure_agent(self, name: str) -> int:
        """An agent's id, cgroup and map entry, created on first use."""
        if not valid_name(name):
            raise DaemonError(f"agent name '{name}' must be lowercase letters, digits, - or _ (≤31)")
        with self.lock:
            if name not in self.agent_ids:
                self.agent_ids[name] = self.recorder.db["agents"].insert({"name": name}).last_pk
            agent_id = self.agent_ids[name]
            path = cgroups.ensure(self.layout.agent_cgroup(name))
            m = bpf_loader.PinnedMap(self.layout.pin_dir / "agent_cgroups")
            try:
                m.update(ctypes.c_uint64(cgroups.cgroup_id(path)), ctypes.c_uint32(agent_id))
            finally:
                m.close()
            return agent_id

    def _load_selectors(self) -> None:
        mount = cgroups.cgroup2_mount()
        exe = bpf_loader.PinnedMap(self.layout.pin_dir / "exe_selectors")
        uid = bpf_loader.PinnedMap(self.layout.pin_dir / "uid_selectors")
        cg = bpf_loader.PinnedMap(self.layout.pin_dir / "agent_cgroups")
        try:
            for sel in self.config.agents:
                agent_id = ctypes.c_uint32(self.ensure_agent(sel.name))
                for path in sel.exe:
                    exe.update(BpfPath(s=path.encode()), agent_id)
                for u in sel.uid:
                    uid.update(ctypes.c_uint32(u), agent_id)
                for rel in sel.cgroup:
                    target = mount / rel.strip("/")
                    if target.is_dir():
                        cg.update(ctypes.c_uint64(cgroups.cgroup_id(target)), agent_id)
        finally:
            for m in (exe, uid, cg):
                m.close()

    def _choose_ptrace_defence(self) -> None:
        """Pick the defence against borrowing un-enrolled processes; refuse to start without one."""
        why = self.datapath.guard_error or self._guard_self_test()
        try:
            self.ptrace_defence = ptrace_guard.decide(why, ptrace_guard.yama_scope(), ptrace_guard.landlock_abi(),
                                                      self.config.allow_unguarded_ptrace)
        except ptrace_guard.GuardError as e:
            raise DaemonError(str(e)) from None
        if self.ptrace_defence.name == "bpf-lsm":
            self.datapath.pin_guard()

    def _guard_self_test(self) -> str | None:
        """None when the BPF LSM guard refuses a process in an agent cgroup attach access to an
        un-enrolled one (the daemon); otherwise why not. The hook can load and attach, yet never
        be called, where `bpf` is not in the boot's lsm= list: only running it tells."""
        probe = cgroups.ensure(self.layout.cgroup_root / "guard-probe")
        key = ctypes.c_uint64(cgroups.cgroup_id(probe))
        m = bpf_loader.PinnedMap(self.layout.pin_dir / "agent_cgroups")
        try:
            m.update(key, ctypes.c_uint32(GUARD_PROBE_AGENT))
            pid = os.fork()
            if pid == 0:  # the child: enrolled by its cgroup, it asks for its parent's memory
                code = 2
                try:
                    (probe / "cgroup.procs").write_text(str(os.getpid()))
                    os.close(os.open(f"/proc/{os.getppid()}/mem", os.O_RDONLY))
                    code = 1
                except PermissionError:
                    code = 0
                finally:
                    os._exit(code)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        finally:
            m.delete(key)
            m.close()
            try:
                probe.rmdir()
            except OSError:
                pass
        if code == 0:
            return None
        if code == 1:
            return "the BPF LSM hook is not called (is `bpf` in the boot's lsm= list?)"
        return f"the self-test failed (exit {code})"

    def _adopt_enrolled(self) -> None:
        """Processes enrolled at exec while no daemon ran: give them their agent cgroup now."""
        names = {i: n for n, i in self.agent_ids.items()}
        tgids = bpf_loader.PinnedMap(self.layout.pin_dir / "agent_tgids")
        try:
            for key in tgids.keys(ctypes.c_uint32):
                agent_id = ctypes.c_uint32()
                if not tgids.lookup(key, agent_id) or agent_id.value not in names:
                    continue
                here = cgroups.cgroup_of(key.value, cgroups.cgroup2_mount())
                target = self.layout.agent_cgroup(names[agent_id.value])
                if here is not None and here != target:
                    if self._selector_refusal(key.value) is not None:
                        tgids.delete(key)
                        continue
                    try:
                        cgroups.move(key.value, target)
                        self.recorder.event("enrolled", {"pid": key.value, "agent": names[agent_id.value],
                                                         "via": "adopted-at-start"})
                    except OSError:
                        pass
        finally:
            tgids.close()

    # ---- the proxy ----------------------------------------------------------------------

    def _start_proxy(self) -> None:
        """A new group of proxy workers: stale ones gone, shared state fresh, sessions a previous
        group left open closed out, worker 0 alone first (it writes the CA), then the rest."""
        info = self._previous_info()
        if info and info.daemon_pid != os.getpid():
            # Proxies from a previous daemon run: they die with their parent, so these are stale.
            for pid in {info.proxy_pid, *info.proxy_pids} - {0}:
                if _alive(pid) and _is_our_proxy(pid):
                    _kill(pid)
        cfg = self.config
        n = cfg.workers or 1
        busy = proxies.ports_free([(socket.SOCK_STREAM, cfg.proxy_port), (socket.SOCK_STREAM, cfg.inbound_port),
                                   (socket.SOCK_DGRAM, cfg.dns_port)])
        if busy:
            raise DaemonError(f"the proxy failed to start: cannot listen on port {busy[0]}: {busy[1]} "
                              "(another instance or program on the same port?)")
        proxy_workers.reset(self.layout.run_dir, n)
        self.recorder.close_out("proxy-died", "the proxy relaying it stopped without closing it (killed or crashed);"
                                " byte counts as last flushed")
        self.workers = [proxies.Worker(i) for i in range(n)]
        for w in self.workers:
            self._start_worker(w)

    def _start_worker(self, w: proxies.Worker) -> None:
        state_dir = self.layout.state_dir if self.layout.state_dir != Path("/var/lib/interlock") else None
        try:
            w.start(lambda fd: proxies.command(w.index, len(self.workers), fd, self.config.source, state_dir))
        except proxies.StartError as e:
            raise DaemonError(str(e)) from None
        self.recorder.event("proxy-start", {"pid": w.pid, "worker": w.index, "workers": len(self.workers)})

    def _read_proxy_state(self) -> None:
        """The workers' latest recorder states from their pipes (JSON lines; see proxy/server.py)."""
        for w in self.workers:
            w.read_state()

    @property
    def proxy_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive]

    @property
    def proxy_listening(self) -> bool:
        """Whether any worker listens (the kernel spreads connections over those that do)."""
        return any(w.alive for w in self.workers)

    def recorder_status(self) -> dict:
        """Whether records can be written, by the proxy and by the daemon: while either cannot,
        agent traffic is refused (the proxy's part) and the reason is here."""
        with self.lock:
            self._read_proxy_state()
        mine = self.recorder.health.as_dict()
        proxy = proxies.combined_recorder(self.workers)
        failed = proxy.get("failed") or mine["failed"]
        return {"state": "failed" if failed else "ok", "failed": failed,
                "since": proxy.get("since") or mine["since"], "db": str(self.layout.db),
                "proxy": proxy or None, "daemon": mine}

    def _previous_info(self) -> InstanceInfo | None:
        try:
            return InstanceInfo.load(self.layout.instance_file)
        except (OSError, ValueError, TypeError):
            return None

    def _publish(self) -> None:
        info = InstanceInfo(
            instance=self.config.instance, daemon_pid=os.getpid(),
            proxy_pid=next(iter(self.proxy_pids), 0), proxy_pids=self.proxy_pids, proxy_port=self.config.proxy_port,
            dns_port=self.config.dns_port, cgroup_root=str(self.layout.cgroup_root),
            capture_cgroup=str(self.layout.capture_cgroup),
            netns=netns_id(), state_dir=str(self.layout.state_dir),
            ca_cert=str(self.layout.ca_cert), ca_bundle=str(self.layout.ca_bundle),
            ptrace_guard=self.ptrace_defence.name if self.ptrace_defence else "",
        )
        info.save(self.layout.instance_file)
        info.save(self.layout.last_instance_file)

    # ---- watching -----------------------------------------------------------------------

    def lockdown(self, reason: str) -> None:
        """Refuse every agent connect until an operator re-arms: tampering is never silent."""
        with self.lock:
            first = self.lockdown_reason is None
            self.lockdown_reason = self.lockdown_reason or reason
            (self.layout.state_dir / "lockdown").write_text(self.lockdown_reason + "\n")
            self._write_settings()
            self.recorder.event("lockdown", {"reason": reason, "first": first})

    def rearm(self, by: str) -> dict:
        with self.lock:
            was = self.lockdown_reason
            self.lockdown_reason = None
            (self.layout.state_dir / "lockdown").unlink(missing_ok=True)
            self._write_settings()
            self.recorder.event("rearm", {"by": by, "was": was})
            return {"ok": True, "was": was}

    def check_once(self) -> None:
        with self.lock:
            self._read_proxy_state()
            if self.recorder.failed:
                self.recorder.recover()
            installed = firewall.snapshot(self.backstop.table)
            if installed != self.nft_expected:
                self.lockdown("nftables table removed or altered")
                self.nft_expected = firewall.install(self.backstop)
                self.recorder.event("tamper", {"what": "nft", "action": "reinstalled",
                                               "differences": firewall.differences(self.nft_expected, installed)})
            self._record_inbound_refusals()
            missing = [h for h, n in bpf_loader.attached(self.layout.capture_cgroup).items() if not n]
            if missing:
                self.lockdown(f"BPF programs detached: {', '.join(missing)}")
                self.datapath.attach()
                self.recorder.event("tamper", {"what": "bpf", "missing": missing, "action": "reattached"})
            for w in self.workers:
                if w.popen is not None and w.popen.poll() is not None:
                    # Its connections died with it (the kernel reset them); its successor closes
                    # out their rows. The others keep serving meanwhile.
                    self.recorder.event("proxy-exit", {"pid": w.pid, "code": w.popen.returncode, "worker": w.index})
                    w.popen = None
                    w.restart_at = time.monotonic() + self.config.proxy_restart_delay
                if w.popen is None and w.restart_at and time.monotonic() >= w.restart_at:
                    w.restart_at = None
                    self._start_worker(w)
                    self._publish()

    def _record_inbound_refusals(self) -> None:
        """Segments into agents that nft reset (no proxy listening) and datagrams it dropped never
        reach the proxy: the rules' counters are what puts those attempts on record."""
        if time.monotonic() < self.inbound_next:
            return
        self.inbound_next = time.monotonic() + INBOUND_COUNTER_INTERVAL  # a listing costs ~10 ms
        now = firewall.inbound_refusals(self.backstop.table)
        grew = {k: v - self.inbound_seen.get(k, 0) for k, v in now.items() if v > self.inbound_seen.get(k, 0)}
        self.inbound_seen = now
        if grew:
            self.recorder.event("inbound-refused", {
                "packets": grew, "proxy_listening": self.proxy_listening,
                "reason": "nothing from another host reaches an agent socket except through the proxy"})

    def _on_exec(self, cpu, data, size) -> None:
        ev = ctypes.cast(data, ctypes.POINTER(ExecEvent)).contents
        name = next((n for n, i in self.agent_ids.items() if i == ev.agent_id), None)
        if name is None:
            return
        if ev.outside_scope:  # matched, but started where no hook sees its sockets: not enrolled
            self.recorder.event("selector-outside-scope", {
                "pid": ev.tgid, "agent": name, "uid": ev.uid, "comm": ev.comm.decode(errors="replace"),
                "capture_cgroup": str(self.layout.capture_cgroup)})
            return
        why = self._selector_refusal(ev.tgid)
        if why is not None:
            self._forget_tgid(ev.tgid)
            if why:  # "" for a process outside this instance's view: not ours to record
                self.recorder.event("enroll-refused", {"pid": ev.tgid, "agent": name, "via": "exec-selector",
                                                       "reason": why})
            return
        moved = True
        try:
            cgroups.move(ev.tgid, self.layout.agent_cgroup(name))
        except OSError:
            moved = False  # exited already, or a kernel thread
        self.recorder.event("enrolled", {"pid": ev.tgid, "agent": name, "via": "exec-selector",
                                         "comm": ev.comm.decode(errors="replace"), "moved": moved})

    def _selector_refusal(self, pid: int) -> str | None:
        """Why a process an exe/uid selector matched at exec must not be moved: "" when it is none of
        this instance's business (outside an explicitly configured capture scope: another instance or
        lab on the host may own it), a reason when it is Interlock itself or another instance's
        process, None when it may be moved."""
        scope = self._scope()
        cg = cgroups.cgroup_of(pid, scope.mount)
        if cg is None:
            return ""
        cap = self.layout.capture_cgroup
        if cap != self.layout.cgroup_root and cg != cap and cap not in cg.parents:
            return ""
        if pid == 1:
            return "pid 1 is the host's init"
        try:
            enrolment.check_member(pid, scope)
        except enrolment.Refused as e:
            return str(e)
        return None

    def _forget_tgid(self, pid: int) -> None:
        with self.lock:
            m = bpf_loader.PinnedMap(self.layout.pin_dir / "agent_tgids")
            try:
                m.delete(ctypes.c_uint32(pid))
            finally:
                m.close()

    def _on_guard(self, cpu, data, size) -> None:
        """A refused ptrace-class syscall or socket() of an agent: on record as an attack (once
        per process, syscall and target; a loop of attempts does not flood the record)."""
        ev = ctypes.cast(data, ctypes.POINTER(GuardEvent)).contents
        if ev.agent_id == GUARD_PROBE_AGENT:
            return
        key = (ev.tgid, ev.syscall, ev.target_tgid)
        if key in self._guard_seen:
            return
        if len(self._guard_seen) > 10000:
            self._guard_seen.clear()
        self._guard_seen.add(key)
        name = next((n for n, i in self.agent_ids.items() if i == ev.agent_id), str(ev.agent_id))
        syscall = GUARD_SYSCALLS.get(ev.syscall, str(ev.syscall))
        if syscall == "socket":  # a raw or ping socket the sock_create hook refused
            asked = ev.target_tgid
            self.recorder.event("socket-refused", {
                "agent": name, "pid": ev.tgid, "uid": ev.uid, "family": asked >> 24, "type": (asked >> 16) & 0xFF,
                "protocol": asked & 0xFFFF, "comm": ev.comm.decode(errors="replace")})
            return
        self.recorder.event("ptrace-refused", {
            "agent": name, "pid": ev.tgid, "uid": ev.uid, "syscall": syscall,
            ("pidfd" if syscall == "pidfd_getfd" else "target_pid"): ev.target_tgid,
            "comm": ev.comm.decode(errors="replace"),
            "defence": self.ptrace_defence.name if self.ptrace_defence else None})

    def _signal_workers(self, signum: int) -> None:
        for w in self.workers:
            if w.alive:
                try:
                    w.popen.send_signal(signum)
                except ProcessLookupError:
                    pass

    def run(self) -> None:
        self.server = _ControlServer(str(self.layout.control_socket), self)
        # Open to every local user on purpose: each request is answered and a refused one is
        # recorded; what a caller may ask is decided per request (interceptor/authority.py).
        os.chmod(self.layout.control_socket, 0o666)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="control").start()
        if self.identities is not None and (self.identities.verifier is not None or self.identities.bound):
            threading.Thread(target=self._watch_identities, daemon=True, name="identities").start()
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self._signal_workers(signal.SIGHUP))
        interval_ms = int(self.config.watch_interval * 1000)
        while not self.stopping.is_set():
            self.datapath.poll(interval_ms)
            try:
                self.check_once()
            except Exception as e:  # the watcher must outlive any single failure
                self.recorder.event("watch-error", {"error": repr(e)})
                time.sleep(self.config.watch_interval)
        self.server.shutdown()
        self.layout.control_socket.unlink(missing_ok=True)
        if self.teardown_requested:
            teardown(self.layout, self.config.instance, proxies=[w.popen for w in self.workers if w.popen])
        else:
            self._signal_workers(signal.SIGTERM)
        self.recorder.event("daemon-stop", {"teardown": self.teardown_requested})
        if self.shipping is not None:
            self.shipping.stop()

    def _watch_identities(self, interval: float = 1.0) -> None:
        """Selectors' token files and expiries, apart from the tamper watcher: a token check may
        wait on the issuer's key endpoint (identity.oidc.FETCH_TIMEOUT)."""
        while not self.stopping.wait(interval):
            try:
                self.identities.watch_once()
            except Exception as e:  # noqa: BLE001 — the watcher outlives any single failure
                self.recorder.event("watch-error", {"error": repr(e), "what": "identities"})

    # ---- control requests ---------------------------------------------------------------

    def handle(self, req: dict, caller: authority.Caller, fds: list[int] | None = None) -> dict:
        op = str(req.get("op"))
        why = authority.refusal(op, caller, self.operator_gid)
        if why is not None:
            return self._refuse(op, req, caller, why)
        if op == "ping":
            return {"ok": True, "instance": self.config.instance, "pid": os.getpid()}
        if op == "status":
            if authority.may_see_details(caller, self.operator_gid):
                return {"ok": True, **self.status()}
            return {"ok": True, **self.health()}
        if op in ("enroll", "unenroll"):
            try:
                pid = self._target_pid(req, caller, fds or [])
                if op == "enroll":
                    token = req.get("identity_token")
                    if token is not None and not isinstance(token, str):
                        raise enrolment.Refused("identity_token must be the token's text")
                    return self.enroll(pid, str(req.get("agent") or ""), bool(req.get("tree", True)), caller, token)
                return self.unenroll(pid, bool(req.get("tree", True)), caller)
            except enrolment.Refused as e:
                return self._refuse(op, req, caller, str(e))
        if op == "rearm":
            return self.rearm(by=f"uid {caller.uid}")
        if op == "down":
            self.teardown_requested = True
            self.stopping.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown request '{op}'"}

    def _refuse(self, op: str, req: dict, caller: authority.Caller, why: str) -> dict:
        """Every refused request is on record before it is answered; past REFUSALS_PER_SECOND from
        one uid, the rest of that second is counted and the count goes on the next record."""
        asked = {k: req[k] for k in ("pid", "agent", "tree") if k in req}
        with self.lock:
            now = int(time.monotonic())
            second, count, suppressed = self.refusal_budget.get(caller.uid, (now, 0, 0))
            if second != now:
                second, count = now, 0
            if count >= REFUSALS_PER_SECOND:
                self.refusal_budget[caller.uid] = (second, count, suppressed + 1)
                return {"ok": False, "error": f"refused: {why}"}
            self.refusal_budget[caller.uid] = (second, count + 1, 0)
            self.recorder.event("control-refused", {"op": op, "asked": asked, "reason": why, "caller_pid": caller.pid,
                                                    "caller_uid": caller.uid, "caller_gid": caller.gid,
                                                    "caller_agent": caller.agent, "suppressed_before": suppressed},
                                durable=True)
        return {"ok": False, "error": f"refused: {why}"}

    def caller(self, sock) -> authority.Caller:
        """The peer of a control connection: credentials from the kernel, agent-ness from its cgroup,
        the agent maps and the selectors."""
        pid, uid, gid = peer_credentials(sock)
        groups = tuple(peer_groups(sock))
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return authority.Caller(pid, uid, gid, groups, gone=True)
        try:
            agent = self.agent_of(pid, uid)
            gone = _exited(pidfd)  # the pid could have been reused while we looked: then trust nothing
        finally:
            os.close(pidfd)
        return authority.Caller(pid, uid, gid, groups, agent=agent, gone=gone)

    def agent_of(self, pid: int, uid: int) -> str | None:
        """Why a process counts as an agent (of this instance or another), or None."""
        mount = cgroups.cgroup2_mount()
        cg = cgroups.cgroup_of(pid, mount)
        lay = self.layout
        if cg is not None and lay.agents_cgroup in cg.parents:
            return f"enrolled as agent '{cg.relative_to(lay.agents_cgroup).parts[0]}'"
        names = {i: n for n, i in self.agent_ids.items()}
        with self.lock:
            cgm = bpf_loader.PinnedMap(lay.pin_dir / "agent_cgroups")
            tgm = bpf_loader.PinnedMap(lay.pin_dir / "agent_tgids")
            try:
                agent_id = ctypes.c_uint32()
                if cg is not None and cg.exists() and cgm.lookup(ctypes.c_uint64(cgroups.cgroup_id(cg)), agent_id):
                    return f"in a cgroup enrolled as agent '{names.get(agent_id.value, agent_id.value)}'"
                if tgm.lookup(ctypes.c_uint32(pid), agent_id):
                    return f"enrolled at exec as agent '{names.get(agent_id.value, agent_id.value)}'"
            finally:
                cgm.close()
                tgm.close()
        if any(uid in sel.uid for sel in self.config.agents):
            return f"uid {uid} is an agent's uid selector"
        owner = cgroups.instance_of(cg, mount) if cg is not None else None
        if owner is not None and cg is not None and (owner[1] / "agents") in cg.parents:
            return f"an agent of instance '{owner[0]}'"
        return None

    def _target_pid(self, req: dict, caller: authority.Caller, fds: list[int]) -> int:
        """The host pid a request is about: from the pidfd it carries (resolved in the daemon's own PID
        namespace), or from a bare number only when the caller shares the daemon's PID namespace."""
        if fds:
            try:
                return pid_of_pidfd(fds[0])
            except NoSuchProcess as e:
                raise enrolment.Refused(f"no process {req.get('pid', '?')} ({e})") from None
            except ValueError as e:
                raise enrolment.Refused(str(e)) from None
        try:
            pid = int(req["pid"])
        except (KeyError, TypeError, ValueError):
            raise enrolment.Refused("the request names no process: give 'pid' (and pass a pidfd)") from None
        try:
            same = os.stat(f"/proc/{caller.pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            same = False
        if not same:
            raise enrolment.Refused("your PID namespace is not the daemon's: pass a pidfd of the process "
                                    "(the interlock CLI does)")
        if pid <= 0:
            raise enrolment.Refused(f"no process {pid}")
        return pid

    def _scope(self) -> enrolment.Scope:
        lay = self.layout
        own = {os.getpid(), *self.proxy_pids}
        return enrolment.Scope(self.config.instance, cgroups.cgroup2_mount(), lay.cgroup_root, lay.agents_cgroup,
                               lay.daemon_cgroup, frozenset(own))

    def enroll(self, pid: int, agent: str, tree: bool, caller: authority.Caller, token: str | None = None) -> dict:
        """Move a process (tree) into an agent's cgroup, or relabel one already enrolled; then
        neutralise the sockets it opened before. Refused (enrolment.Refused) for the wrong targets,
        and for an identity token that does not validate or does not fit the agent's processes."""
        if not agent:
            raise enrolment.Refused("an agent name is required")
        scope = self._scope()
        enrolment.check_target(pid, scope)
        before = cgroups.cgroup_of(pid, scope.mount)
        was = before.name if before is not None and before.parent == self.layout.agents_cgroup else None
        ident = self.identities.for_token(agent, token)  # validated outside the lock: it may fetch keys
        with self.lock:
            running = [p for p in cgroups.procs(self.layout.agent_cgroup(agent)) if p != pid]
            self.identities.check(agent, ident, running)
            try:
                agent_id = self.ensure_agent(agent)
            except DaemonError as e:
                raise enrolment.Refused(str(e)) from None
            # The binding is on file before the process is in the agent: its first connection carries it.
            rebind = ident is not None or not running
            previous = self.identities.set(agent, ident) if rebind else None
            moved = enrolment.move_tree(pid, self.layout.agent_cgroup(agent), tree, scope)
            if not moved:
                if rebind:
                    self.identities.set(agent, previous)
                raise enrolment.Refused(f"no process {pid} (it exited before it could be moved)")
            bound = self.identities.bound.get(agent)
            sockets, still = enrolment.neutralise_or_restore(pid, moved, self.config.mark,
                                                             self.layout.agent_cgroup(agent))
            for p, origin in moved.items():
                if self.layout.agents_cgroup not in origin.parents:
                    self.origins[p] = origin
            pids = sorted(moved)
            self.recorder.event("enrolled", {"pid": pid, "agent": agent, "via": "request", "pids": pids,
                                             "relabelled_from": was, "by_uid": caller.uid, "by_pid": caller.pid,
                                             "sockets": [s.as_dict() for s in sockets], "frozen": still,
                                             "identity": bound.record() if bound is not None else None},
                                durable=True)
        return {"ok": True, "agent": agent, "agent_id": agent_id, "pids": pids, "relabelled_from": was,
                "sockets": [s.as_dict() for s in sockets], "identity": bound.record() if bound is not None else None}

    def unenroll(self, pid: int, tree: bool, caller: authority.Caller) -> dict:
        """Take a process (tree) out of this instance's agent cgroups, back where it came from."""
        scope = self._scope()
        enrolment.check_target(pid, scope)
        cg = cgroups.cgroup_of(pid, scope.mount)
        lay = self.layout
        if cg is None or lay.agents_cgroup not in cg.parents:
            why = self.agent_of(pid, 0)
            hint = f" (it is {why}: change the agent selectors in the config)" if why else ""
            raise enrolment.Refused(f"pid {pid} is not enrolled in an agent cgroup of instance {self.config.instance}{hint}")
        park = lay.cgroup_root.parent
        out, agents = [], set()
        with self.lock:
            tgm = bpf_loader.PinnedMap(lay.pin_dir / "agent_tgids")
            try:
                for p in descendants(pid) if tree else [pid]:
                    here = cgroups.cgroup_of(p, scope.mount)
                    if here is None or lay.agents_cgroup not in here.parents:
                        continue
                    origin = self.origins.pop(p, park)
                    try:
                        cgroups.move(p, origin if origin.is_dir() else park)
                    except OSError:
                        continue
                    tgm.delete(ctypes.c_uint32(p))
                    out.append(p)
                    agents.add(here.relative_to(lay.agents_cgroup).parts[0])
            finally:
                tgm.close()
            self.recorder.event("unenrolled", {"pid": pid, "pids": out, "agents": sorted(agents),
                                               "by_uid": caller.uid, "by_pid": caller.pid}, durable=True)
        return {"ok": True, "pids": out, "agents": sorted(agents)}

    def health(self) -> dict:
        """What anyone may know: whether the capture is up. No agents, selectors or pids."""
        full = self.status()
        keep = ("instance", "proxy_port", "proxy_listening", "programs_attached", "nft_table", "nft_intact")
        return {**{k: full[k] for k in keep}, "programs": full["programs"],
                "lockdown": "yes" if full["lockdown"] else None,
                "recorder": {"state": full["recorder"]["state"]},  # whether agent traffic can be recorded
                "restricted": "agents, selectors and pids are shown to root and the operator group only"}

    def status(self) -> dict:
        lay = self.layout
        progs = bpf_loader.attached(lay.capture_cgroup)
        agents = {}
        for name in sorted(self.agent_ids):
            agents[name] = cgroups.procs(lay.agent_cgroup(name))
        return {
            "instance": self.config.instance,
            "daemon_pid": os.getpid(),
            "proxy_pid": next(iter(self.proxy_pids), None),
            "proxy_pids": self.proxy_pids,
            "proxy_workers": {str(w.index): w.pid for w in self.workers if w.alive},  # index -> pid
            "workers": len(self.workers),
            "proxy_listening": self.proxy_listening,
            "proxy_port": self.config.proxy_port,
            "dns_port": self.config.dns_port,
            "inbound_port": self.config.inbound_port,
            "programs": progs,
            "programs_attached": all(progs.values()),
            "nft_table": lay.nft_table,
            "nft_intact": firewall.intact(self.backstop, self.nft_expected),
            "lockdown": self.lockdown_reason,
            "recorder": self.recorder_status(),
            "shipping": self.shipping.status() if self.shipping is not None else None,
            "ptrace_guard": ({**vars(self.ptrace_defence), "covers_all": self.ptrace_defence.covers_all}
                             if self.ptrace_defence else None),
            "cgroup_root": str(lay.cgroup_root),
            "capture_cgroup": str(lay.capture_cgroup),
            "enrolled": agents,
            "selectors": [vars(a) for a in self.config.agents],
            "identities": {name: {**b.record(), "source": b.source, "refused": b.refusal()}
                           for name, b in (self.identities.bound.items() if self.identities else ())},
        }


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, daemon: Daemon):
        if os.path.exists(path):
            os.unlink(path)
        self.il = daemon
        super().__init__(path, _ControlHandler)


class _ControlHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        fds: list[int] = []
        self.request.settimeout(CONTROL_TIMEOUT)
        try:
            req, fds = receive(self.request)
            il = self.server.il
            reply = il.handle(req, il.caller(self.request), fds)
        except (ValueError, KeyError, TypeError) as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # one request's failure must not leave its client without an answer
            reply = {"ok": False, "error": f"the daemon could not carry out the request: {e}"}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            self.request.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the client is gone; a refusal is on record already


def _be16(port: int) -> int:
    return ((port & 0xFF) << 8) | (port >> 8)


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (pidfd_open(2))."""
    import select

    return bool(select.select([pidfd], [], [], 0)[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill(pid: int, timeout: float = 5.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def teardown(layout: Layout, instance: str, proxies: list[subprocess.Popen] | None = None) -> dict:
    """Remove every trace of an instance: proxy, attachments, nft table, cgroups, pins, run files.

    The recordings in the state dir stay: they are the audit trail, not machinery."""
    done: dict[str, object] = {}
    info = None
    try:
        info = InstanceInfo.load(layout.instance_file)
    except (OSError, ValueError, TypeError):
        pass
    if proxies:
        for p in proxies:
            p.terminate()
        for p in proxies:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    elif info:
        for pid in {info.proxy_pid, *info.proxy_pids} - {0}:
            if _alive(pid) and _is_our_proxy(pid):
                _kill(pid)
    done["programs_detached"] = bpf_loader.detach_all(layout.capture_cgroup)
    done["nft_table_removed"] = firewall.remove(layout.nft_table)
    if layout.cgroup_root.exists():
        cgroups.remove_tree(layout.cgroup_root, layout.cgroup_root.parent)
        done["cgroups_removed"] = True
    if layout.pin_dir.exists():
        for pin in layout.pin_dir.iterdir():
            pin.unlink()
        layout.pin_dir.rmdir()
        try:
            layout.pin_dir.parent.rmdir()
        except OSError:
            pass
        done["pins_removed"] = True
    for f in (layout.instance_file, layout.control_socket, layout.state_dir / "lockdown", layout.identities_file):
        f.unlink(missing_ok=True)
    proxy_workers.remove(layout.run_dir)
    return done


def _is_our_proxy(pid: int) -> bool:
    try:
        return b"proxy.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
