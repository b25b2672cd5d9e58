"""libbpf.prog_run_stats reads bpf_prog_info at offsets from the kernel's
BTF: learnt from the BTF a trace's start parses anyway, so serve's first
scrape does not parse it again (~11 MB above serve's size while it lasts)."""

import pytest

from tracer import libbpf


class FakeBtf:
    def __init__(self, size, t_off, c_off):
        self.size, self.t_off, self.c_off = size, t_off, c_off
        self.asked = 0

    def struct_layout(self, name):
        assert name == "bpf_prog_info"
        self.asked += 1
        return {"run_time_ns": (self.t_off, 64), "run_cnt": (self.c_off, 64), "type": (0, 32)}

    def struct_size(self, name):
        assert name == "bpf_prog_info"
        return self.size


@pytest.fixture
def unlearnt(monkeypatch):
    monkeypatch.setattr(libbpf, "_PROG_INFO", None)


def test_learnt_once_from_the_btf_given(unlearnt):
    first, second = FakeBtf(232, 136, 144), FakeBtf(1, 2, 3)
    libbpf.learn_prog_info(first)
    libbpf.learn_prog_info(second)
    assert libbpf._PROG_INFO == (232, 136, 144)
    assert (first.asked, second.asked) == (1, 0)


def test_reading_the_stats_after_learning_parses_no_btf(unlearnt, monkeypatch):
    libbpf.learn_prog_info(FakeBtf(232, 136, 144))

    def no_parse():
        raise AssertionError("the kernel's BTF parsed again")
    monkeypatch.setattr(libbpf.Btf, "vmlinux", staticmethod(no_parse))
    with pytest.raises(libbpf.BpfError, match="read program info"):
        libbpf.prog_run_stats(-1)            # no such fd: the kernel's answer, not a parse
