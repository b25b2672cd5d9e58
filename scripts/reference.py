#!/usr/bin/env python3
"""Write docs/reference.md from the declarations the code itself uses.

Stages, fates, tables and their priorities, the kernel's tracepoints and
functions each backend needs, the record limits and the command line's
options are each declared once (tracer.model, tracer.placement,
tracer.backends, tracer.events, tracer.cli); this page is printed from
those declarations, so it cannot drift from them.
tests/unit/test_reference_doc.py fails when the committed page is not what
this prints.

    python scripts/reference.py > docs/reference.md
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import click  # noqa: E402

from tracer import backends, cli, events, model, placement  # noqa: E402


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for p in cmd.get_params(ctx):
        rec = p.get_help_record(ctx)
        if rec is None or isinstance(p, click.Argument):
            continue
        names, text = (c.replace("|", "\\|") for c in rec)     # a table cell
        out.append(f"| `{names}` | {' '.join(text.split())} |")
    return out


def _commands() -> list[str]:
    lines = []
    root = cli.main
    ctx = click.Context(root, info_name="pkttrace")
    lines += ["### `pkttrace`", "", "| option | meaning |", "|---|---|", *_options(root, ctx), ""]
    for name in sorted(root.list_commands(ctx)):
        sub = root.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sctx = click.Context(sub, info_name=name, parent=ctx)
        lines += [f"### `pkttrace {name}`", "", (sub.get_short_help_str(200) or "").strip(), ""]
        opts = _options(sub, sctx)
        if opts:
            lines += ["| option | meaning |", "|---|---|", *opts, ""]
        if isinstance(sub, click.Group):
            for child in sorted(sub.list_commands(sctx)):
                c = sub.get_command(sctx, child)
                if c is not None and not c.hidden:
                    lines.append(f"- `pkttrace {name} {child}`: {c.get_short_help_str(200).strip()}")
            lines.append("")
    return lines


def _hooks(hooks) -> str:
    return ", ".join(placement.HOOKS[h] for h in hooks)


def reference() -> str:
    lines = [
        "# Reference",
        "",
        "Printed by `scripts/reference.py` from the declarations the code uses "
        "(do not edit by hand; `tests/unit/test_reference_doc.py` checks it is current).",
        "",
        "## Stages of a path (JSON `stage`)",
        "",
        ", ".join(f"`{s.value}`" for s in model.StageName),
        "",
        "Netfilter hooks among them: " + ", ".join(f"`{s.value}`" for s in model.HOOK_NAMES) + "; "
        "tc: " + ", ".join(f"`{s.value}`" for s in model.TC_NAMES) + ".",
        "",
        "## Fates (JSON `fate`)",
        "",
        ", ".join(f"`{f.value}`" for f in model.FateName),
        "",
        "## Tables and their priorities",
        "",
        "| table | priority | hooks |",
        "|---|---|---|",
    ]
    for name, (prio, hooks) in placement.LEGACY.items():
        shown = prio if prio is not None else "NAT: " + ", ".join(
            f"{placement.HOOKS[h]} {placement.NAT_PRIORITY[h]}" for h in hooks)
        lines.append(f"| {name} (iptables) | {shown} | {_hooks(hooks)} |")
    lines += [
        f"| {placement.CONNTRACK} | {placement.PRI_CONNTRACK} | every hook where a ruleset needs it |",
        "| nftables base chains | their own `priority` | their own `hook` |",
        "",
        "## What each backend needs from the kernel",
        "",
        "Netfilter backends: " + ", ".join(f"`{b}`" for b in backends.BACKENDS) + "; tc modes: " +
        ", ".join(f"`{m}`" for m in backends.TC_MODES) + f". Oldest kernel: {'.'.join(map(str, backends.MIN_KERNEL))}.",
        "",
        "### Tracepoints (every backend)",
        "",
        "| program | tracepoint | what it sees |",
        "|---|---|---|",
    ]
    lines += [f"| `{p}` | `{tp}` | {what} |" for p, (tp, what) in backends.TRACEPOINT_PROGRAMS.items()]
    lines += ["", "Optional: " + "; ".join(f"`{tp}` ({why})" for tp, why in backends.OPTIONAL_TRACEPOINTS.items()),
              "", "### Kernel functions (fentry and kprobe backends)", "",
              "| fentry program | kprobe program | function |", "|---|---|---|"]
    kp_by_fn: dict[str, list[str]] = {}
    for p, fn in backends.KPROBE_PROGRAMS.items():
        kp_by_fn.setdefault(fn, []).append(p)
    fe_by_fn: dict[str, list[str]] = {}
    for p, fn in backends.FENTRY_PROGRAMS.items():
        fe_by_fn.setdefault(fn, []).append(p)
    for fn in dict.fromkeys([*fe_by_fn, *kp_by_fn]):
        fe = ", ".join(f"`{p}`" for p in fe_by_fn.get(fn, [])) or "-"
        kp = ", ".join(f"`{p}`" for p in kp_by_fn.get(fn, [])) or "-"
        lines.append(f"| {fe} | {kp} | `{fn}` |")
    lines += [
        "",
        "## Limits of a record",
        "",
        f"- stages kept per packet: {events.PT_MAX_STAGES} (more are counted: `truncated`)",
        f"- header bytes carried for pcap-ng (`-w`): {events.PT_HEAD_LEN}",
        f"- network namespaces traced at once: {events.PT_MAX_NETNS}",
        "",
        "## Command line",
        "",
        *_commands(),
    ]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
