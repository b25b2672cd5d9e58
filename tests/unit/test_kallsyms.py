"""/proc/kallsyms, faked: sysinfo.Kallsyms (address -> symbol+offset) and
tracer.kallsyms (what the backend probe reads: function code ranges, which
functions exist, the read ahead of need)."""

import sys

import pytest

from tracer.sysinfo import Kallsyms

# Unsorted on purpose; data (D, b, r) and absolute (A) symbols must be ignored.
FAKE = """\
ffffffff81000200 D some_data
ffffffff81000100 t local_helper
ffffffff81000000 T _stext
0000000000000000 A fixed_percpu_data
ffffffff81000080 b bss_counter
ffffffff81000300 W weak_fn
ffffffff81000340 r rodata_table
garbage line
ffffffffc0000000 t mod_fn\t[mymod]

"""
FIRST = 0xFFFFFFFF81000000


@pytest.fixture
def ksyms(tmp_path):
    p = tmp_path / "kallsyms"
    p.write_text(FAKE)
    return Kallsyms(str(p))


@pytest.mark.parametrize("addr, expected", [
    (FIRST, "_stext+0x0"),
    (FIRST + 0x10, "_stext+0x10"),
    (FIRST + 0x80, "_stext+0x80"),            # bss_counter ignored
    (FIRST + 0x100, "local_helper+0x0"),       # lower-case t: static text counts
    (FIRST + 0x250, "local_helper+0x150"),     # some_data ignored
    (FIRST + 0x300, "weak_fn+0x0"),            # weak symbols count
    (FIRST + 0x345, "weak_fn+0x45"),           # rodata_table ignored
    (0xFFFFFFFFC0000024, "mod_fn+0x24"),       # module symbol, "[mymod]" column tolerated
])
def test_symbol_plus_offset(ksyms, addr, expected):
    assert ksyms(addr) == expected


# As a kernel with BPF programs loaded lists them: vmlinux by address, the
# modules above it, then BPF programs and trampolines last, below the modules.
LOADED = """\
ffffffff81000000 T _stext
ffffffff81000100 t helper
ffffffff82000000 T _etext
ffffffffc0000000 t mod_fn\t[mymod]
ffffffffc0000800 t mod_fn2\t[mymod]
ffffffffa0001000 t bpf_prog_6deef7357e7b4530_nf_obs_0\t[bpf]
ffffffffa0000000 t bpf_trampoline_6442491845\t[bpf]
"""


@pytest.mark.parametrize("addr, expected", [
    (FIRST + 0x104, "helper+0x4"),
    (0xFFFFFFFF82000010, "_etext+0x10"),
    (0xFFFFFFFFA0000010, "bpf_trampoline_6442491845+0x10"),     # set aside, then found
    (0xFFFFFFFFA0001044, "bpf_prog_6deef7357e7b4530_nf_obs_0+0x44"),
    (0xFFFFFFFFC0000004, "mod_fn+0x4"),      # above the set-aside ones: the main table's
    (0xFFFFFFFFC0000900, "mod_fn2+0x100"),
])
def test_symbols_listed_out_of_order_are_found_beside_the_sorted_ones(tmp_path, addr, expected):
    p = tmp_path / "kallsyms"
    p.write_text(LOADED)
    assert Kallsyms(str(p))(addr) == expected


@pytest.mark.parametrize("addr", [FIRST - 1, 0x1000, 0])
def test_address_below_first_symbol_is_hex(ksyms, addr):
    assert ksyms(addr) == hex(addr)


def test_zeroed_addresses_are_ignored(tmp_path):
    # what an unprivileged reader sees: every address 0
    p = tmp_path / "kallsyms"
    p.write_text("0000000000000000 T _stext\n0000000000000000 t helper\n")
    assert Kallsyms(str(p))(FIRST + 8) == hex(FIRST + 8)


def test_missing_file_gives_hex(tmp_path):
    assert Kallsyms(str(tmp_path / "nope"))(FIRST) == hex(FIRST)


def test_file_is_read_lazily_and_once(tmp_path):
    p = tmp_path / "kallsyms"
    ks = Kallsyms(str(p))          # not there yet: nothing read at construction
    p.write_text(FAKE)
    assert ks(FIRST + 4) == "_stext+0x4"
    p.write_text("ffffffff81000000 T renamed\n")
    assert ks(FIRST + 4) == "_stext+0x4"  # cached


def test_code_range_of_a_function_for_telling_drops_apart():
    """kallsyms.code_of: nf_hook_slow's code, from its line and the next
    one; None where kallsyms hides addresses (not root, kptr_restrict)."""
    from tracer.kallsyms import code_of as _code_of
    text = (b"ffffffff81f80840 T __pfx_nf_hook_slow\nffffffff81f80850 T nf_hook_slow\n"
            b"ffffffff81f80960 T __pfx_nf_hook_slow_list\n")
    assert _code_of(text, b"nf_hook_slow") == (0xffffffff81f80850, 0xffffffff81f80960)
    assert _code_of(text, b"nft_do_chain") is None
    zeros = b"0000000000000000 T nf_hook_slow\n0000000000000000 T nf_hook_slow_list\n"
    assert _code_of(zeros, b"nf_hook_slow") is None


KALLSYMS = (b"ffffffff81f80840 T __pfx_nf_hook_slow\nffffffff81f80850 T nf_hook_slow\n"
            b"ffffffff81f80960 T nf_hook_slow_list\nffffffff82000000 D nf_hooks_data\n"
            b"ffffffff82000100 W weak_fn\nffffffffc0001000 t nft_do_chain\t[nf_tables]\n"
            b"ffffffffc0002000 t nft_do_chain_ipv4\t[nf_tables]\n")


@pytest.mark.parametrize("name, listed", [
    ("nf_hook_slow", True),          # vmlinux, T
    ("nft_do_chain", True),          # a module's: "\t[nf_tables]" after the name
    ("weak_fn", True),               # W counts
    ("nf_hooks_data", False),        # data, not a function
    ("nf_hook", False),              # only a prefix of listed names
    ("hook_slow", False),            # only a suffix
    ("ipt_do_table", False),         # absent
])
def test_functions_are_found_by_whole_name_and_function_type(name, listed):
    from tracer.kallsyms import Functions, defines
    assert defines(KALLSYMS, name.encode()) is listed
    fns = Functions(KALLSYMS)
    assert (name in fns) is listed
    assert (name in fns) is listed          # remembered, same answer
    assert 42 not in fns


def test_the_read_ahead_is_taken_once_then_read_again(tmp_path, monkeypatch):
    """prefetch() reads in a thread; take() hands that text over and forgets
    it (a service keeps no 5 MB copy), so the next take() reads the file anew."""
    from tracer import kallsyms
    p = tmp_path / "kallsyms"
    p.write_bytes(KALLSYMS)
    monkeypatch.setattr(kallsyms, "PATH", str(p))
    monkeypatch.setattr(kallsyms, "_reader", None)
    monkeypatch.setattr(kallsyms, "_prefetched", None)
    kallsyms.prefetch()
    reader = kallsyms._reader
    kallsyms.prefetch()                     # once: no second reader
    assert kallsyms._reader is reader
    reader.join()
    p.write_bytes(b"ffffffff81000000 T changed\n")
    assert kallsyms.take() == KALLSYMS      # what was read ahead, not the file as it is now
    assert kallsyms._prefetched is None and kallsyms._reader is None
    assert kallsyms.take() == b"ffffffff81000000 T changed\n"   # the next take reads now
    p.unlink()
    assert kallsyms.take() == b""           # unreadable: empty, and the probe finds nothing


@pytest.mark.parametrize("argv, reads", [
    (["--help"], False),
    (["lab", "status"], False),
    (["replay", "x.jsonl"], False),
    (["-r", "x.jsonl"], False),
    (["--mark", "0xZZ"], True),            # a trace: read ahead (the bad mark is said later, exit 2)
    (["serve", "--listen", "nonsense"], True),
])
def test_the_command_line_reads_ahead_only_for_commands_that_probe(monkeypatch, tmp_path, argv, reads):
    """`pkttrace` (tracer.__main__.main) starts the kallsyms read before its
    imports for what may trace; not for help, the lab, replays."""
    from tracer import __main__ as entry, kallsyms
    p = tmp_path / "kallsyms"
    p.write_bytes(KALLSYMS)
    monkeypatch.setattr(kallsyms, "PATH", str(p))
    monkeypatch.setattr(kallsyms, "_reader", None)
    monkeypatch.setattr(sys, "argv", ["pkttrace", *argv])
    started = []
    monkeypatch.setattr(kallsyms, "prefetch", lambda: started.append("read ahead"))
    # the thread must find one malloc arena, not make its own (RSS)
    monkeypatch.setattr("tracer.libbpf.one_malloc_arena", lambda: started.append("one arena"))
    monkeypatch.setattr("tracer.cli.run", lambda: 0)     # the command itself is test_cli's
    assert entry.main() == 0
    assert started == (["one arena", "read ahead"] if reads else [])


@pytest.mark.parametrize("second", [
    # a module loaded between the count and the fill: more symbols than counted
    [(FIRST, b"_stext"), (FIRST + 0x100, b"helper"), (FIRST + 0x200, b"a_much_longer_name_than_counted"),
     (0xFFFFFFFFC0000000, b"new_mod_fn")],
    # one unloaded: fewer
    [(FIRST, b"_stext")],
])
def test_kallsyms_changing_between_the_count_and_the_fill(monkeypatch, second):
    """The symbols are counted in one pass and filled into arrays of that
    size in a second: what changed between them still reads right."""
    first = [(FIRST, b"_stext"), (FIRST + 0x100, b"helper")]
    passes = iter([first, second])
    monkeypatch.setattr(Kallsyms, "_text_symbols", lambda self: iter(next(passes)))
    ks = Kallsyms("/nonexistent")
    for a, name in second:
        assert ks(a + 4) == f"{name.decode()}+0x4"
    assert ks(FIRST - 1) == hex(FIRST - 1)
    main = ks._tables[0]
    assert len(main.addrs) == len(main.ends) == len(second) and len(main.names) == sum(len(n) for _, n in second)
