"""Fuzz target: the cluster file (rram/config.py ``load``, hence YAML and ``from_dict``).

The bytes are a cluster file.  Oracle: ``load`` returns a ClusterConfig or raises ConfigError
(naming the file); a loaded config dumps to YAML that loads back to an equal config (what
``dump`` promises).
"""
from __future__ import annotations

import os
import tempfile

from tests.fuzz import driver

with driver.instrumented("yaml"):
    from rram import config
from rram.errors import ConfigError

_DIR = tempfile.mkdtemp(prefix="rram-fuzz-config-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
PATH = os.path.join(_DIR, "cluster.yaml")


def one_input(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        cfg = config.load(PATH)
    except ConfigError as exc:
        assert PATH in str(exc), f"error does not name the file: {exc}"
        return
    with open(PATH, "w", encoding="utf-8") as f:
        f.write(config.dump(cfg))
    again = config.load(PATH)
    assert again == cfg, f"dump/load changed the config:\n{cfg}\n{again}"


driver.main(__name__, one_input)
