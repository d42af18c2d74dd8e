"""The daemon's configuration: YAML on disk, every key optional, defaults embedded.

Errors name the key and say what would be valid, so `interlock daemon` can refuse a bad file
with a message an operator can act on."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from interceptor.layout import valid_name

MAX_WORKERS = 64  # proxy workers; a session id names its worker in two hex digits


class ConfigError(ValueError):
    pass


@dataclass
class AgentSelector:
    """Processes enrolled at exec as this agent, with no window before the first connect."""

    name: str
    exe: list[str] = field(default_factory=list)
    uid: list[int] = field(default_factory=list)
    cgroup: list[str] = field(default_factory=list)
    # A file holding the workload's OIDC token (a Kubernetes projected service-account token):
    # the daemon reads it, validates it against `identity:` and binds it to this agent.
    identity_token: str | None = None


@dataclass
class IdentityIssuer:
    issuer: str
    audience: list[str]
    jwks_uri: str | None = None
    algorithms: list[str] | None = None


@dataclass
class IdentityConfig:
    """`identity:`: the OIDC issuers whose workload tokens agents may carry (identity/oidc.py)."""

    issuers: list[IdentityIssuer] = field(default_factory=list)
    claims: list[str] | None = None  # claims kept for rules and records (iss, sub always); None: all
    leeway: float = 30.0  # seconds of clock skew allowed on exp/nbf/iat


@dataclass
class RecorderConfig:
    """`recorder:` — ship this host's records to a central recorder (docs/RECORDER.md); the host
    must have run `interlock join`. Past `spool_max` unshipped records agent traffic is refused."""

    server: str
    spool_max: int = 1_000_000


@dataclass
class Config:
    instance: str = "default"
    cgroup_root: str = "interlock"
    # Where the hooks attach: the instance's own tree by default; a wider cgroup ("/" for the
    # whole host) lets exe/uid selectors enroll processes that start anywhere below it.
    capture_cgroup: str | None = None
    proxy_port: int = 15001
    dns_port: int = 15053
    # The proxy's transparent listener for connections from other hosts into agents (nft tproxy);
    # proxy_port + 2 when unset.
    inbound_port: int | None = None
    # The socket mark the nft backstop matches agents by; derived from the instance name when
    # unset, so instances sharing a network namespace do not judge each other's agents.
    mark: int | None = None
    dns_upstream: str | None = None
    dns_timeout: float = 2.0  # an upstream nameserver silent this long gets the agent SERVFAIL
    proxy_restart_delay: float = 1.0
    connect_timeout: float = 10.0
    watch_interval: float = 0.2
    # How long a silent client may wait before the proxy connects to read a server greeting.
    first_byte_timeout: float = 0.25
    # How long a connection may take to name its protocol (an HTTP request head, a PostgreSQL
    # startup packet, a TLS ClientHello; or both sides silent): then it is refused and recorded.
    header_timeout: float = 30.0
    # A connection with no byte either way for this long is closed (0: never).
    idle_timeout: float = 3600.0
    # Open connections one agent may have through the proxy; past it, refused (0: no cap).
    max_connections_per_agent: int = 512
    policy: str | None = None  # policy file; the embedded default when unset
    tls_trust: str | None = None  # CAs the proxy trusts for services (default: the system store)
    splice: bool = True  # move bulk opaque connections to kernel splice threads
    # Proxy worker processes sharing the listeners (SO_REUSEPORT); the number of CPUs when unset.
    workers: int | None = None
    metrics_address: str | None = None  # HOST:PORT for Prometheus metrics (loopback); off when unset
    log_format: str = "text"  # or "json": one JSON object per log line (stderr / journald)
    # Besides root, members of this group (a name or a gid) may enroll, relabel and unenroll
    # processes and see status details. Unset: root only.
    operator_group: str | int | None = None
    agents: list[AgentSelector] = field(default_factory=list)
    # Start even where no ptrace guard (BPF LSM, Yama, Landlock) can stop an agent borrowing an
    # un-enrolled process of its uid: the operator accepts that risk (interceptor/ptrace_guard.py).
    allow_unguarded_ptrace: bool = False
    identity: IdentityConfig | None = None  # unset: no agent may carry an OIDC identity
    recorder: RecorderConfig | None = None  # unset: local recording only
    source: str | None = None


_SCALARS = {"instance": str, "cgroup_root": str, "capture_cgroup": str, "proxy_port": int, "dns_port": int,
            "inbound_port": int, "mark": int,
            "dns_upstream": str, "dns_timeout": float, "proxy_restart_delay": float, "connect_timeout": float,
            "watch_interval": float, "first_byte_timeout": float, "header_timeout": float,
            "idle_timeout": float, "max_connections_per_agent": int, "policy": str, "tls_trust": str,
            "splice": bool, "workers": int, "metrics_address": str, "log_format": str, "allow_unguarded_ptrace": bool}


def load(path: Path | None) -> Config:
    if path is None:
        return finish(Config())
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    cfg = Config(source=str(path))
    for key, value in raw.items():
        if key == "agents":
            cfg.agents = _agents(path, value)
        elif key == "identity":
            cfg.identity = _identity(path, value)
        elif key == "recorder":
            cfg.recorder = _recorder(path, value)
        elif key == "operator_group":
            if isinstance(value, bool) or not isinstance(value, (str, int)) or value in ("", -1):
                raise ConfigError(f"{path}: 'operator_group' must be a group name or a gid, got {value!r}")
            cfg.operator_group = value
        elif key in _SCALARS:
            typ = _SCALARS[key]
            if typ is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
                raise ConfigError(f"{path}: '{key}' must be {typ.__name__}, got {value!r}")
            setattr(cfg, key, value)
        else:
            raise ConfigError(f"{path}: unknown key '{key}' (known: {', '.join([*_SCALARS, 'operator_group', 'agents', 'identity', 'recorder'])})")
    if cfg.policy and not Path(cfg.policy).is_absolute():
        cfg.policy = str((Path(path).parent / cfg.policy).resolve())
    _check(path, cfg)
    return finish(cfg)


def default_workers() -> int:
    """One proxy worker per CPU this process may run on (its affinity mask, not the host's count:
    a daemon pinned to 2 of 64 CPUs gets 2), at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def finish(cfg: Config) -> Config:
    if cfg.mark is None:
        cfg.mark = 0x494C0000 | (zlib.crc32(cfg.instance.encode()) & 0xFFFF)
    if cfg.workers is None:
        cfg.workers = default_workers()
    if cfg.inbound_port is None:
        step = 1 if cfg.proxy_port <= 65530 else -1
        cfg.inbound_port = next(p for p in (cfg.proxy_port + 2 * step, cfg.proxy_port + 3 * step) if p != cfg.dns_port)
    if not 1 <= cfg.inbound_port <= 65535 or cfg.inbound_port in (cfg.proxy_port, cfg.dns_port):
        raise ConfigError(f"{cfg.source or 'config'}: 'inbound_port' ({cfg.inbound_port}) must be a port number "
                          "1..65535 other than 'proxy_port' and 'dns_port'")
    return cfg


def _recorder(path: Path, value) -> RecorderConfig:
    if not isinstance(value, dict) or not isinstance(value.get("server"), str):
        raise ConfigError(f"{path}: 'recorder' must be a mapping with 'server: https://HOST:PORT' (and optionally 'spool_max')")
    unknown = set(value) - {"server", "spool_max"}
    if unknown:
        raise ConfigError(f"{path}: recorder: unknown key(s) {sorted(unknown)} (known: server, spool_max)")
    server = value["server"].rstrip("/")
    if not server.startswith("https://") or len(server) <= len("https://"):
        raise ConfigError(f"{path}: recorder.server must be an https:// URL, got {value['server']!r}")
    spool_max = value.get("spool_max", RecorderConfig.spool_max)
    if isinstance(spool_max, bool) or not isinstance(spool_max, int) or spool_max < 1:
        raise ConfigError(f"{path}: recorder.spool_max must be a number of records above 0, got {spool_max!r}")
    return RecorderConfig(server, spool_max)


def _agents(path: Path, value) -> list[AgentSelector]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: 'agents' must be a list of {{name, exe, uid, cgroup}}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not valid_name(str(item.get("name", ""))):
            raise ConfigError(f"{path}: agents[{i}] needs a 'name' of lowercase letters, digits, - or _")
        unknown = set(item) - {"name", "exe", "uid", "cgroup", "identity_token"}
        if unknown:
            raise ConfigError(f"{path}: agents[{i}]: unknown key(s) {sorted(unknown)}")
        token = item.get("identity_token")
        if token is not None and (not isinstance(token, str) or not token.startswith("/")):
            raise ConfigError(f"{path}: agents[{i}].identity_token must be the absolute path of a token file, got {token!r}")
        sel = AgentSelector(item["name"], list(item.get("exe", [])), list(item.get("uid", [])),
                            list(item.get("cgroup", [])), token)
        for exe in sel.exe:
            if not str(exe).startswith("/") or len(str(exe)) >= 256:
                raise ConfigError(f"{path}: agents[{i}].exe: '{exe}' must be an absolute path under 256 bytes")
        if not all(isinstance(u, int) for u in sel.uid):
            raise ConfigError(f"{path}: agents[{i}].uid must be a list of numbers")
        out.append(sel)
    return out


def _identity(path: Path, value) -> IdentityConfig:
    """identity: {issuers: [{issuer, audience, jwks_uri?, algorithms?}], claims?: [...], leeway?: 30}"""
    from identity.oidc import ASYMMETRIC, DEFAULT_ALGORITHMS

    example = "identity: {issuers: [{issuer: https://token.example, audience: interlock}]}"
    if not isinstance(value, dict) or not isinstance(value.get("issuers"), list) or not value["issuers"]:
        raise ConfigError(f"{path}: 'identity' needs a list of issuers, e.g. {example}")
    unknown = set(value) - {"issuers", "claims", "leeway"}
    if unknown:
        raise ConfigError(f"{path}: identity: unknown key(s) {sorted(unknown)} (known: issuers, claims, leeway)")
    out = IdentityConfig()
    for i, item in enumerate(value["issuers"]):
        where = f"{path}: identity.issuers[{i}]"
        if not isinstance(item, dict) or set(item) - {"issuer", "audience", "jwks_uri", "algorithms"}:
            raise ConfigError(f"{where}: a mapping of issuer, audience, jwks_uri (optional), algorithms (optional)")
        iss, aud = item.get("issuer"), item.get("audience")
        if not isinstance(iss, str) or not iss.startswith(("https://", "http://")):
            raise ConfigError(f"{where}: 'issuer' must be the issuer's URL exactly as its tokens' iss claim says")
        aud = [aud] if isinstance(aud, str) else aud
        if not isinstance(aud, list) or not aud or not all(isinstance(a, str) and a for a in aud):
            raise ConfigError(f"{where}: 'audience' must name the audience(s) tokens for Interlock carry (aud)")
        jwks = item.get("jwks_uri")
        if jwks is not None and (not isinstance(jwks, str) or not jwks.startswith(("https://", "http://"))):
            raise ConfigError(f"{where}: 'jwks_uri' must be an http(s) URL (default: from the issuer's discovery document)")
        algs = item.get("algorithms")
        if algs is not None and (not isinstance(algs, list) or not algs or not set(algs) <= ASYMMETRIC):
            raise ConfigError(f"{where}: 'algorithms' must be a list of {', '.join(DEFAULT_ALGORITHMS)} "
                              "(none and HMAC are never accepted)")
        out.issuers.append(IdentityIssuer(iss, aud, jwks, algs))
    claims = value.get("claims")
    if claims is not None and (not isinstance(claims, list) or not all(isinstance(c, str) for c in claims)):
        raise ConfigError(f"{path}: identity.claims must be a list of claim names (flattened, e.g. kubernetes.io.namespace)")
    out.claims = claims
    leeway = value.get("leeway", 30)
    if isinstance(leeway, bool) or not isinstance(leeway, int | float) or not 0 <= leeway <= 300:
        raise ConfigError(f"{path}: identity.leeway must be seconds of clock skew, 0..300")
    out.leeway = float(leeway)
    return out


def _check(path: Path, cfg: Config) -> None:
    if not valid_name(cfg.instance):
        raise ConfigError(f"{path}: 'instance' must be lowercase letters, digits, - or _ (≤31)")
    for key in ("proxy_port", "dns_port"):
        if not 1 <= getattr(cfg, key) <= 65535:
            raise ConfigError(f"{path}: '{key}' must be a port number 1..65535")
    for key in ("first_byte_timeout", "header_timeout"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{path}: '{key}' must be a number of seconds above 0")
    if cfg.workers is not None and not 1 <= cfg.workers <= MAX_WORKERS:
        raise ConfigError(f"{path}: 'workers' must be 1..{MAX_WORKERS} proxy processes (default: one per CPU)")
    for key in ("idle_timeout", "max_connections_per_agent"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{path}: '{key}' must be 0 (off) or more")
    tokens = [a.name for a in cfg.agents if a.identity_token]
    if tokens and cfg.identity is None:
        raise ConfigError(f"{path}: agents {', '.join(tokens)} have an identity_token but no 'identity:' says which "
                          "issuers to accept")
    if cfg.proxy_port == cfg.dns_port:
        raise ConfigError(f"{path}: 'proxy_port' and 'dns_port' must differ")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"{path}: 'log_format' must be text or json, got {cfg.log_format!r}")
    if cfg.metrics_address is not None:
        host, _, port = cfg.metrics_address.rpartition(":")
        if not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
            raise ConfigError(f"{path}: 'metrics_address' must be HOST:PORT (e.g. 127.0.0.1:9464), got {cfg.metrics_address!r}")
    if not 0 < cfg.dns_timeout <= 30:
        raise ConfigError(f"{path}: 'dns_timeout' must be a number of seconds in (0, 30]")
    root = cfg.cgroup_root.strip("/")
    if root in ("", ".") or ".." in cfg.cgroup_root:
        raise ConfigError(f"{path}: 'cgroup_root' must name a cgroup below the cgroup2 mount")
    if cfg.capture_cgroup is not None:
        scope = cfg.capture_cgroup.strip("/")
        if ".." in scope or (scope and root != scope and not root.startswith(scope + "/")):
            raise ConfigError(f"{path}: 'capture_cgroup' ({cfg.capture_cgroup}) must contain 'cgroup_root' "
                              f"({cfg.cgroup_root}), or the agents would be outside the hooks")
