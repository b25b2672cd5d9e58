"""The wheel carries the compiled BPF object: no compiler where pkttrace runs."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_contains_the_bpf_object(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = list(tmp_path.glob("pkttrace-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        assert "tracer/data/pkttrace.bpf.o" in names
        obj = z.read("tracer/data/pkttrace.bpf.o")
    assert obj[:4] == b"\x7fELF" and obj[18] == 247  # e_machine EM_BPF
