"""The cluster file: typed dataclasses loaded from YAML (``yaml.safe_load``).

Every mistake is a :class:`rram.errors.ConfigError` that names the file, the key path
(``nodes[1].capacity``) and what was expected.  Unknown keys are errors: a typo must not
silently fall back to a default.

    cfg = rram.config.load("cluster.yaml")
    cfg.node("mem1").capacity                        # bytes
    rram.config.dump(cfg)                            # YAML that loads back to an equal config
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

import yaml

from .errors import ConfigError

TRANSPORTS = ("auto", "tcp", "verbs", "loopback")
ROLES = ("provider", "requester")
HUGEPAGES = ("off", "transparent", "explicit")

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


DEFAULT_REPLICAS = 2


def parse_size(value) -> int:
    """Bytes from an int or a string like ``64MiB``, ``1GiB``, ``512M``, ``4k`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size of at least 0 bytes, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size such as 4096, '4k', '512M', '64MiB' or '1GiB', got {value!r}")


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling (``64MiB``); parse_size reads it back."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


# -- the dataclasses ----------------------------------------------------------------------------
# metadata "kind" drives parsing and dumping: size, int, float, bool, str, choice, roles


def _f(default, kind: str, **meta):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"kind": kind, **meta})
    return field(default=default, metadata={"kind": kind, **meta})


_REQUIRED = dataclasses.MISSING


@dataclass
class NodeConfig:
    name: str = _f(_REQUIRED, "str")
    address: str = _f(_REQUIRED, "str")
    port: int = _f(_REQUIRED, "port")
    capacity: int = _f(0, "size")
    roles: list = _f(["provider"], "roles")
    failure_domain: str | None = _f(None, "str", optional=True)
    data_port: int = _f(0, "port0")
    mlock: bool = _f(False, "bool")
    hugepages: str = _f("off", "choice", choices=HUGEPAGES)
    rdma_device: str | None = _f(None, "str", optional=True)
    gid_index: int = _f(0, "int")
    metrics_port: int | None = _f(None, "port", optional=True)
    metrics_address: str = _f("127.0.0.1", "str")  # /metrics has no authentication: loopback unless told
    #: how long a tcp data connection's thread polls for the next request before it sleeps (µs;
    #: adaptive: only while polls catch requests; 0: never, for a donor whose CPU matters more
    #: than its requesters' latency); unset: the transport's default (tcp.DEFAULT_PROVIDER_SPIN_US)
    data_spin_us: int | None = _f(None, "int", optional=True)

    @property
    def is_provider(self) -> bool:
        return "provider" in self.roles


@dataclass
class RequesterConfig:
    local_budget: int = _f(64 << 20, "size")
    remotify_batch: int = _f(256, "int", minimum=1)
    repatriate_rate: int = _f(1000, "int")  # pages/s moved back home when local memory allows; 0 = never
    #: deadline of one control request (heartbeat, lease, resume); capped at suspect_threshold
    heartbeat_timeout: float = _f(2.0, "float", positive=True)


@dataclass
class LimitsConfig:
    """What any peer can make one provider hold (README "Security model"): connections are
    refused over these caps with a logged reason, and the buffers of all data connections
    together come out of ``io_budget``."""

    max_connections: int = _f(256, "int", minimum=1)  # control + data, in total
    max_connections_per_peer: int = _f(64, "int", minimum=1)  # from one IP address
    max_handshakes: int = _f(64, "int", minimum=1)  # connections not yet authenticated
    max_sessions_per_requester: int = _f(8, "int", minimum=1)
    max_data_connections: int = _f(8, "int", minimum=1)  # per session: tcp tokens, verbs QPs
    io_budget: int = _f(256 << 20, "size")  # data-connection buffers, all connections together


@dataclass
class ClusterConfig:
    name: str = _f("rram", "str")
    #: the master key (providers and whoever issues keys hold it; see rram/control/auth.py)
    secret: str | None = _f(None, "str", optional=True)
    secret_file: str | None = _f(None, "str", optional=True)
    #: where ``rram keys add`` writes NAME.key and where a requester or operator finds its own
    keys_dir: str = _f("keys", "str")
    #: the cluster's CA and provider certificates (rram/tls.py): set, every control connection
    #: runs TLS 1.3 and clients verify providers against it; unset, control connections are
    #: plaintext (the provider says so in its log).  ``rram keys init`` fills it.
    tls_dir: str | None = _f(None, "str", optional=True)
    #: bytes each requester may lease on one provider (name -> size); others: default_quota
    quotas: dict = field(default_factory=dict, metadata={"kind": "quotas"})
    default_quota: int | None = _f(None, "size", optional=True)
    #: name -> highest revoked generation: those keys are refused and their sessions cut
    revoked: dict = field(default_factory=dict, metadata={"kind": "revoked"})
    transport: str = _f("auto", "choice", choices=TRANSPORTS)
    slab_size: int = _f(64 << 20, "size")
    heartbeat_interval: float = _f(1.0, "float", positive=True)
    suspect_threshold: float = _f(2.5, "float", positive=True)
    dead_threshold: float = _f(5.0, "float", positive=True)
    lease_grace: float = _f(10.0, "float", positive=True)
    replicas: int = _f(2, "int", minimum=1)
    #: copies a persistent write needs; below, it fails (ReplicationError) instead of weakening
    min_replicas: int = _f(1, "int", minimum=1)
    #: seal every page a requester stores on a provider (AES-256-GCM under a key only that requester
    #: process holds; README "Security model"): providers can neither read nor undetectably alter,
    #: swap or replay pages.  ``false`` stores plain compressed images (a little faster, no privacy)
    seal: bool = _f(True, "bool")
    nodes: list = field(default_factory=list, metadata={"kind": "nodes"})
    requester: RequesterConfig = field(default_factory=RequesterConfig, metadata={"kind": "requester"})
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={"kind": "limits"})
    #: the file this came from (for messages and relative paths); not part of the YAML
    source: str = field(default="<dict>", compare=False, repr=False, metadata={"kind": "internal"})

    def node(self, name: str) -> NodeConfig:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(f"{self.source}: no node named {name!r} in nodes "
                          f"(known: {', '.join(n.name for n in self.nodes) or 'none'})")

    def providers(self) -> list[NodeConfig]:
        return [n for n in self.nodes if n.is_provider]

    def secret_bytes(self) -> bytes:
        """The shared cluster secret (from ``secret`` or the first line of ``secret_file``)."""
        if self.secret is not None:
            return self.secret.encode()
        if self.secret_file is None:
            raise ConfigError(f"{self.source}: secret or secret_file is required")
        try:
            with open(self.secret_file, "rb") as f:
                data = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{self.source}: secret_file: cannot read {self.secret_file}: {exc.strerror}") from exc
        if not data:
            raise ConfigError(f"{self.source}: secret_file: {self.secret_file} is empty")
        return data

    def quota(self, requester: str) -> int | None:
        return self.quotas.get(requester, self.default_quota)

    def is_revoked(self, name: str, generation: int) -> bool:
        return generation <= self.revoked.get(name, 0)

    def key_path(self, name: str) -> str:
        return os.path.join(self.keys_dir, f"{name}.key")

    def transport_options(self, transport_name: str, node: NodeConfig) -> dict:
        """Keyword options of ``rram.transport.provider_transport(transport_name, ...)`` for ``node``."""
        per_session = self.limits.max_data_connections
        if transport_name == "tcp":
            spin = {} if node.data_spin_us is None else {"spin_us": node.data_spin_us}
            return {"host": node.address, "port": node.data_port, "io_budget": self.limits.io_budget,
                    "max_session_connections": per_session, **spin}
        if transport_name == "verbs":
            return {"device": node.rdma_device, "gid_index": node.gid_index, "max_session_connections": per_session}
        if transport_name == "loopback":
            return {}
        raise ConfigError(f"{self.source}: no options for transport {transport_name!r}; "
                          f"expected one of tcp, verbs, loopback (resolve 'auto' first)")


# -- parsing --------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, expected: str, got=None, *, show_got: bool = True):
        tail = f", got {got!r}" if show_got else ""
        raise ConfigError(f"{self.source}: {path}: expected {expected}{tail}")


def _value(ctx: _Ctx, path: str, f: dataclasses.Field, raw):
    kind = f.metadata["kind"]
    if raw is None and f.metadata.get("optional"):
        return None
    if kind == "str":
        if not isinstance(raw, str) or not raw:
            ctx.fail(path, "a non-empty string", raw)
        return raw
    if kind == "size":
        try:
            return parse_size(raw)
        except ValueError as exc:
            ctx.fail(path, str(exc).removeprefix("expected "), show_got=False)
    if kind in ("int", "port", "port0"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            ctx.fail(path, "an integer", raw)
        low = {"port": 1, "port0": 0}.get(kind, f.metadata.get("minimum", 0))
        high = 65535 if kind != "int" else None
        if raw < low or (high is not None and raw > high):
            ctx.fail(path, f"an integer in {low}..{high}" if high else f"an integer >= {low}", raw)
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            ctx.fail(path, "a number of seconds", raw)
        try:
            value = float(raw)  # YAML reads .nan and .inf too
        except OverflowError:  # an integer past the largest float
            value = math.inf
        if not math.isfinite(value):
            ctx.fail(path, "a finite number of seconds", str(raw)[:40])
        if f.metadata.get("positive") and value <= 0:
            ctx.fail(path, "a positive number of seconds", raw)
        return value
    if kind == "bool":
        if not isinstance(raw, bool):
            ctx.fail(path, "true or false", raw)
        return raw
    if kind == "choice":
        choices = f.metadata["choices"]
        if raw is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            raw = "off"
        if raw not in choices:
            ctx.fail(path, f"one of {', '.join(choices)}", raw)
        return raw
    if kind in ("quotas", "revoked"):
        if not isinstance(raw, dict) or any(not isinstance(k, str) or not k for k in raw):
            ctx.fail(path, "a mapping from identity names", raw)
        out = {}
        for k, v in raw.items():
            if kind == "quotas":
                try:
                    out[k] = parse_size(v)
                except ValueError as exc:
                    ctx.fail(f"{path}.{k}", str(exc).removeprefix("expected "), show_got=False)
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                ctx.fail(f"{path}.{k}", "the highest revoked generation (an integer >= 1)", v)
            else:
                out[k] = v
        return out
    if kind == "roles":
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw or any(r not in ROLES for r in raw):
            ctx.fail(path, f"a non-empty list drawn from {', '.join(ROLES)}", raw)
        if len(set(raw)) != len(raw):
            ctx.fail(path, "each role at most once", raw)
        return list(raw)
    raise AssertionError(kind)


def _build(ctx: _Ctx, cls, path: str, data, extra=None):
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        ctx.fail(path or "top level", "a mapping", data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("kind") != "internal"}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{ctx.source}: {prefix}{unknown[0]}: unknown key; expected one of {', '.join(fields)}")
    kwargs = dict(extra or {})
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is _REQUIRED and f.default_factory is _REQUIRED:
                ctx.fail(key, "a value (this key is required)", show_got=False)
            continue
        kind = f.metadata["kind"]
        if kind == "nodes":
            kwargs[name] = _nodes(ctx, key, data[name])
        elif kind in ("quotas", "revoked"):
            kwargs[name] = _value(ctx, key, f, data[name] or {})
        elif kind == "requester":
            kwargs[name] = _build(ctx, RequesterConfig, key, data[name] or {})
        elif kind == "limits":
            kwargs[name] = _build(ctx, LimitsConfig, key, data[name] or {})
        else:
            kwargs[name] = _value(ctx, key, f, data[name])
    return cls(**kwargs)


def _nodes(ctx: _Ctx, path: str, raw) -> list[NodeConfig]:
    if not isinstance(raw, list):
        ctx.fail(path, "a list of nodes", raw)
    nodes = [_build(ctx, NodeConfig, f"{path}[{i}]", item) for i, item in enumerate(raw)]
    seen: dict[str, int] = {}
    endpoints: dict[tuple, int] = {}
    for i, n in enumerate(nodes):
        if n.name in seen:
            ctx.fail(f"{path}[{i}].name", f"a unique node name (nodes[{seen[n.name]}] is also {n.name!r})",
                     show_got=False)
        seen[n.name] = i
        if (n.address, n.port) in endpoints:
            ctx.fail(f"{path}[{i}].port", f"a control address not used by nodes[{endpoints[n.address, n.port]}] "
                     f"({n.address}:{n.port})", show_got=False)
        endpoints[n.address, n.port] = i
        if n.is_provider and n.capacity <= 0:
            ctx.fail(f"{path}[{i}].capacity", "a positive size for a provider (e.g. '1GiB')", n.capacity)
    return nodes


def _check(ctx: _Ctx, cfg: ClusterConfig) -> None:
    if cfg.secret is not None and cfg.secret_file is not None:
        ctx.fail("secret_file", "either secret or secret_file, not both", show_got=False)
    if cfg.slab_size <= 0 or cfg.slab_size % 4096:
        ctx.fail("slab_size", "a positive multiple of 4096 bytes", cfg.slab_size)
    if cfg.slab_size > 256 << 20:
        ctx.fail("slab_size", "at most 256MiB (page locations address 256 MiB slabs)", cfg.slab_size)
    if not cfg.heartbeat_interval < cfg.suspect_threshold <= cfg.dead_threshold:
        ctx.fail("suspect_threshold", "heartbeat_interval < suspect_threshold <= dead_threshold "
                 f"(got {cfg.heartbeat_interval} < {cfg.suspect_threshold} <= {cfg.dead_threshold})",
                 show_got=False)
    providers = len(cfg.providers())
    if cfg.nodes and cfg.replicas > providers:
        ctx.fail("replicas", f"at most the number of providers ({providers})", cfg.replicas)
    if cfg.min_replicas > cfg.replicas:
        ctx.fail("min_replicas", f"at most replicas ({cfg.replicas})", cfg.min_replicas)


def from_dict(d, source: str = "<dict>", base_dir: str | None = None) -> ClusterConfig:
    """A validated ClusterConfig from a mapping (as ``yaml.safe_load`` returns it)."""
    ctx = _Ctx(source)
    cfg = _build(ctx, ClusterConfig, "", d, extra={"source": source})
    if isinstance(d, dict) and "replicas" not in d:
        # default: two copies of every remote slab where the cluster has two providers
        cfg.replicas = max(1, min(DEFAULT_REPLICAS, len(cfg.providers())))
    if cfg.secret_file is not None and base_dir is not None:
        cfg.secret_file = os.path.abspath(os.path.join(base_dir, cfg.secret_file))
    if base_dir is not None:
        cfg.keys_dir = os.path.abspath(os.path.join(base_dir, cfg.keys_dir))
        if cfg.tls_dir is not None:
            cfg.tls_dir = os.path.abspath(os.path.join(base_dir, cfg.tls_dir))
    _check(ctx, cfg)
    return cfg


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"duplicate key {key!r} on line {line}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """``safe_load`` that refuses a repeated mapping key: PyYAML keeps the last one silently,
    so a second ``capacity:`` in a node would quietly win over the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: the base class says what is wrong with it
        return super().construct_mapping(node, deep=deep)


def load(path) -> ClusterConfig:
    """Read and validate a cluster file; ``secret_file`` is relative to the file's directory."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:  # the file is opened as UTF-8 text: a ValueError, not a YAMLError
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); expected a YAML file") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: line {exc.line}: {exc.key!r} is given twice (first on line {exc.first}); "
                          "expected each key once") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: not valid YAML for a cluster file: nested too deeply") from None
    except (ValueError, IndexError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        # PyYAML's constructors raise these, not a YAMLError, for a malformed explicitly tagged
        # scalar (`!!float`, `!!int 0x`, `!!bool`, `!!timestamp 2020-99-99`, `!!timestamp 200112-`)
        raise ConfigError(f"{path}: not valid YAML: a tagged value cannot be read "
                          f"({type(exc).__name__}: {exc})") from exc
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with at least `nodes`")
    return from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def to_dict(cfg) -> dict:
    """Plain data for YAML/JSON; sizes spelled with units."""
    out = {}
    for f in dataclasses.fields(cfg):
        kind = f.metadata.get("kind")
        value = getattr(cfg, f.name)
        if kind == "internal" or (value is None and f.metadata.get("optional")):
            continue
        if kind == "nodes":
            value = [to_dict(n) for n in value]
        elif kind in ("requester", "limits"):
            value = to_dict(value)
        elif kind == "size":
            value = format_size(value)
        elif kind == "roles":
            value = list(value)
        elif kind == "quotas":
            value = {k: format_size(v) for k, v in value.items()}
        elif kind == "revoked":
            value = dict(value)
        out[f.name] = value
    return out


def dump(cfg: ClusterConfig) -> str:
    """YAML text that ``from_dict(yaml.safe_load(text))`` turns back into an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)

