"""Traced packets as a pcap-ng file (`pkttrace -w`), and back (`pkttrace -r`).

Wireshark, tshark and `tcpdump -r` read what is written here:

- one Section Header Block;
- one Interface Description Block per (network namespace, device) a packet
  was first seen on, named `dev@netns`, timestamps in microseconds, link
  type LINKTYPE_LINUX_SLL2 (276, what `tcpdump -i any` writes): a 20-byte
  header saying the IP version, the device's index and whether the packet
  came in or went out, then the IP header, where the kernel's view of a
  traced packet starts.  Not LINKTYPE_RAW (101), the obvious choice: libpcap
  1.10 (tcpdump -r) refuses a file with a second interface of that type
  ("an interface has a type 101 different from the type of the first
  interface": it compares the first, translated to DLT_RAW, with the next
  untranslated);
- one Enhanced Packet Block per traced packet, on the interface of its
  first stage, stamped with the wall-clock time of that stage.  Its data
  is the packet's first bytes as the kernel had them when the trace
  captured them (`Packet.head`, taken with `-w`), else IP and TCP/UDP/ICMP
  headers made up from what pkttrace knows of the packet (addresses,
  ports, protocol, TOS, length, TCP flags, ICMP type and code; TTL 64,
  no payload: the captured length is the headers', the original length
  the packet's), with correct checksums;
- the packet's path, as the human view prints it, as its first comment
  (Wireshark: "Packet comments"; tshark: the field `frame.comment`).

So that `pkttrace -r` rebuilds exactly the packets that were traced, with
the one decoder live tracing uses (tracer.paths), each packet also carries
its kernel record and the names it needs, as the lines a `--record`
recording would hold, in further comments tagged `pkttrace-record `; the
section header carries the recording's header line the same way.
Comments rather than custom options (block option 2988): every pcap-ng
tool reads and keeps comments (editcap, mergecap, Wireshark's "save as"),
and a custom option needs an IANA enterprise number pkttrace does not have.
"""
from __future__ import annotations

import io
import ipaddress
import struct
from typing import IO, Callable, Iterator, cast

from . import events, paths, recording
from .inputs import write_all
from .model import Packet
from .version import __version__

LINKTYPE_LINUX_SLL2 = 276
_SLL2 = struct.Struct("!HHIHBB8s")  # protocol, reserved, ifindex, ARPHRD type, packet type, address length, address
_ETH_P = {"ipv4": 0x0800, "ipv6": 0x86DD}
ARPHRD_NONE = 0xFFFE                # the device type is not traced
PACKET_HOST, PACKET_OUTGOING = 0, 4  # tcpdump: "In", "Out"
SHB_TYPE, IDB_TYPE, EPB_TYPE, SPB_TYPE, OPB_TYPE = 0x0A0D0D0A, 1, 6, 3, 2
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_END, OPT_COMMENT = 0, 1
SHB_OS, SHB_USERAPPL = 3, 4
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9
TSRESOL_US = 6                      # 10^-6 s: what wall_ts, a float of epoch seconds, holds exactly
TAG = "pkttrace-record "            # a comment holding recording lines (see the module's doc)
HEADER_TAG = "pkttrace-recording "  # the section's comment holding the recording's header line
MAX_OPTION = 0xFFFF                 # an option's length is 16 bits
_CHUNK = 60_000                     # record lines per comment (ASCII: bytes = characters)
_PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}
_TTL = 64                           # not traced: a common default, said in the module's doc
_N_STAGES_OFF = events.PtRecord.n_stages.offset


# ---- blocks ------------------------------------------------------------------

def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _option(code: int, value: bytes) -> bytes:
    if len(value) > MAX_OPTION:
        raise ValueError(f"option {code}: {len(value)} bytes, more than pcap-ng's {MAX_OPTION}")
    return struct.pack("<HH", code, len(value)) + value + bytes(_pad4(len(value)))


def _options(opts: list[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    return b"".join(_option(c, v) for c, v in opts) + struct.pack("<HH", OPT_END, 0)


def _block(kind: int, body: bytes) -> bytes:
    """A block: type, total length, body (padded to 32 bits), total length again."""
    body += bytes(_pad4(len(body)))
    total = len(body) + 12
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


def _comment(text: str) -> tuple[int, bytes]:
    data = text.encode("utf-8")
    if len(data) > MAX_OPTION:           # a path of hundreds of stages: cut, and say so
        tail = "\n(cut: longer than a pcap-ng comment holds)".encode()
        data = data[:MAX_OPTION - len(tail)].decode("utf-8", "ignore").encode() + tail
    return OPT_COMMENT, data


def section_header(header_line: str) -> bytes:
    opts = [(OPT_COMMENT, (HEADER_TAG + header_line).encode()),
            (SHB_USERAPPL, f"pkttrace {__version__}".encode())]
    # section length unknown (-1): the file is written as packets come
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts)
    return _block(SHB_TYPE, body)


def interface(name: str, description: str) -> bytes:
    opts = [(IF_NAME, name.encode("utf-8", "surrogateescape")),
            (IF_DESCRIPTION, description.encode("utf-8", "surrogateescape")),
            (IF_TSRESOL, bytes([TSRESOL_US]))]
    return _block(IDB_TYPE, struct.pack("<HHI", LINKTYPE_LINUX_SLL2, 0, 0) + _options(opts))


def packet_block(if_id: int, ts_us: int, data: bytes, orig_len: int, comments: list[str]) -> bytes:
    body = struct.pack("<IIIII", if_id, ts_us >> 32, ts_us & 0xFFFFFFFF, len(data), max(orig_len, len(data)))
    body += data + bytes(_pad4(len(data)))
    return _block(EPB_TYPE, body + _options([_comment(c) for c in comments]))


# ---- headers made up from what is known of a packet ---------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _proto_number(p: Packet) -> int:
    if p.proto_num:
        return p.proto_num
    if p.proto in _PROTO_NUMBERS:
        return _PROTO_NUMBERS[p.proto]
    return int(p.proto) if str(p.proto).isdigit() else 0


def _tos(p: Packet) -> int:
    """The TOS/traffic class the packet came with: its first hook's."""
    for s in p.path:
        if s.tos is not None:
            return s.tos
    return 0


def _l4(p: Packet, proto: int) -> bytes:
    """The transport header, checksum zero (filled in by synthesize)."""
    sport, dport = p.sport or 0, p.dport or 0
    if proto == 6 and p.sport is not None:
        flags = p.tcp_flags or 0
        return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 0, 0, 0)
    if proto == 17 and p.sport is not None:
        return struct.pack("!HHHH", sport, dport, 0, 0)
    if proto in (1, 58):
        if p.icmp_type is None:
            return b""
        return struct.pack("!BBHI", p.icmp_type, p.icmp_code or 0, 0, 0)
    return b""


_CSUM_AT = {6: 16, 17: 6, 1: 2, 58: 2}


def synthesize(p: Packet) -> tuple[bytes, int]:
    """(IP + transport headers, the packet's original length) made up from
    the packet's fields, for a packet whose own bytes were not captured.
    Checksums are those of a packet with these headers and a zero-filled
    payload of the packet's length (the payload itself was never seen)."""
    proto = _proto_number(p)
    l4 = _l4(p, proto)
    v6 = p.family == "ipv6"
    ip_len = 40 if v6 else 20
    length = p.length
    total = max(length or 0, ip_len + len(l4))
    src, dst = ipaddress.ip_address(p.src).packed, ipaddress.ip_address(p.dst).packed
    l4_len = total - ip_len
    if l4 and proto in _CSUM_AT:
        if proto == 17:
            l4 = l4[:4] + struct.pack("!H", l4_len & 0xFFFF) + l4[6:]
        if proto == 1:
            pseudo = b""                                 # ICMPv4: no pseudo-header
        elif v6:
            pseudo = src + dst + struct.pack("!IxxxB", l4_len, proto)
        else:
            pseudo = src + dst + struct.pack("!xBH", proto, l4_len & 0xFFFF)
        # the zero payload adds nothing to the sum, but its length is in the pseudo-header
        csum = _checksum(pseudo + l4)
        if proto == 17 and csum == 0:
            csum = 0xFFFF                                # UDP: 0 means "no checksum"
        at = _CSUM_AT[proto]
        l4 = l4[:at] + struct.pack("!H", csum) + l4[at + 2:]
    tos = _tos(p)
    if v6:
        ip = struct.pack("!IHBB", (6 << 28) | (tos << 20), l4_len & 0xFFFF, proto, _TTL) + src + dst
    else:
        ip = struct.pack("!BBHHHBBH", 0x45, tos, total & 0xFFFF, 0, 0, _TTL, proto, 0) + src + dst
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + l4, total


# ---- writing ----------------------------------------------------------------------

class Writer:
    """Writes traced packets to a binary stream as they come.

    describe(packet) -> str is the comment: the human view without colour
    (tracer.output.plain_text).  close() ends the file (a file without
    packets still gets its section header: tcpdump reads it as empty)."""

    def __init__(self, out: IO[bytes], describe: Callable[[Packet], str]):
        self.out, self.describe = out, describe
        self._ifaces: dict[tuple[str, str], int] = {}
        # the section's names: (context, buffer, recorder), from its first packet
        self._rec: tuple[object, io.StringIO, recording.Recorder] | None = None
        self._own_ctx = paths.Context()      # for packets built by hand (no kernel record)
        self.packets = 0

    def _section(self, ctx: paths.Context) -> recording.Recorder:
        """The recorder of ctx's section, starting one (a section header, and
        interfaces anew) for the first packet and whenever the names' context
        changes: each section is one recording, with its own clock's zero."""
        if self._rec is not None and self._rec[0] is ctx:
            return self._rec[2]
        buf = io.StringIO()
        unknown = ctx.boot_wall_ns is None      # a format-1 recording's packets: no wall-clock time
        rec = recording.Recorder(buf, ctx)
        if unknown and ctx is not self._own_ctx:
            # the recorder makes one up (now) for its header line; the packets
            # being written keep none.  (Read back, they get that made-up time:
            # recording format 2 has no way to say "unknown" yet.)
            ctx.boot_wall_ns = None
        write_all(self.out, section_header(buf.getvalue().rstrip("\n")))
        buf.seek(0)
        buf.truncate()
        self._rec, self._ifaces = (ctx, buf, rec), {}
        return rec

    def _iface(self, p: Packet) -> int:
        first = p.path[0] if p.path else None
        dev = (first.dev if first is not None else None) or p.in_dev or p.out_dev or "-"
        ns = p.netns or ""
        key = (ns, dev)
        if key not in self._ifaces:
            self._ifaces[key] = len(self._ifaces)
            where = f"network namespace {ns}" if ns else "the current network namespace"
            write_all(self.out, interface(f"{dev}@{ns}" if ns else dev,
                                          f"{dev} in {where}: packets first seen there (pkttrace)"))
        return self._ifaces[key]

    def _record_lines(self, p: Packet, rec: recording.Recorder) -> str:
        """The recording's lines for this packet: the names it needs that
        were not written yet, and its kernel record."""
        raw = p._raw
        if raw is None or p._ctx is None:
            return ""                    # built by hand, not from a kernel record: its path comment only
        # exactly the record as the kernel sent it (an aged-out one is read whole
        # from its map: cut to its stages, as the tracer's own recorder does);
        # aged out: its fate is unknown
        n = min(raw[_N_STAGES_OFF], events.PT_MAX_STAGES)
        rec(raw[:events.RECORD_HEADER_SIZE + n * events.STAGE_SIZE], p.fate == "unknown")
        assert self._rec is not None
        buf = self._rec[1]
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return text

    def packet(self, p: Packet) -> None:
        rec = self._section(p._ctx if p._raw is not None and p._ctx is not None else self._own_ctx)
        if_id = self._iface(p)
        if p.head:
            data, orig = bytes(p.head), p.length or len(p.head)
        else:
            data, orig = synthesize(p)
        # received (it has an input device) or sent from this host; no
        # device index: the kernel's is of its own netns, and tcpdump would
        # name it after a device of the reader's
        sll = _SLL2.pack(_ETH_P.get(p.family, 0), 0, 0, ARPHRD_NONE,
                         PACKET_HOST if p.in_dev else PACKET_OUTGOING, 0, b"")
        # microseconds, rounded as the human view's stamps (output.Clock); unknown (older recordings): the epoch
        ts = (p.wall_ns + 500) // 1000 if p.wall_ns is not None else 0
        lines = self._record_lines(p, rec)
        comments = [self.describe(p)] + [TAG + lines[i:i + _CHUNK] for i in range(0, len(lines), _CHUNK)]
        write_all(self.out, packet_block(if_id, ts, sll + data, orig + len(sll), comments))
        self.packets += 1

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        if self._rec is None:
            # nothing was traced: still a file tcpdump reads (libpcap wants an
            # interface after the section header, even with no packet on it)
            self._section(self._own_ctx)
            write_all(self.out, interface("-", "no packet was traced (pkttrace)"))
        self.out.flush()


# ---- reading --------------------------------------------------------------------

class PcapngError(ValueError):
    """Not a pcap-ng file pkttrace can show; one line says why."""


PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"}
PCAPNG_MAGIC = struct.pack("<I", SHB_TYPE)
MAX_BLOCK = 64 << 20


def _parse_options(data: bytes, endian: str) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(data):
        code, n = struct.unpack_from(endian + "HH", data, pos)
        pos += 4
        if code == OPT_END:
            return
        if pos + n > len(data):
            raise PcapngError("an option runs past its block")
        yield code, data[pos:pos + n]
        pos += n + _pad4(n)


def _blocks(f: IO[bytes]) -> Iterator[tuple[int, bytes, str]]:
    """(type, body, byte order) of each block; PcapngError on anything malformed."""
    endian = "<"
    while True:
        head = f.read(8)
        if not head:
            return
        if len(head) < 8:
            raise PcapngError("cut short inside a block header")
        if head[:4] == PCAPNG_MAGIC:
            bom = f.read(4)
            if len(bom) < 4:
                raise PcapngError("cut short inside a section header")
            if struct.unpack("<I", bom)[0] == BYTE_ORDER_MAGIC:
                endian = "<"
            elif struct.unpack(">I", bom)[0] == BYTE_ORDER_MAGIC:
                endian = ">"
            else:
                raise PcapngError("a section header without its byte-order magic")
            kind, total = SHB_TYPE, struct.unpack(endian + "I", head[4:])[0]
            already = bom
        else:
            kind, total = struct.unpack(endian + "II", head)
            already = b""
        if total < 12 + len(already) or total % 4 or total > MAX_BLOCK:
            raise PcapngError(f"a block of {total} bytes")
        rest = f.read(total - 8 - len(already))
        if len(rest) < total - 8 - len(already):
            raise PcapngError("cut short inside a block")
        body = already + rest[:-4]
        if struct.unpack(endian + "I", rest[-4:])[0] != total:
            raise PcapngError("a block whose two lengths differ")
        yield kind, body, endian


def recordings(f: IO[bytes]) -> list[str]:
    """The recordings carried by a pkttrace pcap-ng file, as text, one per
    section: its header line, then each packet's lines.  PcapngError when
    the file is not pcap-ng, or holds no pkttrace paths (another tool wrote it)."""
    start = f.read(4)
    if start in PCAP_MAGICS:
        raise PcapngError("a pcap file (not pcap-ng) has no pkttrace paths: it was not written by pkttrace -w")
    if start != PCAPNG_MAGIC:
        raise PcapngError("not a pcap-ng file")
    sections: list[list[str]] = []
    packets = 0
    for kind, body, endian in _blocks(cast(IO[bytes], _Prefixed(start, f))):
        if kind == SHB_TYPE:
            sections.append([])
            for code, value in _parse_options(body[16:], endian):
                text = value.decode("utf-8", "replace")
                if code == OPT_COMMENT and text.startswith(HEADER_TAG) and not sections[-1]:
                    sections[-1].append(text[len(HEADER_TAG):] + "\n")
        elif kind == EPB_TYPE:
            if len(body) < 20:
                raise PcapngError("a packet block too short")
            packets += 1
            caplen = struct.unpack_from(endian + "I", body, 12)[0]
            opts_at = 20 + caplen + _pad4(caplen)
            if opts_at > len(body):
                raise PcapngError("a packet's data runs past its block")
            for code, value in _parse_options(body[opts_at:], endian):
                text = value.decode("utf-8", "replace")
                if code == OPT_COMMENT and text.startswith(TAG) and sections and sections[-1]:
                    sections[-1].append(text[len(TAG):])
    # a section whose header is pkttrace's and that holds at least one record
    out = ["".join(sec) for sec in sections if len(sec) > 1]
    if not out:
        raise PcapngError(f"no pkttrace paths in it ({packets} packet{'s' if packets != 1 else ''}, "
                          "none written by pkttrace -w)")
    return out


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read put back in front (stdin cannot seek)."""

    def __init__(self, prefix: bytes, rest: IO[bytes]):
        self._prefix, self._rest = prefix, rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            got, self._prefix = self._prefix + self._rest.read(), b""
            return got
        got, self._prefix = self._prefix[:n], self._prefix[n:]
        if len(got) < n:
            got += self._rest.read(n - len(got))
        return got


def sniff(start: bytes) -> str:
    """What a file starting with these bytes is: pcapng, pcap, recording or unknown."""
    if start[:4] == PCAPNG_MAGIC:
        return "pcapng"
    if start[:4] in PCAP_MAGICS:
        return "pcap"
    if start[:1] == b"{":
        return "recording"
    return "unknown"
