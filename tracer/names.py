"""The names records do not carry, learnt from the kernel for a trace.

Records hold numbers: netns inodes, ifindexes, drop reason values.  This
keeps the decoder's Context (tracer.paths) supplied with their names:
devices per namespace (again when devices come, go or are renamed),
namespace names, and the drop reasons of this kernel's BTF (never a copied
table).  The kernel's BTF also says whether the BPF programs can read
nftables' generation, which the observers need to know.
"""
from __future__ import annotations

import time
from typing import Iterable

from . import libbpf, netns, qdiscs
from .paths import Context

QDISC_REREAD_S = 0.5   # an unknown qdisc handle reads a netns's qdiscs again at most this often


class Names:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._ns: dict[int, str | None] = {}          # traced netns inode -> name
        self._qdiscs_read: dict[int, float] = {}      # netns inode -> when its qdiscs were read
        ctx.qdisc_refresh = self.learn_qdiscs

    def read_kernel_btf(self, kernel: libbpf.Btf | None = None) -> bool:
        """Drop reason names into the context; True if the programs can
        read nftables' generation (net->nft.base_seq).  `kernel`: the
        kernel's BTF, already parsed (else parsed here, and freed)."""
        try:
            btf = kernel if kernel is not None else libbpf.Btf.vmlinux()
        except libbpf.BpfError:
            return True   # names fall back to numbers; the doctor reports missing BTF
        try:
            self.ctx.drop_reasons = btf.enum("skb_drop_reason")
            try:
                # in struct net since 6.x (6.12 has it, 6.1 keeps it in
                # nf_tables' per-netns data, out of the programs' reach)
                return "base_seq" in btf.struct_layout("netns_nftables")
            except libbpf.BpfError:
                return False
        except libbpf.BpfError:
            return True
        finally:
            if btf is not kernel:
                btf.close()

    def learn_netns(self, ns: str | None, ino: int) -> None:
        """A traced namespace: its name ("" for the current one) and its devices'."""
        self.ctx.netns_names[ino] = ns or ""
        self._ns[ino] = ns
        self.learn_devices(ns, ino)
        self._qdiscs_read.pop(ino, None)
        self.learn_qdiscs(ino)

    def learn_qdiscs(self, ino: int) -> None:
        """The qdiscs of traced netns ino (kinds by handle, each device's
        root): at start, then again when a record names one not known
        (rate-limited: a handle that is gone stays unknown)."""
        if ino not in self._ns:
            return
        now = time.monotonic()
        if now - self._qdiscs_read.get(ino, -QDISC_REREAD_S) < QDISC_REREAD_S:
            return
        self._qdiscs_read[ino] = now
        found = qdiscs.dump(self._ns[ino])
        before = (len(self.ctx.qdisc_kinds), dict(self.ctx.qdisc_roots))
        for q in found:
            self.ctx.qdisc_kinds[(ino, q.ifindex, q.handle)] = q.kind
            if q.root:
                self.ctx.qdisc_roots[(ino, q.ifindex)] = q.handle
        if (len(self.ctx.qdisc_kinds), self.ctx.qdisc_roots) != before:
            self.ctx.shapes.clear()    # resolved path shapes hold qdisc kinds
            self.ctx.generation += 1   # recordings save the names again

    def learn_devices(self, ns: str | None, ino: int,
                      devices: tuple[dict[int, str], dict[int, str]] | None = None) -> None:
        """The device names of ns, and which are tunnels (devices: as
        netns.links_and_tunnels read them)."""
        self.ctx.shapes.clear()  # resolved path shapes hold device names
        try:
            names, tunnels = netns.links_and_tunnels(ns) if devices is None else devices
        except netns.NetnsError:
            return
        for idx, name in names.items():
            self.ctx.ifnames[(ino, idx)] = name
        for idx, kind in tunnels.items():
            self.ctx.if_kinds[(ino, idx)] = kind

    def relearn(self, traced: Iterable[tuple[str | None, int]]) -> None:
        """Every traced namespace's devices again (a device unknown so far)."""
        for ns, ino in traced:
            self.learn_devices(ns, ino)
