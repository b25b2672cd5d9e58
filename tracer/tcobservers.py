"""The tc observers: the tc_ingress/tc_egress programs on every device of
the traced namespaces, as TCX links (6.6+) or, before that, classic
cls_bpf filters shared politely with other tools (probes.py).  Devices come
and go while tracing: the session tells this which ones are there now."""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

from . import libbpf, netns, probes


def _release(atts: list[probes.Attachment]) -> None:
    """Let go of the attachments of a device (or netns) that went away: the
    kernel took its TCX links and filters with it; a classic filter is
    forgotten (deleting it would find nothing), a link closed."""
    for a in atts:
        if isinstance(a, probes.ClassicTcAttachment):
            a.forget()
        else:
            a.close()


class EarlyTcx:
    """TCX links made while the kernel verifies the programs.

    Each new TCX link waits for an RCU grace period under the RTNL lock
    (~10-14 ms here, one after the other: ~110 ms for the 8 links of a
    router with 4 devices), sleeping, not working.  So a thread makes them
    during the verifier's ~200 ms, running a placeholder that returns
    TCX_NEXT; once tc_ingress/tc_egress are loaded, TcObservers.attach()
    swaps them in (BPF_LINK_UPDATE: in place, microseconds) and compares
    the devices with a fresh dump.  Anything that goes wrong here (no TCX
    before 6.6, a namespace gone) leaves the namespace to the usual attach,
    which says why."""

    def __init__(self, namespaces: list[str | None]):
        # ns -> [(ifindex, ingress, link)], the placeholder still running
        self._links: dict[str | None, list[tuple[int, bool, probes.FdLink]]] = {}
        self._placeholder = -1
        # set when the thread is done with _links: waited for instead of
        # Thread.join, which a Ctrl-C during the wait leaves marking the
        # thread stopped while it runs (CPython 3.11's bpo-45274 handling),
        # so that close() would miss links made after it
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(list(namespaces),), name="pkttrace-tcx", daemon=True).start()

    def _run(self, namespaces: list[str | None]) -> None:
        try:
            self._make(namespaces)
        finally:
            self._done.set()

    def _make(self, namespaces: list[str | None]) -> None:
        try:
            self._placeholder = libbpf.load_tc_next()
        except OSError:
            return
        for ns in namespaces:
            made: list[tuple[int, bool, probes.FdLink]] = []
            try:
                with netns.entered(ns):
                    # glibc's if_nameindex: one netlink dump in this thread's
                    # netns, without pyroute2 (its import is ~100 ms of GIL)
                    devices = sorted(socket.if_nameindex())
                for ifindex, name in devices:
                    for ingress in (True, False):
                        made.append((ifindex, ingress,
                                     probes.attach_tcx(self._placeholder, ifindex, name, ingress, ns)))
            except (probes.AttachError, OSError, netns.NetnsError) as e:
                for _i, _ing, link in made:
                    link.close()
                if isinstance(e, probes.AttachError) and not made:
                    return               # no TCX here (or not allowed): the usual attach finds out
                continue
            self._links[ns] = made

    def _join(self) -> None:
        self._done.wait()

    def take(self, ns: str | None) -> list[tuple[int, bool, probes.FdLink]]:
        """The (ifindex, ingress, link) made in ns, handed over (the caller
        closes them); [] if none."""
        self._join()
        return self._links.pop(ns, [])

    def close(self) -> None:
        """Close every link not taken, and the placeholder."""
        self._join()
        for made in self._links.values():
            for _i, _ing, link in made:
                link.close()
        self._links.clear()
        if self._placeholder >= 0:
            os.close(self._placeholder)
            self._placeholder = -1


class TcObservers:
    """The tc attachments of each traced netns, by device."""

    def __init__(self, obj: libbpf.BpfObject, mode: str, notice: Callable[[str], None]):
        self.ingress, self.egress = obj.program("tc_ingress").fd, obj.program("tc_egress").fd
        self.mode = mode                     # auto | tcx | classic: tcx or classic once decided
        self.notice = notice
        self.by_netns: dict[str | None, dict[int, list[probes.Attachment]]] = {}

    def attachments(self) -> list[probes.Attachment]:
        return [a for per_dev in self.by_netns.values() for atts in per_dev.values() for a in atts]

    def attach(self, ns: str | None, devices: dict[int, str] | None = None,
               early: EarlyTcx | None = None) -> None:
        """tc observers on every device of ns (or on `devices`, new ones);
        TCX links `early` made there are taken over first."""
        if devices is None:
            devices = netns.links(ns)
        per_dev = self.by_netns.setdefault(ns, {})
        if early is not None and self.mode != "classic":
            devices = self._adopt(ns, devices, per_dev, early.take(ns))
        points = [(prog_fd, ifindex, ifname, ingress) for ifindex, ifname in sorted(devices.items())
                  for prog_fd, ingress in ((self.ingress, True), (self.egress, False))]
        if not points:
            return
        if self.mode in ("auto", "tcx"):
            try:
                first = probes.attach_tcx(*points[0], ns)
            except probes.AttachError:
                if self.mode == "tcx":
                    raise
                self.mode = "classic"  # kernel before 6.6: no TCX anywhere
            else:
                # TCX is there (each attach waits for an RCU grace period
                # under the RTNL lock: ~12 ms, one after the other)
                self.mode = "tcx"
                per_dev.setdefault(points[0][1], []).append(first)
                for p in points[1:]:
                    per_dev.setdefault(p[1], []).append(probes.attach_tcx(*p, ns))
                return
        self.mode = "classic"
        if not per_dev:
            # what killed pkttrace sessions left here, and only that (not another
            # tool's filters, not a running session's)
            try:
                done = probes.clean_dead_sessions(ns)
            except probes.UnknownHolders as e:
                # never remove a filter that may be a live session's
                self.notice(f"classic tc: left any killed session's filters alone: {e}")
            else:
                if done.removed:
                    self.notice(done.summary())
        for prog_fd, ifindex, ifname, ingress in points:
            per_dev.setdefault(ifindex, []).append(probes.attach_classic_tc(prog_fd, ifindex, ifname, ingress, ns))

    def _adopt(self, ns: str | None, devices: dict[int, str], per_dev: dict[int, list[probes.Attachment]],
               early: list[tuple[int, bool, probes.FdLink]]) -> dict[int, str]:
        """Take over the early links of ns on devices that are still there,
        running our programs from now on; returns the devices left to attach."""
        adopted = set()
        for ifindex, ingress, link in early:
            name = devices.get(ifindex)
            if name is None:                  # the device went
                link.close()
                continue
            try:
                libbpf.link_update(link.fd, self.ingress if ingress else self.egress)
            except OSError:
                # a device deleted and another made with its index: the link
                # went with the first (ENOLINK); the new one is attached anew
                link.close()
                continue
            self.mode = "tcx"
            adopted.add(ifindex)
            link.what = f"{'ingress' if ingress else 'egress'} {name}"   # (renamed meanwhile)
            per_dev.setdefault(ifindex, []).append(link)
        # a device with both links is done; one with a single link lost the
        # other: its link is closed and the device attached whole
        for ifindex in [i for i in adopted if len(per_dev[i]) != 2]:
            _release(per_dev.pop(ifindex))
        return {i: n for i, n in devices.items() if i not in per_dev}

    def follow(self, ns: str | None, now: dict[int, str], deleted: set[int]) -> None:
        """The devices of ns are `now` (and `deleted` went, maybe to come back
        under the same index): forget the gone ones' observers, attach on the
        new ones."""
        per_dev = self.by_netns.get(ns)
        if per_dev is None:
            return
        for ifindex in [i for i in per_dev if i not in now or i in deleted]:
            _release(per_dev.pop(ifindex))
        new = {i: n for i, n in now.items() if i not in per_dev}
        try:
            self.attach(ns, new)
        except (probes.AttachError, netns.NetnsError) as e:
            # a device that went again at once, or a kernel refusing:
            # its packets are still seen at the netfilter hooks
            self.notice(f"no tc observers on a new device in netns {ns or '(host)'}: {e}")

    def drop(self, ns: str | None) -> None:
        """A netns no longer traced: its TCX links closed, its classic
        filters left to go with it (the namespace is going)."""
        for atts in self.by_netns.pop(ns, {}).values():
            _release(atts)

    def detach(self) -> None:
        for a in reversed(self.attachments()):
            try:
                a.close()
            except Exception:  # keep closing the rest: nothing may stay attached
                pass
        self.by_netns.clear()
