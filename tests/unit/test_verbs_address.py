"""The address vector a verbs QP uses to reach its peer, for both link layers.

The construction is pure policy (which ``ibv_ah_attr`` fields to set), so it is checked here
for InfiniBand and RoCE alike; tests/vm/test_verbs_transport.py checks on soft-RoCE that the
device itself refuses an InfiniBand-style vector and accepts the RoCE one."""
from __future__ import annotations

import pytest

from rram import errors
from rram.transport.verbs import ROCE_HOP_LIMIT, address_vector

GID = bytes.fromhex("fe800000000000000250b6fffe0a0b0c")


def test_infiniband_peer_is_addressed_by_lid_without_a_grh():
    av = address_vector("infiniband", 0, peer_lid=0x12, peer_gid=GID, peer_link_layer="infiniband")
    assert av.dlid == 0x12 and av.dgid is None


def test_roce_peer_is_addressed_by_gid_in_a_routable_grh():
    av = address_vector("ethernet", 3, peer_lid=0, peer_gid=GID, peer_link_layer="ethernet")
    assert av.dlid == 0 and av.dgid == GID and av.sgid_index == 3
    assert av.hop_limit == ROCE_HOP_LIMIT > 1   # a hop limit of 1 cannot leave the L2 segment


@pytest.mark.parametrize("lid", [0, 0xC000, 0xFFFF])
def test_infiniband_without_a_unicast_lid_is_refused(lid):
    with pytest.raises(errors.ProtocolError, match="unicast LID"):
        address_vector("infiniband", 0, peer_lid=lid, peer_gid=GID, peer_link_layer="infiniband")


def test_roce_with_a_zero_gid_is_refused():
    with pytest.raises(errors.ProtocolError, match="GID"):
        address_vector("ethernet", 0, peer_lid=0, peer_gid=bytes(16), peer_link_layer="ethernet")


def test_mixed_link_layers_are_refused():
    with pytest.raises(errors.ProtocolError, match="link layers differ"):
        address_vector("ethernet", 0, peer_lid=5, peer_gid=GID, peer_link_layer="infiniband")


def test_unknown_link_layer_is_refused():
    with pytest.raises(errors.ProtocolError, match="unsupported link layer"):
        address_vector("unspecified", 0, peer_lid=5, peer_gid=GID, peer_link_layer="unspecified")
