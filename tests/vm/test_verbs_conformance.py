"""The transport conformance suite over real verbs (soft-RoCE rxe0 -> rxe1 in the VM).

The suite calls ``session.accept`` directly, so this module stands in for the control
connection: it remembers which session accepted each requester QP and gives every endpoint
a ``reconnect_params`` hook that asks that session again, exactly what the control client
does for ``Endpoint.recover()`` in a real deployment.
"""
from __future__ import annotations

import pytest

from rram.transport import ProviderSession, ProviderTransport, RequesterTransport, verbs
from tests.conformance.suite import *  # noqa: F401,F403

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("rdma_devices")]


class ControlledSession(ProviderSession):
    """A verbs session whose accepts are recorded, as the provider's control server would."""

    def __init__(self, inner, accepted: dict):
        self.inner = inner
        self.accepted = accepted

    def register(self, addr, length):
        return self.inner.register(addr, length)

    def deregister(self, rkey):
        self.inner.deregister(rkey)

    def accept(self, peer_params):
        reply = self.inner.accept(peer_params)
        self.accepted[peer_params["qpn"]] = self.inner  # recover() names it in "replaces"
        return reply

    def close(self):
        self.inner.close()


class ControlledProvider(ProviderTransport):
    name = "verbs"

    def __init__(self, device: str):
        self.inner = verbs.ProviderTransportImpl(device=device)
        self.accepted: dict = {}

    def open_session(self, session_id):
        return ControlledSession(self.inner.open_session(session_id), self.accepted)

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()


class ControlledRequester(RequesterTransport):
    name = "verbs"

    def __init__(self, device: str, accepted: dict):
        self.inner = verbs.RequesterTransportImpl(device=device)
        self.accepted = accepted

    def endpoint(self):
        ep = self.inner.endpoint()
        ep.reconnect_params = lambda params: self.accepted[params["replaces"]].accept(params)
        return ep

    def close(self):
        self.inner.close()


class Pair:
    def __init__(self, requester_dev: str, provider_dev: str):
        self.provider = ControlledProvider(provider_dev)
        self.requester = ControlledRequester(requester_dev, self.provider.accepted)


@pytest.fixture
def transport_pair(device_pair):
    pair = Pair(*device_pair)
    yield pair
    pair.requester.close()
    pair.provider.close()
