"""docs/reference.md is printed from the declarations the code uses
(scripts/reference.py): it must be what the code says now."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_reference_page_is_current():
    printed = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reference.py")],
                             capture_output=True, text=True, check=True).stdout
    with open(os.path.join(ROOT, "docs", "reference.md")) as f:
        assert f.read() == printed, "docs/reference.md is stale: python scripts/reference.py > docs/reference.md"


def test_the_reference_names_every_stage_tracepoint_and_option():
    from tracer import backends, cli, model
    with open(os.path.join(ROOT, "docs", "reference.md")) as f:
        page = f.read()
    assert all(f"`{s.value}`" in page for s in model.StageName)
    assert all(f"`{tp}`" in page for tp, _ in backends.TRACEPOINT_PROGRAMS.values())
    assert all(f"`{fn}`" in page for fn in backends.HOOK_PROGRAMS.values())
    longs = [o for p in cli.main.params for o in p.opts if o.startswith("--")]
    assert longs and all(o in page for o in longs)
