"""Each fact is declared once, and the declarations agree with the BPF
source they describe: the tracepoint programs, the hook-machinery
programs of the fentry/kprobe backends, the record layout's offsets."""
from __future__ import annotations

import os

from tracer import backends, doctor
from tracer.libbpf import BpfObject

OBJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bpf",
                      "pkttrace.bpf.o")


def _sections() -> dict[str, str]:
    """program name -> its section in the built object (opening it needs no
    privileges; test_btf_mirror.py rebuilds a stale one first)."""
    obj = BpfObject(OBJECT)
    try:
        return {p.name: p.section for p in obj.programs()}
    finally:
        obj.close()


def test_tracepoint_programs_are_the_sources_tp_btf_programs():
    secs = _sections()
    tp = {name: sec.split("/", 1)[1] for name, sec in secs.items() if sec.startswith("tp_btf/")}
    assert tp == {prog: t for prog, (t, _what) in backends.TRACEPOINT_PROGRAMS.items()}


def test_doctor_checks_every_tracepoint_the_session_attaches():
    assert set(doctor.TRACEPOINTS) == {t for t, _ in backends.TRACEPOINT_PROGRAMS.values()}
    assert set(backends.OPTIONAL_TRACEPOINTS) <= set(doctor.TRACEPOINTS)


def test_hook_programs_are_the_sources_fentry_and_kprobe_programs():
    secs = _sections()
    for prog, fn in backends.HOOK_PROGRAMS.items():
        kind, target = secs[prog].split("/", 1)
        assert kind in ("fentry", "fexit", "kprobe", "kretprobe") and target == fn, prog
    for prog, fn in (backends.FENTRY_DATA_READY, backends.KPROBE_DATA_READY):
        assert secs[prog].split("/", 1)[1] == fn
    attached = {p for p, s in secs.items() if s.split("/")[0] in ("fentry", "fexit", "kprobe", "kretprobe")}
    assert attached == set(backends.HOOK_PROGRAMS) | {backends.FENTRY_DATA_READY[0], backends.KPROBE_DATA_READY[0]}
