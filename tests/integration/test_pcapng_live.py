"""pkttrace -w on real traffic: tcpdump and tshark read the file with the
packet count pkttrace reported, each packet's comment is its path, and
`pkttrace -r` prints the paths the live run printed.  A `--record`
recording read with -r prints what `pkttrace replay` prints.

Root: a lab of three network namespaces (prefix ptcl..., removed after),
pkttrace run as users run it (a process, its stdout and stderr).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import socket
import string
import subprocess
import sys
import time

import pytest

from tracer import netns
from tracer.lab import NET_ID_RANGE, Lab

from test_cli_process import pkttrace, wait_ready   # pkttrace as a process, and its 'tracing' line

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab():
    from tests.conftest import IS_ROOT
    if not IS_ROOT:
        pytest.skip("needs root: creates network namespaces")
    new = Lab("ptcl" + "".join(random.choices(string.ascii_lowercase, k=4)),
              random.choice([n for n in NET_ID_RANGE if n != 71]))
    try:
        new.up(rules=True)
        yield new
    finally:
        new.down()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def tcp_exchange(lab: Lab, port: int) -> None:
    """A whole TCP connection client -> server through the router: SYN,
    SYN-ACK, data, FIN..."""
    with netns.entered(lab.server):
        srv = socket.create_server((lab.addr["server4"], port))
    try:
        with netns.entered(lab.client):
            cli = socket.create_connection((lab.addr["server4"], port), timeout=5)
        conn, _ = srv.accept()
        with cli, conn:
            cli.sendall(b"hello through the router")
            assert conn.recv(100) == b"hello through the router"
    finally:
        srv.close()


def traffic(lab: Lab, port: int) -> None:
    assert lab.ping(lab.client, lab.addr["server4"], count=2) == 2
    assert lab.ping(lab.client, lab.addr["server6"]) == 1
    tcp_exchange(lab, port)


def run_live(lab: Lab, pcap, *extra: str, port: int) -> tuple[str, str]:
    """Trace the router while pings and a TCP connection cross it; -w pcap."""
    proc = pkttrace("--netns", lab.router, "--duration", "4", "-w", str(pcap), *extra)
    try:
        wait_ready(proc)
        traffic(lab, port)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return out, err


def shown(err: str) -> int:
    m = re.search(r"(\d+) packets shown", err)
    assert m, err
    return int(m.group(1))


def blocks(text: str) -> list[str]:
    return [b for b in text.split("\n\n") if b.strip()]


def test_live_pcapng_read_by_tcpdump_tshark_and_pkttrace(lab, tmp_path):
    pcap = tmp_path / "live.pcapng"
    out, err = run_live(lab, pcap, "--print", "-t", "--color", "never", port=7101)
    n = shown(err)
    assert f"{n} written to {pcap}" in err
    live = blocks(out)
    # echo requests and replies (IPv4, IPv6), and the TCP connection's packets both ways
    assert len(live) == n >= 2 * 2 + 2 + 6
    # the header lines say what tcpdump says of the same packets
    heads = [b.splitlines()[0] for b in live]
    assert any(f"{lab.addr['client4']}:" in h and " [S] length " in h for h in heads), heads
    assert any(" [S.] length " in h for h in heads) and any(" [F.] length " in h for h in heads), heads
    assert any(re.search(r" echo request, length 45 ", h) for h in heads), heads   # lab.ping: 17 bytes of data
    assert any(" echo reply, length " in h and h.split()[1] == "ipv6" for h in heads), heads
    # tcpdump: one packet per traced packet
    r = subprocess.run([_tool("tcpdump"), "-n", "-r", str(pcap)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == n
    assert re.search(r"Flags \[S\]", r.stdout) and "ICMP echo request" in r.stdout, r.stdout
    # the packets' own header bytes (-w asks the kernel for them), not headers made up: TCP options, real ids
    assert "options [mss " in r.stdout and re.search(r"ICMP echo request, id \d+, seq 0", r.stdout), r.stdout
    # tshark: the same count, each path as the packet's comment, the TCP flags the header line shows
    r = subprocess.run([_tool("tshark"), "-r", str(pcap), "-T", "json", "-e", "frame.comment", "-e", "tcp.flags",
                        "-e", "ip.src", "-e", "frame.interface_name"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    layers = [d["_source"]["layers"] for d in json.loads(r.stdout)]
    assert len(layers) == n
    for d, block in zip(layers, live):
        assert d["frame.comment"][0] == block       # the path, as printed (-t: no stamp before it)
        assert d["frame.interface_name"][0].endswith(f"@{lab.router}")
    # header bytes were captured (-w asks the kernel for them): tshark reads real sources
    assert {lab.addr["client4"], lab.addr["server4"]} <= {d["ip.src"][0] for d in layers if "ip.src" in d}
    # pkttrace -r prints the paths the live run printed
    r = subprocess.run([sys.executable, "-m", "tracer", "-r", str(pcap), "-t", "--color", "never"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert blocks(r.stdout) == live


def test_live_stamps_are_the_same_read_back(lab, tmp_path):
    pcap = tmp_path / "stamps.pcapng"
    out, err = run_live(lab, pcap, "--print", "-tt", "--color", "never", port=7102)
    r = subprocess.run([sys.executable, "-m", "tracer", "-r", str(pcap), "-tt", "--color", "never"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert blocks(r.stdout) == blocks(out)
    stamps = [float(b.split(" ", 1)[0]) for b in blocks(out)]
    assert all(abs(s - time.time()) < 120 for s in stamps)
    # and the file's own timestamps are those stamps, to the microsecond
    r = subprocess.run([_tool("tshark"), "-r", str(pcap), "-T", "fields", "-e", "frame.time_epoch"],
                       capture_output=True, text=True, timeout=60)
    assert [round(float(x), 6) for x in r.stdout.split()] == [round(s, 6) for s in stamps]


def test_dash_r_of_a_recording_prints_what_replay_prints(lab, tmp_path):
    rec = tmp_path / "trace.jsonl"
    proc = pkttrace("--netns", lab.router, "--proto", "icmp", "--duration", "3", "--record", str(rec))
    try:
        wait_ready(proc)
        assert lab.ping(lab.client, lab.addr["server4"], count=2) == 2
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and shown(err) >= 4, err
    for args in ([], ["--json"], ["-v", "-tttt"]):
        a = subprocess.run([sys.executable, "-m", "tracer", "replay", str(rec), *args], capture_output=True,
                           text=True, timeout=60)
        b = subprocess.run([sys.executable, "-m", "tracer", "-r", str(rec), *args], capture_output=True,
                           text=True, timeout=60)
        assert a.returncode == b.returncode == 0, a.stderr + b.stderr
        assert a.stdout == b.stdout and a.stdout.count(lab.addr["server4"]) >= 4, args
