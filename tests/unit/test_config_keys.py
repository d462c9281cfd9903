"""Repeated keys in a cluster file are errors that name the line (PyYAML keeps the last silently)."""
from __future__ import annotations

import pytest

from rram import config as C
from rram.errors import ConfigError

GOOD = """\
secret: s3cret
nodes:
  - {name: p0, address: 127.0.0.1, port: 7001, capacity: 1GiB}
  - name: p1
    address: 127.0.0.1
    port: 7002
    capacity: 1GiB
"""


def write(tmp_path, text):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_a_file_without_repeats_loads(tmp_path):
    assert [n.name for n in C.load(write(tmp_path, GOOD)).nodes] == ["p0", "p1"]


@pytest.mark.parametrize("text, line, first, key", [
    (GOOD + "secret: other\n", 8, 1, "secret"),
    (GOOD.replace("    capacity: 1GiB\n", "    capacity: 1GiB\n    capacity: 2GiB\n"), 8, 7, "capacity"),
    (GOOD.replace("capacity: 1GiB}", "capacity: 1GiB, port: 7003}", 1), 3, 3, "port"),
    ("requester: {local_budget: 1MiB}\n" + GOOD + "requester: {local_budget: 2MiB}\n", 9, 1, "requester"),
])
def test_a_repeated_key_names_its_line(tmp_path, text, line, first, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        C.load(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: line {line}: {key!r} is given twice (first on line {first})"), msg


def test_yaml_merge_keys_are_not_repeats(tmp_path):
    text = GOOD.replace("nodes:\n", "x-common: &common {address: 127.0.0.1, capacity: 1GiB}\nnodes:\n")
    text = text.replace("  - {name: p0, address: 127.0.0.1, port: 7001, capacity: 1GiB}",
                        "  - {<<: *common, name: p0, port: 7001}")
    with pytest.raises(ConfigError, match="x-common: unknown key"):  # merges parse; the extra key is refused
        C.load(write(tmp_path, text))
