"""tracer/events.py must mirror bpf/pkttrace.h exactly.

Struct layouts are checked against the BTF of the built object (what the
kernel programs really use); enums and #defines are parsed from the header
(enums only reach BTF when the code uses them).  Every comparison is an
equality of whole lists or dicts, so a member, value or constant added on
one side only fails the test.
"""

import ctypes
import os
import re
import shutil
import subprocess

import pytest

from tracer import events
from tracer.libbpf import BpfError, BpfObject

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPF_DIR = os.path.join(REPO, "bpf")
OBJECT = os.path.join(BPF_DIR, "pkttrace.bpf.o")
HEADER = os.path.join(BPF_DIR, "pkttrace.h")


def _read_header() -> str:
    """pkttrace.h without comments."""
    with open(HEADER) as f:
        return re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)


def _object_up_to_date() -> bool:
    if not os.path.isfile(OBJECT):
        return False
    # the Makefile's dependency file covers pkttrace.h: a header change means a rebuild
    return subprocess.run(["make", "-q", "-C", BPF_DIR], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def bpf_object():
    """The built object, built with `make -C bpf` when missing or stale."""
    if shutil.which("make") is None:
        pytest.fail("make not found: needed to build bpf/pkttrace.bpf.o")
    if not _object_up_to_date():
        clang = os.environ.get("CLANG", "clang")
        if shutil.which(clang) is None:
            pytest.fail(f"{clang} not found: install clang to build bpf/pkttrace.bpf.o (CI must have it)")
        r = subprocess.run(["make", "-C", BPF_DIR], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"make -C bpf failed:\n{r.stdout}\n{r.stderr}")
    try:
        obj = BpfObject(OBJECT)  # opening (not loading) needs no privileges
    except BpfError as e:
        pytest.fail(f"cannot open {OBJECT}: {e}")
    yield obj
    obj.close()


@pytest.fixture(scope="session")
def btf(bpf_object):
    return bpf_object.btf()


@pytest.fixture(scope="session")
def header() -> str:
    return _read_header()


def _mirror_layout(cls) -> list[tuple[str, int, int]]:
    return [(name, getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in cls._fields_]


# --- structs: ctypes mirror vs BTF ------------------------------------------

def test_every_header_struct_has_a_mirror(header):
    c_structs = set(re.findall(r"^struct\s+(pt_\w+)\s*\{", header, flags=re.M))
    assert c_structs, "no struct found in pkttrace.h: the regex is out of date"
    assert c_structs == set(events.MIRRORS)


@pytest.mark.parametrize("name", sorted(events.MIRRORS))
def test_struct_member_names_in_order(btf, name):
    c_names = list(btf.struct_layout(name))
    py_names = [f[0] for f in events.MIRRORS[name]._fields_]
    assert py_names == c_names


@pytest.mark.parametrize("name", sorted(events.MIRRORS))
def test_struct_member_offsets_and_sizes(btf, name):
    c_layout = [(m, off, size) for m, (off, size) in btf.struct_layout(name).items()]
    assert _mirror_layout(events.MIRRORS[name]) == c_layout


@pytest.mark.parametrize("name", sorted(events.MIRRORS))
def test_struct_total_size(btf, name):
    assert ctypes.sizeof(events.MIRRORS[name]) == btf.struct_size(name)


# Member types as declared in the header: BTF offsets and sizes do not catch a
# __u32 that became __s32, a decoding difference.
_CTYPES = {"__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32,
           "__u64": ctypes.c_uint64, "__s32": ctypes.c_int32, "__s64": ctypes.c_int64,
           "char": ctypes.c_char}
_MEMBER = re.compile(r"^\s*(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?\s*;", re.M)


def _header_members(header: str, name: str) -> list[tuple[str, str, str | None]]:
    m = re.search(r"^struct\s+" + name + r"\s*\{(.*?)^\};", header, flags=re.M | re.S)
    assert m, f"struct {name} not found in pkttrace.h"
    return _MEMBER.findall(m.group(1))


@pytest.mark.parametrize("name", sorted(events.MIRRORS))
def test_struct_member_types_match_header(header, name):
    fields = events.MIRRORS[name]._fields_
    members = _header_members(header, name)
    assert [m[1] for m in members] == [f[0] for f in fields]
    for (ctype, member, length), (_, pytype, *_) in zip(members, fields):
        if length:
            n = int(length) if length.isdigit() else getattr(events, length)
            assert issubclass(pytype, ctypes.Array), member
            assert pytype._length_ == n, member
            pytype = pytype._type_
        if ctype.startswith("struct "):
            assert pytype is events.MIRRORS[ctype.split()[1]], member
        else:
            assert pytype is _CTYPES[ctype], f"{name}.{member}: {ctype} mirrored as {pytype.__name__}"


def test_record_header_size_is_offset_of_stages(btf):
    assert events.RECORD_HEADER_SIZE == btf.struct_layout("pt_record")["stages"][0]
    assert events.STAGE_SIZE == btf.struct_size("pt_stage")


# --- enums and #defines: parsed from the header -----------------------------

def _c_enums(header: str) -> dict[str, dict[str, int]]:
    """enum name -> {member name: value}, e.g. pt_fate -> {"PT_FATE_NONE": 0, ...}."""
    out = {}
    for name, body in re.findall(r"^enum\s+(pt_\w+)\s*\{(.*?)\};", header, flags=re.M | re.S):
        members = re.findall(r"^\s*(PT_\w+)\s*(?:=\s*(\w+))?\s*,?\s*$", body, flags=re.M)
        out[name] = {k: int(v, 0) if v else None for k, v in members}  # None: no explicit value
    return out


def _py_enum_name(c_name: str) -> str:
    # pt_stage_kind -> StageKind, pt_deliver_how -> DeliverHow
    return "".join(w.capitalize() for w in c_name[len("pt_"):].split("_"))


def _member_prefix(names) -> str:
    p = os.path.commonprefix([n for n in names if not n.endswith("__MAX")])
    return p[:p.rindex("_") + 1]  # PT_STAGE_, PT_FATE_, ...


C_ENUMS = _c_enums(_read_header())


def test_header_enums_parsed():
    # guard against a regex that silently finds nothing
    assert {"pt_stage_kind", "pt_fate", "pt_stat"} <= set(C_ENUMS)
    assert C_ENUMS["pt_stage_kind"]["PT_STAGE_RX"] == 1
    assert C_ENUMS["pt_stat"]["PT_STAT__MAX"] == events.PT_STAT_MAX


@pytest.mark.parametrize("c_name", sorted(C_ENUMS))
def test_enum_values_match_header(c_name):
    c = C_ENUMS[c_name]
    assert c, f"enum {c_name} has no members the regex understands"
    assert None not in c.values(), f"enum {c_name}: give every member an explicit value (record format)"
    cls = getattr(events, _py_enum_name(c_name), None)
    assert cls is not None, f"enum {c_name} has no mirror events.{_py_enum_name(c_name)}"
    prefix = _member_prefix(c)
    want = {k[len(prefix):]: v for k, v in c.items() if not k.endswith("__MAX")}
    assert {m.name: m.value for m in cls} == want


def test_enum_max_sizes_match_header():
    # PT_STAT__MAX sizes the counter array: events.PT_STAT_MAX
    for c_name, members in C_ENUMS.items():
        prefix = _member_prefix(members)
        for k, v in members.items():
            if k.endswith("__MAX"):
                assert getattr(events, prefix + "MAX", None) == v, k
                assert max(getattr(events, _py_enum_name(c_name))) < v


def _c_defines(header: str) -> dict[str, int]:
    out = {}
    for name, expr in re.findall(r"^#define\s+(PT_\w+)\s+(.+?)\s*$", header, flags=re.M):
        expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr)
        assert re.fullmatch(r"[0-9a-fA-Fx()<\s|]+", expr), f"cannot evaluate #define {name} {expr}"
        out[name] = eval(expr, {"__builtins__": {}})  # digits, parentheses, << and | only
    return out


def _py_constant(c_name: str):
    # PT_MAX_STAGES keeps its name; PT_F_MARK is F_MARK, PT_SEEN_INPUT is SEEN_INPUT, ...
    for name in (c_name, c_name[len("PT_"):]):
        if hasattr(events, name):
            return getattr(events, name)
    return None


def test_defines_parsed(header):
    # guard against a regex that silently finds nothing
    assert {"PT_MAX_STAGES", "PT_MAX_NETNS", "PT_MAX_ROUTE", "PT_NF_SLOTS", "PT_SEEN_INPUT", "PT_F_MARK",
            "PT_F_IFACE", "PT_REC_TRUNCATED"} <= set(_c_defines(header))


def test_every_define_is_mirrored_with_the_same_value(header):
    c = _c_defines(header)
    py = {name: _py_constant(name) for name in c}
    assert py == c



# --- the decoder's formats (tracer/layout.py): derived, and equal to BTF -----

def test_decoder_formats_read_what_btf_says_is_there(btf):
    from tracer import layout
    rec = btf.struct_layout("pt_record")
    for off, fmt, names in ((layout.VALS_OFF, layout.VALS, ("id", "drop_location")),
                            (layout.TAIL_OFF, layout.TAIL, ("match", "comm")),
                            (layout.LINKS_OFF, layout.LINKS, ("cause", "prev_netns"))):
        first, last = rec[names[0]], rec[names[-1]]
        assert off == first[0]
        assert fmt.size == last[0] + last[1] - first[0], names
    assert layout.HEADER_SIZE == rec["stages"][0] and layout.STAGE_SIZE == btf.struct_size("pt_stage")
    stage = btf.struct_layout("pt_stage")
    assert (layout.KIND_OFF, layout.TS_OFF) == (stage["kind"][0], stage["ts"][0])
    assert layout.N_STAGES_OFF == rec["n_stages"][0] and layout.FLAGS_OFF == rec["flags"][0]


def test_decoder_reads_a_record_as_ctypes_does():
    """A record filled field by field through the mirror reads back through
    the struct formats unchanged."""
    from tracer import layout
    r = events.PtRecord()
    r.id, r.drop_location, r.match, r.flags, r.sport, r.dport, r.pid = 7, 0xffffffff81000000, 3, 5, 40000, 53, 99
    r.cause, r.prev, r.next, r.link, r.next_netns, r.prev_netns = 11, 12, 13, 14, 15, 16
    r.comm = b"dig"
    raw = bytes(r)
    assert layout.VALS.unpack_from(raw, layout.VALS_OFF) == (7, 0xffffffff81000000)
    match, _seen, flags, _pad, sport, dport, _s, _d, pid, comm = layout.TAIL.unpack_from(raw, layout.TAIL_OFF)
    assert (match, flags, sport, dport, pid, comm.rstrip(b"\0")) == (3, 5, 40000, 53, 99, b"dig")
    assert layout.LINKS.unpack_from(raw, layout.LINKS_OFF) == (11, 12, 13, 14, 15, 16)
