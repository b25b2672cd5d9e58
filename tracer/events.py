"""Python mirror of bpf/pkttrace.h.

The C header is the definition; this mirror is checked member by member
against the BTF of the built object (tests/unit/test_btf_mirror.py), so a
field added in C and forgotten here fails the tests instead of decoding
garbage.
"""
from __future__ import annotations

import ctypes
import enum

PT_MAX_STAGES = 32
PT_HEAD_LEN = 96      # header bytes a record can carry (cfg.snap)
PT_TUN_PORTS = 8      # pt_config.tun_ports
PT_MAX_NETNS = 1024  # namespaces traced at once
PT_NS_SLOTS = 4096   # map traced_ns: slot = netns inode % PT_NS_SLOTS
PT_SLOTS = 4          # per-CPU record slots
PT_MAX_ROUTE = 16
PT_NF_SLOTS = 16
PT_NF_BANK = 8      # slots per bank; slot % PT_NF_BANK == 0 is a hook's first observer
PT_NF_POS = 4       # per CPU: packets whose place in a hook is counted
PT_PCAP_MAX = 128   # instructions of the filter expression run in the kernel
PT_PCAP_CAP = 256   # bytes of the IP packet the expression sees

u8, u16, u32, s32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64


class StageKind(enum.IntEnum):
    RX = 1
    TC_INGRESS = 2
    PREROUTING = 3
    INPUT = 4
    FORWARD = 5
    OUTPUT = 6
    POSTROUTING = 7
    ROUTE = 8
    REROUTE = 9
    TC_EGRESS = 10
    TX = 11
    DELIVER = 12
    DROP = 13
    ADDR = 14      # PtAddrStage: address for the stage before it (NAT, gateway)
    QDISC = 15     # a device's qdisc: slot = QdiscEvent, aux = root qdisc handle, aux2 = qlen after enqueue

    @property
    def label(self) -> str:
        """The stage name in output (JSON `stage`)."""
        return self.name.lower()


# netfilter hook number (NF_INET_*) -> stage kind; the enum follows their order
HOOK_STAGES = (StageKind.PREROUTING, StageKind.INPUT, StageKind.FORWARD,
               StageKind.OUTPUT, StageKind.POSTROUTING)
NF_STAGES = frozenset(HOOK_STAGES)


class Fate(enum.IntEnum):
    NONE = 0
    FORWARDED = 1
    DELIVERED = 2
    SENT = 3
    DROPPED = 4
    CONSUMED = 5
    REDIRECTED = 6     # left on the device tc redirected it to
    REASSEMBLED = 7    # a fragment absorbed by reassembly (record.link: the packet it became)
    ENCAPSULATED = 8   # became the payload of an outer packet (record.encap)
    DECAPSULATED = 9   # an outer packet whose payload went on (record.inner)


class Ct(enum.IntEnum):
    """pt_stage.ct, without the CT_REPLY bit."""
    NONE = 0
    NEW = 1
    ESTABLISHED = 2
    RELATED = 3
    UNTRACKED = 4


CT_REPLY = 0x80
ROUTE_SRC_CHECK = 1   # pt_stage.ct of a route stage: a lookup of the source (rp_filter)


class AddrWhat(enum.IntEnum):
    NAT_SRC = 1
    NAT_DST = 2
    GW = 3
    NEXTHOP = 4    # the skb's dst after routing: chosen nexthop, device, route type


class QdiscEvent(enum.IntEnum):
    """pt_stage.slot of a QDISC stage."""
    ENQUEUED = 1
    DEQUEUED = 2
    REQUEUED = 3   # dequeued again: the driver was busy, the qdisc requeued it


PT_QDISC_BUCKETS = 12   # count mode: queueing time buckets, powers of 4 from 1 us (the last: more)
PT_QDISC_BULK = 8       # skbs of one bulk dequeue followed


class TcVerdict(enum.IntEnum):
    """pt_stage.aux2 of a tc stage, when a copy was seen leaving tc."""
    MIRROR = 1
    REDIRECT = 2


STF_REDIRECTED = 1    # pt_stage.flags: skb->redirected (tc sent it here)
STF_NF_DROP = 2       # pt_stage.flags: fentry backend, the table observed here said drop
STF_NFT_TABLE = 8     # pt_stage.flags, fentry/kprobe: aux is the nft table's handle
STF_CHANGING = 4      # pt_stage.flags: the hook's registrations changed since the observers were placed
STF_HOOK_SLOW = 16    # drop stage: freed by nf_hook_slow (a hook function's NF_DROP, not an nft chain's)
SLOT_TABLE = 0xFE     # pt_stage.slot, fentry backend: after the table at priority aux2
SLOT_EXIT = 0xFF      # ... after every hook function of the hook


class HandoffHow(enum.IntEnum):
    """pt_handoff.how: what the packet that takes a reserved id is."""
    NETNS = 0      # the same packet in the next netns (veth)
    ENCAP = 1      # the outer packet its payload is sent in later (WireGuard)


class DeliverHow(enum.IntEnum):
    """pt_stage.aux2 of a DELIVER stage."""
    QUEUED = 1     # queued to a socket (aux = socket inode)
    READ = 2       # a process read it (record pid/comm)
    CONSUMED = 3   # consume_skb after INPUT (ICMP echo, ...)
    STACK = 4      # passed INPUT, freed by the stack without an event (TCP ACK)


SEEN_INPUT, SEEN_FORWARD, SEEN_OUTPUT, SEEN_RX, SEEN_LEFT, SEEN_TUNNEL, SEEN_SHARED = 1, 2, 4, 8, 16, 32, 64
# pt_record.ext_hdrs: IPv6 extension headers walked, and their JSON names
EXT_HOP, EXT_ROUTING, EXT_FRAG, EXT_DEST, EXT_AH = 1, 2, 4, 8, 16
EXT_HDRS = ((EXT_HOP, "hop-by-hop"), (EXT_ROUTING, "routing"), (EXT_FRAG, "fragment"), (EXT_DEST, "dstopts"),
            (EXT_AH, "ah"))
F_MARK, F_SRC, F_DST, F_PROTO, F_PORT, F_IFACE, F_PCAP = 1, 2, 4, 8, 16, 32, 64
# criteria judged from the IP packet alone (F_PCAP: the expression reads nothing else)
F_HEADER = F_SRC | F_DST | F_PROTO | F_PORT | F_PCAP
REC_TRUNCATED, REC_LATE, REC_QUEUED, REC_CAUSED, REC_REDIRECTED, REC_FRAG, REC_NAT_NS, REC_L4 = 1, 2, 4, 8, 16, 32, 64, 128


class Stat(enum.IntEnum):
    CREATED = 0
    EMITTED = 1
    FILTERED = 2
    LOST = 3
    CREATE_FAILED = 4
    TRUNCATED = 5
    ROUTE_DROPPED = 6
    REJECTED = 7
    LATE = 8
    PATH_OVERFLOW = 9
    HANDOFF_LOST = 10
    PARKED = 11
    DROP_OVERFLOW = 12
    QDISC_OVERFLOW = 13


PT_STAT_MAX = 14


class PtSockFilter(ctypes.Structure):
    _fields_ = [("code", u16), ("jt", u8), ("jf", u8), ("k", u32)]


class PtConfig(ctypes.Structure):
    _fields_ = [
        ("filter", u32),
        ("mark_value", u32),
        ("mark_mask", u32),
        ("src_addr", u8 * 16),
        ("src_mask", u8 * 16),
        ("dst_addr", u8 * 16),
        ("dst_mask", u8 * 16),
        ("src_family", u8),
        ("dst_family", u8),
        ("proto", u8),
        ("emit", u8),
        ("early_reject", u8),
        ("count", u8),
        ("snap", u8),
        ("_pad1", u8),
        ("port", u16),
        ("_pad0", u16),
        ("_pad2", u32),
        ("tun_ports", u16 * PT_TUN_PORTS),  # UDP ports of tunnels: not judged at first sight
        ("hook_slow_start", u64),   # nf_hook_slow's code: a netfilter drop freed there is not an nft chain's
        ("hook_slow_end", u64),
        ("pcap_len", u32),          # the filter expression's classic BPF (tracer/pcapfilter.py)
        ("_pad3", u32),
        ("pcap", PtSockFilter * PT_PCAP_MAX),
    ]


class PtStage(ctypes.Structure):
    _fields_ = [
        ("ts", u64),
        ("ifindex", u32),
        ("mark", u32),
        ("aux", u32),
        ("aux2", s32),
        ("kind", u8),
        ("slot", u8),
        ("tos", u8),
        ("family", u8),
        ("ct", u8),
        ("flags", u8),
        ("_pad", u8 * 2),
    ]


class PtAddrStage(ctypes.Structure):
    _fields_ = [
        ("addr", u8 * 16),
        ("port", u16),
        ("what", u8),
        ("rtype", u8),
        ("ifindex", u32),
        ("kind", u8),
        ("slot", u8),
        ("_pad2", u8),
        ("family", u8),
        ("_pad3", u32),
    ]


class PtRecord(ctypes.Structure):
    _fields_ = [
        ("id", u64),
        ("first_ts", u64),
        ("last_ts", u64),
        ("drop_location", u64),
        ("netns", u32),
        ("drop_reason", u32),
        ("in_ifindex", u32),
        ("out_ifindex", u32),
        ("path_sig", u32),
        ("family", u8),
        ("proto", u8),
        ("fate", u8),
        ("n_stages", u8),
        ("match", u8),
        ("seen", u8),
        ("flags", u8),
        ("rel_ts", u8),
        ("sport", u16),
        ("dport", u16),
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("pid", u32),
        ("comm", ctypes.c_char * 16),
        ("cur_sport", u16),
        ("cur_dport", u16),
        ("cur_saddr", u8 * 16),
        ("cur_daddr", u8 * 16),
        ("cause", u64),
        ("prev", u64),
        ("next", u64),
        ("link", u64),
        ("next_netns", u32),
        ("prev_netns", u32),
        ("frag_id", u32),
        ("ns_index", u16),
        ("len", u16),
        ("tcp_flags", u8),
        ("icmp_type", u8),
        ("icmp_code", u8),
        ("head_len", u8),
        ("_pad1", u32),
        ("head", u8 * PT_HEAD_LEN),
        ("encap", u64),
        ("decap", u64),
        ("inner", u64),
        ("tun_ifindex", u32),
        ("ext_hdrs", u8),
        ("_pad3", u8 * 3),
        ("stages", PtStage * PT_MAX_STAGES),
    ]


# The bytes that decide how a path reads (see PT_SHAPE_OFF in pkttrace.h)
PT_SHAPE_OFF = 32
PT_SHAPE_LEN = 24


class PtRouteEv(ctypes.Structure):
    _fields_ = [
        ("ts", u64),
        ("table", u32),
        ("err", s32),
        ("oif", u32),
        ("mark", u32),
        ("family", u8),
        ("gw_family", u8),
        ("weak", u8),
        ("_pad", u8 * 5),
        ("gw", u8 * 16),
        ("daddr", u8 * 16),
        ("saddr", u8 * 16),
    ]


class PtPending(ctypes.Structure):
    _fields_ = [("skb", u64), ("id", u64)]


class PtRouteBuf(ctypes.Structure):
    _fields_ = [("n", u32), ("live", u32), ("ev", PtRouteEv * PT_MAX_ROUTE)]


class PtNsSlot(ctypes.Structure):
    _fields_ = [("inum", u32), ("index", u32)]   # index + 1; 0: an empty slot


class PtNatSlots(ctypes.Structure):
    _fields_ = [("after_nat", u16 * 10),    # [family * 5 + hook], family 0: IPv4, 1: IPv6
                ("observers", u8 * 20),   # [bank * 10 + family * 5 + hook]: observers attached
                ("hooks", u64 * 10),      # nf_hook_entries placed for; HOOKS_LEARN / HOOKS_PLACING
                ("changed", u32),         # bits family * 5 + hook: seen replaced
                ("entryless", u32)]       # bits bank * 10 + family * 5 + hook: no observer before the first table


HOOKS_LEARN, HOOKS_PLACING = 0, 1


class PtNfPos(ctypes.Structure):
    _fields_ = [("skb", u64 * PT_NF_POS), ("where", u32 * PT_NF_POS), ("count", u8 * PT_NF_POS),
                ("next", u8), ("pad", u8 * 3)]


class PtSlots(ctypes.Structure):
    _fields_ = [("skb", u64 * PT_SLOTS), ("arg", u64)]


class PtActive(ctypes.Structure):
    _fields_ = [("skb", u64), ("id", u64), ("ts", u64)]


class PtHandoff(ctypes.Structure):
    _fields_ = [("prev", u64), ("next", u64), ("ts", u64), ("prev_netns", u32), ("tun_ifindex", u32),
                ("how", u8), ("match", u8), ("_pad", u8 * 6)]


class PtFragKey(ctypes.Structure):
    _fields_ = [
        ("netns", u32),
        ("frag_id", u32),
        ("saddr", u8 * 16),
        ("daddr", u8 * 16),
        ("family", u8),
        ("proto", u8),
        ("_pad", u8 * 2),
    ]


class PtTcLast(ctypes.Structure):
    _fields_ = [("skb", u64), ("head", u64), ("id", u64)]


RECORD_HEADER_SIZE = PtRecord.stages.offset
STAGE_SIZE = ctypes.sizeof(PtStage)

class PtDropKey(ctypes.Structure):
    _fields_ = [
        ("netns", u32),
        ("reason", u32),
        ("family", u8),
        ("_pad", u8 * 3),
    ]


class PtPathKey(ctypes.Structure):
    _fields_ = [
        ("netns", u32),
        ("path_sig", u32),
        ("drop_reason", u32),
        ("fate", u8),
        ("family", u8),
        ("proto", u8),
        ("_pad", u8),
    ]


class PtQdiscKey(ctypes.Structure):
    _fields_ = [("netns", u32), ("ifindex", u32), ("handle", u32), ("bucket", u32)]


class PtQdiscVal(ctypes.Structure):
    _fields_ = [("packets", u64), ("ns", u64)]


# C struct name -> mirror, for the BTF check
MIRRORS = {
    "pt_config": PtConfig,
    "pt_sock_filter": PtSockFilter,
    "pt_stage": PtStage,
    "pt_addr_stage": PtAddrStage,
    "pt_record": PtRecord,
    "pt_route_ev": PtRouteEv,
    "pt_route_buf": PtRouteBuf,
    "pt_pending": PtPending,
    "pt_path_key": PtPathKey,
    "pt_drop_key": PtDropKey,
    "pt_active": PtActive,
    "pt_slots": PtSlots,
    "pt_nat_slots": PtNatSlots,
    "pt_ns_slot": PtNsSlot,
    "pt_nf_pos": PtNfPos,
    "pt_handoff": PtHandoff,
    "pt_frag_key": PtFragKey,
    "pt_tc_last": PtTcLast,
    "pt_qdisc_key": PtQdiscKey,
    "pt_qdisc_val": PtQdiscVal,
}


def decode_record(buf: bytes) -> PtRecord:
    """A ring-buffer record (header + n_stages stages) as a PtRecord."""
    rec = PtRecord()
    n = min(len(buf), ctypes.sizeof(PtRecord))
    ctypes.memmove(ctypes.addressof(rec), buf, n)
    return rec
