"""rram: keep compressed pages in the idle RAM of other machines, over RDMA or TCP.

Public surface::

    store = rram.connect("cluster.yaml")          # a requester's PageStore
    pool = store.create_pool(persistent=True)
    store.put(pool, obj, index, page)              # 4 KiB
    store.get(pool, obj, index)                    # bytes, or None on a miss

    with rram.FarMemory("cluster.yaml", size=1 << 30, budget=64 << 20) as region:
        a = region.array("float64", (1 << 27,))    # pages arrive from rram on first touch

This package face sits on top of the house (docs/architecture.md): it hands on names defined
below it, and no module of rram imports from it but the CLI (``__version__``).  ``connect``
imports the composition root (rram/cluster.py) when called, and ``FarMemory`` its frontend
(rram/frontends/farmem) when first named, not here, so that importing ``rram.errors`` or
``rram.units`` loads nothing else.
"""
from __future__ import annotations

from .errors import RramError  # noqa: F401
from .units import PAGE_SIZE  # noqa: F401

__version__ = "0.1.0"


def connect(config, **options):
    """Open a requester page store on the cluster ``config`` (a path or a ClusterConfig);
    ``options`` as for ``rram.cluster.open_store`` (name, transport, local_budget, ...)."""
    from .cluster import open_store

    return open_store(config, **options)


def __getattr__(name: str):
    if name == "FarMemory":  # a frontend: loaded on first use (userfaultfd, numpy, a handler)
        from .frontends.farmem import FarMemory

        return FarMemory
    raise AttributeError(f"module 'rram' has no attribute {name!r}")


def build_info() -> dict[str, str]:
    """Which compiled extensions are present, and the reason for each one that is not."""
    import importlib

    from ._ext.native import NATIVE

    info = {}
    for name in (nat.name for nat in NATIVE):
        try:
            importlib.import_module(f"rram._ext.{name}")
            info[name] = "built"
        except ImportError as exc:
            info[name] = f"missing ({exc})"
    return info


def print_build_info() -> None:
    for name, state in build_info().items():
        print(f"rram: {name}: {state}")
