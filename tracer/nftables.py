"""nf_tables over netlink, written by hand: the messages --rules needs.

--rules adds a temporary table and reads nftables' trace events.  pyroute2
(floor 0.7.2) cannot build rules with expressions nor decode NFT_MSG_TRACE,
so the few messages are packed here with struct: a batch (begin, NEWTABLE,
NEWCHAIN, NEWRULE..., end) and the trace event.  Numbers are the kernel's
uapi (linux/netfilter/nf_tables.h, nfnetlink.h); nf_tables attributes are
big-endian.

The table is created with NFT_TABLE_F_OWNER (Linux 5.12): the kernel
deletes it when the socket that created it closes, so it cannot outlive
pkttrace, even after SIGKILL.  The same socket listens to NFNLGRP_NFTRACE.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field


NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTRACE = 9
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x400, 0x800
NLA_F_NESTED = 0x8000

NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_TRACE = 0, 3, 6, 17
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
NFT_TABLE_F_OWNER = 0x2

# attributes
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTA_TRACE_TABLE, NFTA_TRACE_CHAIN, NFTA_TRACE_RULE_HANDLE, NFTA_TRACE_TYPE, NFTA_TRACE_VERDICT, \
    NFTA_TRACE_ID, NFTA_TRACE_LL_HEADER, NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_TRANSPORT_HEADER, \
    NFTA_TRACE_IIF, NFTA_TRACE_IIFTYPE, NFTA_TRACE_OIF, NFTA_TRACE_OIFTYPE, NFTA_TRACE_MARK, \
    NFTA_TRACE_NFPROTO, NFTA_TRACE_POLICY = range(1, 17)
TRACE_POLICY, TRACE_RETURN, TRACE_RULE = 1, 2, 3

# expressions
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_CMP_EQ = 0
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_META_MARK, NFT_META_IIFNAME, NFT_META_OIFNAME, NFT_META_NFTRACE, NFT_META_NFPROTO, NFT_META_L4PROTO = \
    3, 6, 7, 12, 15, 16
NFT_LIMIT_PKTS, NFT_LIMIT_F_INV = 0, 1
NF_DROP, NF_ACCEPT, NF_STOLEN, NF_QUEUE, NF_REPEAT = 0, 1, 2, 3, 4
NFT_CONTINUE, NFT_BREAK, NFT_JUMP, NFT_GOTO, NFT_RETURN = -1, -2, -3, -4, -5
VERDICTS = {NF_DROP: "drop", NF_ACCEPT: "accept", NF_STOLEN: "stolen", NF_QUEUE: "queue", NF_REPEAT: "repeat",
            NFT_CONTINUE: "continue", NFT_BREAK: "break", NFT_JUMP: "jump", NFT_GOTO: "goto",
            NFT_RETURN: "return"}
HOOK_NUMBERS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
TABLE_PREFIX = "pkttrace_"     # --rules tables: pkttrace_<pid>, owned by its socket
PRIO_LOWEST = -(2**31)         # nft accepts INT_MIN for a filter chain: nothing runs before it

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")


class NftError(Exception):
    """nf_tables refused or is missing; the message says which feature and why."""


# ---- packing ----

def nla(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return struct.pack("=HH", n, atype) + payload + b"\0" * (-n % 4)


def nest(atype: int, *attrs: bytes) -> bytes:
    return nla(atype | NLA_F_NESTED, b"".join(attrs))


def be32(v: int) -> bytes:
    return struct.pack(">i" if v < 0 else ">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def strz(s: str) -> bytes:
    return s.encode() + b"\0"


def message(mtype: int, flags: int, seq: int, family: int, payload: bytes = b"", res_id: int = 0,
            subsys: int = NFNL_SUBSYS_NFTABLES) -> bytes:
    """nlmsghdr + nfgenmsg + attributes (batch markers have no subsystem in the type)."""
    full = mtype if mtype in (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END) else subsys << 8 | mtype
    body = _NFGENMSG.pack(family, 0, socket.htons(res_id)) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), full, flags, seq, 0) + body


def expr(name: str, *attrs: bytes) -> bytes:
    return nest(NFTA_LIST_ELEM, nla(NFTA_EXPR_NAME, strz(name)), nest(NFTA_EXPR_DATA, *attrs))


def payload(base: int, offset: int, length: int, dreg: int = NFT_REG_1) -> bytes:
    return expr("payload", nla(1, be32(dreg)), nla(2, be32(base)), nla(3, be32(offset)), nla(4, be32(length)))


def meta(key: int, dreg: int = NFT_REG_1) -> bytes:
    return expr("meta", nla(2, be32(key)), nla(1, be32(dreg)))


def meta_set(key: int, sreg: int = NFT_REG_1) -> bytes:
    return expr("meta", nla(2, be32(key)), nla(3, be32(sreg)))


def cmp_eq(data: bytes, sreg: int = NFT_REG_1) -> bytes:
    return expr("cmp", nla(1, be32(sreg)), nla(2, be32(NFT_CMP_EQ)), nest(3, nla(NFTA_DATA_VALUE, data)))


def bitwise(mask: bytes, reg: int = NFT_REG_1) -> bytes:
    """reg = reg & mask (xor 0)."""
    return expr("bitwise", nla(1, be32(reg)), nla(2, be32(reg)), nla(3, be32(len(mask))),
                nest(4, nla(NFTA_DATA_VALUE, mask)), nest(5, nla(NFTA_DATA_VALUE, b"\0" * len(mask))))


def immediate(value: bytes, dreg: int = NFT_REG_1) -> bytes:
    return expr("immediate", nla(1, be32(dreg)), nest(2, nla(NFTA_DATA_VALUE, value)))


def verdict(code: int, chain: str | None = None) -> bytes:
    v = [nla(NFTA_VERDICT_CODE, be32(code))]
    if chain is not None:
        v.append(nla(NFTA_VERDICT_CHAIN, strz(chain)))
    return expr("immediate", nla(1, be32(NFT_REG_VERDICT)), nest(2, nest(NFTA_DATA_VERDICT, *v)))


def limit(rate: int, burst: int, over: bool = False, unit_s: int = 1) -> bytes:
    """`limit rate [over] RATE/second burst BURST packets`."""
    return expr("limit", nla(1, be64(rate)), nla(2, be64(unit_s)), nla(3, be32(burst)),
                nla(4, be32(NFT_LIMIT_PKTS)), nla(5, be32(NFT_LIMIT_F_INV if over else 0)))


def counter() -> bytes:
    return expr("counter", nla(1, be64(0)), nla(2, be64(0)))


def new_table(seq: int, family: int, name: str, flags: int = NFT_TABLE_F_OWNER) -> bytes:
    return message(NFT_MSG_NEWTABLE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, seq, family,
                   nla(NFTA_TABLE_NAME, strz(name)) + nla(NFTA_TABLE_FLAGS, be32(flags)))


def new_chain(seq: int, family: int, table: str, name: str, hook: int | None = None,
              priority: int = PRIO_LOWEST) -> bytes:
    """A base chain (type filter, policy accept) at hook, or a regular chain."""
    attrs = nla(NFTA_CHAIN_TABLE, strz(table)) + nla(NFTA_CHAIN_NAME, strz(name))
    if hook is not None:
        attrs += nest(NFTA_CHAIN_HOOK, nla(NFTA_HOOK_HOOKNUM, be32(hook)), nla(NFTA_HOOK_PRIORITY, be32(priority)))
        attrs += nla(NFTA_CHAIN_POLICY, be32(NF_ACCEPT)) + nla(NFTA_CHAIN_TYPE, strz("filter"))
    return message(NFT_MSG_NEWCHAIN, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, seq, family, attrs)


def new_rule(seq: int, family: int, table: str, chain: str, exprs: list[bytes]) -> bytes:
    return message(NFT_MSG_NEWRULE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK, seq, family,
                   nla(NFTA_RULE_TABLE, strz(table)) + nla(NFTA_RULE_CHAIN, strz(chain))
                   + nest(NFTA_RULE_EXPRESSIONS, *exprs))


def batch(msgs: list[bytes], seq: int) -> bytes:
    """The messages between BATCH_BEGIN and BATCH_END: one transaction."""
    return (message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, res_id=NFNL_SUBSYS_NFTABLES)
            + b"".join(msgs)
            + message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(msgs) + 1, 0, res_id=NFNL_SUBSYS_NFTABLES))


# ---- parsing ----

def attrs(buf: bytes, off: int = 0, end: int | None = None) -> dict[int, bytes]:
    """Attribute type (flags off) -> payload."""
    out: dict[int, bytes] = {}
    end = len(buf) if end is None else end
    while off + 4 <= end:
        n, t = struct.unpack_from("=HH", buf, off)
        if n < 4:
            break
        out[t & 0x3FFF] = bytes(buf[off + 4:off + n])
        off += (n + 3) & ~3
    return out


def messages(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, body after nlmsghdr) of each message in a datagram."""
    out, off = [], 0
    while off + _NLMSGHDR.size <= len(buf):
        n, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if n < _NLMSGHDR.size:
            break
        out.append((mtype, seq, bytes(buf[off + _NLMSGHDR.size:off + n])))
        off += (n + 3) & ~3
    return out


@dataclass
class TraceEvent:
    """One NFT_MSG_TRACE: what a rule, a chain's end or its policy did to a traced packet."""
    id: int
    family: int                        # the table's family (nfgenmsg)
    table: str
    chain: str
    type: int                          # TRACE_RULE | TRACE_RETURN | TRACE_POLICY
    handle: int | None = None
    verdict: int | None = None
    target: str | None = None          # jump/goto: the chain
    nfproto: int | None = None         # the packet's family
    network: bytes | None = None       # the headers, in the first event of each base chain run
    transport: bytes | None = None
    iif: int | None = None
    oif: int | None = None
    mark: int | None = None
    policy: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def verdict_text(self) -> str:
        """`accept`, `drop`, `continue`, `jump <chain>`, `goto <chain>`, `return`."""
        if self.type == TRACE_POLICY and self.policy is not None:
            return VERDICTS.get(self.policy, str(self.policy))
        if self.type == TRACE_RETURN:
            return "return"
        if self.verdict is None:
            return "continue"
        word = VERDICTS.get(self.verdict, str(self.verdict & 0xFFFF))
        return f"{word} {self.target}" if self.target else word


def _u32(b: bytes | None) -> int | None:
    return struct.unpack(">I", b[:4])[0] if b is not None and len(b) >= 4 else None


def _str(b: bytes | None) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace") if b is not None else ""


def decode_trace(body: bytes) -> TraceEvent:
    """An NFT_MSG_TRACE body (nfgenmsg + attributes)."""
    family = body[0]
    a = attrs(body, _NFGENMSG.size)
    ev = TraceEvent(id=_u32(a.get(NFTA_TRACE_ID)) or 0, family=family, table=_str(a.get(NFTA_TRACE_TABLE)),
                    chain=_str(a.get(NFTA_TRACE_CHAIN)), type=_u32(a.get(NFTA_TRACE_TYPE)) or 0)
    h = a.get(NFTA_TRACE_RULE_HANDLE)
    ev.handle = struct.unpack(">Q", h[:8])[0] if h is not None and len(h) >= 8 else None
    if NFTA_TRACE_VERDICT in a:
        v = attrs(a[NFTA_TRACE_VERDICT])
        code = v.get(NFTA_VERDICT_CODE)
        if code is not None:
            ev.verdict = struct.unpack(">i", code[:4])[0]
        if NFTA_VERDICT_CHAIN in v:
            ev.target = _str(v[NFTA_VERDICT_CHAIN])
    ev.nfproto = _u32(a.get(NFTA_TRACE_NFPROTO))
    ev.network, ev.transport = a.get(NFTA_TRACE_NETWORK_HEADER), a.get(NFTA_TRACE_TRANSPORT_HEADER)
    ev.iif, ev.oif, ev.mark = _u32(a.get(NFTA_TRACE_IIF)), _u32(a.get(NFTA_TRACE_OIF)), _u32(a.get(NFTA_TRACE_MARK))
    ev.policy = _u32(a.get(NFTA_TRACE_POLICY))
    return ev


# ---- the socket ----

def open_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in the calling thread's netns (it stays there)."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)


class Socket:
    """A NETLINK_NETFILTER socket (open_socket(), made inside the netns it
    serves, bound to it for life): commits batches, and receives trace
    events once subscribed."""

    def __init__(self, sock: socket.socket, rcvbuf: int = 8 << 20):
        self.sock = sock
        try:
            self.sock.bind((0, 0))
            try:   # beyond rmem_max (root): bursts of trace events must not overrun it
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)        # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        except BaseException:
            self.sock.close()
            raise
        self.seq = 1
        self.overruns = 0              # ENOBUFS: trace events the kernel could not queue to us
        self.drained = False           # the last events() emptied the queue (not stopped by its budget)

    def commit(self, build) -> None:
        """Send one batch (build(seq) -> messages) and wait for every ack."""
        msgs = build(self.seq + 1)
        data = batch(msgs, self.seq)
        first, last = self.seq + 1, self.seq + len(msgs)
        self.seq += len(msgs) + 2
        self.sock.settimeout(5.0)
        try:
            self.sock.send(data)
            acked: set[int] = set()
            while len(acked) < len(msgs):
                for mtype, seq, body in messages(self.sock.recv(1 << 16)):
                    if mtype != NLMSG_ERROR or not first <= seq <= last:
                        continue
                    err = -struct.unpack_from("=i", body)[0]
                    if err:
                        raise OSError(err, os.strerror(err))
                    acked.add(seq)
        finally:
            self.sock.settimeout(None)

    def subscribe(self) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTRACE)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def events(self, budget: int = 4096) -> list[TraceEvent]:
        """The trace events queued now (at most budget datagrams)."""
        out: list[TraceEvent] = []
        self.drained = False
        for _ in range(budget):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                self.drained = True
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:   # events were lost: counted, and reading goes on
                    self.overruns += 1
                    continue
                raise
            for mtype, _seq, body in messages(data):
                if mtype == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_TRACE:
                    out.append(decode_trace(body))
        return out

    def close(self) -> None:
        self.sock.close()
