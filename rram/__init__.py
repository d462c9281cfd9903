"""rram: keep compressed pages in the idle RAM of other machines, over RDMA or TCP.

Public surface::

    store = rram.connect("cluster.yaml")          # a requester's PageStore
    pool = store.create_pool(persistent=True)
    store.put(pool, obj, index, page)              # 4 KiB
    store.get(pool, obj, index)                    # bytes, or None on a miss
"""
from __future__ import annotations

from .errors import RramError  # noqa: F401

__version__ = "0.1.0"
PAGE_SIZE = 4096


def connect(config, **kwargs):
    """Open a requester page store on the cluster described by ``config`` (a path or a Config)."""
    from .datapath.store import connect as _connect

    return _connect(config, **kwargs)


def __getattr__(name: str):
    # FarMemory is a frontend: imported on first use, never by the layers below
    if name == "FarMemory":
        from .frontends.farmem import FarMemory

        return FarMemory
    raise AttributeError(f"module 'rram' has no attribute {name!r}")


def build_info() -> dict[str, str]:
    """Which compiled extensions are present, and the reason for each one that is not."""
    import importlib

    info = {}
    for name in ("_codec", "_slab", "_pagemap", "_memops", "_verbs", "_uffd"):
        try:
            importlib.import_module(f"rram._ext.{name}")
            info[name] = "built"
        except ImportError as exc:
            info[name] = f"missing ({exc})"
    return info


def print_build_info() -> None:
    for name, state in build_info().items():
        print(f"rram: {name}: {state}")
