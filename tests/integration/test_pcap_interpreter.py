"""The kernel's interpreter of the filter expression (bpf/pcap_filter.h)
against libpcap's own (bpf_filter), on the same bytes.

The object's test-only program pt_pcap_selftest runs the interpreter on an
Ethernet frame given to BPF_PROG_TEST_RUN: the real verifier, the real JIT,
the real bpf_loop.  Its verdict must be libpcap's for every packet of a few
thousand synthetic ones, for each expression."""
from __future__ import annotations

import ctypes
import random
import struct

import pytest

from tests import pcapgen
from tracer import events, libbpf, pcapfilter

pytestmark = pytest.mark.root

BPF_PROG_TEST_RUN = 10
ETH_HDR = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"

EXPRESSIONS = [
    "tcp port 443 and host 192.0.2.1",
    "tcp and not port 22",
    "not icmp",
    "portrange 5000-5010",
    "udp and (src port 53 or dst portrange 1000-2000)",
    "net 10.0.0.0/8",
    "src net 192.0.2.0/25 and not dst host 10.1.1.1",
    "greater 200",
    "less 100",
    "ip6 and udp",
    "ip6 host 2001:db8::1 and tcp dst port 80",
    "ip6 net 2001:db8::/48 or icmp6",
    "tcp[tcpflags] & tcp-syn != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
    "icmp[icmptype] == icmp-echo or icmp[icmptype] == icmp-echoreply",
    "ip[6:2] & 0x1fff != 0 or ip[6] & 0x20 != 0",      # IPv4 fragments
    "ip[0] & 0xf > 5",                                    # IPv4 options
    "tcp[((tcp[12:1] & 0xf0) >> 2):4] = 0x47455420",      # "GET ": indirect loads
    "ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2) > 100",
    "(ip[8] * 3) / 2 % 7 = 3 or (ip[8] ^ 5) + 1 = 3 or (-ip[1] & 0xff) > 0x80 or (ip[9] | ip[1]) = 0x7f",
    "ip[8] / ip[1] > 1 or ip[9] % (ip[1] & 3) = 1",       # division by zero rejects
    "ip[8] * ip[9] - ip[1] > 300 or (ip[8] ^ ip[9]) = (ip[1] | ip[10])",   # ALU with X
    "ip[7] << ip[8] > 1000 or ip[10] >> (ip[8] & 0x3f) = 1",   # shifts by 32 or more
    "udp[300] = 1 or ip[250:4] != 0",                     # past the captured bytes
    "proto 47 or ip6 proto 132",
]


def _test_run(prog_fd: int, frame: bytes) -> int:
    """BPF_PROG_TEST_RUN: the program's return value on this frame."""
    data = ctypes.create_string_buffer(frame, len(frame))
    attr = (ctypes.c_ubyte * 80)()
    # union bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat
    struct.pack_into("=IIIIQQI", attr, 0, prog_fd, 0, len(frame), 0, ctypes.addressof(data), 0, 1)
    libbpf.bpf_syscall(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("=I", attr, 4)[0]


def _selftest_program(prog: pcapfilter.PcapProgram) -> libbpf.BpfObject:
    obj = libbpf.BpfObject(libbpf.object_path())
    for p in obj.programs():
        if p.name != "pt_pcap_selftest":
            p.set_autoload(False)
    ptr, _ = obj.map(".rodata").initial_value()
    cfg = events.PtConfig.from_address(ptr)
    cfg.filter = events.F_PCAP
    cfg.pcap_len = len(prog.insns)
    for i, insn in enumerate(prog.insns):
        cfg.pcap[i] = events.PtSockFilter(*insn)
    obj.load()
    return obj


PACKETS = pcapgen.packets(3000)


def _frame(pkt: bytes) -> bytes:
    # a local ethertype: the interpreter reads only what follows (raw IP),
    # and the kernel's test run refuses an IPv4 frame shorter than a header
    return ETH_HDR + struct.pack("!H", 0x88B5) + pkt


def _compare(prog: pcapfilter.PcapProgram, pkts: list[bytes]) -> tuple[list[bool], list]:
    """libpcap's verdicts on pkts, and the packets where the kernel's differ.
    libpcap decides on the same bytes: the first PT_PCAP_CAP of a packet of
    its full length."""
    obj = _selftest_program(prog)
    try:
        fd = obj.program("pt_pcap_selftest").fd
        got = [_test_run(fd, _frame(p)) != 0 for p in pkts]
    finally:
        obj.close()
    want = [prog.run(p[:events.PT_PCAP_CAP], len(p)) != 0 for p in pkts]
    return want, [(i, pkts[i].hex()) for i, (g, w) in enumerate(zip(got, want)) if g != w]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_kernel_verdict_is_libpcaps(expr):
    want, diff = _compare(pcapfilter.compile(expr), PACKETS)
    assert not diff, f"{len(diff)} verdicts differ from libpcap's, first: {diff[:3]}"
    # the expression must both match and miss among these packets, or the
    # comparison says little
    assert 0 < sum(want) < len(PACKETS), sum(want)


def test_longest_program_allowed_runs_to_its_end():
    """A program of PT_PCAP_MAX instructions, its verdict in the last one:
    bpf_loop gives the interpreter enough steps."""
    terms = " or ".join(f"ip[{i % 20}] = {200 + i % 50}" for i in range(200))
    for n in range(200, 0, -1):
        expr = " or ".join(terms.split(" or ")[:n]) + " or ip[1] = 7"
        try:
            prog = pcapfilter.compile(expr)
            break
        except pcapfilter.PcapError:
            continue
    assert len(prog.insns) > events.PT_PCAP_MAX - 10, len(prog.insns)
    obj = _selftest_program(prog)
    try:
        fd = obj.program("pt_pcap_selftest").fd
        pkt = bytearray(pcapgen.packets(1, seed=3)[0][:40].ljust(40, b"\0"))
        pkt[0], pkt[1] = 0x45, 7
        for i in range(2, 20):
            pkt[i] = 0
        assert prog.run(bytes(pkt)) and _test_run(fd, _frame(bytes(pkt)))
        pkt[1] = 8
        assert not prog.run(bytes(pkt)) and not _test_run(fd, _frame(bytes(pkt)))
    finally:
        obj.close()


def _random_program(rng: random.Random) -> tuple:
    """A valid classic BPF program (forward jumps in range, memory stored
    before it is read, no division by a zero constant) with any opcode:
    libpcap emits some rarely (stx, ja, ld #k, jset x), none is left out."""
    slots = rng.sample(range(16), 3)
    insns = []
    for m in slots:
        insns += [(0x00, 0, 0, rng.getrandbits(32)), (0x02, 0, 0, m)]   # ld #k; st M[m]
    n = rng.randrange(4, 40)
    for i in range(n):
        left = n - i                                                    # insns before the final ret
        c = rng.randrange(10)
        if c == 0:
            insns.append((rng.choice([0x20, 0x28, 0x30, 0x40, 0x48, 0x50]), 0, 0, rng.randrange(60)))
        elif c == 1:
            insns.append((rng.choice([0x00, 0x01, 0x80, 0x81]), 0, 0, rng.getrandbits(rng.choice([3, 8, 32]))))
        elif c == 2:
            insns.append((rng.choice([0x60, 0x61, 0x02, 0x03]), 0, 0, rng.choice(slots)))
        elif c == 3:
            insns.append((0xb1, 0, 0, rng.randrange(30)))               # ldx 4*([k]&0xf)
        elif c in (4, 5):
            op = rng.choice([0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x90, 0xa0])
            if rng.random() < 0.5:
                insns.append((0x0c | op, 0, 0, 0))                      # alu x
            else:
                k = rng.randrange(1, 32) if op in (0x60, 0x70) else rng.getrandbits(rng.choice([2, 8, 32])) or 1
                insns.append((0x04 | op, 0, 0, k))
        elif c == 6:
            insns.append((rng.choice([0x84, 0x07, 0x87]), 0, 0, 0))   # neg, tax, txa
        elif c == 7:
            insns.append((0x05, 0, 0, rng.randrange(left)))             # ja
        else:
            op = rng.choice([0x10, 0x20, 0x30, 0x40]) | rng.choice([0, 8])
            insns.append((0x05 | op, rng.randrange(left), rng.randrange(left), rng.getrandbits(rng.choice([1, 4, 8, 32]))))
    insns.append(rng.choice([(0x16, 0, 0, 0), (0x06, 0, 0, rng.choice([0, 1, 262144]))]))
    return tuple(insns)


def test_random_programs_every_opcode():
    """Random programs, every opcode, jumps and edge values (shifts by X of
    32 or more, division by X of 0, loads past the end): the kernel's
    verdict is libpcap's."""
    rng = random.Random(1414)
    pkts = PACKETS[:300]
    for _ in range(40):
        prog = pcapfilter.PcapProgram("", _random_program(rng))
        _, diff = _compare(prog, pkts)
        assert not diff, (prog.insns, diff[:2])


def test_expressions_cover_every_opcode_the_interpreter_runs():
    """Every classic BPF opcode, in the comparisons above (libpcap's
    expressions, and the random programs for those it emits rarely)."""
    seen = {code for e in EXPRESSIONS for code, *_ in pcapfilter.compile(e).insns}
    rng = random.Random(1414)
    seen |= {code for _ in range(40) for code, *_ in _random_program(rng)}
    ld = {0x00, 0x08, 0x10}                      # W H B
    want = ({0x20 | s for s in ld} | {0x40 | s for s in ld}   # ld abs, ind
            | {0x00, 0x01, 0x80, 0x60, 0x61, 0xb1}          # ld imm, ldx imm, ld len, ld/ldx mem, ldx msh
            | {0x02, 0x03, 0x07, 0x87, 0x06, 0x16}          # st stx tax txa ret k, ret a
            | {0x04 | op | src for op in (0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x90, 0xa0)
               for src in (0, 8)} | {0x84}                  # alu k/x, neg
            | {0x05} | {0x05 | op | src for op in (0x10, 0x20, 0x30, 0x40) for src in (0, 8)})
    missing = sorted(want - seen)
    assert not missing, [hex(c) for c in missing]
