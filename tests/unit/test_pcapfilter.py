"""The filter expression in user space: libpcap's compile, the program in
the BPF config, the filter object and the command line (no root, no BPF).
libpcap's own interpreter (bpf_filter) is the reference: on synthetic
packets it must decide as the header fields say."""
from __future__ import annotations

import ipaddress
import struct

import pytest
from click.testing import CliRunner

from tests import pcapgen
from tracer import cli, events, pcapfilter
from tracer.filters import FilterError, PacketFilter


def test_compile_gives_libpcaps_instructions():
    prog = pcapfilter.compile("tcp port 443 and host 192.0.2.1")
    # DLT_RAW: the program starts by reading the IP version nibble, not an ethertype
    assert prog.insns[0] == (0x30, 0, 0, 0)          # ldb [0]
    assert prog.insns[-1][0] == 0x06 and any(i[0] == 0x06 and i[3] == 0 for i in prog.insns)
    assert any(i[0] == 0x15 and i[3] == 0xC0000201 for i in prog.insns)   # jeq #192.0.2.1
    assert any(i[3] == 443 for i in prog.insns)
    assert len(prog.insns) <= events.PT_PCAP_MAX


def test_program_packs_into_the_config():
    prog = pcapfilter.compile("udp portrange 5000-5010 or icmp6")
    cfg = events.PtConfig()
    PacketFilter(expression="udp portrange 5000-5010 or icmp6").fill(cfg)
    assert cfg.filter == events.F_PCAP
    assert cfg.pcap_len == len(prog.insns)
    got = [(cfg.pcap[i].code, cfg.pcap[i].jt, cfg.pcap[i].jf, cfg.pcap[i].k) for i in range(cfg.pcap_len)]
    assert tuple(got) == prog.insns
    # the bytes the kernel reads: struct sock_filter, 8 bytes each, little endian here
    raw = bytes(cfg)[events.PtConfig.pcap.offset:][:8 * len(prog.insns)]
    assert [struct.unpack_from("<HBBI", raw, 8 * i) for i in range(len(prog.insns))] == list(prog.insns)


@pytest.mark.parametrize("expr, message", [
    ("tcp port", "syntax error"),
    ("vlan", "no VLAN support"),
    ("ether host 1:2:3:4:5:6", "ethernet addresses supported only"),
    ("ip broadcast", "netmask not known"),
    ("host no.such.name.invalid", "unknown host"),
])
def test_bad_expressions_are_one_line_from_libpcap(expr, message):
    with pytest.raises(FilterError) as e:
        PacketFilter.parse(expression=expr)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert repr(expr) in str(e.value)


def test_a_program_too_long_for_the_kernel_is_refused():
    expr = " or ".join(f"ip[{i % 40}:2] = {i + 1}" for i in range(140))
    with pytest.raises(FilterError, match=f"at most {events.PT_PCAP_MAX} run in the kernel"):
        PacketFilter(expression=expr)


def test_the_expression_is_a_header_criterion():
    """Judged from the IP packet alone: a packet may be rejected at first sight."""
    pf = PacketFilter.parse(proto="udp", expression="portrange 5000-5010")
    assert pf.flags == events.F_PROTO | events.F_PCAP
    assert not pf.flags & ~events.F_HEADER


def test_an_empty_expression_is_no_filter():
    """As tcpdump '': nothing to run in the kernel."""
    assert PacketFilter(expression="  ").flags == 0 and PacketFilter(expression="").program is None


def test_a_recording_cannot_be_filtered_by_an_expression():
    with pytest.raises(FilterError, match="packet's bytes"):
        PacketFilter(expression="tcp").matches(object())


def _fields(pkt: bytes):
    """(version, proto, src, dst, sport, dport) from the header, or None."""
    if len(pkt) < 20 or pkt[0] >> 4 not in (4, 6):
        return None
    if pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        frag = struct.unpack_from("!H", pkt, 6)[0] & 0x1FFF
        src, dst, proto, l4 = pkt[12:16], pkt[16:20], pkt[9], pkt[ihl:] if not frag else b""
    else:
        if len(pkt) < 40:
            return None
        src, dst, proto, l4 = pkt[8:24], pkt[24:40], pkt[6], pkt[40:]
    ports = struct.unpack_from("!HH", l4) if proto in (6, 17) and len(l4) >= 4 else (None, None)
    return (pkt[0] >> 4, proto, ipaddress.ip_address(src), ipaddress.ip_address(dst), *ports)


def test_libpcaps_verdict_is_what_the_header_says():
    """The oracle the kernel is compared with (bpf_filter), checked against
    the header fields on synthetic packets."""
    prog = pcapfilter.compile("tcp port 443 and host 192.0.2.1")
    rng_prog = pcapfilter.compile("udp portrange 5000-5010 and not src net 10.0.0.0/8")
    host = ipaddress.ip_address("192.0.2.1")
    seen = [0, 0]
    for pkt in pcapgen.packets(3000):
        f = _fields(pkt)
        if f is None or (f[1] in (6, 17) and f[4] is None) or len(pkt) != _ip_len(pkt):
            continue   # truncated or not IP: out of this check (the kernel test covers them)
        want = f[1] == 6 and 443 in (f[4], f[5]) and host in (f[2], f[3])
        assert bool(prog.run(pkt)) == want, pkt.hex()
        want2 = (f[1] == 17 and any(p is not None and 5000 <= p <= 5010 for p in f[4:])
                 and not (f[0] == 4 and f[2] in ipaddress.ip_network("10.0.0.0/8")))
        assert bool(rng_prog.run(pkt)) == want2, pkt.hex()
        seen[want] += 1
    assert all(seen), seen


def _ip_len(pkt: bytes) -> int:
    if pkt[0] >> 4 == 4:
        return struct.unpack_from("!H", pkt, 2)[0]
    return struct.unpack_from("!H", pkt, 4)[0] + 40


@pytest.mark.parametrize("argv", [
    ["tcp", "port"],
    ["tcp port 443 and"],
    ["--proto", "udp", "vlan"],
])
def test_cli_bad_expression_one_line_exit_2(argv):
    r = CliRunner().invoke(cli.main, argv)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("pkttrace: invalid filter expression"), r.output


def test_cli_joins_trailing_words_and_still_dispatches_subcommands(monkeypatch):
    """`pkttrace tcp port 443` is the expression 'tcp port 443' (as tcpdump
    joins its arguments); `pkttrace doctor` is still the subcommand."""
    got = {}

    def fake_build(*a, expression=None, **kw):
        got["expression"] = expression
        raise cli.UsageFailure("stop here")
    monkeypatch.setattr(cli, "build_filter", fake_build)
    r = CliRunner().invoke(cli.main, ["--json", "tcp", "port", "443", "and", "not", "host 10.0.0.1"])
    assert r.exit_code == 2 and got["expression"] == "tcp port 443 and not host 10.0.0.1"
    r = CliRunner().invoke(cli.main, ["replay", "--help"])
    assert r.exit_code == 0 and "RECORDING" in r.output
