"""pkttrace(1), generated from the command line itself (click's command tree),
so the man page never says something the CLI does not do.

    python -m tracer.manpage > /usr/local/share/man/man1/pkttrace.1

Every visible command and option, with click's own help records (metavars,
defaults, environment variables), in troff's man macros.
"""
from __future__ import annotations

import inspect
import sys

import click

from .cli import main
from .version import __version__


def _esc(text: str) -> str:
    """Text for troff: backslashes and hyphens escaped, no line taken for a
    request, non-ASCII (an em dash) as a named glyph, as groff wants it."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in text.splitlines())


def _paragraphs(help_text: str) -> list[str]:
    """click help as man paragraphs: "\\b" blocks (examples) verbatim, the rest filled."""
    out: list[str] = []
    for para in inspect.cleandoc(help_text).split("\n\n"):
        if para.startswith("\b\n"):
            out.append(".PP\n.nf\n" + _esc(para[2:]) + "\n.fi")
        else:
            out.append(".PP\n" + _esc(" ".join(para.split())))
    return out


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for p in cmd.get_params(ctx):
        rec = p.get_help_record(ctx)
        if rec is None:                                  # hidden, or an argument
            continue
        opts, text = rec
        out.append(f".TP\n\\fB{_esc(opts)}\\fR\n{_esc(' '.join(text.split()))}")
    return out


def _walk(cmd: click.Command, ctx: click.Context, path: str) -> list[str]:
    """The section of each subcommand, depth first, in click's order."""
    out: list[str] = []
    if not isinstance(cmd, click.Group):
        return out
    for name in cmd.list_commands(ctx):
        sub = cmd.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sctx = click.Context(sub, info_name=name, parent=ctx)
        out.append(f'.SS "{_esc(path + " " + name)}"')
        out.append(f".B {_esc(path + ' ' + name)}\n{_esc(' '.join(sub.collect_usage_pieces(sctx)))}")
        out.extend(_paragraphs(sub.help or sub.short_help or ""))
        out.extend(_options(sub, sctx))
        out.extend(_walk(sub, sctx, path + " " + name))
    return out


def render(cmd: click.Command = main, prog: str = "pkttrace") -> str:
    ctx = click.Context(cmd, info_name=prog)
    summary = (cmd.help or "").strip().splitlines()[0].rstrip(".")
    lines = [
        f'.TH {prog.upper()} 1 "" "{prog} {__version__}" "User Commands"',
        ".SH NAME", f"{prog} \\- {_esc(summary)}",
        ".SH SYNOPSIS", f".B {prog}\n{_esc(' '.join(cmd.collect_usage_pieces(ctx)))}",
        ".SH DESCRIPTION", *_paragraphs(cmd.help or ""),
        ".SH OPTIONS", *_options(cmd, ctx),
        ".SH COMMANDS", *_walk(cmd, ctx, prog),
        ".SH EXIT STATUS",
        ".PP\n0 done; 1 the kernel or the machine could not do it (one line on stderr); "
        "2 bad input (one line on stderr).",
        ".SH SEE ALSO", ".PP\ntcpdump(8), ip\\-route(8), ip\\-rule(8), nft(8), bpftool(8)",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
