"""Which capabilities pkttrace needs, and whether this process has them.

The check reads the effective set (CapEff in /proc/self/status), not the
uid: under systemd's `User=`/`DynamicUser=` with `AmbientCapabilities=`
pkttrace runs as an unprivileged uid with exactly what it needs, and root
in a container may lack CAP_BPF.  What each capability is for was measured
by running `pkttrace serve` as `nobody` under `setpriv --ambient-caps`
with one capability taken away at a time (Linux 6.18, libbpf 1.1.2):

- CAP_BPF: without it libbpf cannot load even its probe program (EPERM).
- CAP_PERFMON: tracing programs (tp_btf) read kernel memory: their load is
  refused (`on_fib_lookup`: EPERM).
- CAP_NET_ADMIN: netfilter programs (`nf_obs_*`) and links, TCX, clsact:
  their load is refused (EPERM).
- CAP_SYS_ADMIN: (1) libbpf resolves a CO-RE relocation that has no
  candidate in vmlinux's BTF against the kernel modules' BTF, which it
  lists with BPF_BTF_GET_NEXT_ID, a CAP_SYS_ADMIN command; libbpf 1.1
  (Debian 12's) fails the whole load on that EPERM.  The object has such a
  relocation on every kernel (`bpf_core_type_exists(struct pt_addr_stage)`),
  and on kernels with netfilter as modules (Debian's) the conntrack and
  nftables types live in module BTF.  (2) setns() into a named network
  namespace (`--netns NAME`).  (3) BPF_ENABLE_STATS (`--bpf-stats`).
- CAP_SYS_PTRACE: only `--netns all`: a namespace held only by another
  user's process (a container) is found through /proc/PID/ns/net, which
  the kernel shows to a different uid only with it; without it those
  namespaces would be silently missing, so it is required.
"""
from __future__ import annotations

CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
         CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

# loading and attaching the programs, in any namespace (see above for SYS_ADMIN)
BASE = (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN)


class CapsError(Exception):
    """The capability set cannot be read or parsed; the message is one line."""


def parse_status(text: str, field: str = "CapEff") -> int:
    """The capability mask of `field` in /proc/PID/status text."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key == field:
            v = value.strip()
            # 16 hex digits on every kernel since 2.6.26; anything else is not a mask
            if not v or len(v) > 16 or any(c not in "0123456789abcdefABCDEF" for c in v):
                raise CapsError(f"{field} in /proc/self/status is not a capability mask: {v!r}")
            return int(v, 16)
    raise CapsError(f"no {field} line in /proc/self/status")


def effective(status_path: str = "/proc/self/status") -> int:
    try:
        with open(status_path) as f:
            return parse_status(f.read())
    except OSError as e:
        raise CapsError(f"cannot read {status_path}: {e.strerror}") from None


def needed(*, named_netns: bool = False, all_netns: bool = False, bpf_stats: bool = False) -> tuple[int, ...]:
    """The capabilities a trace or `serve` with these options needs."""
    need = list(BASE)
    # CAP_SYS_ADMIN is in BASE today; these keep needing it if BASE loses it
    if (named_netns or all_netns or bpf_stats) and CAP_SYS_ADMIN not in need:
        need.append(CAP_SYS_ADMIN)
    if all_netns:
        need.append(CAP_SYS_PTRACE)
    return tuple(need)


def missing(need: tuple[int, ...], mask: int) -> list[str]:
    """Names of the capabilities of `need` that `mask` lacks, in `need`'s order."""
    return [NAMES[c] for c in need if not mask >> c & 1]


def missing_message(names: list[str]) -> str:
    """One line: what is missing and how to grant it."""
    return (f"missing capabilit{'y' if len(names) == 1 else 'ies'} {', '.join(names)}: run as root, or grant "
            f"them (systemd: AmbientCapabilities=; setpriv --ambient-caps)")
