"""`pkttrace install-service`: put the unit, its environment file and the
dashboards where systemd and Grafana look, from the files the package ships.

Idempotent: a file whose content is already right is left alone; the
environment file, which the operator edits, is never replaced.  The unit's
ExecStart names the pkttrace being run (a venv under /opt, pipx, /usr/bin),
so the installed service runs the same code as the command that installed
it.  Everything goes below one root directory (default /), to fixed paths:
nothing else is written.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

UNIT = "etc/systemd/system/pkttrace.service"
ENV_FILE = "etc/default/pkttrace"
DASHBOARDS = "usr/share/pkttrace/dashboards"


class InstallError(Exception):
    """One line: why the service could not be installed."""


def shipped() -> Path:
    """The directory holding systemd/ and dashboards/: the installed
    package's data, else (running from a checkout) the checkout itself."""
    pkg = Path(__file__).resolve().parent
    for d in (pkg / "data", pkg.parent):
        if (d / "systemd" / "pkttrace.service").is_file():
            return d
    raise InstallError("this pkttrace ships no systemd unit (a broken install? reinstall the wheel)")


def executable() -> str:
    """The pkttrace command being run, as an absolute path (ExecStart)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    found = argv0 if os.sep in argv0 else shutil.which(argv0 or "pkttrace")
    if not found or not os.access(found, os.X_OK) or os.path.basename(found) != "pkttrace":
        found = shutil.which("pkttrace", path=os.path.dirname(sys.executable)) or shutil.which("pkttrace")
    if not found:
        raise InstallError("cannot tell where the pkttrace command is: give --exec PATH")
    return os.path.abspath(found)


_EXEC = re.compile(r"^ExecStart=\S+", re.M)
_PATH = re.compile(r"^(\s*path:\s*)\S+", re.M)


def unit_text(template: str, exe: str) -> str:
    text, n = _EXEC.subn(lambda _m: f"ExecStart={exe}", template, count=1)
    if n != 1:
        raise InstallError("the shipped unit has no ExecStart= line")
    return text


@dataclass
class Report:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)       # the operator's own (environment file)

    def lines(self) -> list[str]:
        return ([f"written   {p}" for p in self.written] + [f"unchanged {p}" for p in self.unchanged] +
                [f"kept      {p} (yours: not replaced)" for p in self.kept])


def _put(root: Path, rel: str, data: bytes, mode: int, report: Report, keep: bool = False) -> None:
    dest = root / rel
    try:
        if dest.is_file():
            if keep:
                report.kept.append(str(dest))
                return
            if dest.read_bytes() == data:
                report.unchanged.append(str(dest))
                return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.pkttrace-new")
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)          # never a half-written unit
    except OSError as e:
        raise InstallError(f"cannot write {dest}: {e.strerror}") from None
    report.written.append(str(dest))


def check(root: str, exe: str | None) -> str:
    """InstallError unless root is a directory and exe (None: this
    pkttrace) an absolute path a unit can name; the path to use."""
    if not root or not Path(root).is_dir():
        raise InstallError(f"--root {root!r}: not a directory")
    exe = executable() if exe is None else exe
    if not os.path.isabs(exe) or not exe.isprintable() or any(c.isspace() for c in exe):
        raise InstallError(f"--exec must be an absolute path without spaces, not {exe!r}")
    return exe


def install(root: str = "/", exe: str | None = None, dashboards: bool = True) -> Report:
    """Install the unit (ExecStart = exe, default: this pkttrace), the
    environment file (only if absent) and the dashboards below root."""
    exe = check(root, exe)
    base = Path(root)
    src = shipped()
    report = Report()
    template = (src / "systemd" / "pkttrace.service").read_text()
    _put(base, UNIT, unit_text(template, exe).encode(), 0o644, report)
    _put(base, ENV_FILE, (src / "systemd" / "pkttrace.env").read_bytes(), 0o644, report, keep=True)
    if dashboards:
        for f in sorted((src / "dashboards").glob("*.json")):
            _put(base, f"{DASHBOARDS}/{f.name}", f.read_bytes(), 0o644, report)
        for f in sorted((src / "dashboards" / "provisioning").glob("*.yaml")):
            text = f.read_text()
            if f.name == "dashboards.yaml":   # Grafana's provider: read them where they are installed
                text = _PATH.sub(f"\\g<1>/{DASHBOARDS}", text)
            _put(base, f"{DASHBOARDS}/provisioning/{f.name}", text.encode(), 0o644, report)
    return report
