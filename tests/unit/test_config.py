"""The cluster file: sizes, defaults, round trips, and errors that name file, key and expectation."""
from __future__ import annotations

import os

import pytest
import yaml

from rram import config as C
from rram.errors import ConfigError

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "cluster.yaml")


def base(**over) -> dict:
    d = {"secret": "s3cret", "nodes": [
        {"name": "a", "address": "127.0.0.1", "port": 7000, "capacity": "1GiB"},
        {"name": "b", "address": "127.0.0.1", "port": 7001, "capacity": "512M", "roles": ["provider", "requester"]},
        {"name": "c", "address": "127.0.0.1", "port": 7002, "roles": ["requester"]},
    ]}
    d.update(over)
    return d


@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("4k", 4096), ("4K", 4096), ("512M", 512 << 20), ("64MiB", 64 << 20), ("1GiB", 1 << 30),
    ("1 GiB", 1 << 30), ("100", 100), ("2TiB", 2 << 40), (0, 0),
])
def test_parse_size(text, expected):
    assert C.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "1.5GiB", "-4k", "4 parsecs", -1, True, None, 1.5, [1]])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="expected a size"):
        C.parse_size(bad)


def test_defaults_and_accessors():
    cfg = C.from_dict(base())
    assert cfg.slab_size == 64 << 20 and cfg.heartbeat_interval == 1.0 and cfg.dead_threshold == 5.0
    assert cfg.lease_grace == 10.0 and cfg.replicas == 2 and cfg.transport == "auto"
    assert cfg.requester.local_budget == 64 << 20 and cfg.requester.remotify_batch == 256
    a = cfg.node("a")
    assert a.capacity == 1 << 30 and a.roles == ["provider"] and a.data_port == 0 and a.gid_index == 0
    assert a.hugepages == "off" and a.mlock is False and a.failure_domain is None
    assert [n.name for n in cfg.providers()] == ["a", "b"]
    assert cfg.secret_bytes() == b"s3cret"
    assert cfg.transport_options("tcp", a) == {"host": "127.0.0.1", "port": 0, "io_budget": 256 << 20,
                                               "max_session_connections": 8}
    assert cfg.transport_options("verbs", a) == {"device": None, "gid_index": 0, "max_session_connections": 8}
    assert a.metrics_address == "127.0.0.1"  # /metrics stays on loopback unless told otherwise
    assert a.data_spin_us is None  # the transport's default
    spun = C.from_dict(base(nodes=[{"name": "a", "address": "127.0.0.1", "port": 1, "capacity": "1GiB", "data_spin_us": 0}]))
    assert spun.transport_options("tcp", spun.node("a"))["spin_us"] == 0
    assert cfg.transport_options("loopback", a) == {}
    with pytest.raises(ConfigError, match="no node named 'zz'"):
        cfg.node("zz")


def test_limits_are_checked_and_round_trip():
    cfg = C.from_dict(base(limits={"max_connections": 10, "io_budget": "32MiB"}))
    assert cfg.limits.max_connections == 10 and cfg.limits.io_budget == 32 << 20
    assert cfg.limits.max_sessions_per_requester == 8  # the others keep their defaults
    assert C.from_dict(yaml.safe_load(C.dump(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"limits.max_handshakes: expected an integer >= 1, got 0"):
        C.from_dict(base(limits={"max_handshakes": 0}))
    with pytest.raises(ConfigError, match=r"limits.max_conections: unknown key"):
        C.from_dict(base(limits={"max_conections": 3}))


def test_dump_round_trips():
    cfg = C.from_dict(base(transport="tcp", slab_size="16MiB", lease_grace=2, requester={"local_budget": "1GiB"}))
    cfg.nodes[0].failure_domain = "rack-1"
    again = C.from_dict(yaml.safe_load(C.dump(cfg)))
    assert again == cfg


def test_example_file_loads():
    cfg = C.load(EXAMPLE)
    assert cfg.node("mem1").hugepages == "transparent"
    assert os.path.isabs(cfg.secret_file) and cfg.secret_file.endswith("cluster.secret")
    assert C.from_dict(yaml.safe_load(C.dump(cfg))) == cfg
    assert cfg.tls_dir == os.path.join(os.path.dirname(os.path.abspath(EXAMPLE)), "tls")


def test_tls_dir_is_optional_and_relative_to_the_file(tmp_path):
    assert C.from_dict(base()).tls_dir is None  # plaintext control connections
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base(), "tls_dir": "certs"}))
    assert C.load(path).tls_dir == str(tmp_path / "certs")
    path.write_text(yaml.safe_dump({**base(), "tls_dir": ""}))
    with pytest.raises(ConfigError, match="tls_dir: expected a non-empty string"):
        C.load(path)


def test_secret_file_relative_to_config(tmp_path):
    (tmp_path / "s.key").write_text("  topsecret\n")
    path = tmp_path / "c.yaml"
    d = base()
    del d["secret"]
    d["secret_file"] = "s.key"
    path.write_text(yaml.safe_dump(d))
    assert C.load(path).secret_bytes() == b"topsecret"


@pytest.mark.parametrize("mutate,key,expected", [
    (lambda d: d["nodes"][1].update(capacity="lots"), "nodes[1].capacity", "a size"),
    (lambda d: d["nodes"][0].update(mlok=True), "nodes[0].mlok", "unknown key"),
    (lambda d: d.update(heartbeat_intervl=1), "heartbeat_intervl", "unknown key"),
    (lambda d: d["nodes"][0].pop("address"), "nodes[0].address", "required"),
    (lambda d: d.update(transport="udp"), "transport", "one of auto, tcp, verbs, loopback"),
    (lambda d: d["nodes"][2].update(roles=["donor"]), "nodes[2].roles", "provider, requester"),
    (lambda d: d["nodes"][0].update(port=70000), "nodes[0].port", "1..65535"),
    (lambda d: d["nodes"][0].update(port="7000"), "nodes[0].port", "an integer"),
    (lambda d: d["nodes"][0].update(mlock="yes"), "nodes[0].mlock", "true or false"),
    (lambda d: d["nodes"][0].update(hugepages="always"), "nodes[0].hugepages", "off, transparent, explicit"),
    (lambda d: d["nodes"][1].update(name="a"), "nodes[1].name", "unique node name"),
    (lambda d: d["nodes"][1].update(port=7000), "nodes[1].port", "not used by nodes[0]"),
    (lambda d: d["nodes"][0].pop("capacity"), "nodes[0].capacity", "positive size for a provider"),
    (lambda d: d.update(secret_file="x"), "secret_file", "not both"),
    (lambda d: d.update(slab_size="1000"), "slab_size", "multiple of 4096"),
    (lambda d: d.update(slab_size="1GiB"), "slab_size", "at most 256MiB"),
    (lambda d: d.update(dead_threshold=0.5), "suspect_threshold", "heartbeat_interval < suspect_threshold"),
    (lambda d: d.update(heartbeat_interval=-1), "heartbeat_interval", "positive number of seconds"),
    (lambda d: d.update(replicas=3), "replicas", "at most the number of providers (2)"),
    (lambda d: d.update(replicas=0), "replicas", "an integer >= 1"),
    (lambda d: d.update(requester={"local_budgt": 1}), "requester.local_budgt", "unknown key"),
    (lambda d: d.update(requester={"remotify_batch": "many"}), "requester.remotify_batch", "an integer"),
    (lambda d: d.update(nodes={"a": 1}), "nodes", "a list of nodes"),
    (lambda d: d["nodes"].append("d"), "nodes[3]", "a mapping"),
])
def test_errors_name_file_key_and_expectation(tmp_path, mutate, key, expected):
    d = base()
    mutate(d)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as info:
        C.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert expected in msg, msg


def test_file_level_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: cannot read"):
        C.load(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        C.load(empty)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level: expected a mapping"):
        C.load(top)


def test_missing_secret_is_reported_when_needed():
    cfg = C.from_dict(base(secret=None), source="c.yaml")
    with pytest.raises(ConfigError, match="c.yaml: secret or secret_file is required"):
        cfg.secret_bytes()


def test_bare_off_reads_as_off():
    d = base()
    d["nodes"][0]["hugepages"] = False  # what YAML 1.1 makes of `hugepages: off`
    assert C.from_dict(d).node("a").hugepages == "off"


def test_seal_is_on_unless_the_cluster_file_turns_it_off():
    base = {"secret": "s", "nodes": [{"name": "p0", "address": "127.0.0.1", "port": 7001, "capacity": "1GiB"}]}
    assert C.from_dict(base).seal is True
    off = C.from_dict({**base, "seal": False})
    assert off.seal is False
    assert C.from_dict(yaml.safe_load(C.dump(off))).seal is False
    with pytest.raises(ConfigError, match="seal"):
        C.from_dict({**base, "seal": "maybe"})
