"""Attach mechanisms, behind one small interface.

Each attachment is an object with `describe()` and `close()`.  Tracepoints
and netfilter/TCX links are fd-owned: the kernel detaches them when the last
fd closes, so even a SIGKILLed pkttrace leaves nothing behind.  Classic
cls_bpf (kernels before 6.6, no TCX) is netlink state shared with other
tools: each session adds its own filters at a free priority and removes
only those; what a killed session left is removed by the next start and by
`pkttrace cleanup` (clean_dead_sessions), and nothing else is.

An older kernel will need kprobe/fentry attachments: they belong here, as
further classes with the same two methods.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import struct
from dataclasses import dataclass, field

from . import libbpf, netns
from .placement import HOOKS as HOOK_NAMES
from .placement import PRIO_FIRST, PRIO_LAST  # noqa: F401  (re-exported)

NFPROTO = {4: 2, 6: 10}


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
    last: OSError | None = None
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
    why = last.strerror if last is not None else "no priority tried"    # max_tries < 1
    raise AttachError(f"netfilter link ipv{family} {HOOK_NAMES[hook]} prio {priority}: {why}{hint}")


def attach_tcx(prog_fd: int, ifindex: int, ifname: str, ingress: bool, ns: str | None) -> FdLink:
    """A TCX link that runs first (BPF_F_BEFORE) and returns TCX_NEXT."""
    at = libbpf.BPF_TCX_INGRESS if ingress else libbpf.BPF_TCX_EGRESS
    with netns.entered(ns):
        try:
            fd = libbpf.link_tcx(prog_fd, ifindex, at, libbpf.BPF_F_BEFORE)
        except OSError as e:
            raise AttachError(f"tcx {'ingress' if ingress else 'egress'} on {ifname}: {e.strerror}") from None
    return FdLink("tcx", f"{'ingress' if ingress else 'egress'} {ifname}", fd, ns)


# ---- classic tc: clsact + cls_bpf, netlink state shared with other tools ----
#
# Before pkttrace deletes a filter it checks three things:
#   1. the filter's name (TCA_BPF_NAME, chosen by whoever adds the filter):
#      "pkttrace/<pid>" or "pkttrace/<pid>/clsact" ("pkttrace" alone: versions
#      before this one), kind bpf, chain 0;
#   2. the name of the program it runs (TCA_BPF_ID, then the kernel's
#      bpf_prog_info): tc_ingress or tc_egress;
#   3. who added it: a session removes only the filter it added (same
#      priority, handle and program id), and a clean-up only the filters of
#      dead sessions.
#
# A session counts as dead when no process holds its program.  A running
# pkttrace keeps an fd of every program it loaded until it has removed its
# filters, so if no process has an fd of a filter's program (no `prog_id:` line
# in any /proc/*/fdinfo), the session that added it is gone.  We do not use
# the pid in the name for this: pids are recycled, so a dead session's filter
# could look alive for as long as an unrelated process has its old pid, and a
# pid means nothing in another pid namespace.  A program id is global and is
# not reused while the program exists, and the filter keeps the program in
# existence.  Every error leaves the filter in place: if someone else holds
# the program (bpftool reading it at that moment), the filter counts as alive
# and the next clean-up removes it.  Limit: processes that our /proc does not
# show (another pid namespace) are not seen, so run the clean-up from the
# host's pid namespace. The pid in the name is only there for people who
# read `tc filter show`.
#
# The "/clsact" suffix means the clsact qdisc was created by a pkttrace (this
# session, or a live one it joined). Only then may pkttrace remove the qdisc,
# and only when no filter at all is left on it.

CLS_NAME = "pkttrace"          # every filter name of ours starts with it
CLS_QDISC_MARK = "clsact"      # ... and ends with it when a pkttrace created the clsact
TC_PROGRAMS = ("tc_ingress", "tc_egress")
ETH_P_ALL = 0x0003
_ADD_TRIES = 4                 # a priority or handle taken between our dump and our add

# rtnetlink numbers (include/uapi/linux/rtnetlink.h, pkt_cls.h)
_NLMSG_HDR, _TCMSG_LEN = 16, 20
_TCA_KIND, _TCA_OPTIONS, _TCA_CHAIN = 1, 2, 11
_TCA_BPF_NAME, _TCA_BPF_ID = 7, 11


def _tc_parent(ingress: bool) -> int:
    # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS/EGRESS)
    return 0xFFFFFFF2 if ingress else 0xFFFFFFF3


def _direction(ingress: bool) -> str:
    return "ingress" if ingress else "egress"


def _nlas(buf, pos: int, end: int):
    """(type, payload) of each netlink attribute in buf[pos:end]."""
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", buf, pos)
        if length < 4 or pos + length > end:
            return
        yield kind & 0x3FFF, bytes(buf[pos + 4:pos + length])
        pos += (length + 3) & ~3


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True)
class TcFilter:
    """One entry of a tc filter dump.

    Read from the raw message: pyroute2 (0.7 and 0.9) does not decode
    TCA_BPF_ID, the program id this check needs."""
    ifindex: int
    ingress: bool
    pref: int
    protocol: int        # host order
    handle: int          # 0: the entry for the priority itself, not a filter
    chain: int = 0
    kind: str = ""
    name: str = ""
    prog_id: int = 0

    @classmethod
    def parse(cls, msg) -> "TcFilter":
        buf, off = msg.data, msg.offset
        end = off + msg["header"]["length"]
        ifindex, handle, parent, info = struct.unpack_from("=iIII", buf, off + _NLMSG_HDR + 4)
        kind = name = ""
        chain = prog_id = 0
        for t, v in _nlas(buf, off + _NLMSG_HDR + _TCMSG_LEN, end):
            if t == _TCA_KIND:
                kind = _cstr(v)
            elif t == _TCA_CHAIN and len(v) >= 4:
                chain = struct.unpack_from("=I", v)[0]
            elif t == _TCA_OPTIONS:
                for t2, v2 in _nlas(v, 0, len(v)):
                    if t2 == _TCA_BPF_NAME:
                        name = _cstr(v2)
                    elif t2 == _TCA_BPF_ID and len(v2) >= 4:
                        prog_id = struct.unpack_from("=I", v2)[0]
        return cls(ifindex, parent == _tc_parent(True), info >> 16, socket.ntohs(info & 0xFFFF), handle, chain,
                   kind, name, prog_id)

    @property
    def named_ours(self) -> bool:
        """Named like a filter of pkttrace (check 1; the program is check 2)."""
        return (self.kind == "bpf" and self.handle != 0 and self.chain == 0 and self.prog_id != 0
                and (self.name == CLS_NAME or self.name.startswith(CLS_NAME + "/")))

    @property
    def marks_qdisc(self) -> bool:
        return self.named_ours and self.name.split("/")[2:3] == [CLS_QDISC_MARK]

    @property
    def pid(self) -> int | None:
        part = self.name.split("/")[1:2]
        return int(part[0]) if part and part[0].isascii() and part[0].isdigit() else None

    def describe(self, ifname: str) -> str:
        return f"cls_bpf filter {_direction(self.ingress)} {ifname} pref {self.pref} handle {self.handle:#x}"


def _filters(ipr, ifindex: int, ingress: bool) -> list[TcFilter]:
    """Every filter (and priority entry) on ifindex's clsact ingress or egress,
    in every chain; NetlinkError if the device or the qdisc is gone."""
    return [TcFilter.parse(m) for m in ipr.get_filters(ifindex, parent=_tc_parent(ingress))]


def _lowest_free(used) -> int:
    taken = set(used)
    n = 1
    while n in taken:
        n += 1
    return n


def _add_clsact(ipr, ifindex: int, ifname: str) -> bool:
    """Add clsact if the device has none; whether we added it."""
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        ipr.tc("add", "clsact", ifindex)
        return True
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise AttachError(f"clsact qdisc on {ifname}: {e}") from None
        return False


def _delete_filters(ipr, ifindex: int, ingress: bool, pred) -> list[TcFilter]:
    """Delete the filters of ifindex/direction for which pred() holds, read
    again right before (the kernel has no compare-and-delete for filters).
    Deleting by priority, handle and kind removes that one filter and nothing
    else; returns what was deleted."""
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        here = _filters(ipr, ifindex, ingress)
    except NetlinkError:
        return []    # device or qdisc gone: the filter with it
    done = []
    for f in here:
        if not pred(f):
            continue
        try:
            ipr.tc("del-filter", "bpf", ifindex, f.handle, parent=_tc_parent(ingress), prio=f.pref,
                   protocol=f.protocol)
        except NetlinkError:
            continue  # removed meanwhile
        done.append(f)
    return done


def _drop_clsact_if_empty(ipr, ifindex: int) -> bool:
    """Remove the clsact qdisc if no filter (anyone's, any chain) is left on
    it; whether it was removed.  Deleting with the kind named never removes
    an `ingress` qdisc or anything else."""
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        if _filters(ipr, ifindex, True) or _filters(ipr, ifindex, False):
            return False
        ipr.tc("del", "clsact", ifindex)
        return True
    except NetlinkError:
        return False


@dataclass
class ClassicTcAttachment(Attachment):
    """clsact + a cls_bpf direct-action filter of ours, for kernels without
    TCX: which filter it is (priority, handle, program id) and whether a
    pkttrace created the qdisc."""
    ns: str | None
    ifindex: int
    ifname: str
    ingress: bool
    pref: int = 0
    handle: int = 0
    prog_id: int = 0
    owns_qdisc: bool = False
    closed: bool = field(default=False, repr=False)

    def describe(self) -> str:
        return f"cls_bpf {_direction(self.ingress)} {self.ifname} pref {self.pref}"

    def is_this(self, f: TcFilter) -> bool:
        return f.named_ours and (f.pref, f.handle, f.prog_id) == (self.pref, self.handle, self.prog_id)

    def close(self) -> None:
        """Remove our filter, only ours; then the clsact qdisc if a pkttrace
        created it and no filter at all is left on it."""
        if self.closed:
            return
        self.closed = True
        try:
            with _ipr(self.ns) as ipr:
                _delete_filters(ipr, self.ifindex, self.ingress, self.is_this)
                if self.owns_qdisc:
                    _drop_clsact_if_empty(ipr, self.ifindex)
        except AttachError:
            pass   # the netns is gone, and our filter with it

    def forget(self) -> None:
        """Its netns is gone: nothing to remove, and the name may already
        stand for another namespace, whose filters are not ours."""
        self.closed = True


def _ipr(ns: str | None):
    """rtnetlink in the existing netns ns (never pyroute2's NetNS, which
    creates a missing namespace)."""
    try:
        return netns.ipr(ns)
    except netns.NetnsError as e:
        raise AttachError(str(e)) from None


def attach_classic_tc(prog_fd: int, ifindex: int, ifname: str, ingress: bool,
                      ns: str | None) -> ClassicTcAttachment:
    """Our filter next to whatever is there: the lowest priority and handle no
    filter of this device and direction uses (so it runs first unless another
    tool holds priority 1), and clsact added if the device has none.

    A priority taken between our dump and our add (another pkttrace starting
    at the same time, a qdisc removed meanwhile) costs a new dump and a new
    choice, never someone else's filter: the add is exclusive (NLM_F_EXCL)."""
    from pyroute2.netlink.exceptions import NetlinkError
    where = f"cls_bpf {_direction(ingress)} on {ifname}"
    try:
        prog_id = libbpf.prog_id_name(prog_fd)[0]
    except OSError as e:
        raise AttachError(f"{where}: reading its program's id: {e.strerror}") from None
    last: Exception | None = None
    created = False
    with _ipr(ns) as ipr:
        for _ in range(_ADD_TRIES):
            created = _add_clsact(ipr, ifindex, ifname) or created
            try:
                here = _filters(ipr, ifindex, ingress)
                # a live pkttrace created the qdisc: whichever of us ends last removes it.
                # A session starting at the very instant the creator adds its
                # first filter may miss the mark: then an empty clsact can stay
                # behind, which is better than removing a qdisc another tool made
                owns_qdisc = created or any(f.marks_qdisc for f in here + _filters(ipr, ifindex, not ingress))
            except NetlinkError as e:
                last = e
                continue
            pref, handle = _lowest_free(f.pref for f in here), _lowest_free(f.handle for f in here)
            name = f"{CLS_NAME}/{os.getpid()}" + (f"/{CLS_QDISC_MARK}" if owns_qdisc else "")
            try:
                ipr.tc("add-filter", "bpf", ifindex, handle, fd=prog_fd, name=name, parent=_tc_parent(ingress),
                       prio=pref, protocol=ETH_P_ALL, direct_action=True)
            except NetlinkError as e:
                last = e
                # EEXIST: that handle was just taken; EINVAL: that priority, by a
                # filter of another kind or protocol; ENOENT: the qdisc went away
                if e.code in (errno.EEXIST, errno.EINVAL, errno.ENOENT):
                    continue
                break
            return ClassicTcAttachment(ns, ifindex, ifname, ingress, pref, handle, prog_id, owns_qdisc)
        if created:
            _drop_clsact_if_empty(ipr, ifindex)
    raise AttachError(f"{where}: {last}")


# ---- what killed sessions left ----

class UnknownHolders(AttachError):
    """Some process's fds cannot be read: which programs are held is unknown."""


def fdinfo_prog_id(text: str) -> int | None:
    """The program a bpf-prog or bpf_link fd stands for, from its fdinfo."""
    m = re.search(r"^prog_id:\s*(\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def prog_ids_of(pid: int | str) -> set[int]:
    """Ids of the BPF programs process pid holds an fd of, or of a link to
    (fdinfo of bpf-prog and bpf_link fds).  OSError (PermissionError: another
    user's process) when its fds cannot be listed."""
    fd_dir = f"/proc/{pid}/fd"
    ids: set[int] = set()
    for fd in os.listdir(fd_dir):
        try:
            if not os.readlink(f"{fd_dir}/{fd}").startswith(("anon_inode:bpf-prog", "anon_inode:bpf_link")):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                prog = fdinfo_prog_id(f.read())
        except OSError:
            continue   # closed meanwhile
        if prog is not None:
            ids.add(prog)
    return ids


def held_prog_ids() -> set[int]:
    """Ids of the BPF programs some process holds an fd of, or of a link to.
    Only /proc/<pid>: a task that unshared its fd table is not seen, and
    pkttrace never does that."""
    ids: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ids |= prog_ids_of(pid)
        except PermissionError:
            # another user's process (pkttrace as a dynamic user without
            # CAP_SYS_PTRACE): what it holds is unknown, so no filter may be
            # judged dead
            raise UnknownHolders(f"cannot read /proc/{pid}/fd (another user's process; needs root or "
                                 "CAP_SYS_PTRACE): cannot tell which pkttrace filters are still in use") from None
        except OSError:
            continue   # gone, or a kernel thread
    return ids


@dataclass
class Cleanup:
    """What clean_dead_sessions did in one netns."""
    ns: str | None
    removed: list[str] = field(default_factory=list)   # one line per filter or qdisc removed
    filters: int = 0
    qdiscs: int = 0
    live: int = 0          # filters of running pkttrace sessions, left alone

    @property
    def where(self) -> str:
        return f"netns {self.ns}" if self.ns else "current netns"

    def summary(self) -> str:
        what = f"{self.filters} cls_bpf filter{'s' if self.filters != 1 else ''}"
        if self.qdiscs:
            what += f" and {self.qdiscs} clsact qdisc{'s' if self.qdiscs != 1 else ''}"
        return f"{self.where}: removed {what} left by a killed pkttrace"


def clean_dead_sessions(ns: str | None) -> Cleanup:
    """Remove, in netns ns, the classic tc filters of pkttrace sessions that
    are gone (SIGKILL, a crash, a power cut of the process), and each clsact
    qdisc a pkttrace created once nothing is left on it. Nothing else:
    not another tool's filter, not a running session's filter, not a qdisc a
    pkttrace did not create.  Cheap when there is nothing to do: one qdisc
    dump, and a filter dump per device with a clsact qdisc."""
    from pyroute2.netlink.exceptions import NetlinkError
    out = Cleanup(ns)
    with _ipr(ns) as ipr:
        try:
            devices = sorted({q["index"] for q in ipr.get_qdiscs() if q.get_attr("TCA_KIND") == "clsact"})
        except NetlinkError as e:
            raise AttachError(f"reading the qdiscs of {out.where}: {e}") from None
        found: list[TcFilter] = []
        for idx in devices:
            for ingress in (True, False):
                try:
                    found.extend(f for f in _filters(ipr, idx, ingress) if f.named_ours)
                except NetlinkError:
                    pass   # the device went away meanwhile
        if not found:
            return out
        names = _links(ipr)
        progs = {i: libbpf.prog_name_by_id(i) for i in {f.prog_id for f in found}}
        ours = [f for f in found if progs[f.prog_id] in TC_PROGRAMS]
        held = held_prog_ids()     # after prog_name_by_id closed its fds
        dead = [f for f in ours if f.prog_id not in held]
        out.live = len(ours) - len(dead)
        for idx in sorted({f.ifindex for f in dead}):
            ifname = names.get(idx, f"ifindex {idx}")
            gone = [f for f in dead if f.ifindex == idx]
            for ingress in (True, False):
                keys = {(f.pref, f.handle, f.prog_id) for f in gone if f.ingress == ingress}
                if not keys:
                    continue
                for f in _delete_filters(ipr, idx, ingress,
                                         lambda f: f.named_ours and (f.pref, f.handle, f.prog_id) in keys):
                    pid = f"pid {f.pid}" if f.pid is not None else "an earlier pkttrace"
                    out.filters += 1
                    out.removed.append(f"{out.where}: removed {f.describe(ifname)} "
                                       f"({progs[f.prog_id]}, prog id {f.prog_id}, left by {pid})")
            if any(f.marks_qdisc for f in gone) and _drop_clsact_if_empty(ipr, idx):
                out.qdiscs += 1
                out.removed.append(f"{out.where}: removed clsact qdisc {ifname} (created by a killed pkttrace, "
                                   "now empty)")
    return out


def _links(ipr) -> dict[int, str]:
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        # get_attr: pyroute2 0.7's get("IFLA_IFNAME") returns None
        return {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
    except NetlinkError:
        return {}
