"""Devices that come, go and change names under a running trace (issue 11).

The lab router gets a device (a veth to the server) after pkttrace started: the client's
UDP packets routed to it must show its tc egress stage (an observer was
attached when rtnetlink announced it) and its name.  A rename shows the new
name; `--iface NAME` follows the name: a device deleted and created again
under it is traced, the same device renamed away is not.
"""
from __future__ import annotations

import socket
import time

import pytest

from tracer import netns
from tracer.filters import PacketFilter

pytestmark = pytest.mark.root

NET = "10.99.0.0/24"
DST = "10.99.0.1"


@pytest.fixture
def lab(make_lab):
    new = make_lab(rules=False)
    new.flush_rules()
    return new


def add_link(lab, name):
    """A veth from the router to the server, NET routed through it."""
    lab.ip(lab.router, "link", "add", name, "type", "veth", "peer", "name", "peer0", "netns", lab.server)
    lab.ip(lab.server, "addr", "add", DST + "/24", "dev", "peer0")
    lab.ip(lab.server, "link", "set", "peer0", "up")
    lab.ip(lab.router, "link", "set", name, "up")
    lab.ip(lab.router, "route", "replace", NET, "dev", name)


def rename(lab, old, new):
    lab.ip(lab.router, "link", "set", old, "down")
    lab.ip(lab.router, "link", "set", old, "name", new)
    lab.ip(lab.router, "link", "set", new, "up")
    lab.ip(lab.router, "route", "replace", NET, "dev", new)   # going down took the route


def announced(cap, seconds=0.3):
    """Let the tracer read what rtnetlink announced (it does so between polls)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cap.packets.extend(cap.tracer.poll(0.05))


def udp_to_net(lab, port):
    """One UDP datagram from the client to DST (not a lab address: its own helper)."""
    with netns.entered(lab.client):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.sendto(b"x", (DST, port))


def sent_to(cap, lab, port):
    udp_to_net(lab, port)
    return cap.until(lambda p: p.dport == port and p.dst == DST)


@pytest.mark.parametrize("tc", ["tcx", "classic"])
def test_a_device_added_after_start_gets_tc_observers_and_its_name(lab, trace, tc):
    cap = trace(filter=PacketFilter(proto=17), tc=tc)
    if not cap.tracer.plan.tc:
        pytest.skip("no tc observers on this kernel: kfunc bpf_cast_to_kern_ctx missing (Linux 6.2+)")
    add_link(lab, "dum0")
    announced(cap)
    p = sent_to(cap, lab, 7001)
    assert p.fate == "forwarded" and p.out_dev == "dum0"
    egress = p.stage("tc_egress")             # the router's only egress for it: dum0's
    assert egress is not None and egress.dev == "dum0", p.stage_names()
    # renamed: the next packet names it by its new name
    rename(lab, "dum0", "dum1")
    announced(cap)
    p = sent_to(cap, lab, 7002)
    assert p.out_dev == "dum1" and p.stage("tc_egress").dev == "dum1"
    # deleted: its observers are forgotten (nothing left to close in the kernel)
    lab.ip(lab.router, "link", "del", "dum1")
    announced(cap)
    assert set(cap.tracer.tc.by_netns[lab.router]) == set(netns.links(lab.router))
    # a new device again, attached again
    add_link(lab, "dum2")
    announced(cap)
    p = sent_to(cap, lab, 7003)
    assert p.stage("tc_egress").dev == "dum2"


def test_iface_filter_follows_the_name_through_re_creation_and_rename(lab, trace):
    add_link(lab, "dum0")
    cap = trace(filter=PacketFilter(proto=17, iface="dum0"))
    p = sent_to(cap, lab, 7101)
    assert p.out_dev == "dum0"
    # deleted and created again under the same name: a new ifindex, still traced
    lab.ip(lab.router, "link", "del", "dum0")
    add_link(lab, "dum0")
    announced(cap)
    p = sent_to(cap, lab, 7102)
    assert p.out_dev == "dum0"
    # renamed away: its packets no longer go through a device called dum0
    rename(lab, "dum0", "other0")
    announced(cap)
    udp_to_net(lab, 7103)
    lab.udp_send(lab.client, lab.addr["server4"], 7104)      # through rs: never dum0
    cap.settle(0.5)
    assert not [p for p in cap.packets if p.dport in (7103, 7104)]
    # and a new dum0 is traced again
    lab.ip(lab.router, "link", "del", "other0")
    add_link(lab, "dum0")
    announced(cap)
    p = sent_to(cap, lab, 7105)
    assert p.out_dev == "dum0"
