"""pcap-ng files of traced packets: read back by tcpdump, tshark and pkttrace itself.

The packets are those of tests/data/lab-demo.jsonl (recorded from a real
kernel, see test_replay.py), written with tracer.pcapng.Writer; tcpdump
and tshark are the real programs (tcpdump and tshark installed by
scripts/setup.sh), never a stand-in.
"""
from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import struct
import subprocess

import pytest

from tracer import output, pcapng
from tracer.model import Packet, Stage
from tracer.recording import replay

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "lab-demo.jsonl")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


@pytest.fixture(scope="module")
def packets():
    with open(DATA) as f:
        return list(replay(f))


def write(packets, path) -> None:
    with open(path, "wb") as f:
        w = pcapng.Writer(f, output.plain_text)
        for p in packets:
            w.packet(p)
        w.close()


class _Partial(io.RawIOBase):
    """A raw stream that takes at most 500 bytes a write (as a pipe under
    python -u when a signal comes) and says so."""

    def __init__(self):
        self.got = bytearray()

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)[:500]
        self.got += b
        return len(b)


def test_a_stream_taking_part_of_each_write_gets_the_whole_file(packets):
    # -w - under python -u: stdout's binary layer is the raw file
    whole, part = io.BytesIO(), _Partial()
    for out in (whole, part):
        w = pcapng.Writer(out, output.plain_text)
        for p in packets[:20]:
            w.packet(p)
        w.close()
    assert len(whole.getvalue()) > 5000 and bytes(part.got) == whole.getvalue()


@pytest.fixture(scope="module")
def demo_file(packets, tmp_path_factory):
    path = tmp_path_factory.mktemp("pcapng") / "demo.pcapng"
    write(packets, path)
    return path


def tshark_json(path, *fields: str) -> list[dict]:
    args = [_tool("tshark"), "-r", str(path), "-T", "json"]
    for f in fields:
        args += ["-e", f]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d["_source"]["layers"] for d in json.loads(r.stdout)]


# --- the must-show: tcpdump -r and tshark read it, one packet per traced packet ---

def test_tcpdump_reads_one_packet_per_traced_packet(packets, demo_file):
    r = subprocess.run([_tool("tcpdump"), "-n", "-r", str(demo_file)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == len(packets) == 30
    # the addresses of each packet, in order (tcpdump: "IP 10.71.1.2 > 10.71.2.2: ...")
    for line, p in zip(r.stdout.splitlines(), packets):
        assert f" {p.src} > {p.dst}" in line or f" {p.src}.{p.sport} > {p.dst}.{p.dport}" in line, (line, p.src)


def test_tshark_reads_each_path_as_the_packets_comment(packets, demo_file):
    layers = tshark_json(demo_file, "frame.comment", "frame.interface_name")
    assert len(layers) == len(packets)
    for d, p in zip(layers, packets):
        comments = d["frame.comment"]
        # first the path as the human view prints it, then the record for -r
        assert comments[0] == output.plain_text(p)
        assert comments[0].startswith(f"#{p.id} ") and "tx" in comments[0] or p.fate != "forwarded"
        assert all(c.startswith(pcapng.TAG) for c in comments[1:]) and len(comments) >= 2
        dev = p.path[0].dev or p.in_dev or p.out_dev
        assert d["frame.interface_name"] == [f"{dev}@{p.netns}"]


def test_one_interface_block_per_netns_and_device(packets, demo_file):
    want = {(p.netns, p.path[0].dev or p.in_dev or p.out_dev) for p in packets}
    with open(demo_file, "rb") as f:
        idbs = [b for b in pcapng._blocks(f) if b[0] == pcapng.IDB_TYPE]
    assert len(idbs) == len(want) >= 2
    r = subprocess.run([_tool("tshark"), "-r", str(demo_file), "-T", "fields", "-e", "frame.interface_id"],
                       capture_output=True, text=True, timeout=60)
    assert sorted({int(x) for x in r.stdout.split()}) == list(range(len(want)))


def test_pkttrace_reads_back_the_same_packets(packets, demo_file):
    with open(demo_file, "rb") as f:
        [text] = pcapng.recordings(f)
    back = list(replay(io.StringIO(text)))
    assert [output.plain_text(p) for p in back] == [output.plain_text(p) for p in packets]
    # and everything else the JSON carries (this format-1 fixture has no
    # wall-clock time: the file's section says a made-up one, see pcapng._section)
    for a, b in zip(back, packets):
        ja, jb = a.to_json(), b.to_json()
        ja.pop("time_ns", None)
        assert ja == jb


# --- headers made up when the packet's own bytes were not captured --------------

def _packet(family="ipv4", proto="tcp", src="10.0.0.1", dst="10.0.0.2", sport=40000, dport=80, **facts) -> Packet:
    p = Packet(id=1, netns="ns1", family=family, proto=proto, src=src, dst=dst, sport=sport, dport=dport,
               fate="delivered", in_dev="eth0", out_dev=None, path=[Stage("tc_ingress", 0, "eth0", 0)],
               proto_num={"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}[proto])
    for k, v in facts.items():
        setattr(p, k, v)
    return p


SYNTH = [
    ("syn", _packet(length=60, tcp_flags=0x02, wall_ns=1_764_000_000_123_456_000)),
    ("synack6", _packet(family="ipv6", src="fd00::1", dst="fd00::2", length=80, tcp_flags=0x12)),
    ("udp", _packet(proto="udp", sport=5000, dport=53, length=128)),
    ("udp6", _packet(family="ipv6", proto="udp", src="fd00::1", dst="fd00::2", sport=5000, dport=53, length=100)),
    ("echo", _packet(proto="icmp", sport=None, dport=None, length=84, icmp_type=8, icmp_code=0)),
    ("unreach6", _packet(family="ipv6", proto="icmpv6", src="fd00::1", dst="fd00::2", sport=None, dport=None,
                         length=120, icmp_type=1, icmp_code=4)),
]


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcapng") / "synth.pcapng"
    write([p for _, p in SYNTH], path)
    return path


def test_made_up_headers_as_tshark_decodes_them(synth_file):
    args = [_tool("tshark"), "-r", str(synth_file), "-o", "ip.check_checksum:TRUE", "-T", "fields", "-E",
            "separator=|", "-e", "ip.len", "-e", "ipv6.plen", "-e", "tcp.flags", "-e", "udp.length",
            "-e", "icmp.type", "-e", "icmpv6.type", "-e", "icmpv6.code", "-e", "ip.checksum.status",
            "-e", "frame.time_epoch", "-e", "sll.pkttype"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [ln.split("|") for ln in r.stdout.splitlines()]
    assert len(rows) == len(SYNTH)
    syn, synack6, udp, udp6, echo, unreach6 = rows
    assert (syn[0], syn[2], syn[7]) == ("60", "0x0002", "1")        # 1: the IP checksum is good (0 bad)
    assert syn[8].startswith("1764000000.123456")
    assert syn[9] == "0"                                             # PACKET_HOST: it came in
    assert (synack6[1], synack6[2]) == ("40", "0x0012")
    assert (udp[0], udp[3]) == ("128", "108")
    assert (udp6[1], udp6[3]) == ("60", "60")
    assert (echo[0], echo[4]) == ("84", "8")
    assert (unreach6[5], unreach6[6]) == ("1", "4")


def test_made_up_transport_checksums_are_right():
    # with the zero payload the length says, each checksum verifies (sums to 0xffff)
    for name, p in SYNTH:
        data, total = pcapng.synthesize(p)
        whole = data + bytes(total - len(data))
        v6 = p.family == "ipv6"
        ip_len = 40 if v6 else 20
        if not v6:
            assert pcapng._checksum(whole[:20]) == 0, name
        proto = whole[6] if v6 else whole[9]
        l4 = whole[ip_len:]
        src, dst = (whole[8:24], whole[24:40]) if v6 else (whole[12:16], whole[16:20])
        pseudo = b"" if proto == 1 else (src + dst + struct.pack("!IxxxB", len(l4), proto) if v6 else
                                         src + dst + struct.pack("!xBH", proto, len(l4)))
        assert pcapng._checksum(pseudo + l4) == 0, name
        assert total == p.length


def test_captured_head_bytes_are_the_packets_data(tmp_path):
    head = bytes.fromhex("4500003c1c4640004006b1e6") + ipaddress.ip_address("10.0.0.1").packed + \
        ipaddress.ip_address("10.0.0.2").packed
    p = _packet(length=60, tcp_flags=0x02, head=head)
    path = tmp_path / "head.pcapng"
    write([p], path)
    [d] = tshark_json(path, "ip.id", "frame.len", "frame.cap_len")
    assert d["ip.id"] == ["0x1c46"]                       # from the captured bytes, not made up
    assert (d["frame.len"], d["frame.cap_len"]) == (["80"], [str(20 + len(head))])   # + the SLL2 header


def test_a_packet_built_by_hand_has_its_path_and_no_record(tmp_path):
    path = tmp_path / "hand.pcapng"
    write([SYNTH[0][1]], path)
    [d] = tshark_json(path, "frame.comment")
    assert d["frame.comment"] == [output.plain_text(SYNTH[0][1])]
    with open(path, "rb") as f, pytest.raises(pcapng.PcapngError, match="no pkttrace paths"):
        pcapng.recordings(f)


def test_an_empty_trace_is_a_file_tcpdump_reads(tmp_path):
    path = tmp_path / "empty.pcapng"
    write([], path)
    r = subprocess.run([_tool("tcpdump"), "-r", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stderr


# --- reading what pkttrace did not write --------------------------------------

def _foreign_pcapng() -> bytes:
    """SHB, IDB, one EPB with a comment: what another tool writes."""
    shb = pcapng._block(pcapng.SHB_TYPE, struct.pack("<IHHq", pcapng.BYTE_ORDER_MAGIC, 1, 0, -1))
    idb = pcapng._block(pcapng.IDB_TYPE, struct.pack("<HHI", 101, 0, 0))
    data = bytes(20)
    epb = pcapng._block(pcapng.EPB_TYPE, struct.pack("<IIIII", 0, 0, 0, len(data), len(data)) + data +
                        pcapng._options([(pcapng.OPT_COMMENT, b"hello")]))
    return shb + idb + epb


@pytest.mark.parametrize("data, message", [
    (_foreign_pcapng(), "no pkttrace paths in it (1 packet,"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), "a pcap file (not pcap-ng) has no pkttrace paths"),
    (b"\x0a\x0d\x0d\x0a\x1c\x00", "cut short"),
    (_foreign_pcapng()[:-3], "cut short"),
    (b"GIF89a", "not a pcap-ng file"),
])
def test_files_without_pkttrace_paths_are_refused_with_one_reason(data, message):
    with pytest.raises(pcapng.PcapngError) as e:
        pcapng.recordings(io.BytesIO(data))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_block_length_is_refused(demo_file):
    data = bytearray(demo_file.read_bytes())
    data[4:8] = struct.pack("<I", 13)                     # not a multiple of 4
    with pytest.raises(pcapng.PcapngError, match="a block of 13 bytes"):
        pcapng.recordings(io.BytesIO(bytes(data)))


def test_names_longer_than_one_comment_are_split_and_joined_again(tmp_path):
    # a host with thousands of devices: the first packet's names exceed a
    # pcap-ng option (64 KiB) and go in several comments, read back as one
    with open(DATA) as f:
        pkts = list(replay(f))
    ctx = pkts[0]._ctx
    ctx.ifnames.update({(1, i): f"veth{i:05d}" for i in range(10_000)})
    path = tmp_path / "many.pcapng"
    write(pkts[:3], path)
    [d, *_] = tshark_json(path, "frame.comment")
    assert len(d["frame.comment"]) >= 4 and all(len(c.encode()) <= 0xFFFF for c in d["frame.comment"])
    with open(path, "rb") as f:
        [text] = pcapng.recordings(f)
    back = list(replay(io.StringIO(text)))
    assert [output.plain_text(p) for p in back] == [output.plain_text(p) for p in pkts[:3]]
    assert back[0]._ctx.ifnames[(1, 9_999)] == "veth09999"
