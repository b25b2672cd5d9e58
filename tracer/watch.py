"""What a traced network namespace announces: netlink multicast groups.

One socket per netns and protocol, opened inside the netns (a netlink
socket stays in the namespace it was created in), non-blocking, read
between ring-buffer polls.  Only which kind of thing changed is kept: the
session reads the new state itself, so a lost announcement (ENOBUFS: the
socket's buffer overflowed) counts as "everything changed".
"""
from __future__ import annotations

import errno
import socket
import struct

from . import netns

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
# nftables messages that can change what is registered at a hook (tables,
# base chains) or whether conntrack is (rules: ct expressions, NAT); set
# elements (fail2ban, sshguard) and generation messages cannot
NFT_PLACEMENT_MSGS = frozenset({0, 2, 3, 5, 6, 8, 26, 27, 28})   # NEW/DEL TABLE, CHAIN, RULE; DESTROY *
RTNLGRP_LINK = 1
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_RULE = 19
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWRULE, RTM_DELRULE = 32, 33

NFT, RULES, LINKS = "nft", "rules", "links"
EVERYTHING = frozenset({NFT, RULES, LINKS})
_NLMSGHDR = struct.Struct("=IHHII")


def _socket(proto: int, groups: tuple[int, ...]) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        for g in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
    except OSError:
        sock.close()
        raise
    return sock


_IFINFOMSG = struct.Struct("=BxHiII")    # family, type, index, flags, change


def _kinds(data: bytes, proto: int, deleted: set[int]) -> set[str]:
    """What the netlink messages in one datagram announce (the ifindex of
    each deleted device is added to `deleted`)."""
    out: set[str] = set()
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype = _NLMSGHDR.unpack_from(data, off)[:2]
        if length < _NLMSGHDR.size:
            break
        if proto == NETLINK_NETFILTER:
            if mtype >> 8 == NFNL_SUBSYS_NFTABLES and mtype & 0xFF in NFT_PLACEMENT_MSGS:
                out.add(NFT)
        elif mtype in (RTM_NEWLINK, RTM_DELLINK):
            out.add(LINKS)
            if mtype == RTM_DELLINK and off + _NLMSGHDR.size + _IFINFOMSG.size <= len(data):
                deleted.add(_IFINFOMSG.unpack_from(data, off + _NLMSGHDR.size)[2])
        elif mtype in (RTM_NEWRULE, RTM_DELRULE):
            out.add(RULES)
        off += (length + 3) & ~3
    return out


NFT_MSG_GETGEN, NFT_MSG_NEWGEN = 16, 15
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2


def nft_generation(ns: str | None) -> int:
    """nftables' generation in netns ns (what each commit bumps, and what
    the BPF observers compare with); 0 where nf_tables is not loaded (the
    kernel's counter is 0 there too)."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        # nlmsghdr + nfgenmsg (family, version, res_id)
        req = _NLMSGHDR.pack(_NLMSGHDR.size + 4, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0)
        sock.send(req + b"\0\0\0\0")
        data = sock.recv(65536)
    finally:
        sock.close()
    length, mtype = _NLMSGHDR.unpack_from(data, 0)[:2]
    if mtype == NLMSG_ERROR:
        return 0                      # no nf_tables here
    off = _NLMSGHDR.size + 4
    while off + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        if atype & 0x3FFF == NFTA_GEN_ID and alen >= 8:
            return struct.unpack_from(">I", data, off + 4)[0]
        off += (alen + 3) & ~3
    return 0


class NetnsWatch:
    """nftables, routing-rule and link announcements of one netns."""

    def __init__(self, ns: str | None):
        self.ns = ns
        self._socks: list[tuple[socket.socket, int]] = []
        self._deleted: set[int] = set()       # ifindex of devices deleted since take_deleted()
        try:
            with netns.entered(ns):
                self._socks.append((_socket(NETLINK_NETFILTER, (NFNLGRP_NFTABLES,)), NETLINK_NETFILTER))
                self._socks.append((_socket(socket.NETLINK_ROUTE,
                                            (RTNLGRP_LINK, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE)),
                                    socket.NETLINK_ROUTE))
        except BaseException:
            self.close()
            raise

    def changed(self) -> set[str]:
        """What was announced since the last call (never blocks)."""
        out: set[str] = set()
        for sock, proto in self._socks:
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        out |= EVERYTHING     # announcements were lost: assume anything changed
                        continue
                    raise
                out |= _kinds(data, proto, self._deleted)
        return out

    def take_deleted(self) -> set[int]:
        """The devices deleted since the last call (by ifindex: one deleted
        and created again under the same index between two reads is in it)."""
        out, self._deleted = self._deleted, set()
        return out

    def close(self) -> None:
        for sock, _ in self._socks:
            sock.close()
        self._socks.clear()
