"""The ring buffer's reader pieces that need no kernel: the size -B asks
for, and records that cross the end of a data area mapped once."""
from __future__ import annotations

import mmap
import multiprocessing
import os
import select
import struct

import pytest

from tracer.libbpf import RingBuffer, ring_record
from tracer.session import TraceError, TraceOptions, Tracer, ring_bytes


@pytest.mark.parametrize("kib, size", [(1, 4096), (4, 4096), (5, 8192), (100, 128 << 10), (128, 128 << 10),
                                       (32768, 32 << 20), (1 << 20, 1 << 30)])
def test_b_rounds_up_to_a_power_of_two_of_at_least_a_page(kib, size):
    assert ring_bytes(kib) == size


def _put(data, base: int, size: int, off: int, payload: bytes) -> None:
    """One record (8-byte header at off) in the data area of `size` bytes
    at data[base:], written as the kernel writes it through its double
    mapping: wrapping at the end."""
    struct.pack_into("=I", data, base + off, len(payload))
    for i, b in enumerate(payload):
        data[base + (off + 8 + i) % size] = b


def _ring(size: int, off: int, payload: bytes) -> bytearray:
    """A data area holding one record at off."""
    data = bytearray(size)
    _put(data, 0, size, off, payload)
    return data


@pytest.mark.parametrize("off", [0, 64, 4096 - 40, 4096 - 16, 4096 - 8])
def test_a_record_is_read_whole_wherever_it_sits(off):
    payload = bytes(range(200))[:33]
    data = memoryview(_ring(4096, off, payload))
    assert ring_record(data, off, len(payload)) == payload


def test_a_record_crossing_the_end_is_joined_from_two_slices():
    payload = bytes((i * 7) & 0xFF for i in range(600))
    off = 4096 - 104                  # 96 bytes before the end, the other 504 at the start
    data = memoryview(_ring(4096, off, payload))
    assert ring_record(data, off, len(payload)) == payload


@pytest.mark.parametrize("size", [0, 4095, 5000, 3 << 20])
def test_a_ring_size_the_kernel_refuses_is_refused_first(size):
    with pytest.raises(TraceError, match="power of two"):
        Tracer(TraceOptions(ringbuf_bytes=size))


class _NoEpoll:
    """A memfd cannot be registered with epoll; drain() needs none."""

    def register(self, fd, events):
        pass

    def close(self):
        pass


def _fake_map(size: int, records: list[bytes], cons: int) -> int:
    """A file laid out as a BPF ring map is mmapped: the consumer page, the
    producer page, then the data area (mapped once, as RingBuffer maps it),
    holding `records` written from position `cons` the way the kernel
    writes them (8-byte header, 8-aligned, wrapping at the end)."""
    page = mmap.PAGESIZE
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 2 * page + size)
    buf = bytearray(2 * page + size)
    struct.pack_into("=Q", buf, 0, cons)
    pos = cons
    for rec in records:
        _put(buf, 2 * page, size, pos & (size - 1), rec)
        pos += (len(rec) + 8 + 7) & ~7
    struct.pack_into("=Q", buf, page, pos)
    os.pwrite(fd, bytes(buf), 0)
    return fd


def test_drain_reads_records_across_the_end_and_releases_them(monkeypatch):
    monkeypatch.setattr(select, "epoll", _NoEpoll)
    size = 4096
    recs = [bytes([n]) * (100 + 50 * n) for n in range(1, 8)]
    fd = _fake_map(size, recs, cons=3 * size - 300)     # the third record crosses the end
    rb = RingBuffer(fd, size)
    try:
        assert rb.pending()
        assert rb.drain(max_records=2) == recs[:2]
        assert rb.drain() == recs[2:]
        assert not rb.pending()
        # the consumer position the kernel reads: every record released
        prod = struct.unpack_from("=Q", os.pread(fd, 8, mmap.PAGESIZE))[0]
        assert struct.unpack_from("=Q", os.pread(fd, 8, 0))[0] == prod
    finally:
        rb.close()
        os.close(fd)


def test_the_consumer_position_is_never_seen_torn(monkeypatch):
    """The kernel reads the consumer position while we write it.
    struct.pack_into zeroes its target before it writes the value byte by
    byte: a producer then read 0 and refused records as if the ring were
    full.  Another process (another core: no GIL between us) reads the
    position while drain() stores it 200,000 times; it must only ever see
    the value stored."""
    monkeypatch.setattr(select, "epoll", _NoEpoll)
    size, cons = 4096, 0x0123_4567_89AB_CDE0
    fd = _fake_map(size, [], cons=cons)
    rb = RingBuffer(fd, size)
    fork = multiprocessing.get_context("fork")
    seen, go = fork.Queue(), fork.Event()

    def watch():
        pos = memoryview(mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)).cast("Q")
        bad = reads = 0
        go.set()
        while go.is_set():
            for _ in range(1000):
                bad += pos[0] != cons
            reads += 1000
        seen.put((bad, reads))

    child = fork.Process(target=watch)
    child.start()
    try:
        assert go.wait(10)
        for _ in range(200_000):
            rb.drain()
        go.clear()
        bad, reads = seen.get(timeout=10)
    finally:
        child.join(10)
        rb.close()
        os.close(fd)
    assert reads > 0 and bad == 0, f"{bad} of {reads} reads saw a torn consumer position"
