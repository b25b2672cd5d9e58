"""tcpdump's filter expressions, compiled by the system libpcap.

`pkttrace tcp port 443 and host 192.0.2.1` hands the expression to
libpcap's own compiler (pcap_compile), so it means exactly what it means to
tcpdump.  The classic BPF program is compiled for DLT_RAW: offset 0 is the
IP header, as tcpdump sees a raw-IP device (tun, WireGuard); the kernel runs
it on each packet with bpf/pcap_filter.h, over the first PT_PCAP_CAP bytes
of the IP packet.  `len`, `greater` and `less` therefore count from the IP
header (tcpdump on an Ethernet device counts the 14-byte Ethernet header
too), and link-layer primitives (ether, vlan, arp, ...) are refused by
libpcap itself: at most stages a packet has no link-layer header.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

DLT_RAW = 12                       # pcap/dlt.h: raw IP, version from the first nibble
SNAPLEN = 262144                   # what a match returns; any non-zero value means "match"
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF  # `ip broadcast` then fails to compile rather than guess


class PcapError(ValueError):
    """An expression libpcap refuses, or no libpcap: one line."""


class BpfInsn(ctypes.Structure):
    """libpcap's struct bpf_insn (== the kernel's struct sock_filter)."""
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(BpfInsn))]


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap")
    if name is None:
        raise PcapError("filter expressions need libpcap (Debian: apt install libpcap0.8)")
    lib = ctypes.CDLL(name)
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.bpf_filter.restype = ctypes.c_uint
    lib.bpf_filter.argtypes = [ctypes.POINTER(BpfInsn), ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]
    return lib


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class PcapProgram:
    """A compiled expression: its text and libpcap's instructions."""
    expression: str
    insns: tuple[tuple[int, int, int, int], ...]   # (code, jt, jf, k)

    def run(self, packet: bytes, wirelen: int | None = None) -> int:
        """libpcap's own interpreter (bpf_filter) on an IP packet: what
        tcpdump would decide.  The reference the kernel's run is tested
        against; non-zero is a match."""
        prog = (BpfInsn * len(self.insns))(*(BpfInsn(*i) for i in self.insns))
        return _lib().bpf_filter(prog, packet, len(packet) if wirelen is None else wirelen, len(packet))


def compile(expression: str) -> PcapProgram:  # noqa: A001 -- the name libpcap and tcpdump use
    """Compile a pcap-filter expression for raw IP packets; PcapError, one
    line with libpcap's message, if libpcap refuses it."""
    if "\0" in expression:
        raise PcapError(f"invalid filter expression {expression!r}: contains a NUL byte")
    lib = _lib()
    pcap = lib.pcap_open_dead(DLT_RAW, SNAPLEN)
    if not pcap:
        raise PcapError("libpcap: pcap_open_dead failed")
    prog = BpfProgram()
    try:
        if lib.pcap_compile(pcap, ctypes.byref(prog), expression.encode(), 1, PCAP_NETMASK_UNKNOWN) != 0:
            msg = (lib.pcap_geterr(pcap) or b"").decode(errors="replace")
            raise PcapError(f"invalid filter expression {expression!r}: {_one_line(msg)}")
        try:
            insns = tuple((prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf, prog.bf_insns[i].k)
                          for i in range(prog.bf_len))
        finally:
            lib.pcap_freecode(ctypes.byref(prog))
    finally:
        lib.pcap_close(pcap)
    return PcapProgram(expression, insns)
