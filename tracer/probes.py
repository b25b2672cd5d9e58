"""Attach mechanisms, behind one small interface.

Each attachment is an object with `describe()` and `close()`.  Tracepoints
and netfilter/TCX links are fd-owned: the kernel detaches them when the last
fd closes, so even a SIGKILLed pkttrace leaves nothing behind.  Classic
cls_bpf (kernels before 6.6, no TCX) is netlink state: we remove it on exit
and remove stale filters of ours when starting.

An older kernel will need kprobe/fentry attachments: they belong here, as
further classes with the same two methods.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from . import libbpf, netns
from .placement import HOOKS as HOOK_NAMES
from .placement import PRIO_FIRST, PRIO_LAST  # noqa: F401  (re-exported)

NFPROTO = {4: 2, 6: 10}

# name and priority of our classic tc filters, to find stale ones
CLS_NAME = "pkttrace"
CLS_PRIO = 1


class AttachError(Exception):
    """An attach point could not be used; the message names it."""


class Attachment:
    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class TracepointAttachment(Attachment):
    prog: str
    link: libbpf.Link

    def describe(self) -> str:
        return f"tracepoint {self.prog}"

    def close(self) -> None:
        self.link.close()


@dataclass
class FdLink(Attachment):
    """A bpf link held by its fd: netfilter or TCX."""
    kind: str
    what: str
    fd: int
    netns: str | None = None
    priority: int | None = None

    def describe(self) -> str:
        where = f" netns {self.netns}" if self.netns else ""
        return f"{self.kind} {self.what}{where}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def attach_tracepoint(obj: libbpf.BpfObject, prog: str) -> TracepointAttachment:
    try:
        return TracepointAttachment(prog, obj.program(prog).attach())
    except libbpf.BpfError as e:
        raise AttachError(f"tracepoint for {prog}: {e}") from None


def attach_netfilter(prog_fd: int, family: int, hook: int, priority: int,
                     ns: str | None, max_tries: int = 16) -> FdLink:
    """A netfilter link at `priority`, moving up from it on EBUSY.

    The kernel refuses a priority already used by a registered hook
    (an iptables table, an nft base chain).  Observers are placed right
    after tables, so moving up keeps them after the table they follow;
    only at the top of the range do we move down.
    """
    step = 1 if priority < PRIO_LAST - max_tries else -1
    last = None
    with netns.entered(ns):
        for i in range(max_tries):
            p = priority + i * step
            try:
                fd = libbpf.link_netfilter(prog_fd, NFPROTO[family], hook, p)
            except OSError as e:
                last = e
                if e.errno == errno.EBUSY:
                    continue
                break
            return FdLink("netfilter", f"ipv{family} {HOOK_NAMES[hook]} prio {p}", fd, ns, p)
    hint = " (netfilter BPF links need Linux 6.4+)" if last and last.errno in (errno.EINVAL, errno.EOPNOTSUPP) else ""
    raise AttachError(f"netfilter link ipv{family} {HOOK_NAMES[hook]} prio {priority}: "
                      f"{os.strerror(last.errno)}{hint}")


def attach_tcx(prog_fd: int, ifindex: int, ifname: str, ingress: bool, ns: str | None) -> FdLink:
    """A TCX link that runs first (BPF_F_BEFORE) and returns TCX_NEXT."""
    at = libbpf.BPF_TCX_INGRESS if ingress else libbpf.BPF_TCX_EGRESS
    with netns.entered(ns):
        try:
            fd = libbpf.link_tcx(prog_fd, ifindex, at, libbpf.BPF_F_BEFORE)
        except OSError as e:
            raise AttachError(f"tcx {'ingress' if ingress else 'egress'} on {ifname}: {os.strerror(e.errno)}") from None
    return FdLink("tcx", f"{'ingress' if ingress else 'egress'} {ifname}", fd, ns)


@dataclass
class ClassicTcAttachment(Attachment):
    """clsact + cls_bpf direct-action filter, for kernels without TCX."""
    ns: str | None
    ifindex: int
    ifname: str
    ingress: bool
    added_qdisc: bool = False
    closed: bool = field(default=False, repr=False)

    def describe(self) -> str:
        return f"cls_bpf {'ingress' if self.ingress else 'egress'} {self.ifname}"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            remove_classic_filter(self.ns, self.ifindex, self.ingress)
            if self.added_qdisc:
                _drop_clsact_if_empty(self.ns, self.ifindex)
        except AttachError:
            pass   # the netns is gone, and our filter with it

    def forget(self) -> None:
        """Its netns is gone: nothing to remove, and the name may already
        stand for another namespace, whose filters are not ours."""
        self.closed = True


def _tc_parent(ingress: bool) -> int:
    # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS/EGRESS)
    return 0xFFFFFFF2 if ingress else 0xFFFFFFF3


def _ipr(ns: str | None):
    """rtnetlink in the existing netns ns (never pyroute2's NetNS, which
    creates a missing namespace)."""
    try:
        return netns.ipr(ns)
    except netns.NetnsError as e:
        raise AttachError(str(e)) from None


def attach_classic_tc(prog_fd: int, ifindex: int, ifname: str, ingress: bool,
                      ns: str | None, adopt_qdisc: bool = False) -> ClassicTcAttachment:
    """Add our filter (and clsact if missing).

    adopt_qdisc: a killed pkttrace left a filter of ours here, so the clsact
    it sits on is ours too: remove it on exit if it is empty then.
    """
    from pyroute2.netlink.exceptions import NetlinkError
    with _ipr(ns) as ipr:
        added = False
        try:
            ipr.tc("add", "clsact", ifindex)
            added = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AttachError(f"clsact qdisc on {ifname}: {e}") from None
        try:
            ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog_fd, name=CLS_NAME,
                   parent=_tc_parent(ingress), prio=CLS_PRIO, protocol=0x0003, direct_action=True)
        except NetlinkError as e:
            raise AttachError(f"cls_bpf on {ifname}: {e}") from None
    return ClassicTcAttachment(ns, ifindex, ifname, ingress, added or adopt_qdisc)


def remove_classic_filter(ns: str | None, ifindex: int, ingress: bool) -> bool:
    """Remove our cls_bpf filter (by name and priority) if present."""
    from pyroute2.netlink.exceptions import NetlinkError
    with _ipr(ns) as ipr:
        try:
            filters = ipr.get_filters(ifindex, parent=_tc_parent(ingress))
        except NetlinkError:
            return False
        for f in filters:
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if f.get_attr("TCA_KIND") == "bpf" and name and name.startswith(CLS_NAME):
                try:
                    ipr.tc("del-filter", "bpf", ifindex, parent=_tc_parent(ingress), prio=CLS_PRIO,
                           protocol=0x0003)
                except NetlinkError:
                    pass
                return True
    return False


def _drop_clsact_if_empty(ns: str | None, ifindex: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    with _ipr(ns) as ipr:
        try:
            if ipr.get_filters(ifindex, parent=_tc_parent(True)) or \
                    ipr.get_filters(ifindex, parent=_tc_parent(False)):
                return
            ipr.tc("del", "clsact", ifindex)
        except NetlinkError:
            pass
