"""`pkttrace install-service`: the unit, environment file and dashboards the
package ships, installed below a root directory; idempotent; the operator's
environment file is never replaced."""
from __future__ import annotations

import configparser
import os

from test_cli import _runner, assert_one_line

from tracer.cli import main
from tracer.installer import DASHBOARDS, ENV_FILE, UNIT, shipped


def _install(root, *args):
    return _runner().invoke(main, ["install-service", "--root", str(root), *args])


def _unit(root) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(root / UNIT)
    return cp


def test_installs_what_the_package_ships_then_changes_nothing(tmp_path):
    r = _install(tmp_path, "--exec", "/opt/pkttrace/bin/pkttrace")
    assert r.exit_code == 0, r.output
    assert _unit(tmp_path)["Service"]["ExecStart"] == "/opt/pkttrace/bin/pkttrace serve"
    src = shipped()
    assert (tmp_path / ENV_FILE).read_bytes() == (src / "systemd" / "pkttrace.env").read_bytes()
    shipped_boards = sorted(f.name for f in (src / "dashboards").glob("*.json"))
    assert shipped_boards and sorted(os.listdir(tmp_path / DASHBOARDS / "..")) == ["dashboards"]
    assert sorted(f.name for f in (tmp_path / DASHBOARDS).glob("*.json")) == shipped_boards
    prov = (tmp_path / DASHBOARDS / "provisioning" / "dashboards.yaml").read_text()
    assert f"path: /{DASHBOARDS}" in prov           # Grafana reads them where they were put
    assert r.output.count("written") == 2 + len(shipped_boards) + 2
    # again: every file is already right
    again = _install(tmp_path, "--exec", "/opt/pkttrace/bin/pkttrace")
    assert again.exit_code == 0 and "written" not in again.output
    assert again.output.count("unchanged") == 1 + len(shipped_boards) + 2 and "kept" in again.output


def test_the_operators_environment_file_is_kept_and_a_new_exec_rewrites_the_unit(tmp_path):
    assert _install(tmp_path, "--exec", "/usr/bin/pkttrace").exit_code == 0
    (tmp_path / ENV_FILE).write_text("PKTTRACE_NETNS=all\n")
    r = _install(tmp_path, "--exec", "/opt/pkttrace/bin/pkttrace", "--no-dashboards")
    assert r.exit_code == 0
    assert (tmp_path / ENV_FILE).read_text() == "PKTTRACE_NETNS=all\n"
    assert f"written   {tmp_path / UNIT}" in r.output
    assert _unit(tmp_path)["Service"]["ExecStart"] == "/opt/pkttrace/bin/pkttrace serve"


def test_without_exec_the_unit_runs_the_pkttrace_installing_it(tmp_path):
    assert _install(tmp_path).exit_code == 0
    exe = _unit(tmp_path)["Service"]["ExecStart"].split()[0]
    assert os.path.isabs(exe) and os.path.basename(exe) == "pkttrace" and os.access(exe, os.X_OK)


def test_bad_input_is_one_line(tmp_path):
    for args, says in ((["--exec", "pkttrace"], "absolute path"), (["--exec", "/opt/my tools/pkttrace"], "spaces")):
        r = _install(tmp_path, *args)
        assert r.exit_code == 2 and says in assert_one_line(r.stderr)
    r = _install(tmp_path / "missing")
    assert r.exit_code == 2 and "not a directory" in assert_one_line(r.stderr)
    assert not (tmp_path / "etc").exists()
