"""The `pkttrace` command: a thin layer over tracer.session and friends.

Bad input becomes one line on stderr and exit status 2, never a traceback.
Every value is checked (tracer/inputs.py) before root is asked for and
before any BPF is loaded; every line written to the terminal is escaped.
"""
from __future__ import annotations

import os
import signal
import sys

from dataclasses import dataclass
from typing import IO, cast

import click

from . import backends, libbpf, netns
from .colour import COLOR_CHOICES, wanted as colour_wanted
from .filters import FilterError, PacketFilter
from .inputs import MAX_SECONDS, InputError, InputPath, OutputPath, Seconds, UInt, _PathParam, check_output_path, \
    dedupe, escape, open_output
from .version import __version__

EXIT_USAGE = 2


def say(text: str) -> None:
    """One line on stderr: messages quote what the user or the system named,
    so they are escaped (a name with a newline or ESC stays one plain line)."""
    click.echo(f"pkttrace: {escape(text)}", err=True)


class UsageFailure(click.ClickException):
    """Wrong input: one line, exit 2."""
    exit_code = EXIT_USAGE

    def show(self, file=None) -> None:
        say(self.format_message())


class RuntimeFailure(click.ClickException):
    """The kernel or the machine could not do it: one line, exit 1."""

    def show(self, file=None) -> None:
        say(self.format_message())


def build_filter(mark, src, dst, proto, port, iface, ns, live: bool = True, expression=None) -> PacketFilter:
    try:
        pf = PacketFilter.parse(mark=mark, src=src, dst=dst, proto=proto, port=port, iface=iface,
                                expression=expression)
    except FilterError as e:
        raise UsageFailure(str(e)) from None
    if iface is not None and live:
        # it must exist now (a typo is said at once); later it is followed
        # by name: renamed away, deleted, re-created
        if ns is not None:
            _require_root()  # entering a named netns needs CAP_SYS_ADMIN
        try:
            netns.ifindex(ns, iface)
        except netns.NetnsError as e:
            raise UsageFailure(str(e)) from None
    return pf


ALL_NETNS = "all"


def _netns_choice(names: tuple[str, ...]) -> tuple[list[str | None], bool]:
    """--netns NAME... or --netns all (every namespace, and new ones)."""
    if ALL_NETNS in names:
        if len(names) > 1:
            raise UsageFailure("--netns all traces every network namespace: give it alone")
        return [None], True
    return _check_netns(names), False


def _check_netns(names: tuple[str, ...]) -> list[str | None]:
    out: list[str | None] = []
    for n in names or (None,):
        try:
            known = n is None or netns.exists(n)
        except netns.NetnsError as e:      # a name that cannot be one
            raise UsageFailure(str(e)) from None
        if not known:
            raise UsageFailure(f"unknown network namespace {n!r} (see `ip netns list`)")
        out.append(n)
    return out


def _require_root(**options: bool) -> None:
    """The effective capabilities the command needs (caps.needed), not uid
    0: `User=`/`DynamicUser=` with AmbientCapabilities= passes, root in a
    container without CAP_BPF does not.  Missing ones: one line, exit 2."""
    from . import caps
    try:
        lacking = caps.missing(caps.needed(**options), caps.effective())
    except caps.CapsError as e:
        raise UsageFailure(str(e)) from None
    if lacking:
        raise UsageFailure(caps.missing_message(lacking))


def filter_options(fn):
    """The packet filters, shared by live tracing and replay."""
    opts = [
        click.option("--mark", metavar="VALUE[/MASK]",
                     help="Packets whose mark matches at any stage, e.g. 0x1 or 0x10/0xf0."),
        click.option("--src", metavar="CIDR", help="Source address or network."),
        click.option("--dst", metavar="CIDR", help="Destination address or network."),
        click.option("--proto", metavar="tcp|udp|icmp|icmpv6|N", help="IP protocol."),
        click.option("--port", metavar="N", help="TCP/UDP source or destination port."),
        click.option("-i", "--iface", metavar="NAME",
                     help="Packets received or sent on this device (tcpdump's -i; 'any': every device)."),
        click.option("-c", "--count", type=UInt(1, (1 << 63) - 1), help="Stop after N packets."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per packet per line."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def view_options(fn):
    """How packets are shown (tcpdump's switches), shared by live tracing and replay."""
    opts = [
        click.option("-v", "verbose", count=True,
                     help="More detail: every netfilter observer (priority, time, mark, TOS, conntrack), every "
                          "route lookup and the rule that chose the table, TOS on each hook, tc verdicts, how "
                          "delivery was seen."),
        click.option("-t", "stamp", count=True,
                     help="Time before each packet (wall clock of its first stage): absolute by default; -t none, "
                          "-tt seconds since 1970, -ttt since the previous packet, -tttt date and time, "
                          "-ttttt since the first packet."),
        click.option("-n", "numeric", is_flag=True,
                     help="Accepted for tcpdump's habit: pkttrace never turns addresses or ports into names."),
        click.option("--color", "--colour", "color", type=click.Choice(COLOR_CHOICES), default="auto",
                     show_default=True,
                     help="Colour verdicts, drops and changes: auto = on a terminal unless NO_COLOR is set."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _write_path(value: str) -> str:
    """-w FILE: a regular file (created or replaced), or - for standard output."""
    return value if value == "-" else check_output_path(value, "")


class TraceGroup(click.Group):
    """`pkttrace [OPTIONS] [EXPRESSION]`: trailing words that do not start
    with a subcommand's name are a tcpdump filter expression, joined with
    spaces as tcpdump joins them (`pkttrace tcp port 443` or quoted)."""
    EXPRESSION = "pkttrace.expression"

    def parse_args(self, ctx, args):
        super().parse_args(ctx, args)
        # click 8.2 renamed the attribute that holds the subcommand's name
        attr = "_protected_args" if hasattr(ctx, "_protected_args") else "protected_args"
        first = getattr(ctx, attr)
        if first and first[0] not in self.commands:
            ctx.meta[self.EXPRESSION] = " ".join([*first, *ctx.args])
            setattr(ctx, attr, [])
            ctx.args = []
        return ctx.args


@click.group(cls=TraceGroup, invoke_without_command=True, subcommand_metavar="[EXPRESSION] | COMMAND [ARGS]...",
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="pkttrace", message="%(prog)s %(version)s")
@click.option("--netns", "netns_names", multiple=True, metavar="NAME", callback=dedupe,
              help="Trace this named network namespace (repeatable, a name given twice is traced once; "
                   "default: the current one).  'all': every namespace of the host, named or only held by "
                   "processes (containers), and those created while tracing.")
@filter_options
@click.option("--duration", type=Seconds(0, lo_open=True), metavar="SECONDS",
              help=f"Stop after this many seconds (more than 0, at most {MAX_SECONDS:.0f}).")
@click.option("--tc", "tc_mode", type=click.Choice(backends.TC_MODES), default="auto",
              show_default=True, help="How to observe tc ingress/egress.")
@click.option("--age-after", type=Seconds(0.1), default=5.0, show_default=True, metavar="SECONDS",
              help="Report a packet as 'unknown' when its end is not seen within this time (at least 0.1).")
@click.option("-B", "--buffer-size", "buffer_kib", type=UInt(1, 1 << 20), metavar="KiB",
              help="The ring buffer between the kernel and pkttrace, in KiB (tcpdump's -B), rounded up to a power "
                   "of two (default 8192: ~0.2 s of a 50,000 pps flow).  Packets that find it full are counted "
                   "as lost in the closing line.")
@click.option("--record", "record_path", type=OutputPath(), metavar="FILE",
              help="Also save the raw records (and the names they need) for `pkttrace replay` "
                   "(a regular file, created or replaced).")
@click.option("--backend", type=click.Choice(backends.BACKENDS), default="auto", show_default=True,
              envvar="PKTTRACE_BACKEND",
              help="How netfilter hooks are observed: netfilter BPF links (6.4+), fentry (older kernels) "
                   "or kprobes (where fentry is refused).")
@view_options
@click.option("-w", "write_path", type=_PathParam(lambda v, _what: _write_path(v)), metavar="FILE",
              help="Write the packets to a pcap-ng file (- : standard output) for Wireshark, tshark or tcpdump -r: "
                   "their headers, and their path as each packet's comment.  Nothing is printed unless --print.")
@click.option("--print", "print_too", is_flag=True, help="With -w: print the packets as well (tcpdump's --print).")
@click.option("--rules", "rules", is_flag=True,
              help="Show the nftables rules each packet met (chains, jump/goto, handles, rule text, verdicts) under "
                   "each table: a temporary table (deleted by the kernel when pkttrace exits, even killed) selects "
                   "the filter's packets for nftables tracing, at most 2,000 hook passes a second.  Linux 5.12+.")
@click.option("-r", "read_path", type=InputPath(), metavar="FILE",
              help="Read packets from a pcap-ng file written by -w, or a --record recording, instead of "
                   "tracing (- : standard input; no root needed).")
@click.pass_context
def main(ctx, netns_names, mark, src, dst, proto, port, iface, count, as_json, duration, tc_mode, age_after,
         buffer_kib, record_path, backend, verbose, stamp, numeric, color, write_path, print_too, rules, read_path):
    """Show the path each packet really takes through the Linux network stack.

    \b
    Examples:
      pkttrace --mark 0x1                 # packets marked 0x1 at any stage
      pkttrace --netns ptlab-rtr --proto icmp -c 5
      pkttrace --dst 10.0.0.0/8 --port 53 --json
      pkttrace tcp port 443 and host 192.0.2.1   # a tcpdump expression (on the IP packet)
      pkttrace --record trace.jsonl       # replay later: pkttrace replay trace.jsonl
      pkttrace -i rc -w trace.pcapng      # for Wireshark: paths as packet comments
      pkttrace -r trace.pcapng -v -tttt   # read it back (no root)
      pkttrace doctor                     # what this kernel supports
      pkttrace lab up                     # a netns lab to try it on
    """
    if ctx.invoked_subcommand is not None:
        return
    # validate everything the user typed before asking for root
    if iface == "any":                   # tcpdump's -i any: every device, no device filter
        iface = None
    show = _show(as_json, verbose, stamp, color, write_path, print_too)
    if read_path is not None:
        for name, given in (("--netns", netns_names), ("--duration", duration), ("--record", record_path),
                            ("--rules", rules), ("-B", buffer_kib)):
            if given:
                raise UsageFailure(f"-r reads packets traced before: {name} means nothing with it")
        if write_path not in (None, "-") and read_path != "-" and os.path.exists(write_path) and \
                os.path.samefile(read_path, write_path):
            # -w empties its file before -r has read it
            raise UsageFailure(f"-r and -w name the same file ({read_path}): write to another one")
        if ctx.meta.get(TraceGroup.EXPRESSION):
            raise UsageFailure("-r: a filter expression is run in the kernel on live packets; packets read back "
                               "are filtered with --src, --dst, --proto, --port, --mark, --iface")
        pf = build_filter(mark, src, dst, proto, port, iface, None, live=False)
        read_packets(read_path, pf, count, show, write_path)
        return
    ns_list, all_netns = _netns_choice(netns_names)
    if iface is not None and (len(ns_list) > 1 or all_netns):
        raise UsageFailure("--iface names a device of one namespace: give a single --netns with it")
    pf = build_filter(mark, src, dst, proto, port, iface, ns_list[0], expression=ctx.meta.get(TraceGroup.EXPRESSION))
    _require_root(named_netns=any(ns_list), all_netns=all_netns)
    from .session import RINGBUF_DEFAULT, TraceOptions, ring_bytes
    opts = TraceOptions(netns=ns_list, filter=pf, tc=tc_mode, age_after=age_after, backend=backend,
                        all_netns=all_netns, snap=write_path is not None, rules=rules,
                        ringbuf_bytes=RINGBUF_DEFAULT if buffer_kib is None else ring_bytes(buffer_kib))
    run_trace(opts, count=count, duration=duration, as_json=as_json, record_path=record_path, show=show,
              write_path=write_path)


@dataclass
class Show:
    """Where packets go: printed (as_json, the clock, colour, -v) and/or written (-w)."""
    as_json: bool = False
    printing: bool = True
    clock: int = 0                      # how many -t
    colour: bool = False
    verbose: int = 0

    def printer(self, out=None):
        from .output import Clock, Printer
        if not self.printing:
            return None
        return Printer(out or sys.stdout, self.as_json, clock=Clock(self.clock), colour=self.colour,
                       verbose=self.verbose)


MAX_STAMP = 5      # -ttttt


def _show(as_json, verbose, stamp, color, write_path, print_too) -> Show:
    """The output options, checked together (one line, exit 2, before root)."""
    if stamp > MAX_STAMP:
        raise UsageFailure(f"-{'t' * stamp}: at most -{'t' * MAX_STAMP} (see --help)")
    if print_too and write_path is None:
        raise UsageFailure("--print prints packets that -w writes: give it with -w FILE")
    if write_path == "-":
        if print_too:
            raise UsageFailure("-w - writes the pcap-ng file to standard output: --print has nowhere to go")
        if sys.stdout.isatty():
            raise UsageFailure("-w -: standard output is a terminal; redirect it to a file or a pipe")
    printing = write_path is None or print_too
    return Show(as_json=as_json, printing=printing, clock=stamp, verbose=verbose,
                colour=printing and not as_json and colour_wanted(color, sys.stdout))


def _open_write(path: str | None):
    """The -w file (binary), opened once the packets will come: - is standard output."""
    if path is None:
        return None
    if path == "-":
        return sys.stdout.buffer
    try:
        # the checked, opened file as bytes (detached: the text layer would close it when collected)
        return open_output(path, "-w").detach()
    except InputError as e:
        raise UsageFailure(str(e)) from None


def _close_output(f) -> None:
    """Close an output file pkttrace opened (never standard output)."""
    if f is not None and f is not sys.stdout.buffer:
        f.close()


class Sinks:
    """Where each packet goes: the printer (unless -w without --print) and
    the -w writer (with -w)."""

    def __init__(self, show: Show, out):
        from .output import plain_text
        from .pcapng import Writer
        self.printer = show.printer()
        self.writer = Writer(out, plain_text) if out is not None else None

    def packet(self, pkt) -> None:
        if self.writer is not None:
            self.writer.packet(pkt)
        if self.printer is not None:
            self.printer.batch(pkt)

    def flush(self) -> None:
        # after each batch: a reader of -w - (tshark -r -) sees packets as they come
        if self.writer is not None:
            self.writer.flush()
        if self.printer is not None:
            self.printer.flush()

    def close(self) -> None:
        """The last packets out, and the pcap-ng file ended."""
        self.flush()
        if self.printer is not None:
            self.printer.flush(final=True)     # outer packets still waiting for their payload
        if self.writer is not None:
            self.writer.close()


def read_packets(path: str, pf: PacketFilter, count: int | None, show: Show, write_path: str | None) -> None:
    """-r FILE: the packets of a pcap-ng file written by -w, or of a --record
    recording, shown as they were when traced (and written again with -w)."""
    import io
    from .recording import RecordingError, replay_to
    try:
        f = cast(io.BufferedReader, sys.stdin.buffer) if path == "-" else open(path, "rb")
    except OSError as e:
        raise UsageFailure(f"-r: cannot read {path}: {e.strerror}") from None
    out = None
    try:
        sources = _recorded_sources(f, path, "-r")
        out = _open_write(write_path)
        sinks = Sinks(show, out)
        left = count
        for source in sources:
            try:
                done = replay_to(source, lambda p: p, sinks.packet, keep=pf.matches, count=left)
            except RecordingError as e:
                raise UsageFailure(f"-r: {path}: {e}") from None
            if done.cut.lines:
                say(f"-r: {done.cut}")
            if left is not None:
                left -= done.shown
                if left <= 0:
                    break
        sinks.close()
    except BrokenPipeError:
        # the reader went away (pkttrace -r x | head): done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:            # writing the output failed (disk full)
        raise RuntimeFailure(f"-r: cannot write the output: {e.strerror}") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
        _close_output(out)


def _recorded_sources(f, path: str, what: str) -> list[IO]:
    """The recordings a file holds: itself (--record), or those a pcap-ng
    file written by -w carries in its comments."""
    import io
    from .pcapng import PcapngError, recordings, sniff
    kind = sniff(f.peek(4)[:4])
    if kind == "pcapng" or kind == "pcap":
        try:
            return [io.StringIO(text) for text in recordings(f)]
        except PcapngError as e:
            raise UsageFailure(f"{what}: {path}: {e}") from None
    if kind == "recording":
        return [f]
    raise UsageFailure(f"{what}: {path}: neither a pcap-ng file written by pkttrace -w nor a recording")


def _open_record(path: str | None):
    """The --record file, opened (created or emptied) only once tracing will
    start, and before any BPF is loaded: a bad path costs nothing."""
    if not path:
        return None
    try:
        return open_output(path, "--record")
    except InputError as e:
        raise UsageFailure(str(e)) from None


def run_trace(opts, count=None, duration=None, as_json=False, record_path=None, show: Show | None = None,
              write_path: str | None = None) -> None:
    from . import api
    from .output import summary
    show = show or Show(as_json=as_json)
    record = _open_record(record_path)
    out = _open_write(write_path)
    # Ctrl-C and SIGTERM end the trace between two batches, with the summary.
    # Caught from before the start: a KeyboardInterrupt raised while libbpf
    # calls back into Python (loading) is printed and dropped by ctypes, and
    # a SIGTERM would skip the clean-up; a signal during the start stops the
    # trace as soon as it is started.
    tracer: api.Tracer | None = None
    early: list[int] = []

    def _stop(signum, _frame):
        if tracer is None:
            early.append(signum)
        else:
            tracer.stopping = True
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)   # the terminal went away: clean up as for SIGTERM
    signal.signal(signal.SIGINT, _stop)
    try:
        tracer = api.start(opts)
    except api.TraceError as e:
        _close_output(record)
        _close_output(out)
        raise RuntimeFailure(str(e)) from None
    if early:
        tracer.stopping = True
    if record:
        from .recording import Recorder
        tracer.on_raw = Recorder(record, tracer.ctx)
    sinks = Sinks(show, out)
    where = ", ".join(n or "current netns" for n in opts.netns)
    if opts.all_netns:
        where = f"every netns ({len(opts.netns)} now, and new ones)"
    say(f"tracing {where} ({len(tracer.attached())} probes, ready in "
        f"{tracer.ready_s * 1000:.0f} ms); Ctrl-C to stop")
    assert tracer.plan is not None   # start() chose the backends or raised
    for note in tracer.plan.notes:   # what this kernel's backends cannot see, once
        say(f"note: {note}")
    limit_reached = False
    try:
        for pkt in tracer.packets(count=count, duration=duration, after_batch=sinks.flush):
            sinks.packet(pkt)
        sinks.flush()
        limit_reached = count is not None
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # the reader went away (pkttrace | head): keep stderr for the summary
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        limit_reached = True
    finally:
        # what the kernel reported before the probes came off is printed,
        # or, past -c or a gone reader (no reading: budget 0), counted
        rest = tracer.stop(budget=0.0 if limit_reached else 1.0)
        try:
            for pkt in rest:
                sinks.packet(pkt)
            sinks.close()
        except (BrokenPipeError, KeyboardInterrupt):
            pass
        c = tracer.counters()
        tracer.close()
        _close_output(record)
        _close_output(out)
        written = f"; {sinks.writer.packets} written to {write_path}" if sinks.writer is not None else ""
        say(summary(c) + written)


@main.command()
@click.option("--listen", default="127.0.0.1:9632", show_default=True, envvar="PKTTRACE_LISTEN",
              metavar="ADDRESS:PORT",
              help="Where to serve /metrics and the live page at / (explicit address; [::1]:PORT for IPv6).")
@click.option("--netns", "netns_names", multiple=True, envvar="PKTTRACE_NETNS", metavar="NAME", callback=dedupe,
              help="Count in this named network namespace (repeatable, a name given twice counts once; "
                   "default: the current one; a traced name deleted and created again is counted again).  "
                   "'all': every namespace of the host, and those created while serving.")
@click.option("--tc", "tc_mode", type=click.Choice(backends.TC_MODES), default="auto",
              show_default=True, envvar="PKTTRACE_TC", help="How to observe tc ingress/egress.")
@click.option("--age-after", type=Seconds(0.1), default=5.0, show_default=True,
              envvar="PKTTRACE_AGE_AFTER", metavar="SECONDS",
              help="Forget a packet whose end is not seen within this time (counted as aged out; at least 0.1).")
@click.option("--max-paths", type=UInt(16, 1 << 20), default=1024, show_default=True,
              envvar="PKTTRACE_MAX_PATHS", help="Distinct paths counted (16-1048576); more are counted as overflow.")
@click.option("--bpf-stats/--no-bpf-stats", default=False, show_default=True, envvar="PKTTRACE_BPF_STATS",
              help="Export each BPF program's run time (kernel BPF stats: ~25 ns more on every run of every "
                   "BPF program of the host while pkttrace serves).")
@click.option("--web.config.file", "web_config_file", envvar="PKTTRACE_WEB_CONFIG_FILE",
              metavar="FILE", help="TLS and basic auth for /metrics and the page: a Prometheus exporter web-config file "
                                   "(tls_server_config, basic_auth_users with bcrypt hashes).")
def serve(listen, netns_names, tc_mode, age_after, max_paths, bpf_stats, web_config_file):
    """Export per-hook, per-table, per-path counters to Prometheus.

    The kernel counts every packet by path; nothing is sent per packet.
    Beside /metrics, a page at / draws the packet flow of the traced
    namespaces with live rates per box, edge and drop reason.
    Every option can also come from a PKTTRACE_* environment variable
    (systemd/pkttrace.env).  Metrics: docs/metrics.md.

    \b
    Example:
      pkttrace serve --listen 127.0.0.1:9632 --netns ptlab-rtr
    """
    from .serve import Exporter, ServeError, ServeOptions
    from .webconfig import WebConfigError, load
    addr = _listen(listen)
    ns_list, all_netns = _netns_choice(netns_names)
    try:
        web = load(web_config_file) if web_config_file is not None else None
    except WebConfigError as e:
        raise UsageFailure(str(e)) from None
    _require_root(named_netns=any(ns_list), all_netns=all_netns, bpf_stats=bpf_stats)
    srv = Exporter(ServeOptions(listen=addr, netns=ns_list, age_after=age_after, tc=tc_mode, max_paths=max_paths,
                                bpf_stats=bpf_stats, all_netns=all_netns, web=web))
    # from before the start, as for a trace (run_trace): a signal during it
    # stops the service as soon as it has started
    signal.signal(signal.SIGTERM, lambda *_: srv.stop())
    signal.signal(signal.SIGHUP, lambda *_: srv.stop())
    signal.signal(signal.SIGINT, lambda *_: srv.stop())
    try:
        srv.start()
    except ServeError as e:
        raise RuntimeFailure(str(e)) from None
    where = "every netns" if all_netns else ", ".join(n or "current netns" for n in ns_list)
    scheme = "https" if web and web.ssl_context else "http"
    say(f"serving metrics of {where} on {scheme}://{listen}/metrics, the live page on {scheme}://{listen}/ "
        f"(ready in {srv.tracer.ready_s * 1000:.0f} ms)")
    try:
        srv.run()
    finally:
        srv.close()
    say("stopped")


def _listen(value: str) -> tuple[str, int]:
    """--listen ADDRESS:PORT: the port in ASCII digits, no spaces anywhere
    (parse_listen strips spaces and its isdigit() takes any script's digits)."""
    from .serve import ServeError, parse_listen
    host, sep, port = value.rpartition(":")
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value) or \
            (sep and port and not port.isdigit()):
        raise UsageFailure(f"--listen {value!r}: give ADDRESS:PORT in ASCII, without spaces, "
                           "e.g. 127.0.0.1:9632 or [::1]:9632")
    try:
        return parse_listen(value)
    except ServeError as e:
        raise UsageFailure(str(e)) from None


@main.command()
@click.argument("recording", type=InputPath())
@filter_options
@view_options
def replay(recording, mark, src, dst, proto, port, iface, count, as_json, verbose, stamp, numeric, color):
    """Print the packets of a recording made with --record (no root needed).

    Filters apply as in live tracing (any stage matches); --iface matches
    device names.  A file that is not a whole recording is refused before
    anything is printed; a last line cut short (the tracer was killed, the
    disk filled) is skipped, and said so.

    \b
    Example:
      pkttrace replay trace.jsonl --proto udp --json
    """
    from .recording import RecordingError, replay_to
    if iface == "any":
        iface = None
    pf = build_filter(mark, src, dst, proto, port, iface, None, live=False)

    def keep(pkt) -> bool:
        return pf.matches(pkt)

    printer = _show(as_json, verbose, stamp, color, None, False).printer()
    assert printer is not None
    try:
        f = sys.stdin.buffer if recording == "-" else open(recording, "rb")
    except OSError as e:
        raise UsageFailure(f"replay: cannot read {recording}: {e.strerror}") from None
    try:
        done = replay_to(f, printer.render, printer.write, keep=keep, count=count)
    except RecordingError as e:     # reading errors included
        raise UsageFailure(f"replay: {recording}: {e}") from None
    except BrokenPipeError:
        # the reader went away (pkttrace replay x | head): done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    except OSError as e:            # writing the output failed (disk full)
        raise RuntimeFailure(f"replay: cannot write the output: {e.strerror}") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if done.cut.lines:
        say(f"replay: {done.cut}")


@main.command()
def doctor():
    """Check what this kernel offers and what pkttrace will use.

    \b
    Example:
      pkttrace doctor
    """
    from . import doctor as doc
    checks = doc.run()
    for c in checks:
        click.echo(c.line())
    if all(c.ok or not c.required for c in checks):
        click.echo(doc.plan(checks))
    else:
        raise RuntimeFailure("this kernel cannot run pkttrace (see FAIL lines above)")


@main.command("install-service")
@click.option("--root", default="/", show_default=True, metavar="DIR",
              help="Install below this directory (a chroot or image being built).")
@click.option("--exec", "exe", metavar="PATH",
              help="The pkttrace the unit runs (default: this one, e.g. /opt/pkttrace/bin/pkttrace).")
@click.option("--no-dashboards", is_flag=True, help="Only the unit and its environment file.")
@click.option("--no-reload", is_flag=True, help="Do not run `systemctl daemon-reload` afterwards.")
def install_service(root, exe, no_dashboards, no_reload):
    """Install the systemd unit, its environment file and the dashboards.

    \b
    Writes, from the files this pkttrace ships:
      /etc/systemd/system/pkttrace.service   ExecStart = this pkttrace
      /etc/default/pkttrace                  only if absent (yours to edit)
      /usr/share/pkttrace/dashboards/        Grafana dashboards, provisioning
    Safe to run again: what is already right is left alone.

    \b
    Examples:
      pkttrace install-service && systemctl enable --now pkttrace
      /opt/pkttrace/bin/pkttrace install-service    # ExecStart=/opt/pkttrace/bin/pkttrace serve
      pkttrace install-service --root /srv/image --exec /usr/bin/pkttrace
    """
    from . import installer
    try:
        exe = installer.check(root, exe)      # what the user typed, before root is asked for
        if root == "/" and os.geteuid() != 0:
            raise UsageFailure("not root: installing a systemd unit writes /etc (or give --root DIR)")
        report = installer.install(root, exe, dashboards=not no_dashboards)
    except installer.InstallError as e:
        raise UsageFailure(str(e)) from None
    for line in report.lines():
        click.echo(escape(line))
    if root == "/" and not no_reload and report.written and os.path.isdir("/run/systemd/system"):
        import subprocess
        r = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeFailure(f"systemctl daemon-reload: {r.stderr.strip() or r.returncode}")
        click.echo("systemctl daemon-reload: done")


@main.command()
@click.option("--netns", "netns_names", multiple=True, metavar="NAME", callback=dedupe,
              help="Clean this named network namespace (repeatable; default: the current one).")
@click.option("--all", "all_netns", is_flag=True, help="Clean the current network namespace and every named one.")
def cleanup(netns_names, all_netns):
    """Remove what killed pkttrace sessions left behind, and nothing else.

    A pkttrace killed by SIGKILL (or a crash) cannot remove the classic tc
    state it added with --tc classic (kernels without TCX): its cls_bpf
    filters, which keep its programs and their maps loaded, and the clsact
    qdisc it created.  This removes exactly those: filters named by pkttrace,
    running pkttrace's tc_ingress/tc_egress programs, whose program no
    process holds any more; then each clsact qdisc a pkttrace created, once
    no filter at all is left on it.  Filters of other tools and of running
    pkttrace sessions are never touched.  A classic-mode start does the same
    in the namespaces it traces.

    Everything else a killed session had is held by its file descriptors and
    goes away with the process: TCX, netfilter, tracepoint, fentry and kprobe
    links, programs and maps (after a SIGKILL with TCX, bpftool prog/map/link
    show lists none of them).

    One line per thing removed, then a summary.

    \b
    Examples:
      pkttrace cleanup                      # the current network namespace
      pkttrace cleanup --netns ptlab-rtr
      pkttrace cleanup --all
    """
    if all_netns and netns_names:
        raise UsageFailure("--all already cleans every named network namespace: give --all or --netns, not both")
    ns_list = _all_netns() if all_netns else _check_netns(netns_names)
    _require_root()
    from .probes import AttachError, clean_dead_sessions
    filters = qdiscs = live = cleaned = 0
    for ns in ns_list:
        try:
            done = clean_dead_sessions(ns)
        except AttachError as e:
            if all_netns and ns is not None and not netns.exists(ns):
                continue    # deleted since it was listed
            raise RuntimeFailure(str(e)) from None
        for line in done.removed:
            click.echo(escape(line))
        filters, qdiscs, live, cleaned = filters + done.filters, qdiscs + done.qdiscs, live + done.live, cleaned + 1
    where = f"{cleaned} network namespace{'s' if cleaned != 1 else ''}"
    running = f"; {live} filter{'s' if live != 1 else ''} of running pkttrace sessions left alone" if live else ""
    if filters or qdiscs:
        click.echo(f"removed {filters} cls_bpf filter{'s' if filters != 1 else ''} and {qdiscs} clsact "
                   f"qdisc{'s' if qdiscs != 1 else ''} in {where}{running}")
    else:
        click.echo(f"nothing left by a killed pkttrace in {where}{running}")


def _all_netns() -> list[str | None]:
    """The current netns and every named one, each once (a name may stand
    for the current namespace)."""
    here = netns.inode(None)
    seen = {here}
    out: list[str | None] = [None]
    for name in netns.names():
        ino = netns.current_inode(name)
        if ino is not None and ino not in seen:
            seen.add(ino)
            out.append(name)
    return out


@main.group()
def lab():
    """A netns lab (client — router — server) to see pkttrace work.

    \b
    Example:
      pkttrace lab up && pkttrace --netns ptlab-rtr
    """


def _lab(prefix):
    from .lab import Lab, LabError
    try:
        return Lab(prefix)
    except LabError as e:
        raise UsageFailure(str(e)) from None


def _valid_prefix(_ctx, _param, value):
    # at parse time: a bad prefix gets its one line before root is asked for
    from .lab import LabError, validate_prefix
    try:
        return validate_prefix(value)
    except LabError as e:
        raise UsageFailure(str(e)) from None


_prefix = click.option("--prefix", default="ptlab", show_default=True, callback=_valid_prefix,
                       help="Name prefix of the lab's namespaces (1-8 characters of [a-z0-9]).")


@lab.command("up")
@_prefix
@click.option("--no-rules", is_flag=True, help="Do not load the demo iptables rules.")
def lab_up(prefix, no_rules):
    """Create the lab namespaces, links, addresses and demo rules.

    \b
    Example:
      pkttrace lab up --prefix demo
    """
    from .lab import LabError
    _require_root()
    lb = _lab(prefix)
    try:
        lb.up(rules=not no_rules)
    except LabError as e:
        raise RuntimeFailure(str(e)) from None
    click.echo(f"lab up: {lb.client} — {lb.router} — {lb.server}; trace with: pkttrace --netns {lb.router}")


@lab.command("down")
@_prefix
def lab_down(prefix):
    """Remove the lab's namespaces (and everything in them).

    \b
    Example:
      pkttrace lab down
    """
    _require_root()
    _lab(prefix).down()
    click.echo("lab down")


@lab.command("status")
@_prefix
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
def lab_status(prefix, as_json):
    """Show the lab's namespaces, links, addresses and rules.

    \b
    Example:
      pkttrace lab status --json
    """
    import json
    st = _lab(prefix).status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    for ns, info in st["namespaces"].items():
        click.echo(f"{ns}: {'present' if info['exists'] else 'absent'}")
        for ifname, li in (info.get("links") or {}).items():
            addrs = escape(" ".join(li.get("addresses", [])))
            click.echo(f"  {escape(str(ifname)):<6} {'up' if li.get('up') else 'down':<5} {addrs}")
    click.echo(f"demo rules: {'present' if st.get('rules') else 'absent'}")


@lab.command("demo")
@_prefix
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of blocks.")
@click.option("--keep", is_flag=True, help="Leave the lab up afterwards.")
@click.option("--record", "record_path", type=OutputPath(), metavar="FILE",
              help="Save the raw records for `pkttrace replay` (and test fixtures; a regular file).")
def lab_demo(prefix, as_json, keep, record_path):
    """Bring the lab up and trace one packet of each kind the diagrams draw.

    \b
    Example:
      pkttrace lab demo
    """
    from . import demo
    from .lab import LabError
    from .output import Printer
    from .session import TraceError
    _require_root()
    printer = Printer(sys.stdout, as_json)
    record = _open_record(record_path)
    try:
        demo.run(lambda s: click.echo(s, nl=False, err=as_json), printer.packet, prefix=prefix, keep=keep,
                 record=record)
    except (LabError, TraceError) as e:
        raise RuntimeFailure(str(e)) from None
    finally:
        if record is not None:
            record.close()


# click >= 8.2 raises this for a group called without a command (8.1 prints the help itself)
@main.command()
@click.option("-r", "read_path", type=InputPath(), metavar="FILE",
              help="The recording to read: pkttrace --record FILE, or a pcap-ng file written by -w.")
@click.option("--packet", "packet_id", type=UInt(0, (1 << 63) - 1), metavar="ID",
              help="The packet with this id (#ID in pkttrace's output); else the first that matches the filters.")
@click.option("--mark", metavar="VALUE[/MASK]", help="The first packet whose mark matches at any stage.")
@click.option("--src", metavar="CIDR", help="... whose source is in this network.")
@click.option("--dst", metavar="CIDR", help="... whose destination is in this network.")
@click.option("--proto", metavar="tcp|udp|icmp|icmpv6|N", help="... of this IP protocol.")
@click.option("--port", metavar="N", help="... with this TCP/UDP source or destination port.")
@click.option("-i", "--iface", metavar="NAME", help="... received or sent on this device.")
@click.option("-o", "out_path", type=_PathParam(lambda v, _what: _write_path(v)), metavar="FILE",
              help="The SVG file to write (-: standard output).")
def diagram(read_path, packet_id, mark, src, dst, proto, port, iface, out_path):
    """Draw one recorded packet's path on the packet-flow diagram, as SVG.

    The drawing is the live page's (`pkttrace serve`, at /): the stages the
    packet crossed are highlighted, with the tables it crossed in each hook,
    their verdicts, mark and NAT changes, the routing decision, and where it
    ended (the drop reason and location).  No root needed.

    \b
    Example:
      pkttrace diagram -r trace.jsonl --proto udp --port 5009 -o drop.svg
      pkttrace diagram -r trace.pcapng --packet 1024 -o forwarded.svg
    """
    from .diagram import packet_svg
    from .recording import RecordingError, replay
    if iface == "any":
        iface = None
    pf = build_filter(mark, src, dst, proto, port, iface, None, live=False)
    if read_path is None:
        raise UsageFailure("diagram: which recording? -r FILE (made by pkttrace --record FILE or -w FILE)")
    if out_path is None:
        raise UsageFailure("diagram: where to? -o FILE.svg (- for standard output)")
    try:
        f = sys.stdin.buffer if read_path == "-" else open(read_path, "rb")
    except OSError as e:
        raise UsageFailure(f"diagram: cannot read {read_path}: {e.strerror}") from None
    found = None
    try:
        for source in _recorded_sources(f, read_path, "diagram"):
            found = next((p for p in replay(source) if (packet_id is None or p.id == packet_id) and pf.matches(p)),
                         None)
            if found is not None:
                break
    except RecordingError as e:
        raise UsageFailure(f"diagram: {read_path}: {e}") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if found is None:
        which = f"packet #{packet_id}" if packet_id is not None else "packet"
        filtered = " that matches the filters" if pf.flags else ""
        raise UsageFailure(f"diagram: no {which}{filtered} in {read_path}")
    svg = packet_svg(found)
    try:
        if out_path == "-":
            sys.stdout.write(svg)
            sys.stdout.flush()
            return
        with open_output(out_path, "-o") as out:
            out.write(svg)
    except InputError as e:
        raise UsageFailure(str(e)) from None
    except OSError as e:
        raise RuntimeFailure(f"diagram: cannot write {out_path}: {e.strerror}") from None
    say(f"diagram: #{found.id} ({found.fate}) drawn in {out_path}")


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def run(argv=None) -> int:
    """Console entry point: click's errors become one line too."""
    libbpf.one_malloc_arena()
    try:
        main.main(args=argv, prog_name="pkttrace", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        if isinstance(e, _NO_ARGS_IS_HELP):
            e.show()                    # `pkttrace lab`: the group's help, as click shows it
            return e.exit_code
        if isinstance(e, click.UsageError):
            say(e.format_message())     # click quotes what was typed: escaped, one line
            return EXIT_USAGE
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
