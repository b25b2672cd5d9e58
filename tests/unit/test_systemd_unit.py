"""systemd/pkttrace.service: systemd itself accepts it, and the hardening stays."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(REPO, "systemd", "pkttrace.service")
ENV = os.path.join(REPO, "systemd", "pkttrace.env")
ANALYZE = shutil.which("systemd-analyze")


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    cp.optionxform = str  # systemd keys are case-sensitive
    with open(UNIT) as f:
        cp.read_file(f)
    return cp


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package `systemd`)")
def test_systemd_analyze_verify(tmp_path):
    # verify insists the ExecStart binary exists: point it at one that does,
    # keeping the arguments.
    with open(UNIT) as f:
        text = f.read()
    assert "\nExecStart=/usr/local/bin/pkttrace serve\n" in text
    unit = tmp_path / "pkttrace.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/pkttrace", "ExecStart=/bin/true"))
    r = subprocess.run([ANALYZE, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert r.returncode == 0, r.stderr
    # Unknown keys and unparsable values are only warnings (exit 0) naming
    # the file: "pkttrace.service:27: Unknown key ..."
    about_unit = [ln for ln in r.stderr.splitlines() if "pkttrace.service" in ln]
    assert not about_unit, r.stderr


def test_service_shape():
    svc = _unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["ExecStart"] == "/usr/local/bin/pkttrace serve"
    assert svc["EnvironmentFile"] == "-/etc/default/pkttrace"
    assert svc["Restart"] == "on-failure"
    assert "RestartSec" in svc
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_hardening():
    svc = _unit()["Service"]
    wanted_caps = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert set(svc["CapabilityBoundingSet"].split()) == wanted_caps
    assert set(svc["AmbientCapabilities"].split()) == wanted_caps
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelTunables": "yes",  # the exporter uses BPF_ENABLE_STATS, not the sysctl
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        # setns(CLONE_NEWNET) for --netns must stay possible
        "RestrictNamespaces": "net",
    }.items():
        assert svc.get(key) == value, key
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # libbpf's log callback is a ctypes CFUNCTYPE: libffi closures may need W+X
    assert "MemoryDenyWriteExecute" not in svc
    # nothing pinned, nothing written
    assert "ReadWritePaths" not in svc


def test_env_example_names_the_cli_variables():
    names = set()
    with open(ENV) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                names.add(line.split("=", 1)[0])
    assert names == {"PKTTRACE_LISTEN", "PKTTRACE_NETNS", "PKTTRACE_AGE_AFTER", "PKTTRACE_TC", "PKTTRACE_BPF_STATS"}
