"""`interlock`: the daemon and the verbs that talk to it.

Every verb takes --state-dir to find its daemon; errors are one line that says what to do."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path

from interceptor import config as config_mod
from interceptor import fleet_cli
from interceptor.cgroups import CgroupError
from interceptor.control import DaemonUnavailable, request
from interceptor.layout import InstanceInfo, Layout
from recorder.printable import printable


class CliError(Exception):
    """A message for the operator, printed without a traceback."""


def _layout(args, cfg: config_mod.Config | None = None) -> Layout:
    if cfg is None:
        cfg = config_mod.load(args.config) if getattr(args, "config", None) else None
    base = Layout.build(args.state_dir, "default", "interlock")
    # the running instance's facts, else those of the one that ran here last (after `down`)
    info_file = base.instance_file if base.instance_file.exists() else base.last_instance_file
    if cfg is None and info_file.exists():
        info = InstanceInfo.load(info_file)
        from interceptor.cgroups import PRIVATE_CGROUP2, cgroup2_mount

        mount = cgroup2_mount()

        def below_mount(path: str) -> str:
            # the daemon may have seen the hierarchy at another mount point than we do
            p = Path(path)
            base = next((b for b in (mount, PRIVATE_CGROUP2) if p.is_relative_to(b)), Path("/"))
            return str(p.relative_to(base))

        return Layout.build(args.state_dir, info.instance, below_mount(info.cgroup_root), below_mount(info.capture_cgroup))
    cfg = cfg or config_mod.finish(config_mod.Config())
    return Layout.build(args.state_dir, cfg.instance, cfg.cgroup_root, cfg.capture_cgroup)


def _ask(args, op: str, **kw) -> dict:
    lay = _layout(args)
    try:
        reply = request(lay.control_socket, op, **kw)
    except DaemonUnavailable as e:
        sd = f" --state-dir {args.state_dir}" if args.state_dir else ""
        raise CliError(f"{e}. Start it first: interlock daemon{sd}") from None
    if not reply.get("ok"):
        raise CliError(reply.get("error", "the daemon refused the request"))
    return reply


def _emit(args, data: dict, text: str) -> None:
    """One result: `data` as a JSON object under --json, else `text` for a person."""
    print(json.dumps(data, indent=1) if getattr(args, "json", False) else text)


def _need_root(verb: str) -> None:
    if os.geteuid() != 0:
        raise CliError(f"'interlock {verb}' must run as root (it loads BPF programs and nft rules): sudo interlock {verb}")


# ---- verbs ---------------------------------------------------------------------------------

def cmd_daemon(args) -> int:
    _need_root("daemon")
    from interceptor import doctor, logs
    from interceptor.bpf_loader import HookLoadError
    from interceptor.daemon import Daemon, DaemonError
    from interceptor.firewall import FirewallError
    from policy.engine import PolicyError, load

    cfg = config_mod.load(args.config)
    logs.setup(args.log_format or cfg.log_format, "daemon")
    log = logging.getLogger("interlock.daemon")
    if cfg.policy:
        try:
            load(cfg.policy)
        except PolicyError as e:
            log.error("policy-rejected", extra={"event": "policy-rejected", "data": {"file": cfg.policy,
                                                                                    "problems": e.problems}})
            print("\n".join(e.problems), file=sys.stderr)
            print(f"interlock daemon: cannot start: the policy {cfg.policy} is invalid (check it with: "
                  f"interlock policy check {cfg.policy})", file=sys.stderr)
            return 2
    failures = [c for c in doctor.run_checks(quick=True) if not c.ok and c.fatal]
    if failures:
        for c in failures:
            print(f"interlock daemon: cannot start: {c.name}: {c.detail}. Fix: {c.fix}", file=sys.stderr)
        return 2
    d = Daemon(cfg, _layout(args, cfg))
    try:
        d.start()
    except (DaemonError, HookLoadError, FirewallError, OSError) as e:
        print(f"interlock daemon: cannot start: {e}", file=sys.stderr)
        print("interlock daemon: whatever was already installed stays in place and refuses agent traffic; "
              f"remove it with: interlock down{' --state-dir ' + str(args.state_dir) if args.state_dir else ''}",
              file=sys.stderr)
        return 2
    ready = f"interlock daemon: instance {cfg.instance} ready, proxy on port {cfg.proxy_port}"
    print(json.dumps({"event": "ready", "instance": cfg.instance, "proxy_port": cfg.proxy_port, "message": ready})
          if args.json else ready, flush=True)
    log.info("ready", extra={"event": "ready", "data": {"instance": cfg.instance, "proxy_port": cfg.proxy_port}})
    d.run()
    return 0


def cmd_down(args) -> int:
    _need_root("down")
    from interceptor.daemon import teardown

    lay = _layout(args)
    lines = []
    try:
        request(lay.control_socket, "down", timeout=30)
        deadline = time.monotonic() + 30
        while lay.instance_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        was_running = True
        lines.append(f"interlock down: the daemon of instance {lay.instance} stopped its proxy and removed its BPF programs, "
                     f"nft table, cgroups and pinned maps")
    except DaemonUnavailable:
        was_running = False
        lines.append(f"interlock down: no daemon running for instance {lay.instance}; removing what it left")
    done = teardown(lay, lay.instance)
    left = [k.replace("_", " ") for k, v in done.items() if v]
    if left:
        lines.append(f"interlock down: also removed: {', '.join(left)}")
    lines.append(f"interlock down: recordings kept in {lay.db}")
    _emit(args, {"ok": True, "instance": lay.instance, "daemon_was_running": was_running, "also_removed": left,
                 "recordings": str(lay.db)}, "\n".join(lines))
    return 0


def cmd_run(args) -> int:
    if not args.cmd:
        raise CliError("nothing to run: interlock run [--agent NAME] [--user NAME|UID[:GID]] -- CMD ARGS…")
    agent = args.agent or _agent_name(args.cmd[0])
    user = _user(args.user) if args.user else None
    if user is not None and os.geteuid() != 0 and user[:2] != (os.getuid(), os.getgid()):
        raise CliError("--user needs root: only root can run the agent as another user")
    reply = _ask(args, "enroll", fds=(_pidfd(os.getpid()),), pid=os.getpid(), agent=agent, tree=False,
                 **_identity_token(args))
    for line in _socket_lines(reply, quiet_if_none=True):
        print(f"interlock run: {line}", file=sys.stderr)
    # HTTPS is intercepted: the agent's TLS libraries must trust the instance's CA. Processes
    # enrolled by selector or `enroll --pid` do not get these (see docs/ARCHITECTURE.md).
    try:
        info = InstanceInfo.load(_layout(args).instance_file)
    except (OSError, ValueError, TypeError):
        info = None
    _confine(info)
    if info is not None and info.ca_bundle and Path(info.ca_bundle).is_file():
        for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            os.environ[var] = info.ca_bundle
        os.environ["NODE_EXTRA_CA_CERTS"] = info.ca_cert
    if user is not None:
        _become(*user)
    try:
        os.execvp(args.cmd[0], args.cmd)
    except OSError as e:
        raise CliError(f"cannot run {args.cmd[0]}: {e.strerror}") from None
    return 127


def _identity_token(args) -> dict:
    """{"identity_token": text} from --identity-token FILE (read as the caller), else {}."""
    path = getattr(args, "identity_token", None)
    if path is None:
        return {}
    try:
        with open(path) as f:
            token = f.read(65536).strip()
    except OSError as e:
        raise CliError(f"--identity-token: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"--identity-token: {path} is not a token (not text)") from None
    if not token:
        raise CliError(f"--identity-token: {path} is empty")
    return {"identity_token": token}


def _pidfd(pid: int) -> int:
    """A pidfd of `pid` as this CLI's PID namespace names it: the daemon reads the process from it."""
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, ValueError):
        raise CliError(f"no process {pid}") from None
    except OSError as e:
        raise CliError(f"no process {pid}" if e.errno == 22 else f"cannot open process {pid}: {e.strerror}") from None


def _user(spec: str) -> tuple[int, int, str | None]:
    """(uid, gid, name) for --user NAME, UID or UID:GID (a uid without a passwd entry keeps gid = uid)."""
    import pwd

    name, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        uid, gid, login = pw.pw_uid, pw.pw_gid, pw.pw_name
    except KeyError:
        if not name.isdigit():
            raise CliError(f"--user: no user '{name}'") from None
        uid, gid, login = int(name), int(name), None
    if group:
        if not group.isdigit():
            raise CliError(f"--user: the group in '{spec}' must be a number (UID:GID)")
        gid = int(group)
    return uid, gid, login


def _become(uid: int, gid: int, login: str | None) -> None:
    """Drop to uid/gid for good (real, effective and saved ids; supplementary groups of the login
    or none), after the enrol and before the exec: the agent never holds the caller's rights."""
    try:
        if login is not None:
            os.initgroups(login, gid)
        else:
            os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise CliError(f"cannot become uid {uid} gid {gid}: {e.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise CliError(f"cannot become uid {uid} gid {gid}")
    if login is not None:
        import pwd

        os.environ.update(USER=login, LOGNAME=login, HOME=pwd.getpwnam(login).pw_dir)


def _confine(info: InstanceInfo | None) -> None:
    """Make the agent its own Landlock domain: it cannot ptrace (or pidfd_getfd, or write the
    memory of) any process outside it. Where Landlock is missing, the daemon's guard must be one
    that covers every agent (BPF LSM or Yama) — or the operator accepted running without one."""
    from interceptor import ptrace_guard

    try:
        ptrace_guard.confine_self()
    except ptrace_guard.GuardError as e:
        if info is not None and info.ptrace_guard in ("landlock", ""):
            raise CliError(f"cannot run the agent unguarded: {e}; the daemon's ptrace guard is "
                           f"'{info.ptrace_guard or 'unknown'}' (see interlock doctor)") from None


def _agent_name(exe: str) -> str:
    name = re.sub(r"[^a-z0-9_-]", "-", Path(exe).name.lower()).strip("-")[:31]
    return name or "agent"


def cmd_enroll(args) -> int:
    reply = _ask(args, "enroll", fds=(_pidfd(args.pid),), pid=args.pid, agent=args.agent or "default", tree=True,
                 **_identity_token(args))
    text = (f"enrolled {len(reply['pids'])} process(es) as agent {reply['agent']}: {' '.join(map(str, reply['pids']))}"
            + (f" (relabelled from {reply['relabelled_from']})" if reply.get("relabelled_from") else "")
            + (f" with identity {printable(reply['identity']['sub'])} ({printable(reply['identity']['iss'])})"
               if reply.get("identity") else ""))
    _emit(args, reply, "\n".join([text, *_socket_lines(reply)]))
    return 0


def _socket_lines(reply: dict, quiet_if_none: bool = False) -> list[str]:
    """What the daemon did to the sockets the tree had opened before it was enrolled."""
    from interceptor.presockets import PreSocket

    found = [PreSocket(**s) for s in reply.get("sockets", []) if s["action"] != "kept"]
    if not found:
        return [] if quiet_if_none else ["no inet socket opened before enrolment"]
    lines = [f"{len(found)} inet socket(s) opened before enrolment can no longer carry a byte unjudged "
             f"(destroyed: aborted with SOCK_DESTROY and marked; marked: every packet now meets the nft backstop):"]
    return lines + [f"  {s.line()}" for s in found]


def cmd_unenroll(args) -> int:
    reply = _ask(args, "unenroll", fds=(_pidfd(args.pid),), pid=args.pid, tree=True)
    _emit(args, reply, f"unenrolled {len(reply['pids'])} process(es) from agent {', '.join(reply['agents']) or '-'}: "
                       f"{' '.join(map(str, reply['pids']))}")
    return 0


def cmd_rearm(args) -> int:
    reply = _ask(args, "rearm")
    _emit(args, reply, f"re-armed (lockdown was: {reply['was'] or 'not set'})")
    return 0


def cmd_sessions(args) -> int:
    if args.server:
        return fleet_cli.sessions(args)
    fleet_cli.need_server(args, "sessions")
    from recorder.store import read_sessions

    rows = read_sessions(_layout(args).db, agent=args.agent, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no sessions recorded yet")
        return 0
    p = printable  # agents choose exe, comm and what ends up in detail: escaped, one line per session
    print(f"{'session':21}  {'started':19}  {'agent':12} {'pid':>7}  {'exe':24} {'destination':28} {'proto':8} {'up':>8} "
          f"{'down':>8}  outcome")
    for r in rows:
        dst = f"[{r['dst_addr']}]:{r['dst_port']}" if ":" in (r["dst_addr"] or "") else f"{r['dst_addr']}:{r['dst_port']}"
        started = datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{p(r['id']):21}  {started:19}  {p(r['agent'])[:12]:12} {r['tgid']:>7}  {p(r['exe'] or r['comm'])[-24:]:24} "
              f"{p(dst):28} {p(r['protocol'])[:8]:8} {r['bytes_up']:>8} {r['bytes_down']:>8}  {p(r['outcome'])}"
              + (f" ({p(r['detail'])})" if r["detail"] else ""))
    return 0


def cmd_status(args) -> int:
    from interceptor import bpf_loader

    lay = _layout(args)
    try:
        st = request(lay.control_socket, "status")
        st["daemon"] = "running"
    except DaemonUnavailable:
        progs = bpf_loader.attached(lay.capture_cgroup)
        st = {"daemon": "not running", "instance": lay.instance, "programs": progs,
              "programs_attached": all(progs.values()),
              "note": "agents stay redirected to a closed port: their connections are refused"}
    if args.json:
        print(json.dumps(st, indent=1))
        return 0 if st["daemon"] == "running" else 3
    print(f"instance {st['instance']}: daemon {st['daemon']}" + (f" (pid {st.get('daemon_pid')})" if st.get("daemon_pid") else ""))
    print(f"  programs attached: {'yes' if st['programs_attached'] else 'NO'} ({', '.join(k for k, v in st['programs'].items() if v)})")
    if st["daemon"] == "running":
        workers = f" ({len(st.get('proxy_pids') or [])} of {st['workers']} workers)" if st.get("workers", 1) > 1 else ""
        listening = f"listening on port {st['proxy_port']}{workers}"
        print(f"  proxy: {listening if st['proxy_listening'] else 'DOWN (agent connections are refused)'}")
        print(f"  nft table inet {st['nft_table']}: {'intact' if st['nft_intact'] else 'MISSING OR ALTERED'}")
        print(f"  lockdown: {printable(st['lockdown'] or 'no')}")
        rec = st.get("recorder")
        if rec:
            where = f" {printable(Path(rec['db']).parent)}" if rec.get("db") else " the state dir"
            if rec["state"] == "ok":
                print("  recorder: writing" + (f" to {printable(rec['db'])}" if rec.get("db") else ""))
            else:
                since = datetime.fromtimestamp(rec["since"]).strftime("%H:%M:%S") if rec.get("since") else "?"
                print(f"  recorder: FAILED since {since}: {printable(rec.get('failed') or 'cannot write')}; agent "
                      f"connections are refused until it can write again (free space or fix{where})")
        if st.get("shipping"):
            print(_shipping_line(st["shipping"]))
        for name, pids in st.get("enrolled", {}).items():
            print(f"  agent {printable(name)}: {len(pids)} process(es) {' '.join(map(str, pids[:20]))}")
        if st.get("restricted"):
            print(f"  ({printable(st['restricted'])})")
    else:
        print(f"  {st['note']}")
    return 0 if st["daemon"] == "running" else 3


def _shipping_line(sh: dict) -> str:
    """`status`'s line on shipping to the central recorder."""
    line = (f"  shipping: to {printable(sh.get('server'))} as host {printable(sh.get('host_id'))}: acked seq "
            f"{sh.get('acked_seq', 0)} of {sh.get('head_seq', 0)}, {sh.get('unshipped', 0)} unshipped, lag "
            f"{sh.get('lag_seconds', 0):.1f}s")
    if sh.get("last_error") and not sh.get("connected"):
        line += f"; last error: {printable(sh['last_error'])}"
    return line


def cmd_doctor(args) -> int:
    from interceptor import doctor

    checks = doctor.run_checks(quick=False)
    bad = [c for c in checks if not c.ok and c.fatal]
    if args.json:
        print(json.dumps({"ok": not bad, "checks": [{"name": c.name, "ok": c.ok, "fatal": c.fatal, "detail": c.detail,
                                                     "fix": c.fix} for c in checks]}, indent=1))
        return 1 if bad else 0
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
        print(f"{mark}  {c.name:{width}}  {c.detail}" + ("" if c.ok else f"\n      fix: {c.fix}"))
    print(f"\n{len(checks) - len(bad)} of {len(checks)} checks passed" + ("" if not bad else "; the daemon will refuse to start"))
    return 1 if bad else 0


def _who() -> str:
    import pwd

    user = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"{user} (uid {os.getuid()})"


def cmd_policy(args) -> int:
    from policy.engine import Destination, PolicyError, load, load_default
    from policy.model import Operation

    if args.policy_verb == "check":
        try:
            pol = load(args.file)
        except PolicyError as e:
            if args.json:
                print(json.dumps({"ok": False, "file": str(args.file), "problems": e.problems}, indent=1))
                return 1
            print("\n".join(e.problems), file=sys.stderr)
            print(f"{args.file}: {len(e.problems)} problem(s); the policy in force stays unchanged until this file is valid",
                  file=sys.stderr)
            return 1
        _emit(args, {"ok": True, "file": str(args.file), "agents": len(pol.agents), "targets": len(pol.targets),
                     "rules": len(pol.rules), "default": pol.default.value},
              f"{args.file}: valid: {len(pol.agents)} agent(s), {len(pol.targets)} target(s), {len(pol.rules)} rule(s), "
              f"default {pol.default.value}")
        return 0
    try:
        pol = load(args.file) if args.file else load_default()
    except PolicyError as e:
        raise CliError("\n".join(e.problems)) from None
    if args.target in pol.targets:
        t = pol.targets[args.target]
        net = t.networks[0] if t.networks else None
        dest = Destination(str(net.network_address) if net else "0.0.0.0", t.ports[0] if t.ports else 0,
                           tuple(h for h in t.hostnames if "*" not in h), args.protocol or t.protocol or "tcp")
    else:
        host, _, port = args.target.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--target must be a target name from the policy or ADDRESS:PORT, got '{args.target}'")
        dest = Destination(host.strip("[]"), int(port), (), args.protocol or "tcp")
    op = Operation(args.protocol or dest.protocol, args.op, tuple(args.object or ()), tuple(args.risk or ()))
    if args.claim:
        pol.identity_of = _explained_identity(args.agent, args.claim)
    d = pol.decide(args.agent, dest, op)
    if args.json:
        print(json.dumps({"verdict": d.verdict.value, "rule": d.rule, "reason": d.reason, "mask": list(d.mask),
                          "approval_timeout": d.approval_timeout}, indent=1))
        return 0
    print(f"{d.verdict.value.upper()}  rule: {d.rule}  ({d.reason})" + (f"  mask: {', '.join(d.mask)}" if d.mask else "")
          + (f"  approval timeout: {d.approval_timeout:g}s" if d.verdict.value == "approve" else ""))
    return 0


def _explained_identity(agent: str, claims: list[str]):
    """--claim NAME=VALUE…: the agent as if it carried a verified identity with these claims."""
    from identity.agents import AgentIdentity

    flat: dict[str, str | list[str]] = {}
    for c in claims:
        name, sep, value = c.partition("=")
        if not sep or not name:
            raise CliError(f"--claim takes NAME=VALUE (e.g. sub=repo:org/app:ref:refs/heads/main), got '{c}'")
        flat[name] = [*flat[name], value] if isinstance(flat.get(name), list) else \
            [flat[name], value] if name in flat else value
    ident = AgentIdentity(agent, str(flat.get("iss", "")), str(flat.get("sub", "")), time.time() + 3600, flat)
    return lambda name: ident if name == agent else None


def cmd_approvals(args) -> int:
    if args.server:
        return fleet_cli.approvals(args)
    fleet_cli.need_server(args, "approvals")
    from recorder.approvals import listing

    rows = listing(_layout(args).db, pending_only=not args.all)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no approvals pending" if not args.all else "no approvals recorded")
        return 0
    for r in rows:
        left = r["timeout_at"] - time.time()
        state = f"{r['status']}" + (f", {int(left)}s left" if r["status"] == "pending" else f" by {r['decided_by']}")
        p = printable  # the summary quotes the agent's SQL, path or host
        print(f"{p(r['id'])}  {p(r['agent']):12} {p(r['destination']):24} {p(r['protocol'])}:{p(r['action'])}  "
              f"'{p(r['summary'])[:60]}'  rule {p(r['rule'])}  [{p(state)}]")
    return 0


def cmd_approve(args) -> int:
    from policy.engine import parse_duration
    from recorder.approvals import ApprovalError, decide

    try:
        seconds = parse_duration(args.for_) if args.for_ else None
    except ValueError as e:
        raise CliError(f"--for: {e}") from None
    try:
        r = decide(_layout(args).db, args.id, True, _who(), seconds)
    except ApprovalError as e:
        raise CliError(str(e)) from None
    extra = f"; identical operations are granted until {datetime.fromtimestamp(r['grant_until']):%H:%M:%S}" if r["grant_until"] else ""
    _emit(args, {"ok": True, "id": args.id, **r}, f"approved {args.id} as {r['by']}{extra}")
    return 0


def cmd_deny(args) -> int:
    from recorder.approvals import ApprovalError, decide

    try:
        r = decide(_layout(args).db, args.id, False, _who(), note=args.reason)
    except ApprovalError as e:
        raise CliError(str(e)) from None
    _emit(args, {"ok": True, "id": args.id, "reason": args.reason, **r}, f"denied {args.id}: {args.reason}")
    return 0


def cmd_replay(args) -> int:
    if args.server:
        return fleet_cli.replay(args)
    fleet_cli.need_server(args, "replay")
    from recorder.replay import render, timeline

    tl = timeline(_layout(args).db, args.session)
    if tl is None:
        raise CliError(f"no session '{args.session}'; list them with: interlock sessions")
    if args.json:
        print(json.dumps(tl, indent=1))
    else:
        print(render(tl))
    return 0


def cmd_events(args) -> int:
    from recorder.store import read_events

    rows = read_events(_layout(args).db, args.kind, limit=args.limit)
    if args.session:
        rows = [r for r in rows if r["session"] == args.session]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no events recorded" + (f" of kind {args.kind}" if args.kind else ""))
        return 0
    for r in rows:
        at = datetime.fromtimestamp(r["at"]).strftime("%Y-%m-%d %H:%M:%S")
        data = json.dumps(r["data"], sort_keys=True, ensure_ascii=True)  # agent text stays escaped
        print(f"{at}  {r['kind']:20} {r['session'] or '-':21}  {data}")
    return 0


def cmd_prune(args) -> int:
    from policy.engine import parse_duration
    from recorder.store import prune

    _need_root("prune")
    try:
        age = parse_duration(args.older_than)
    except ValueError as e:
        raise CliError(f"--older-than: {e}") from None
    lay = _layout(args)
    done = prune(lay.db, time.time() - age)
    _emit(args, {"ok": True, "older_than_seconds": age, "deleted": done},
          f"pruned recordings older than {args.older_than} from {lay.db}: {done['sessions']} session(s), "
          f"{done['events']} event(s), {done['approvals']} decided approval(s)"
          + (f", {done['journal']} journal record(s) the central recorder acknowledged" if "journal" in done else "")
          + "; open sessions and pending holds stay" + ("; unshipped records stay" if "journal" in done else ""))
    return 0


def cmd_join(args) -> int:
    from recorder.join import JoinError, join

    if os.geteuid() != 0:
        raise CliError("'interlock join' must run as root (it writes the host's keys, readable by root only): "
                       "sudo interlock join --server URL --token TOKEN")
    lay = _layout(args)
    try:
        files = join(lay.state_dir, args.server, args.token, args.name)
    except JoinError as e:
        raise CliError(str(e)) from None
    _emit(args, {"ok": True, "host_id": files.host_id, "server": files.server, "files": str(files.dir)},
          f"joined the recorder at {files.server} as host {files.host_id} (keys in {files.dir}, root only).\n"
          f"Ship to it: add to the daemon's config\n  recorder:\n    server: {files.server}\nand restart the daemon")
    return 0


def cmd_credentials(args) -> int:
    from credentials.store import KINDS, OPTIONAL, CredentialError, CredentialStore

    _need_root("credentials")
    store = CredentialStore(_layout(args).state_dir)
    try:
        if args.cred_verb == "list":
            rows = store.listing()
            if args.json:
                print(json.dumps(rows, indent=1))
            for r in [] if args.json else rows:
                print(f"{r['name']:24} {r['kind']:9} " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("name", "kind")))
            if not rows and not args.json:
                print("no credentials stored")
        elif args.cred_verb == "rm":
            if not store.delete(args.name):
                raise CliError(f"no credential '{args.name}'")
            _emit(args, {"ok": True, "removed": args.name}, f"removed {args.name}")
        else:
            fields = dict(kv.split("=", 1) for kv in args.field or [])
            secret_field = {"postgres": "password", "basic": "password", "bearer": "token", "aws": "secret_access_key"}[args.kind]
            secret = sys.stdin.readline().rstrip("\n")
            if not secret:
                raise CliError(f"give the {secret_field} on standard input (it never goes on a command line), e.g.\n"
                               f"  read -rs S; printf '%s\\n' \"$S\" | interlock credentials set {args.name} --kind {args.kind} ...")
            fields[secret_field] = secret
            store.put(args.name, args.kind, fields)
            _emit(args, {"ok": True, "stored": args.name, "kind": args.kind, "fields": sorted(fields)},
                  f"stored {args.kind} credential '{args.name}' (fields: {', '.join(sorted(fields))})")
    except CredentialError as e:
        raise CliError(str(e)) from None
    except ValueError:
        kinds = "; ".join(k + ": " + ", ".join(v + OPTIONAL.get(k, ())) for k, v in KINDS.items())
        raise CliError(f"--field takes NAME=VALUE; fields for each kind: {kinds}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="interlock", description="Transparent guardrails between AI agents and the services they use.")
    ap.add_argument("--version", action="version", version=f"interlock {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="instance state (default /var/lib/interlock and /run/interlock)")
    common.add_argument("--config", type=Path, help="YAML configuration (default: embedded defaults)")
    common.add_argument("--json", action="store_true", help="machine-readable output (errors too)")
    # The same options after a second-level verb (interlock policy check --state-dir …); SUPPRESS
    # so they do not reset what was given before it.
    inner = argparse.ArgumentParser(add_help=False)
    inner.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS)
    inner.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    inner.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("daemon", parents=[common], help="load the capture and run the proxy")
    p.add_argument("--log-format", choices=["text", "json"], help="operator log on stderr (default: the config's, text)")
    p.set_defaults(fn=cmd_daemon)
    sub.add_parser("down", parents=[common], help="remove everything the daemon installed").set_defaults(fn=cmd_down)
    p = sub.add_parser("run", parents=[common], help="run a command enrolled as an agent")
    p.add_argument("--agent", help="agent name (default: the command's name)")
    p.add_argument("--user", metavar="NAME|UID[:GID]", help="run the command as this user, after the enrol (root only)")
    p.add_argument("--identity-token", metavar="FILE",
                   help="the workload's OIDC token (a CI job's, a service account's): validated by the daemon, its claims "
                        "bound to the agent for rules (identity:) and records")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("enroll", parents=[common], help="enroll (or relabel) a running process tree (root or operator group)")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--agent")
    p.add_argument("--identity-token", metavar="FILE", help="the workload's OIDC token (see run)")
    p.set_defaults(fn=cmd_enroll)
    p = sub.add_parser("unenroll", parents=[common], help="take a process tree out of its agent (root or operator group)")
    p.add_argument("--pid", type=int, required=True)
    p.set_defaults(fn=cmd_unenroll)
    p = sub.add_parser("sessions", parents=[common], help="list recorded sessions")
    p.add_argument("--agent")
    p.add_argument("--limit", type=int, default=200)
    fleet_cli.add_server_options(p, ("target", "verdict", "time"))
    p.set_defaults(fn=cmd_sessions)
    p = sub.add_parser("status", parents=[common], help="what is attached, listening and enrolled")
    p.set_defaults(fn=cmd_status)
    sub.add_parser("doctor", parents=[common], help="check this host's kernel and tools").set_defaults(fn=cmd_doctor)
    sub.add_parser("rearm", parents=[common], help="lift a tamper lockdown").set_defaults(fn=cmd_rearm)
    p = sub.add_parser("policy", parents=[common], help="check a policy file or explain a decision")
    psub = p.add_subparsers(dest="policy_verb", required=True)
    pc = psub.add_parser("check", parents=[inner], help="validate a policy file (line-numbered errors)")
    pc.add_argument("file", type=Path)
    pe = psub.add_parser("explain", parents=[inner], help="the decision for one agent, target and operation, and the rule that made it")
    pe.add_argument("--file", type=Path, help="policy file (default: the embedded default policy)")
    pe.add_argument("--agent", required=True)
    pe.add_argument("--target", required=True, help="a target name from the policy, or ADDRESS:PORT")
    pe.add_argument("--op", required=True, help="operation, e.g. connect, read, delete, s3:DeleteBucket, GET")
    pe.add_argument("--protocol", help="tcp, postgres, http, aws … (default: the target's)")
    pe.add_argument("--object", action="append", help="a table, bucket or path the operation touches")
    pe.add_argument("--risk", action="append", help="a risk flag the parser would raise (e.g. drop)")
    pe.add_argument("--claim", action="append", metavar="NAME=VALUE",
                    help="a claim of the agent's verified OIDC identity (repeat; a name given twice is a list)")
    p.set_defaults(fn=cmd_policy)
    p = sub.add_parser("approvals", parents=[common], help="operations waiting for a human")
    p.add_argument("--all", action="store_true", help="include decided and expired ones")
    fleet_cli.add_server_options(p, ("agent", "time"))
    p.set_defaults(fn=cmd_approvals)
    p = sub.add_parser("approve", parents=[common], help="let a held operation run")
    p.add_argument("id")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="this operation only (the default)")
    g.add_argument("--for", dest="for_", metavar="DURATION", help="also grant identical operations for DURATION (e.g. 15m)")
    p.set_defaults(fn=cmd_approve)
    p = sub.add_parser("deny", parents=[common], help="refuse a held operation")
    p.add_argument("id")
    p.add_argument("--reason", required=True)
    p.set_defaults(fn=cmd_deny)
    p = sub.add_parser("credentials", parents=[common], help="secrets the proxy uses for agents (never shown to them)")
    csub = p.add_subparsers(dest="cred_verb", required=True)
    cs = csub.add_parser("set", parents=[inner], help="store a credential; the secret is read from standard input")
    cs.add_argument("name")
    cs.add_argument("--kind", required=True, choices=["postgres", "aws", "bearer", "basic"])
    cs.add_argument("--field", action="append", metavar="NAME=VALUE",
                    help="non-secret fields: user=…, access_key_id=…, placeholder_access_key_id=…")
    csub.add_parser("list", parents=[inner], help="names, kinds and non-secret fields")
    cr = csub.add_parser("rm", parents=[inner], help="delete a credential")
    cr.add_argument("name")
    p.set_defaults(fn=cmd_credentials)
    p = sub.add_parser("events", parents=[common], help="recorded events: policy, tamper, lockdown, enrolment, approvals…")
    p.add_argument("--kind", help="only this kind (e.g. policy-rejected, tamper, lockdown, enrolled)")
    p.add_argument("--session", help="only this session's")
    p.add_argument("--limit", type=int, default=200)
    p.set_defaults(fn=cmd_events)
    p = sub.add_parser("prune", parents=[common], help="delete recordings older than a duration")
    p.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 30d, 12h")
    p.set_defaults(fn=cmd_prune)
    p = sub.add_parser("join", parents=[common], help="join a central recorder with an enrolment token (root)")
    p.add_argument("--server", required=True, metavar="URL", help="the recorder, e.g. https://recorder.example:8443")
    p.add_argument("--token", required=True, help="from `interlock recorder token` on the recorder (single use)")
    p.add_argument("--name", help="this host's name on the recorder (default: the hostname)")
    p.set_defaults(fn=cmd_join)
    p = sub.add_parser("replay", parents=[common], help="a session as a timeline")
    p.add_argument("session")
    fleet_cli.add_server_options(p)
    p.set_defaults(fn=cmd_replay)
    fleet_cli.register(sub, common)  # export, verify: a central recorder's records
    from central.cli import add_parser as add_recorder  # the central recorder's admin verbs (central/)

    add_recorder(sub)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("interlock")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `interlock sessions --json | head`: the reader went away; say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    try:
        return args.fn(args)
    except (CliError, fleet_cli.FleetCliError, config_mod.ConfigError, CgroupError, OSError, sqlite3.Error) as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "verb": args.verb, "error": str(e)}, indent=1))
        print(f"interlock {args.verb}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
