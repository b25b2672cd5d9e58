"""The qdiscs of a network namespace, as netlink lists them (`tc qdisc show`).

A qdisc stage's record carries the device and the root qdisc's handle (the
qdisc tracepoints' `q`); its kind (tbf, htb, fq_codel...) is read here, by
a netlink dump of the namespace's qdiscs (pyroute2), and kept by the
decoder's Context.  A packet dropped before any qdisc took it (a tail drop)
has no handle in its record: the device's root qdisc is the one that
refused it.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import netns

TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1     # ingress and clsact: no queue


@dataclass(frozen=True)
class QdiscInfo:
    ifindex: int
    handle: int
    parent: int
    kind: str

    @property
    def root(self) -> bool:
        return self.parent == TC_H_ROOT


def dump(ns: str | None) -> list[QdiscInfo]:
    """Every queueing qdisc of netns ns (None: the current one); [] if it is gone."""
    try:
        with netns.ipr(ns) as sock:
            msgs = list(sock.get_qdiscs())
    except (netns.NetnsError, OSError):
        return []
    out = []
    for m in msgs:
        parent = m["parent"] & 0xFFFFFFFF
        if parent == TC_H_INGRESS:
            continue
        # get_attr: pyroute2 0.7's msg.get("TCA_KIND") returns None
        out.append(QdiscInfo(m["index"], m["handle"] & 0xFFFFFFFF, parent, m.get_attr("TCA_KIND") or "?"))
    return out
