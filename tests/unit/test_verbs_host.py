"""The verbs transport on a host without RDMA devices (like CI's): discovery says why, the
registry falls back to tcp with that reason, and nothing crashes.  The real verbs tests run
in the soft-RoCE VM (tests/vm, scripts/ci-vm.sh)."""
from __future__ import annotations

import pytest

from rram import errors, transport
from rram.transport import verbs

_verbs = pytest.importorskip("rram._ext._verbs", reason="rram._ext._verbs is not built (needs libibverbs-dev)")
HAS_DEVICES = bool(_verbs.device_names()[0])
needs_no_rdma = pytest.mark.skipif(HAS_DEVICES, reason="this host has RDMA devices: covered by tests/vm")


@needs_no_rdma
def test_device_discovery_returns_empty_list_and_reason():
    names, reason = _verbs.device_names()
    assert names == []
    assert isinstance(reason, str) and "RDMA" in reason


@needs_no_rdma
def test_unavailable_reason_is_a_sentence():
    reason = verbs.unavailable_reason()
    assert isinstance(reason, str) and len(reason.split()) >= 4
    assert transport.available()["verbs"] == reason


@needs_no_rdma
def test_auto_falls_back_to_tcp_with_the_reason():
    name, why = transport.choose("auto")
    assert name == "tcp"
    assert verbs.unavailable_reason() in why
    with pytest.raises(errors.TransportUnavailable, match="RDMA"):
        transport.choose("verbs")


@needs_no_rdma
def test_constructors_raise_transport_unavailable():
    for cls in (verbs.ProviderTransportImpl, verbs.RequesterTransportImpl):
        with pytest.raises(errors.TransportUnavailable):
            cls()
    with pytest.raises(errors.TransportUnavailable):
        _verbs.Context("rxe0")


def test_peer_parameters_are_validated():
    good = {"transport": "verbs", "qpn": 17, "psn": 5, "gid": "fe80" + "00" * 14, "mtu": 3}
    assert verbs._parse_params(good) == (17, 5, bytes.fromhex(good["gid"]), 3)
    for bad in ({}, dict(good, qpn=0), dict(good, psn=1 << 24), dict(good, gid="fe80"), dict(good, mtu=9),
                dict(good, transport="tcp"), dict(good, gid=None)):
        with pytest.raises(errors.ProtocolError):
            verbs._parse_params(bad)


def test_windows_option_is_checked_before_any_device():
    with pytest.raises(errors.ConfigError, match="auto, on or off"):
        verbs.ProviderTransportImpl(windows="sometimes")


def test_window_constants_are_libibverbs():
    # verbs.h: IBV_ACCESS_MW_BIND = 1 << 4, IBV_DEVICE_MEM_WINDOW_TYPE_2A/2B = 1 << 23 / 1 << 24
    assert _verbs.ACCESS_MW_BIND == 1 << 4
    assert (_verbs.DEVICE_MEM_WINDOW_TYPE_2A, _verbs.DEVICE_MEM_WINDOW_TYPE_2B) == (1 << 23, 1 << 24)
    assert verbs.WINDOW_MR_ACCESS & _verbs.ACCESS_REMOTE_READ == 0  # only the window grants remote access
