"""Small helpers for network namespaces: named ones (the ones `ip netns`
manages), and unnamed ones held only by processes (containers), which
pkttrace names ``ns:<inode>`` and enters through a process that holds them.

Switching namespaces is done with libc ``setns(2)`` through ctypes, because
Python 3.11 has no ``os.setns``.  ``setns(CLONE_NEWNET)`` only moves the
*calling thread*, so :func:`entered` is safe to use from any thread as long
as the code inside the ``with`` block stays on that thread.  Sockets created
inside the block keep their namespace after the thread switches back, which
is what the lab and the tracer rely on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from typing import Iterator

NETNS_DIR = "/run/netns"
SELF_NETNS = "/proc/self/ns/net"
CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


class NetnsError(Exception):
    """A one-line, human readable network namespace problem."""


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


UNNAMED = "ns:"          # an unnamed netns: "ns:<inode>"


def _check_name(name: str) -> None:
    # Refuse anything that could escape NETNS_DIR before touching the disk.
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\0" in name:
        raise NetnsError(f"invalid network namespace name {name!r}")


def unnamed(ino: int) -> str:
    """The name pkttrace gives a namespace no name in /run/netns stands for."""
    return f"{UNNAMED}{ino}"


def _unnamed_inode(name: str) -> int | None:
    if name.startswith(UNNAMED) and name[len(UNNAMED):].isascii() and name[len(UNNAMED):].isdigit():
        return int(name[len(UNNAMED):])
    return None


# inode -> pid of a process last seen in that netns
_holders: dict[int, int] = {}


def processes() -> dict[int, int]:
    """Every network namespace some process is in: inode -> a pid in it.
    One readlink(2) per process; processes that exit meanwhile are skipped."""
    out: dict[int, int] = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")      # "net:[4026532178]"
        except OSError:
            continue
        if link.startswith("net:[") and link.endswith("]"):
            out.setdefault(int(link[5:-1]), int(pid))
    _holders.clear()
    _holders.update(out)
    return out


def _holder_path(ino: int) -> str | None:
    """/proc/<pid>/ns/net of a process in netns ino (found again if the one
    known exited), or None when no process is in it any more."""
    for attempt in range(2):
        pid = _holders.get(ino)
        if pid is not None:
            p = f"/proc/{pid}/ns/net"
            try:
                if os.stat(p).st_ino == ino:
                    return p
            except OSError:
                pass
        if attempt == 0:
            processes()
    return None


def path(name: str) -> str:
    """Path of the bind mount that keeps named netns *name* alive (for an
    unnamed one: the namespace file of a process in it)."""
    _check_name(name)
    ino = _unnamed_inode(name)
    if ino is not None:
        p = _holder_path(ino)
        if p is None:
            raise _unknown(name)
        return p
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    try:
        return os.path.exists(path(name))
    except NetnsError:
        return False


def _unknown(name: str | None) -> NetnsError:
    if name is None:                      # /proc/self/ns/net: no /proc?
        return NetnsError(f"cannot find the current network namespace ({SELF_NETNS})")
    if _unnamed_inode(name) is not None:
        return NetnsError(f"network namespace {name!r}: no process is in it any more")
    return NetnsError(f"unknown network namespace {name!r} (see `ip netns list`)")


def everything() -> dict[int, str | None]:
    """Every network namespace of the host: inode -> None for the current
    one, its name for a named one, ``ns:<inode>`` for one only processes
    hold.  A name wins over a process: a container's netns that `ip netns`
    also names is known by that name."""
    out: dict[int, str | None] = {inode(None): None}
    for name in names():
        ino = current_inode(name)
        if ino is not None:
            out.setdefault(ino, name)
    for ino in processes():
        out.setdefault(ino, unnamed(ino))
    return out


def names() -> list[str]:
    """The named network namespaces (`ip netns list`), sorted; a file in
    NETNS_DIR with no namespace mounted on it is not one.  Nothing is
    opened: one stat(2) per name."""
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if current_inode(n) is not None)


_nsfs_dev: int | None = None


def _nsfs() -> int:
    """st_dev of nsfs, where every namespace file lives (one superblock)."""
    global _nsfs_dev
    if _nsfs_dev is None:
        _nsfs_dev = os.stat(SELF_NETNS).st_dev
    return _nsfs_dev


def inode(name: str | None) -> int:
    """Inode number identifying the netns (what BPF sees as net->ns.inum).

    A file left in /run/netns without a namespace mounted on it (an
    interrupted `ip netns add`, or one half way through `ip netns del`)
    is not a namespace: unknown, like a missing one."""
    target = SELF_NETNS if name is None else path(name)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise _unknown(name) from None
    except ProcessLookupError:
        raise _unknown(name) from None
    except OSError as e:
        raise NetnsError(f"cannot stat {target}: {e.strerror}") from None
    if st.st_dev != _nsfs():
        raise _unknown(name)
    return st.st_ino


def current_inode(name: str) -> int | None:
    """The inode *name* names now, or None if it names no netns (deleted).

    Never opens, never creates: one stat(2), cheap enough to poll."""
    try:
        return inode(name)
    except NetnsError:
        return None


def _setns(fd: int, what: str) -> None:
    if _get_libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns into {what} failed: {os.strerror(err)}")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block with the calling thread inside netns *name*.

    ``None`` means "stay where you are", so callers can pass an optional
    namespace straight through.  Only an existing namespace is entered:
    its file is opened read-only, never created (pyroute2's own netns
    helpers default to O_CREAT and would re-create a deleted one).
    """
    if name is None:
        yield
        return
    target = path(name)
    # Open both fds before switching so a failure leaves us untouched.
    orig = os.open(SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _unknown(name) from None
        except OSError as e:
            raise NetnsError(f"cannot open {target}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            want = _unnamed_inode(name)
            if st.st_dev != _nsfs() or (want is not None and st.st_ino != want):
                # a plain file: no namespace mounted there; or the process
                # we went through exited and its pid is another's now
                raise _unknown(name)
            _setns(fd, f"network namespace {name!r}")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(orig, "the original network namespace")
    finally:
        os.close(orig)


def _ipr():
    # Imported lazily so modules that only need inode()/entered() do not pay
    # for (or require) pyroute2.
    from pyroute2 import IPRoute

    return IPRoute()


def ipr(ns: str | None):
    """An rtnetlink socket (pyroute2 IPRoute) in the existing netns *ns*.

    The socket is created inside entered(), so it stays in that namespace;
    pyroute2's NetNS / IPRoute(netns=...) are never used: they open the
    namespace with O_CREAT by default (re-creating a deleted one, in 0.7
    and 0.9 alike) and fork a helper process per socket."""
    with entered(ns):
        return _ipr()


# link kinds (IFLA_INFO_KIND) that are tunnels: an outer packet's payload
# leaves or arrives by one of these
TUNNEL_KINDS = frozenset({"vxlan", "geneve", "gre", "gretap", "ip6gre", "ip6gretap", "erspan", "ip6erspan",
                          "ipip", "sit", "ip6tnl", "wireguard", "vti", "vti6", "xfrm", "bareudp"})


# UDP ports tunnels listen on by default: VXLAN (IANA, and Linux's default),
# GENEVE, ESP in UDP (NAT-T), WireGuard
TUNNEL_UDP_PORTS = (4789, 8472, 6081, 4500, 51820)


def links(ns: str | None) -> dict[int, str]:
    """ifindex -> ifname for every link in netns *ns* (None = current)."""
    return links_and_tunnels(ns)[0]


def links_and_tunnels(ns: str | None) -> tuple[dict[int, str], dict[int, str]]:
    """(ifindex -> ifname of every link, ifindex -> kind of the tunnel
    devices) in netns *ns* (None = current), from one dump."""
    names, tunnels = {}, {}
    # The netlink socket is bound to the netns it was created in, so it is
    # enough to create it inside entered() and use it afterwards.
    with ipr(ns) as sock:
        for msg in sock.get_links():
            # get_attr: pyroute2 0.7's get("IFLA_IFNAME") returns None
            names[msg["index"]] = msg.get_attr("IFLA_IFNAME")
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            if kind in TUNNEL_KINDS:
                tunnels[msg["index"]] = kind
    return names, tunnels


def ifindex(name_ns: str | None, ifname: str) -> int:
    """ifindex of *ifname* inside netns *name_ns* (None = current)."""
    with ipr(name_ns) as sock:
        found = sock.link_lookup(ifname=ifname)
    if not found:
        where = "the current network namespace" if name_ns is None else f"network namespace {name_ns!r}"
        raise NetnsError(f"no interface {ifname!r} in {where}")
    return found[0]
