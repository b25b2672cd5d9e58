"""Filter parsing (what the user types) and the BPF config it becomes."""

import ctypes
import ipaddress
import sys

import pytest

from tracer import events
from tracer.filters import (FilterError, Mark, PacketFilter, parse_cidr, parse_mark, parse_port,
                            parse_proto)
from tracer.model import Packet, Stage

FULL = 0xFFFFFFFF


# --- parse_mark -------------------------------------------------------------

@pytest.mark.parametrize("text, value, mask", [
    ("0x1", 0x1, FULL),
    ("16", 16, FULL),
    ("0x10/0xf0", 0x10, 0xF0),
    ("0", 0, FULL),
    ("0xffffffff", FULL, FULL),
    ("0/0xff", 0, 0xFF),
])
def test_parse_mark_valid(text, value, mask):
    assert parse_mark(text) == Mark(value, mask)


@pytest.mark.parametrize("text, reason, shown", [
    ("0xZZ", "invalid mark '0xZZ': expected a number", "0xZZ"),
    ("", "expected a number", "''"),
    ("0x1/0xZZ", "invalid mark mask '0xZZ': expected a number", "0xZZ"),
    ("0x1/", "invalid mark mask '': expected a number", "''"),
    ("0x3/0x1", "outside the mask", "0x3/0x1"),
    ("0x100/0xff", "outside the mask", "0x100/0xff"),
    ("0x100000000", "32 bits", "0x100000000"),
    ("0x1/0x100000000", "invalid mark mask .* 32 bits", "0x100000000"),
    ("-1", "32 bits", "-1"),
])
def test_parse_mark_invalid(text, reason, shown):
    with pytest.raises(FilterError, match=reason) as exc:
        parse_mark(text)
    assert shown in str(exc.value)  # the message names what the user typed
    assert "\n" not in str(exc.value)


def test_filter_error_is_a_value_error():
    assert issubclass(FilterError, ValueError)


def test_mark_str_shows_mask_only_when_partial():
    assert str(Mark(1)) == "0x1"
    assert str(Mark(0x10, 0xF0)) == "0x10/0xf0"


# --- parse_cidr -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10.0.0.0/8", ipaddress.IPv4Network("10.0.0.0/8")),
    ("10.1.2.3/8", ipaddress.IPv4Network("10.0.0.0/8")),          # host bits dropped, not an error
    ("192.0.2.7", ipaddress.IPv4Network("192.0.2.7/32")),         # host address
    ("2001:db8::1/64", ipaddress.IPv6Network("2001:db8::/64")),
    ("2001:db8::1", ipaddress.IPv6Network("2001:db8::1/128")),
])
def test_parse_cidr_valid(text, expected):
    net = parse_cidr(text)
    assert net == expected
    assert net.version == expected.version


@pytest.mark.parametrize("text", ["10.0.0.300/8", "nonsense", "10.0.0.0/33", "", "2001:db8::g", "10.0.0.0/8/8"])
def test_parse_cidr_invalid(text):
    with pytest.raises(FilterError, match="invalid address or CIDR") as exc:
        parse_cidr(text)
    assert repr(text) in str(exc.value)


# --- parse_proto ------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("tcp", 6), ("udp", 17), ("icmp", 1), ("icmpv6", 58),
    ("TCP", 6), ("Udp", 17),
    ("0", 0), ("47", 47), ("255", 255), ("0x11", 17),
])
def test_parse_proto_valid(text, value):
    assert parse_proto(text) == value


@pytest.mark.parametrize("text", ["bogus", "", "tcp6", "1.5"])
def test_parse_proto_not_a_protocol(text):
    with pytest.raises(FilterError, match="expected tcp, udp, icmp, icmpv6 or a number"):
        parse_proto(text)


@pytest.mark.parametrize("text", ["256", "-1", "0x100"])
def test_parse_proto_out_of_range(text):
    with pytest.raises(FilterError, match="0-255"):
        parse_proto(text)


# --- parse_port -------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("1", 1), ("53", 53), ("65535", 65535), (80, 80)])
def test_parse_port_valid(text, value):
    assert parse_port(text) == value


@pytest.mark.parametrize("text", ["0", "65536", "70000", "-1", "http", ""])
def test_parse_port_invalid(text):
    with pytest.raises(FilterError, match="expected 1-65535") as exc:
        parse_port(text)
    assert repr(text) in str(exc.value)


# --- PacketFilter.flags -----------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"mark": Mark(1)}, events.F_MARK),
    ({"src": ipaddress.ip_network("10.0.0.0/8")}, events.F_SRC),
    ({"dst": ipaddress.ip_network("2001:db8::/32")}, events.F_DST),
    ({"proto": 17}, events.F_PROTO),
    ({"port": 53}, events.F_PORT),
    ({"iface": "eth0"}, events.F_IFACE),
])
def test_flags_one_criterion(kwargs, flag):
    assert PacketFilter(**kwargs).flags == flag


def test_flags_none_and_all():
    assert PacketFilter().flags == 0
    pf = PacketFilter(mark=Mark(1), src=parse_cidr("10.0.0.0/8"), dst=parse_cidr("10.0.0.1"),
                      proto=6, port=80, iface="eth1")
    assert pf.flags == (events.F_MARK | events.F_SRC | events.F_DST | events.F_PROTO
                        | events.F_PORT | events.F_IFACE)


def test_flags_zero_values_are_still_criteria():
    # "is set" means "is not None": mark 0 and proto 0 are real filters
    pf = PacketFilter(mark=Mark(0, 0xFF), proto=0, iface="0")
    assert pf.flags == events.F_MARK | events.F_PROTO | events.F_IFACE


# --- PacketFilter.fill ------------------------------------------------------

def _field_bytes(cfg, name):
    desc = getattr(events.PtConfig, name)
    return bytes(cfg)[desc.offset:desc.offset + desc.size]


def test_fill_ipv4_src_is_premasked_and_padded_to_16_bytes():
    cfg = events.PtConfig()
    PacketFilter(src=parse_cidr("10.1.2.3/8")).fill(cfg)
    assert cfg.filter == events.F_SRC
    assert cfg.src_family == 4
    assert _field_bytes(cfg, "src_addr") == bytes([10, 0, 0, 0]) + bytes(12)
    assert _field_bytes(cfg, "src_mask") == bytes([255, 0, 0, 0]) + bytes(12)
    # dst untouched
    assert cfg.dst_family == 0
    assert _field_bytes(cfg, "dst_addr") == bytes(16)
    assert _field_bytes(cfg, "dst_mask") == bytes(16)


def test_fill_ipv4_host_address_mask_is_all_ones_in_first_4_bytes():
    cfg = events.PtConfig()
    PacketFilter(dst=parse_cidr("192.0.2.7")).fill(cfg)
    assert cfg.dst_family == 4
    assert _field_bytes(cfg, "dst_addr") == bytes([192, 0, 2, 7]) + bytes(12)
    assert _field_bytes(cfg, "dst_mask") == b"\xff" * 4 + bytes(12)


def test_fill_ipv6_dst():
    cfg = events.PtConfig()
    PacketFilter(dst=parse_cidr("2001:db8:ab::1/36")).fill(cfg)
    assert cfg.filter == events.F_DST
    assert cfg.dst_family == 6
    assert _field_bytes(cfg, "dst_addr") == ipaddress.IPv6Address("2001:db8::").packed
    assert _field_bytes(cfg, "dst_mask") == b"\xff" * 4 + b"\xf0" + bytes(11)
    assert cfg.src_family == 0


def test_fill_src_and_dst_of_different_families():
    cfg = events.PtConfig()
    PacketFilter(src=parse_cidr("2001:db8::/32"), dst=parse_cidr("10.0.0.0/24")).fill(cfg)
    assert (cfg.src_family, cfg.dst_family) == (6, 4)
    assert _field_bytes(cfg, "src_addr") == bytes.fromhex("20010db8") + bytes(12)
    assert _field_bytes(cfg, "dst_mask") == b"\xff\xff\xff\x00" + bytes(12)


def test_fill_scalar_criteria():
    cfg = events.PtConfig()
    pf = PacketFilter(mark=Mark(0x10, 0xF0), proto=17, port=5353, iface="eth7")
    pf.fill(cfg)
    assert cfg.filter == pf.flags == events.F_MARK | events.F_PROTO | events.F_PORT | events.F_IFACE
    assert (cfg.mark_value, cfg.mark_mask) == (0x10, 0xF0)
    assert cfg.proto == 17
    assert cfg.port == 5353  # host order, as the C header says
    assert _field_bytes(cfg, "port") == (5353).to_bytes(2, sys.byteorder)
    # the device is a runtime map (iface_want): its ifindex changes under us
    assert not hasattr(cfg, "ifindex")


def test_fill_empty_filter_leaves_config_zero():
    cfg = events.PtConfig()
    PacketFilter().fill(cfg)
    assert bytes(cfg) == bytes(ctypes.sizeof(events.PtConfig))


def test_fill_keeps_fields_it_does_not_own():
    # the session sets emit and count; fill() must not clobber them
    cfg = events.PtConfig()
    cfg.emit, cfg.count = 1, 1
    PacketFilter(mark=Mark(1), src=parse_cidr("10.0.0.0/8"), proto=6, port=22, iface="lo").fill(cfg)
    assert (cfg.emit, cfg.count) == (1, 1)


# --- PacketFilter.matches (the kernel rule in Python) -----------------------

def _pkt(proto="udp", proto_num=17, stages=None):
    return Packet(id=1, netns="", family="ipv4", proto=proto, src="10.0.0.1", dst="10.0.1.2",
                  sport=40000, dport=53, fate="sent", in_dev=None, out_dev="eth0",
                  path=stages or [Stage("output", 0, "eth0", 0), Stage("tx", 10, "eth0", 1)],
                  proto_num=proto_num)


def test_matches_mark_src_dst_port():
    p = _pkt()
    assert PacketFilter(mark=Mark(1)).matches(p)
    assert not PacketFilter(mark=Mark(2)).matches(p)
    assert PacketFilter(src=parse_cidr("10.0.0.0/24"), dst=parse_cidr("10.0.1.2")).matches(p)
    assert not PacketFilter(src=parse_cidr("2001:db8::/32")).matches(p)
    assert PacketFilter(port=53).matches(p) and not PacketFilter(port=54).matches(p)


def test_matches_proto():
    assert PacketFilter(proto=17).matches(_pkt())
    assert not PacketFilter(proto=6).matches(_pkt())


def test_matches_iface_not_on_path():
    assert PacketFilter(iface="eth9").matches(_pkt()) is False


def test_matches_iface_on_path_by_name():
    assert PacketFilter(iface="eth0").matches(_pkt(stages=[Stage("tx", 10, "eth0", 1)]))
    fwd = Stage("forward", 5, "eth1", 0)
    fwd.in_dev = "eth0"
    assert PacketFilter(iface="eth0").matches(_pkt(stages=[fwd]))


def test_matches_mark_set_inside_a_hook():
    """The kernel matches every observation; a mark seen only after a table counts."""
    from tracer.model import Observation
    pre = Stage("prerouting", 0, "eth0", 0, mark_out=0x1,
                observations=[Observation(-1, 0, 0, 0), Observation(1, 0x1, 0, 5)])
    assert PacketFilter(mark=Mark(1)).matches(_pkt(stages=[pre]))
