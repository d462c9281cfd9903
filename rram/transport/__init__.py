"""Transports: one interface (base.py), three implementations.

``loopback``  in-process, for unit tests and single-process tools
``tcp``       one-sided READ/WRITE emulated by the provider's data server
``verbs``     real one-sided RDMA through ext/_verbs (rdma-core's libibverbs)
"""
from __future__ import annotations

import importlib

from .. import errors
from .base import (  # noqa: F401  (public surface)
    COMPLETION_DTYPE,
    OP_DTYPE,
    OP_READ,
    OP_WRITE,
    Endpoint,
    ProviderSession,
    ProviderTransport,
    RemoteRegion,
    RequesterTransport,
    completion_error,
    new_completions,
    new_ops,
)

NAMES = ("loopback", "tcp", "verbs")


def _module(name: str):
    if name not in NAMES:
        raise errors.ConfigError(f"unknown transport {name!r}; expected one of {', '.join(NAMES)} or 'auto'")
    return importlib.import_module(f"{__name__}.{name}")


def unavailable_reason(name: str) -> str | None:
    """None when ``name`` can run on this host, else a sentence saying why not."""
    try:
        mod = _module(name)
    except ImportError as exc:
        return f"{name} transport cannot be imported: {exc}"
    return mod.unavailable_reason()


def available() -> dict[str, str | None]:
    """Every transport with None (usable) or the reason it is not."""
    return {name: unavailable_reason(name) for name in NAMES}


def choose(name: str = "auto") -> tuple[str, str]:
    """Resolve ``auto``: verbs when a usable RDMA device exists, else tcp. Returns (name, why)."""
    if name != "auto":
        reason = unavailable_reason(name)
        if reason:
            raise errors.TransportUnavailable(reason)
        return name, f"{name} requested"
    reason = unavailable_reason("verbs")
    if reason is None:
        return "verbs", "an RDMA device is present"
    return "tcp", f"verbs unavailable ({reason})"


def provider_transport(name: str, **options) -> ProviderTransport:
    """The provider-side transport ``name``; options are transport-specific (bind host, device...)."""
    return _module(name).ProviderTransportImpl(**options)


def requester_transport(name: str, **options) -> RequesterTransport:
    return _module(name).RequesterTransportImpl(**options)
