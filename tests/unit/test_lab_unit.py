"""Lab and netns logic that needs no root."""

import ipaddress

import pytest

from tracer import netns
from tracer.lab import (DEFAULT_NET_ID, Lab, LabError, _checksum, _echo_request,
                        _parse_reply, address_plan, net_id_for, validate_prefix)


@pytest.mark.parametrize("prefix", ["ptlab", "a", "t1b2c3d4", "0"])
def test_valid_prefixes(prefix):
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "toolong123", "Upper", "a-b", "a/b", "a.b", " a", None, 7])
def test_invalid_prefixes(prefix):
    with pytest.raises(LabError, match="invalid lab prefix"):
        Lab(prefix)


def test_default_lab_names_and_addresses():
    lab = Lab()
    assert (lab.client, lab.router, lab.server) == ("ptlab-cli", "ptlab-rtr", "ptlab-srv")
    assert lab.net_id == DEFAULT_NET_ID == 71
    assert lab.addr == {
        "client4": "10.71.1.2", "router_c4": "10.71.1.1",
        "router_s4": "10.71.2.1", "server4": "10.71.2.2",
        "router_s2_4": "10.71.3.1", "server2_4": "10.71.3.2",
        "client6": "fd71:1::2", "router_c6": "fd71:1::1",
        "router_s6": "fd71:2::1", "server6": "fd71:2::2",
        "router_s2_6": "fd71:3::1", "server2_6": "fd71:3::2",
    }


@pytest.mark.parametrize("net_id", [1, 5, 42, 99])
def test_address_plan_is_valid_and_unique(net_id):
    plan = address_plan(net_id)
    assert len(set(plan.values())) == 12
    for key, value in plan.items():
        ip = ipaddress.ip_address(value)
        assert ip.version == (6 if key.endswith("6") else 4)
        assert ip.is_private
    assert plan["client4"] == f"10.{net_id}.1.2"
    assert plan["server2_6"] == f"fd{net_id:02d}:3::2"


@pytest.mark.parametrize("net_id", [0, 100, 250, -1, "7", 7.0, True])
def test_bad_net_id(net_id):
    with pytest.raises(LabError, match="invalid net_id"):
        Lab("x", net_id=net_id)


def test_net_id_from_prefix_is_stable_and_avoids_default():
    ids = {net_id_for(f"t{i}") for i in range(300)}
    assert DEFAULT_NET_ID not in ids
    assert ids <= set(range(1, 100))
    assert net_id_for("abc") == net_id_for("abc")
    assert Lab("abc").net_id == net_id_for("abc")
    assert Lab("abc", net_id=9).addr["server4"] == "10.9.2.2"


def test_traffic_helpers_refuse_foreign_targets():
    lab = Lab("unit", net_id=33)
    with pytest.raises(LabError, match="not a lab address"):
        lab.udp_send(lab.client, "8.8.8.8", 53)
    with pytest.raises(LabError, match="not a namespace of this lab"):
        lab.udp_send("other-ns", lab.addr["server4"], 5010)


def test_icmp_encoding_roundtrip():
    req = _echo_request(False, 0x1234, 7)
    assert _checksum(req) == 0  # a correct checksum sums to zero
    reply = bytes([0x45]) + bytes(19) + bytes([0]) + req[1:]  # fake IPv4 hdr + type 0
    assert _parse_reply(reply, v6=False) == (0x1234, 7)
    v6reply = bytes([129]) + _echo_request(True, 5, 1)[1:]
    assert _parse_reply(v6reply, v6=True) == (5, 1)
    assert _parse_reply(_echo_request(True, 5, 1), v6=True) is None  # a request


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc"])
def test_netns_name_validation(name):
    with pytest.raises(netns.NetnsError, match="invalid network namespace name"):
        netns.inode(name)
    assert not netns.exists(name)


def test_netns_paths():
    assert netns.path("foo") == "/run/netns/foo"
    assert netns.inode(None) > 0
    with netns.entered(None):
        pass
