"""A small ctypes layer over the system libbpf (libbpf.so.1, 1.1 on Debian 12).

Only what pkttrace needs: open an object, fill its `const volatile` config,
set program types libbpf 1.1 does not know (netfilter), load, attach
tracepoints, create netfilter and TCX links with the bpf() syscall (libbpf
1.1 has no helpers for them), read maps, read the ring buffer, and look up
types in BTF.  Every failure becomes a BpfError with one readable line.
"""
from __future__ import annotations

import contextlib
import ctypes
from importlib import resources
import ctypes.util
import errno
import mmap
import os
import select
import struct
import sys
import threading
from typing import Iterator, cast

# Program and attach types from include/uapi/linux/bpf.h (stable ABI numbers).
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_NETFILTER = 32
BPF_NETFILTER = 45
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_PROG_LOAD = 5
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
TCX_NEXT = -1
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
# __NR_bpf by os.uname().machine, from the kernel's syscall tables
# (arch/x86/entry/syscalls/syscall_{64,32}.tbl, arch/arm/tools/syscall.tbl,
# arch/powerpc/kernel/syscalls/syscall.tbl, arch/s390/kernel/syscalls/
# syscall.tbl; arm64, riscv and loongarch use asm-generic/unistd.h's 280).
# Not a default: a wrong number would be some other syscall.
SYS_BPF = {"x86_64": 321, "i686": 357, "i386": 357, "aarch64": 280, "riscv64": 280, "loongarch64": 280,
           "ppc64le": 361, "ppc64": 361, "s390x": 351, "armv7l": 386, "armv6l": 386}

# BTF kinds (include/uapi/linux/btf.h)
BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT = 1, 2, 3, 4
BTF_KIND_ENUM, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST = 6, 8, 9, 10
BTF_KIND_ENUM64 = 19

_RINGBUF_BUSY = 1 << 31
_RINGBUF_DISCARD = 1 << 30
_RINGBUF_HDR = 8


OBJECT_ENV = "PKTTRACE_BPF_OBJECT"


def object_path() -> str:
    """The built BPF object: $PKTTRACE_BPF_OBJECT, the package's copy, or a source build."""
    env = os.environ.get(OBJECT_ENV)
    if env:
        return env
    pkg = resources.files("tracer") / "data" / "pkttrace.bpf.o"
    if pkg.is_file():
        return str(pkg)
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf", "pkttrace.bpf.o")
    if os.path.isfile(src):
        return src
    raise BpfError("BPF object not found: reinstall pkttrace (pip install .) or run `make -C bpf`")


class BpfError(Exception):
    """A libbpf or bpf() failure, as one line a user can act on."""


class UnsupportedArchitecture(BpfError):
    """This machine's bpf() syscall number is not known: refused, never guessed.
    A BpfError, so every caller that already turns those into one line does."""


def sys_bpf() -> int:
    """The bpf() syscall number of this machine, or UnsupportedArchitecture."""
    machine = os.uname().machine
    try:
        return SYS_BPF[machine]
    except KeyError:
        raise UnsupportedArchitecture(f"unsupported architecture {machine}: pkttrace knows the bpf() syscall "
                                      f"on {', '.join(sorted(SYS_BPF))}") from None


def _errmsg(what: str, err: int, hint: str = "") -> str:
    err = abs(err)
    name = errno.errorcode.get(err, str(err))
    msg = f"{what}: {os.strerror(err)} ({name})"
    return f"{msg}; {hint}" if hint else msg


_lib = None
_libc = ctypes.CDLL(None, use_errno=True)
_log: list[str] = []

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


LIBBPF_DEBUG = 2
# A verifier log comes as one message: big enough for its last lines, which
# say why a program was refused.  One buffer per thread (programs are
# verified in parallel, BpfObject.load_split): libbpf calls back thousands
# of times while loading.
_print_bufs = threading.local()


_NO_PRINT = _PRINT_FN()    # a NULL callback: libbpf then formats nothing
# libbpf's print callback is one for the process, and opens and loads may
# run in two threads at once (load_split): the messages stay off while any
# of them asks, back on once none does
_print_lock = threading.Lock()
_quiet_depth = 0


@contextlib.contextmanager
def _messages_off() -> Iterator[None]:
    global _quiet_depth
    with _print_lock:
        _quiet_depth += 1
        lib().libbpf_set_print(_NO_PRINT)
    try:
        yield
    finally:
        with _print_lock:
            _quiet_depth -= 1
            if not _quiet_depth:
                lib().libbpf_set_print(_print_cb)


@contextlib.contextmanager
def _messages_on() -> Iterator[None]:
    """For repeating a failure with its reason, even while another thread's
    open or load runs quietly (its callbacks then come here: slower only)."""
    with _print_lock:
        lib().libbpf_set_print(_print_cb)
    try:
        yield
    finally:
        with _print_lock:
            if _quiet_depth:
                lib().libbpf_set_print(_NO_PRINT)


@_PRINT_FN
def _print_cb(level, fmt, args):
    if level >= LIBBPF_DEBUG:
        return 0  # relocation chatter: never why something failed
    # x86_64/aarch64 pass va_list by pointer, so vsnprintf can format it here.
    buf = getattr(_print_bufs, "buf", None)
    if buf is None:
        buf = _print_bufs.buf = ctypes.create_string_buffer(1 << 20)
    _libc.vsnprintf(buf, len(buf), fmt, ctypes.c_void_p(args))
    msg = buf.value.decode(errors="replace").rstrip()
    _log.extend(msg.splitlines()[-40:] if len(msg) > 4096 else [msg])
    del _log[:-200]  # keep the tail: the verifier's last lines say why
    return 0


def lib():
    """Load libbpf.so.1 once and declare the functions we call."""
    global _lib
    if _lib is not None:
        return _lib
    sys_bpf()   # an unknown architecture is refused before anything touches the kernel
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        L = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BpfError(f"cannot load libbpf ({name}): {e}; install libbpf1") from None
    P, I, U, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
    sigs = {
        "libbpf_set_print": (P, [_PRINT_FN]),
        "libbpf_get_error": (ctypes.c_long, [P]),
        "bpf_object__open_file": (P, [S, P]),
        "bpf_object__load": (I, [P]),
        "bpf_object__close": (None, [P]),
        "bpf_object__btf": (P, [P]),
        "bpf_object__find_program_by_name": (P, [P, S]),
        "bpf_object__find_map_by_name": (P, [P, S]),
        "bpf_object__next_map": (P, [P, P]),
        "bpf_map__name": (S, [P]),
        "bpf_map__reuse_fd": (I, [P, I]),
        "bpf_object__next_program": (P, [P, P]),
        "bpf_program__name": (S, [P]),
        "bpf_program__section_name": (S, [P]),
        "bpf_program__set_type": (I, [P, I]),
        "bpf_program__set_expected_attach_type": (I, [P, I]),
        "bpf_program__set_autoload": (I, [P, ctypes.c_bool]),
        "bpf_program__autoload": (ctypes.c_bool, [P]),
        "bpf_program__type": (I, [P]),
        "bpf_program__expected_attach_type": (I, [P]),
        "bpf_program__fd": (I, [P]),
        "bpf_program__attach": (P, [P]),
        "bpf_link__destroy": (I, [P]),
        "bpf_link__fd": (I, [P]),
        "bpf_map__fd": (I, [P]),
        "bpf_map__set_max_entries": (I, [P, U]),
        "bpf_map__max_entries": (U, [P]),
        "bpf_map__set_map_flags": (I, [P, U]),
        "bpf_map__map_flags": (U, [P]),
        "bpf_map__initial_value": (P, [P, ctypes.POINTER(ctypes.c_size_t)]),
        "bpf_map_lookup_elem": (I, [I, P, P]),
        "bpf_map_update_elem": (I, [I, P, P, ctypes.c_uint64]),
        "bpf_map_delete_elem": (I, [I, P]),
        "bpf_map_get_next_key": (I, [I, P, P]),
        "libbpf_num_possible_cpus": (I, []),
        "bpf_obj_get_info_by_fd": (I, [I, P, ctypes.POINTER(ctypes.c_uint32)]),
        "btf__load_vmlinux_btf": (P, []),
        "btf__free": (None, [P]),
        "btf__find_by_name_kind": (ctypes.c_int32, [P, S, U]),
        "btf__type_by_id": (P, [P, U]),
        "btf__name_by_offset": (S, [P, U]),
        "btf__resolve_size": (ctypes.c_long, [P, U]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(L, fn)
        f.restype, f.argtypes = res, args
    L.libbpf_set_print(_print_cb)
    _lib = L
    return L


BPF_F_NO_PREALLOC = 1   # map_flags: elements allocated when inserted
M_ARENA_MAX = -8   # mallopt(3)


def one_malloc_arena() -> None:
    """For a process that is pkttrace (the CLI, serve), not a library user:
    glibc gives each thread that allocates its own malloc arena, and the
    verifier thread of BpfObject.load_split would keep ~12 MB of RSS in one
    for the life of the process.  One arena: the threads only load."""
    _libc.mallopt(M_ARENA_MAX, 1)


def trim_heap() -> None:
    """Give back the pages libbpf freed after loading (the object file's ELF
    and the kernel's BTF, parsed for CO-RE): ~3 MB of RSS."""
    _libc.malloc_trim(0)


def _last_log(n: int = 3) -> str:
    lines = [ln for ln in _log if ln.strip()]
    return " | ".join(lines[-n:])


def bpf_syscall(cmd: int, attr: ctypes.Array) -> int:
    """bpf(cmd, attr, size); returns the result or raises OSError."""
    r = _libc.syscall(sys_bpf(), cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _link_create(prog_fd: int, target: int, attach_type: int, flags: int, extra: bytes) -> int:
    # union bpf_attr, link_create: prog_fd, target, attach_type, flags, then
    # the per-type union at offset 16 (8-byte aligned).
    attr = (ctypes.c_ubyte * 64)()
    struct.pack_into("=IIII", attr, 0, prog_fd, target, attach_type, flags)
    ctypes.memmove(ctypes.byref(attr, 16), extra, len(extra))
    return bpf_syscall(BPF_LINK_CREATE, attr)


def link_netfilter(prog_fd: int, pf: int, hooknum: int, priority: int) -> int:
    """A netfilter link in the calling thread's netns; returns its fd."""
    return _link_create(prog_fd, 0, BPF_NETFILTER, 0, struct.pack("=IIiI", pf, hooknum, priority, 0))


def link_tcx(prog_fd: int, ifindex: int, attach_type: int, flags: int = 0) -> int:
    """A TCX link on ifindex (in the calling thread's netns); returns its fd."""
    return _link_create(prog_fd, ifindex, attach_type, flags, struct.pack("=IIQ", 0, 0, 0))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Make a link run another program of its type (BPF_LINK_UPDATE).  A TCX
    link's program is swapped in place: no RCU grace period, unlike a new
    link (~10 ms each under the RTNL lock)."""
    attr = (ctypes.c_ubyte * 16)()            # link_fd, new_prog_fd, flags, old_prog_fd
    struct.pack_into("=II", attr, 0, link_fd, prog_fd)
    bpf_syscall(BPF_LINK_UPDATE, attr)


_LICENSE = ctypes.create_string_buffer(b"GPL")


def load_tc_next(name: bytes = b"pt_tc_wait") -> int:
    """A SCHED_CLS program that returns TCX_NEXT at once (two instructions,
    loaded with no object and no BTF); returns its fd.  It holds a TCX link's
    place until the real program is verified (link_update)."""
    insns = struct.pack("<BBhiBBhi", 0xb7, 0, 0, TCX_NEXT,   # r0 = TCX_NEXT
                        0x95, 0, 0, 0)                       # exit
    buf = ctypes.create_string_buffer(insns, len(insns))
    # union bpf_attr, prog_load: prog_type, insn_cnt, insns, license,
    # log_level, log_size, log_buf, kern_version, prog_flags, prog_name[16]
    attr = (ctypes.c_ubyte * 128)()
    struct.pack_into("=IIQQIIQII16s", attr, 0, BPF_PROG_TYPE_SCHED_CLS, len(insns) // 8, ctypes.addressof(buf),
                     ctypes.addressof(_LICENSE), 0, 0, 0, 0, 0, name)
    return bpf_syscall(BPF_PROG_LOAD, attr)


class Program:
    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj, self.ptr = obj, ptr
        self.name = lib().bpf_program__name(ptr).decode()
        self.section = lib().bpf_program__section_name(ptr).decode()   # "tp_btf/kfree_skb", "tc", ...

    def set_type(self, prog_type: int, attach_type: int | None = None) -> None:
        lib().bpf_program__set_type(self.ptr, prog_type)
        if attach_type is not None:
            lib().bpf_program__set_expected_attach_type(self.ptr, attach_type)

    def set_autoload(self, on: bool) -> None:
        lib().bpf_program__set_autoload(self.ptr, on)

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self.ptr))

    @property
    def fd(self) -> int:
        return lib().bpf_program__fd(self.ptr)

    def attach(self) -> "Link":
        """Attach by section (tp_btf/...): an fd-owned link."""
        p = lib().bpf_program__attach(self.ptr)
        if not p:
            raise BpfError(_errmsg(f"attach {self.name}", ctypes.get_errno(), _last_log(1)))
        return Link(p)


class Link:
    """A libbpf link; destroying it (or process exit) detaches."""

    def __init__(self, ptr: int):
        self.ptr: int | None = ptr      # None once destroyed

    def close(self) -> None:
        if self.ptr:
            lib().bpf_link__destroy(self.ptr)
            self.ptr = None


class Map:
    def __init__(self, obj: "BpfObject", ptr: int, name: str):
        self._obj, self.ptr, self.name = obj, ptr, name

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self.ptr)

    def set_max_entries(self, n: int) -> None:
        if lib().bpf_map__set_max_entries(self.ptr, n):
            raise BpfError(_errmsg(f"resize map {self.name}", ctypes.get_errno()))

    def add_flags(self, flags: int) -> None:
        """Before load: map_flags |= flags (BPF_F_NO_PREALLOC, ...)."""
        if lib().bpf_map__set_map_flags(self.ptr, lib().bpf_map__map_flags(self.ptr) | flags):
            raise BpfError(_errmsg(f"set the flags of map {self.name}", ctypes.get_errno()))

    def initial_value(self) -> tuple[int, int]:
        """(address, size) of the map's initial data (.rodata: the config)."""
        size = ctypes.c_size_t()
        p = lib().bpf_map__initial_value(self.ptr, ctypes.byref(size))
        if not p:
            raise BpfError(f"map {self.name} has no initial value")
        return p, size.value

    def lookup(self, key, value) -> bool:
        return lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(value)) == 0

    def update(self, key, value, flags: int = 0) -> None:
        if lib().bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), ctypes.c_uint64(flags)):
            raise BpfError(_errmsg(f"update map {self.name}", ctypes.get_errno()))

    def delete(self, key) -> bool:
        return lib().bpf_map_delete_elem(self.fd, ctypes.byref(key)) == 0

    def keys(self, key_type) -> Iterator:
        """Iterate keys; entries deleted meanwhile are simply skipped."""
        cur, nxt = None, key_type()
        while True:
            r = lib().bpf_map_get_next_key(self.fd, ctypes.byref(cur) if cur is not None else None,
                                           ctypes.byref(nxt))
            if r:
                return
            yield key_type.from_buffer_copy(nxt)
            cur = key_type.from_buffer_copy(nxt)

    def percpu_u64_sum(self, key) -> int | None:
        """Sum over CPUs of a per-CPU u64 value (hash or array); None if absent."""
        vals = (ctypes.c_uint64 * possible_cpus())()
        if lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), vals):
            return None
        return sum(vals)

    def percpu_values(self, index: int, value_type) -> list:
        """Per-CPU array: the value of one index on every CPU, as value_type
        (each CPU's value is padded to 8 bytes)."""
        ncpu = possible_cpus()
        size = (ctypes.sizeof(value_type) + 7) & ~7
        buf = ctypes.create_string_buffer(size * ncpu)
        key = ctypes.c_uint32(index)
        if lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf):
            raise BpfError(_errmsg(f"read map {self.name}", ctypes.get_errno()))
        return [value_type.from_buffer_copy(buf.raw[i * size:i * size + ctypes.sizeof(value_type)])
                for i in range(ncpu)]

    def percpu_u64(self, index: int) -> list[int]:
        """Per-CPU array of u64: the values of one index on every CPU."""
        ncpu = possible_cpus()
        vals = (ctypes.c_uint64 * ncpu)()
        key = ctypes.c_uint32(index)
        if lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), vals):
            raise BpfError(_errmsg(f"read map {self.name}", ctypes.get_errno()))
        return list(vals)


def prog_fd_by_id(prog_id: int) -> int:
    """An fd of the loaded program with this id (close it); OSError ENOENT
    once the program is gone."""
    attr = (ctypes.c_uint8 * 16)()            # prog_id, next_id, open_flags
    struct.pack_into("=I", attr, 0, prog_id)
    return bpf_syscall(BPF_PROG_GET_FD_BY_ID, attr)


def prog_id_name(prog_fd: int) -> tuple[int, str]:
    """(id, name) of a loaded program, from the head of bpf_prog_info: id at
    offset 4 and name[16] at 64 are stable ABI since Linux 4.15."""
    info = (ctypes.c_uint8 * 80)()
    attr = (ctypes.c_uint8 * 16)()            # bpf_fd, info_len, info
    struct.pack_into("=IIQ", attr, 0, prog_fd, len(info), ctypes.addressof(info))
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, attr)
    raw = bytes(info)
    return struct.unpack_from("=I", raw, 4)[0], raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")


def prog_name_by_id(prog_id: int) -> str | None:
    """The name of the loaded program with this id; None if there is none."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        return prog_id_name(fd)[1]
    except OSError:
        return None
    finally:
        os.close(fd)


def enable_run_time_stats() -> int:
    """Turn on per-program run time accounting for as long as the returned
    fd is open (BPF_ENABLE_STATS): unlike the sysctl, a crash cannot leave
    it on for every program of the host."""
    attr = (ctypes.c_uint8 * 8)()
    ctypes.c_uint32.from_buffer(attr).value = BPF_STATS_RUN_TIME
    try:
        return bpf_syscall(BPF_ENABLE_STATS, attr)
    except OSError as e:
        # bpf_syscall's OSError always carries the errno
        raise BpfError(_errmsg("enable BPF run-time stats", cast(int, e.errno))) from None


_PROG_INFO: tuple[int, int, int] | None = None   # (size, run_time_ns offset, run_cnt offset)


def learn_prog_info(btf: "Btf") -> None:
    """bpf_prog_info's size and the offsets prog_run_stats reads, from the
    kernel's BTF parsed already (a trace's start parses it once): parsing it
    again at serve's first scrape took RSS ~11 MB above the service's size
    for the moment it lasted (VmHWM 46.7 -> 58.0 MiB in one measured serve)."""
    global _PROG_INFO
    if _PROG_INFO is None:
        lay = btf.struct_layout("bpf_prog_info")
        _PROG_INFO = (btf.struct_size("bpf_prog_info"), lay["run_time_ns"][0], lay["run_cnt"][0])


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded program, from bpf_prog_info; the
    offsets come from the kernel's BTF, not from a copied header."""
    if _PROG_INFO is None:
        with Btf.vmlinux() as btf:
            learn_prog_info(btf)
    assert _PROG_INFO is not None
    size, off_t, off_c = _PROG_INFO
    buf = (ctypes.c_uint8 * size)()
    n = ctypes.c_uint32(size)
    if lib().bpf_obj_get_info_by_fd(prog_fd, buf, ctypes.byref(n)):
        raise BpfError(_errmsg("read program info", ctypes.get_errno()))
    return ctypes.c_uint64.from_buffer(buf, off_t).value, ctypes.c_uint64.from_buffer(buf, off_c).value


def possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise BpfError(_errmsg("count possible CPUs", n))
    return n


class BpfObject:
    """An opened (then loaded) BPF object file."""

    def __init__(self, path: str):
        L = lib()
        _log.clear()
        # An open makes ~12,000 debug callbacks, and each must take the GIL:
        # with another thread running Python that is ~100 ms instead of ~10.
        # Open quietly; only a failure's message is wanted, so a failed open
        # is repeated with the messages on (an open changes nothing).
        with _messages_off():
            ptr = L.bpf_object__open_file(os.fsencode(path), None)
        err = L.libbpf_get_error(ptr)
        if not ptr or err:
            with _messages_on():
                ptr = L.bpf_object__open_file(os.fsencode(path), None)
            err = L.libbpf_get_error(ptr)
        if not ptr or err:
            raise BpfError(_errmsg(f"open {path}", err or ctypes.get_errno(), _last_log(1)))
        self.ptr = ptr
        self.path = path
        self.loaded = False
        self.parts: list[BpfObject] = []     # load_split's objects, which hold the programs
        self._maps_of: BpfObject | None = None   # whose maps this one uses (share_maps_of)

    def program(self, name: str) -> Program:
        for part in self.parts:
            p = part.program(name)
            if p.fd >= 0:
                return p
        p = lib().bpf_object__find_program_by_name(self.ptr, name.encode())
        if not p:
            raise BpfError(f"no program {name!r} in the BPF object")
        return Program(self, p)

    def _each(self, next_of, make) -> list:
        """Walk libbpf's list of the object's programs or maps."""
        out: list = []
        p = None
        while True:
            p = next_of(self.ptr, p)
            if not p:
                return out
            out.append(make(p))

    def programs(self) -> list[Program]:
        """This object's programs; after load_split, the programs its parts loaded."""
        if self.parts:
            return [p for part in self.parts for p in part.programs() if p.fd >= 0]
        return self._each(lib().bpf_object__next_program, lambda p: Program(self, p))

    def map(self, name: str) -> Map:
        p = lib().bpf_object__find_map_by_name(self.ptr, name.encode())
        if not p:
            raise BpfError(f"no map {name!r} in the BPF object")
        return Map(self, p, name)

    def maps(self) -> list[Map]:
        return self._each(lib().bpf_object__next_map, lambda p: Map(self, p, lib().bpf_map__name(p).decode()))

    def share_maps_of(self, other: "BpfObject") -> None:
        """Before load: use the maps of a loaded object of the same file, so
        programs loaded later see the same records, counters and config."""
        for m in self.maps():
            if lib().bpf_map__reuse_fd(m.ptr, other.map(m.name).fd):
                raise BpfError(_errmsg(f"share map {m.name}", ctypes.get_errno()))
        self._maps_of = other

    def btf(self) -> "Btf":
        p = lib().bpf_object__btf(self.ptr)
        if not p:
            raise BpfError("the BPF object has no BTF (built without -g?)")
        return Btf(p, owned=False)

    def load(self) -> None:
        # Quietly: a load makes ~2,700 debug callbacks, and each must take
        # the GIL; with another thread running Python meanwhile (the
        # session's ruleset reader, ~100 ms of pyroute2 and parsing) the
        # load took ~60-100 ms longer.  Only a failure's messages are wanted,
        # and libbpf never loads an object twice: a failed load is repeated
        # on a replica of this object, with the messages on, for its reason.
        with _messages_off():
            r = lib().bpf_object__load(self.ptr)
        if r:
            hint = self._why_not_loaded()
            if abs(r) == errno.EPERM:
                hint = "pkttrace needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON); " + hint
            raise BpfError(_errmsg("load BPF programs", r, hint))
        self.loaded = True

    def _why_not_loaded(self) -> str:
        """libbpf's last messages from loading a new object of the same file
        with this one's settings: which programs, their types, the maps'
        sizes and flags, the config, the maps shared."""
        replica = BpfObject(self.path)
        try:
            each_prog = lib().bpf_object__next_program
            for mine, its in zip(self._each(each_prog, lambda p: Program(self, p)),
                                 replica._each(each_prog, lambda p: Program(replica, p))):
                its.set_autoload(mine.autoload)
                its.set_type(lib().bpf_program__type(mine.ptr), lib().bpf_program__expected_attach_type(mine.ptr))
            for mine_m, its_m in zip(self.maps(), replica.maps()):
                its_m.set_max_entries(lib().bpf_map__max_entries(mine_m.ptr))
                lib().bpf_map__set_map_flags(its_m.ptr, lib().bpf_map__map_flags(mine_m.ptr))
                try:
                    (src, size), (dst, dst_size) = mine_m.initial_value(), its_m.initial_value()
                except BpfError:
                    continue                 # no initial data (not a .rodata/.data)
                ctypes.memmove(dst, src, min(size, dst_size))
            if self._maps_of is not None:
                replica.share_maps_of(self._maps_of)
            _log.clear()
            with _messages_on():
                lib().bpf_object__load(replica.ptr)
            return _last_log(3)
        except BpfError as e:
            return str(e)
        finally:
            replica.close()

    def load_split(self, first: set[str]) -> None:
        """Load as load() does, but verify the programs named in `first` and
        the others at the same time, in two threads.

        The verifier runs in the kernel without the GIL, and one observer
        program takes half of it (~200 ms of ~430 ms here), so two cores
        halve the start.  libbpf 1.1 loads an object's programs one after
        the other, so the file is opened twice more: this object creates the
        maps (and freezes the config) with no program, then two objects of
        the same file that share every map load one group each.  program()
        and programs() answer from them.  Programs and types are taken from
        this object's settings (autoload, set_type)."""
        want = {p.name: (lib().bpf_program__type(p.ptr), lib().bpf_program__expected_attach_type(p.ptr))
                for p in self.programs() if p.autoload}
        groups = [set(want) & first, set(want) - first]
        if not all(groups):
            return self.load()
        for p in self.programs():
            p.set_autoload(False)
        # Another thread runs Python meanwhile (the session's ruleset reader):
        # each of the thousands of calls into libbpf here waits for the GIL,
        # for up to the switch interval (5 ms); the loads make no callbacks
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        # the parts are opened first, here: nothing else runs libbpf meanwhile
        parts: list[BpfObject] = []
        try:
            for group in groups:
                part = BpfObject(self.path)
                parts.append(part)
                for p in part.programs():
                    if p.name in group:
                        p.set_type(*want[p.name])
                    else:
                        p.set_autoload(False)
            self.load()         # the maps, and the config frozen
            for part in parts:
                part.share_maps_of(self)
            failed: list[BaseException] = []

            def load_other() -> None:
                try:
                    parts[1].load()
                except BaseException as e:  # noqa: BLE001 -- raised below, in the caller's thread
                    failed.append(e)
            other = threading.Thread(target=load_other, name="pkttrace-verify")
            other.start()
            try:
                parts[0].load()
            finally:
                other.join()
            if failed:
                raise failed[0]
        except BaseException:
            for part in parts:
                part.close()
            raise
        finally:
            sys.setswitchinterval(interval)
        self.parts = parts

    def close(self) -> None:
        for part in self.parts:
            part.close()
        self.parts = []
        if self.ptr:
            lib().bpf_object__close(self.ptr)
            self.ptr = None


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class Btf:
    """Type lookups in kernel or object BTF."""

    def __init__(self, ptr: int, owned: bool = True):
        self.ptr: int | None = ptr      # None once closed
        self.owned = owned

    @classmethod
    def vmlinux(cls) -> "Btf":
        p = lib().btf__load_vmlinux_btf()
        if not p or lib().libbpf_get_error(p):
            raise BpfError("cannot read kernel BTF (/sys/kernel/btf/vmlinux): "
                           "pkttrace needs a kernel built with CONFIG_DEBUG_INFO_BTF")
        return cls(p)

    def close(self) -> None:
        if self.owned and self.ptr:
            lib().btf__free(self.ptr)
        self.ptr = None

    def __enter__(self) -> "Btf":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _type(self, tid: int) -> _BtfType:
        p = lib().btf__type_by_id(self.ptr, tid)
        return _BtfType.from_address(p)

    def _name(self, off: int) -> str:
        return (lib().btf__name_by_offset(self.ptr, off) or b"").decode()

    def find(self, name: str, kind: int) -> int | None:
        tid = lib().btf__find_by_name_kind(self.ptr, name.encode(), kind)
        return tid if tid > 0 else None

    def enum(self, name: str) -> dict[int, str]:
        """value -> member name of an enum (e.g. skb_drop_reason)."""
        tid = self.find(name, BTF_KIND_ENUM)
        if tid is None:
            return {}
        t = self._type(tid)
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        out = {}
        for i in range(vlen):
            e = _BtfEnum.from_address(base + i * ctypes.sizeof(_BtfEnum))
            out[e.val] = self._name(e.name_off)
        return out

    def struct_layout(self, name: str) -> dict[str, tuple[int, int]]:
        """member name -> (byte offset, byte size) of a struct."""
        tid = self.find(name, BTF_KIND_STRUCT)
        if tid is None:
            raise BpfError(f"no struct {name} in BTF")
        t = self._type(tid)
        kflag = t.info >> 31
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        out = {}
        for i in range(vlen):
            m = _BtfMember.from_address(base + i * ctypes.sizeof(_BtfMember))
            bits = m.offset & 0xFFFFFF if kflag else m.offset
            out[self._name(m.name_off)] = (bits // 8, lib().btf__resolve_size(self.ptr, m.type))
        return out

    def struct_size(self, name: str) -> int:
        tid = self.find(name, BTF_KIND_STRUCT)
        if tid is None:
            raise BpfError(f"no struct {name} in BTF")
        return lib().btf__resolve_size(self.ptr, tid)

    def has_type(self, name: str, kind: int) -> bool:
        return self.find(name, kind) is not None


def ring_record(data, off: int, ln: int) -> bytes:
    """The ln bytes of the record whose 8-byte header is at off in a ring's
    data area (mapped once, its size a power of two): the header never
    crosses the end (records are 8-aligned), the record may."""
    start, size = off + _RINGBUF_HDR, len(data)
    start &= size - 1                      # a header in the last 8 bytes
    end = start + ln
    if end <= size:
        return bytes(data[start:end])
    return bytes(data[start:]) + bytes(data[:end - size])


class RingBuffer:
    """Reads a BPF ring buffer map by mmap, in batches.

    libbpf's ring_buffer__poll calls back once per record; through ctypes
    that costs microseconds each.  The ring is simple enough to read here:
    a consumer page we write, a producer page, and the data area.  libbpf
    maps the data twice so that no record wraps; every mapped page counts
    in the process's RSS, so the data is mapped once here and the few
    records that cross its end are joined from two slices.

    The two positions and each record's header are read and written as
    whole words (memoryviews cast to 'Q' and 'I'), never through struct,
    which the kernel can see or change half done: struct.pack_into zeroes
    its target before it writes the value byte by byte, and a producer that
    read the consumer position in between saw 0 and refused its record as
    if the ring were full (measured: the paced benchmark's 0-3 lost records
    a round, with 4 KiB of 8 MiB in use, were all this).
    """

    def __init__(self, map_fd: int, size: int):
        self.fd, self.size, self.mask = map_fd, size, size - 1
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._prod)[page:]
        self._cons_pos = memoryview(self._cons).cast("Q")      # [0]: consumer_pos, ours
        self._prod_pos = memoryview(self._prod)[:8].cast("Q")  # [0]: producer_pos, the kernel's
        self._hdrs = self._data.cast("I")   # [off >> 2]: a record's length word (headers are 8-aligned)
        self._ep = select.epoll()
        self._ep.register(map_fd, select.EPOLLIN)

    def wait(self, timeout: float) -> None:
        """Sleep until the kernel signals data (or timeout seconds)."""
        if not self.pending():
            self._ep.poll(timeout)

    def pending(self) -> bool:
        return self._cons_pos[0] < self._prod_pos[0]

    def drain(self, max_records: int = 1 << 16) -> list[bytes]:
        """Copy out up to max_records committed records and release them."""
        cons = self._cons_pos[0]
        prod = self._prod_pos[0]
        out: list[bytes] = []
        data, hdrs, mask = self._data, self._hdrs, self.mask
        while cons < prod and len(out) < max_records:
            off = cons & mask
            hdr = hdrs[off >> 2]          # committed by the kernel's xchg: one load
            if hdr & _RINGBUF_BUSY:
                break  # reserved, not committed yet
            ln = hdr & ~(_RINGBUF_BUSY | _RINGBUF_DISCARD)
            if not hdr & _RINGBUF_DISCARD:
                out.append(ring_record(data, off, ln))
            cons += (ln + _RINGBUF_HDR + 7) & ~7
        self._cons_pos[0] = cons            # one 8-byte store: never torn
        return out

    def discard(self) -> int:
        """Release every committed record; returns how many there were."""
        return len(self.drain(max_records=1 << 62))

    def close(self) -> None:
        self._ep.close()
        self._hdrs.release()
        self._data.release()
        self._cons_pos.release()
        self._prod_pos.release()
        self._prod.close()
        self._cons.close()
