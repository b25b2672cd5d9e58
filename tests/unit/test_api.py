"""The library API (tracer.api): the README's examples, run as doctests,
and what read() promises.  No root: recorded data only (the live half,
tracer.trace(), is in tests/integration/test_api_live.py)."""
from __future__ import annotations

import collections
import doctest
import io
import os
import re
import subprocess
import sys

import pytest

import tracer
from tracer import api

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "lab-demo.jsonl")


def _readme_section(title: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_readme_python_api_examples_run(monkeypatch):
    section = _readme_section("Python API")
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    examples = [b for b in blocks if b.lstrip().startswith(">>>")]
    assert examples, "the README's Python API section has no doctest block"
    monkeypatch.chdir(ROOT)
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for i, block in enumerate(examples):
        test = parser.get_doctest(block, {"collections": collections}, f"README-python-api-{i}", "README.md", 0)
        out = io.StringIO()
        result = runner.run(test, out=out.write)
        assert result.failed == 0, out.getvalue()
        assert result.attempted > 5


def test_the_package_exports_the_api_lazily():
    assert tracer.read is api.read and tracer.Filter is api.Filter and tracer.trace is api.trace
    assert set(tracer._API) == set(api.__all__)
    with pytest.raises(AttributeError):
        tracer.nothing_here  # noqa: B018
    # the command line does not pay for the library's imports at start-up
    code = "import sys, tracer.cli; print('tracer.session' in sys.modules, 'tracer.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "False"]


def test_read_takes_a_path_a_binary_or_a_text_file_alike():
    by_path = [p.to_json() for p in tracer.read(DATA)]
    with open(DATA, "rb") as f:
        by_bin = [p.to_json() for p in tracer.read(f)]
    with open(DATA) as f:
        by_text = [p.to_json() for p in tracer.read(f)]
    assert len(by_path) == 30 and by_path == by_bin == by_text


def test_read_filters_with_the_command_lines_rule():
    flt = tracer.Filter.parse(mark="0x1")
    got = list(tracer.read(DATA, flt))
    assert got and all(any(m & 1 for m in p.marks()) for p in got)
    assert len(got) < 30


def test_read_refuses_what_is_not_a_recording_and_reports_a_cut_tail():
    with pytest.raises(tracer.RecordingError):
        list(tracer.read(io.BytesIO(b"not a recording\n")))
    with open(DATA, "rb") as f:
        data = f.read()
    cut = tracer.Cut()
    got = list(tracer.read(io.BytesIO(data[:-40]), cut=cut))
    assert len(got) == 29 and cut.lines == 1


def test_a_drop_is_typed_and_reads_as_its_json_object():
    d = tracer.Drop("NETFILTER_DROP", "nft_do_chain+0x46f", "forward", "forward", "filter", "rc")
    assert (d.reason, d.stage, d.table, d.dev) == ("NETFILTER_DROP", "forward", "filter", "rc")
    assert d["table"] == "filter" and d.get("before_priority") is None and d.get("nope", 1) == 1
    assert "attribution" not in d and "table" in d
    assert d == d.to_json() and d == tracer.Drop(**d.to_json())
    with pytest.raises(KeyError):
        d["attribution"]
    changing = tracer.Drop("NETFILTER_DROP", "x", attribution="changing")
    assert changing.to_json()["attribution"] == "changing" and "attribution" in changing
