"""End-to-end checks of the netns lab: forwarding, demo ruleset, teardown."""

import subprocess

import pytest

from tracer import netns
from tracer.lab import LabError

pytestmark = pytest.mark.root


@pytest.mark.parametrize("key", ["server4", "server6"])
def test_client_reaches_server_through_router(lab, key):
    assert lab.ping(lab.client, lab.addr[key], count=2) == 2


@pytest.mark.parametrize("key", ["router_c4", "router_c6"])
def test_client_reaches_router(lab, key):
    assert lab.ping(lab.client, lab.addr[key]) == 1


def test_server_second_uplink_answers(lab):
    # Arrives via rs2/s1, replies leave via s0: works only with rp_filter off.
    assert lab.ping(lab.client, lab.addr["server2_4"]) == 1


@pytest.mark.parametrize("fam", ["4", "6"])
def test_udp_5009_dropped_5010_delivered(lab, fam):
    dst = lab.addr["server" + fam]
    dropped = lab.udp_server(lab.server, dst, 5009)
    passed = lab.udp_server(lab.server, dst, 5010)
    try:
        lab.udp_send(lab.client, dst, 5009, b"drop me")
        lab.udp_send(lab.client, dst, 5010, b"let me in")
        assert passed.recv(2.0) == b"let me in"
        assert dropped.recv(1.0) is None
    finally:
        dropped.close()
        passed.close()


@pytest.mark.parametrize("v6", [False, True])
def test_mark_rule_installed(lab, v6):
    assert "--set-xmark 0x1" in lab.iptables("-t", "mangle", "-S", "PREROUTING", v6=v6)
    assert "--dport 5009 -j DROP" in lab.iptables("-S", "FORWARD", v6=v6)


def test_rule_is_in_router_netns_only(lab):
    out = subprocess.run(["ip", "netns", "exec", lab.client, "iptables-nft", "-t", "mangle", "-S"],
                         capture_output=True, text=True, check=True).stdout
    assert "set-xmark" not in out


def test_status_and_idempotent_up(lab):
    before = netns.inode(lab.router)
    lab.up()  # complete already: must not rebuild
    assert netns.inode(lab.router) == before
    st = lab.status()
    assert st["complete"] and st["rules"]
    rtr = st["namespaces"][lab.router]
    assert {"lo", "rc", "rs", "rs2"} <= set(rtr["links"])
    assert lab.addr["router_s2_6"] in rtr["links"]["rs2"]["addresses"]
    # Demo rules are not duplicated by a second up().
    assert lab.iptables("-t", "mangle", "-S", "PREROUTING").count("set-xmark") == 1


def test_sysctls_are_per_namespace(lab):
    def get(ns, key):
        with netns.entered(ns):
            with open(f"/proc/sys/{key}") as f:
                return f.read().strip()

    assert get(lab.router, "net/ipv4/ip_forward") == "1"
    assert get(lab.router, "net/ipv6/conf/all/forwarding") == "1"
    assert get(lab.router, "net/ipv4/conf/rs2/rp_filter") == "0"
    assert get(lab.client, "net/ipv4/ip_forward") == "0"


def test_netns_helpers(lab):
    assert netns.inode(lab.client) != netns.inode(None)
    idx = netns.ifindex(lab.router, "rs2")
    assert netns.links(lab.router)[idx] == "rs2"
    with netns.entered(lab.server):
        assert netns.inode(None) == netns.inode(lab.server)
    assert netns.inode(None) != netns.inode(lab.server)
    with pytest.raises(netns.NetnsError, match="no interface 'c0'"):
        netns.ifindex(lab.router, "c0")


def test_flush_and_reapply_rules(lab):
    lab.flush_rules()
    assert not lab.rules_present()
    lab.up(rules=True)
    assert lab.rules_present()


def test_traffic_only_to_lab_addresses(lab):
    with pytest.raises(LabError, match="not a lab address"):
        lab.ping(lab.client, "10.255.255.1")


def test_down_removes_everything(make_lab):
    other = make_lab(rules=False)
    assert all(netns.exists(ns) for ns in other.namespaces)
    assert not other.status()["rules"]
    other.down()
    assert not any(netns.exists(ns) for ns in other.namespaces)
    other.down()  # absent: still fine
    assert not other.status()["namespaces"][other.client]["exists"]


def test_half_built_lab_is_rebuilt(make_lab):
    from pyroute2 import netns as pr_netns

    other = make_lab(rules=False)
    pr_netns.remove(other.server)
    other.up(rules=False)
    assert other.status()["complete"]
    assert other.ping(other.client, other.addr["server6"]) == 1
