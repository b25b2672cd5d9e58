"""The netfilter observers of every traced namespace: where they sit for
the ruleset each has (placement.plan), the two banks of observer programs
(the second is attached at the new places before the first is detached, so
no packet crosses a hook unobserved while the ruleset changes), and what the
kernel compares each hook with to tell that the ruleset changed under them.

The session owns one Observers and tells it which namespaces it traces; the
BPF maps it writes (nat_slots, ruleset_gen, netns_nat) are described in
bpf/pkttrace.h.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

from . import events, libbpf, netns, paths, placement, probes, watch
from .backends import Plan


def nf_programs() -> list[str]:
    """The observer program of each bank: attached at every slot of its bank."""
    return [f"nf_obs_{bank}" for bank in range(events.PT_NF_SLOTS // events.PT_NF_BANK)]


def select_programs(obj: libbpf.BpfObject, plan: Plan) -> int:
    """Before obj's load: the observers' program type, and autoload off for
    what this kernel cannot run or plan's backend does not use.  Returns how
    many observer banks load now: the first where netfilter links attach
    them (~80 ms of verifier time each; the second is loaded at the first
    re-placement, Observers.program_fd), none otherwise."""
    need = 1 if plan.netfilter == "nflink" else 0
    for i, name in enumerate(nf_programs()):
        obj.program(name).set_type(libbpf.BPF_PROG_TYPE_NETFILTER, libbpf.BPF_NETFILTER)
        if i >= need:
            obj.program(name).set_autoload(False)
    # tc observers mark the receive and the hand-over to a device in the
    # traced namespaces only; the rx/queue tracepoints stand in for them
    # without tc, at the cost of a program run per packet of the host
    for name in plan.off:
        obj.program(name).set_autoload(False)
    return need


def registered(ns: str | None) -> placement.Registered:
    try:
        return placement.registered(ns)
    except (OSError, netns.NetnsError) as e:
        raise probes.AttachError(f"reading the netfilter ruleset of netns {ns or '(host)'}: {e}") from None


def read_ruleset(ns: str | None) -> tuple[int, placement.Registered]:
    """The ruleset of ns as committed at one nftables generation: read
    again if a commit came in between."""
    for _ in range(5):
        try:
            gen = watch.nft_generation(ns)
        except (OSError, netns.NetnsError) as e:
            raise probes.AttachError(f"reading the nftables generation of netns {ns or '(host)'}: {e}") from None
        reg = registered(ns)
        if watch.nft_generation(ns) == gen:
            return gen, reg
    return gen, reg      # a ruleset committed to without pause: its packets stay "changing"


@dataclass
class Placed:
    """The netfilter observers of one netns: which bank, for which ruleset."""
    bank: int
    registered: placement.Registered
    plans: dict
    links: list[probes.FdLink]


class Observers:
    """The observers of the traced namespaces, and the banks they run."""

    def __init__(self, obj: libbpf.BpfObject, ctx: paths.Context, plan: Plan, fds: dict[int, int],
                 inode_of: Callable[[str | None], int | None], index_of: Callable[[int], int]):
        self.obj, self.ctx, self.plan = obj, ctx, plan
        self.fds = fds                                   # bank -> observer program fd
        self.extra_objs: list[libbpf.BpfObject] = []     # banks loaded later (second loads sharing the maps)
        self.placed: dict[str | None, Placed] = {}
        self.inode_of, self.index_of = inode_of, index_of
        # the programs read net->nft.base_seq (else they see 0, and are told 0)
        self.gen_visible = True

    def program_fd(self, bank: int) -> int:
        """The observer program of a bank, loading it if it is not loaded
        yet: a second load of the same file that shares every map (records,
        counters, config) with the first."""
        if bank not in self.fds:
            name = nf_programs()[bank]
            obj = libbpf.BpfObject(libbpf.object_path())
            try:
                for p in obj.programs():
                    if p.name == name:
                        p.set_type(libbpf.BPF_PROG_TYPE_NETFILTER, libbpf.BPF_NETFILTER)
                    else:
                        p.set_autoload(False)
                obj.share_maps_of(self.obj)
                obj.load()
            except libbpf.BpfError as e:
                obj.close()
                raise probes.AttachError(str(e)) from None
            self.extra_objs.append(obj)
            self.fds[bank] = obj.program(name).fd
        return self.fds[bank]

    def place(self, ns: str | None, bank: int, reg: placement.Registered) -> Placed:
        """Attach the observers of bank `bank` after each table registered in ns."""
        ino = self.inode_of(ns)
        assert ino is not None          # placed only in a namespace being traced
        plans = placement.plan(reg, bank, merge_conntrack=self.plan.hook_slow is not None)
        links: list[probes.FdLink] = []
        # the fentry backend observes the tables themselves: it names them by
        # the priorities of what is registered, and places nothing
        for reg_key in [k for k in self.ctx.registered if k[0] == ino]:
            del self.ctx.registered[reg_key]
        for (fam, hook), tables in reg.items():
            self.ctx.registered[(ino, fam, hook)] = [(t.name, t.priority, t.handle) for t in tables]
        if self.plan.netfilter != "nflink":
            plans = {}
        idx = ctypes.c_uint32(self.index_of(ino))
        nat = events.PtNatSlots()
        self.obj.map("nat_slots").lookup(idx, nat)
        # how many observers each hook has, before any is attached: the
        # bank's program counts its runs per packet up to that
        for fam in (4, 6):
            for hook in range(5):
                hp = plans.get((fam, hook))
                k = bank * 10 + (5 if fam == 6 else 0) + hook
                nat.observers[k] = len(hp.priorities) if hp else 0
                if hp and placement.entryless(hp):
                    nat.entryless |= 1 << k
                else:
                    nat.entryless &= ~(1 << k)
        self.obj.map("nat_slots").update(idx, nat)
        try:
            for (fam, hook), hp in plans.items():
                fd = self.program_fd(bank)
                for prio in hp.priorities:
                    links.append(probes.attach_netfilter(fd, fam, hook, prio, ns))
        except probes.AttachError:
            for link in links:
                link.close()
            raise
        # name the slots only once all are attached: a failed re-placement
        # leaves the old bank's names (and observers) as they were
        it = iter(links)
        for (fam, hook), hp in plans.items():
            for i in range(len(hp.priorities)):
                key = (ino, fam, hook, bank * events.PT_NF_BANK + i)
                got = next(it).priority
                assert got is not None           # a netfilter link has the priority it got
                self.ctx.slot_priority[key] = got
                self.ctx.slot_tables[key] = [(t.name, t.priority) for t in hp.tables[i]]
                self.ctx.slot_after[key] = [(t.name, t.priority) for t in hp.tables_after(i)]
        self.ctx.conntrack[ino] = sorted({fam for (fam, h), ts in reg.items()
                                          for t in ts if t.name == "conntrack"})
        # with NAT a header filter cannot judge a packet at first sight, and
        # the observers right after a NAT table compare its addresses
        self.obj.map("netns_nat").update(idx, ctypes.c_uint32(placement.has_nat(reg)))
        self.obj.map("nat_slots").lookup(idx, nat)
        for (fam, hook), hp in plans.items():
            k = (5 if fam == 6 else 0) + hook
            for i in range(len(hp.priorities)):
                bit = 1 << (bank * events.PT_NF_BANK + i)
                nat.after_nat[k] = (nat.after_nat[k] | bit) if any(t.nat for t in hp.tables[i]) \
                    else (nat.after_nat[k] & ~bit)
        self.obj.map("nat_slots").update(idx, nat)
        self.ctx.shapes.clear()  # they hold table names
        self.ctx.generation += 1
        return Placed(bank, reg, plans, links)

    def set_hooks(self, ns: str | None, value: int, gen: int | None = None) -> None:
        """Set what the BPF observers compare each hook of ns with:
        HOOKS_PLACING while observers move (every packet crossing a hook
        meanwhile is marked "changing"), HOOKS_LEARN once they are where the
        ruleset read at nftables generation `gen` says (the next packet at
        each hook takes the kernel's hook entries as the ones placed for).
        Clears the changed bits."""
        ino = self.inode_of(ns)
        if ino is None or self.obj is None:
            return
        idx = ctypes.c_uint32(self.index_of(ino))
        if gen is not None:
            self.tell_generation(ns, gen)
        nat = events.PtNatSlots()
        m = self.obj.map("nat_slots")
        m.lookup(idx, nat)
        nat.hooks[:] = [value] * len(nat.hooks)
        nat.changed = 0
        m.update(idx, nat)

    def tell_generation(self, ns: str | None, gen: int) -> None:
        """The nftables generation the observers of ns fit (0 where the
        programs cannot read it: they compare with 0 then)."""
        ino = self.inode_of(ns)
        if ino is not None and self.obj is not None:
            self.obj.map("ruleset_gen").update(ctypes.c_uint32(self.index_of(ino)),
                                               ctypes.c_uint32(gen if self.gen_visible else 0))

    def hooks_changed(self, ns: str | None) -> bool:
        """Did a packet find a hook of ns changed since the observers were placed?"""
        ino = self.inode_of(ns)
        if ino is None:
            return False
        nat = events.PtNatSlots()
        return self.obj.map("nat_slots").lookup(ctypes.c_uint32(self.index_of(ino)), nat) and bool(nat.changed)

    def recheck(self, ns: str | None, signalled: bool) -> bool:
        """Bring the observers of ns in line with its ruleset; True if they moved.

        signalled: a packet found a hook replaced or nftables' generation
        moved.  Packets are marked "changing" from then on until the ruleset
        is read again (at one generation) and the observers are placed for
        it; the generation is checked once more after, and all of it done
        again if a commit came meanwhile.  Unprompted checks (an nftables
        announcement, the timer) move nothing if the ruleset read is the one
        placed for: they only tell the kernel that generation is fine.
        """
        if not signalled:
            gen, reg = read_ruleset(ns)
            if reg == self.placed[ns].registered:
                self.tell_generation(ns, gen)
                return False
        moved = False
        for _ in range(3):
            self.set_hooks(ns, events.HOOKS_PLACING)
            gen, reg = read_ruleset(ns)
            old = self.placed[ns]
            if reg != old.registered:
                # the new bank is attached before the old one is detached:
                # no packet crosses a hook unobserved
                self.placed[ns] = self.place(ns, 1 - old.bank, reg)
                for link in old.links:
                    link.close()
                moved = True
            self.set_hooks(ns, events.HOOKS_LEARN, gen)
            if watch.nft_generation(ns) == gen:
                break
        return moved

    def links(self) -> list[probes.FdLink]:
        return [link for p in self.placed.values() for link in p.links]

    def drop(self, ns: str | None) -> None:
        """Detach the observers of a namespace no longer traced."""
        placed = self.placed.pop(ns, None)
        for link in placed.links if placed else ():
            link.close()

    def detach(self) -> None:
        for p in self.placed.values():
            for link in p.links:
                link.close()
        self.placed.clear()

    def close(self) -> None:
        self.detach()
        for o in self.extra_objs:
            o.close()
        self.extra_objs.clear()
