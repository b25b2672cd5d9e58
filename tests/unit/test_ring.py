"""The ring buffer's reader pieces that need no kernel: the size -B asks
for, and records that cross the end of a data area mapped once."""
from __future__ import annotations

import struct

import pytest

from tracer.libbpf import ring_record
from tracer.session import TraceError, TraceOptions, Tracer, ring_bytes


@pytest.mark.parametrize("kib, size", [(1, 4096), (4, 4096), (5, 8192), (100, 128 << 10), (128, 128 << 10),
                                       (32768, 32 << 20), (1 << 20, 1 << 30)])
def test_b_rounds_up_to_a_power_of_two_of_at_least_a_page(kib, size):
    assert ring_bytes(kib) == size


def _ring(size: int, off: int, payload: bytes) -> bytearray:
    """A data area with one record (8-byte header at off) written as the
    kernel writes it through its double mapping: wrapping at the end."""
    data = bytearray(size)
    struct.pack_into("=I", data, off, len(payload))
    for i, b in enumerate(payload):
        data[(off + 8 + i) % size] = b
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
