"""pkttrace as users run it: a real process, real signals, real leftovers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root

from tracer import backends

OUR_PROGS = {"nf_obs_0", "nf_obs_1", "tc_ingress", "tc_egress", "on_rx", "on_dev_queue", "on_kfree_skb",
             "on_consume_skb", "on_copy_datagram", "on_sk_data_ready", "on_napi_poll", "on_fib_lookup",
             "on_fib6_lookup", "fe_sk_data_ready", "kp_data_ready",
             # names the kernel keeps are cut at 15 characters
             *(n[:15] for n in backends.HOOK_PROGRAMS)}


def the_plan() -> backends.Plan:
    """What a pkttrace started now will use on this kernel."""
    return backends.plan(backends.probe(), os.environ.get("PKTTRACE_BACKEND", "auto"))


def need_tc_observers():
    if not the_plan().tc:
        pytest.skip("no tc observers on this kernel: kfunc bpf_cast_to_kern_ctx missing (Linux 6.2+)")


def pkttrace(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tracer", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """The 'tracing ...' line pkttrace prints once every probe is attached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "tracing" in line:
            return line
        if not line and proc.poll() is not None:
            break
    pytest.fail(f"pkttrace never became ready: rc={proc.poll()} {proc.stderr.read()}")


# bpftool 7.1 (Debian 12) predates netfilter and TCX links and prints their
# type as the number from enum bpf_link_type
LINK_TYPES = {10: "netfilter", 11: "tcx"}


def our_links() -> list[dict]:
    """bpf links whose program is one of ours (bpftool sees every netns)."""
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    ours = {p["id"] for p in progs if p.get("name") in OUR_PROGS}
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    return [dict(lk, type=LINK_TYPES.get(lk.get("type"), lk.get("type")))
            for lk in links if lk.get("prog_id") in ours]


def wait_no_links(timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while (left := our_links()) and time.monotonic() < deadline:
        time.sleep(0.05)  # link release after exit is asynchronous (RCU)
    return left


def tc_state(ns: str) -> str:
    out = []
    for args in (["qdisc", "show"], ["filter", "show", "dev", "rs", "ingress"],
                 ["filter", "show", "dev", "rs", "egress"]):
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
        out.append(r.stdout)
    return "".join(out)


def test_sigkill_leaves_no_link_filter_or_qdisc(lab):
    assert not our_links(), "links of ours before the test: another pkttrace is running?"
    before = tc_state(lab.router)
    proc = pkttrace("--netns", lab.router)
    try:
        wait_ready(proc)
        links = our_links()
        kinds = {lk.get("type") for lk in links}
        plan = the_plan()
        # the hooks' links by backend: netfilter links, fentry (tracing), kprobes (perf events)
        want = {"raw_tracepoint", {"nflink": "netfilter", "fentry": "tracing", "kprobe": "perf_event"}[plan.netfilter]}
        if plan.tc and backends._kernel_version() >= (6, 6):
            want.add("tcx")                      # TCX links: Linux 6.6+ (else classic cls_bpf)
        assert want <= kinds, kinds
        if plan.netfilter == "nflink":
            # one observer per hook and family, one more after each table the
            # lab's rules registered (mangle PREROUTING, filter FORWARD; v4
            # and v6), but FORWARD has none before its first table
            assert sum(lk.get("type") == "netfilter" for lk in links) == 10 + 2 * 2 - 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_no_links() == []
    assert tc_state(lab.router) == before
    assert "bpf" not in tc_state(lab.router)


def test_classic_tc_fallback_is_removed_on_exit_and_after_a_kill(lab):
    """--tc classic (kernels without TCX): netlink state, ours to clean."""
    need_tc_observers()
    proc = pkttrace("--netns", lab.router, "--tc", "classic")
    wait_ready(proc)
    assert "pkttrace" in tc_state(lab.router)
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    # a SIGKILLed process cannot clean netlink state: the next start does
    proc = pkttrace("--netns", lab.router, "--tc", "classic")
    wait_ready(proc)
    assert tc_state(lab.router).count("pkttrace") == 2  # one ingress, one egress on rs: no duplicates
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    state = tc_state(lab.router)
    assert "pkttrace" not in state and "clsact" not in state
    assert wait_no_links() == []


def test_sighup_cleans_up_like_sigterm(lab):
    """A closed terminal (SIGHUP) ends pkttrace with its summary and leaves
    nothing: not even classic tc filters, which are netlink state."""
    need_tc_observers()
    proc = pkttrace("--netns", lab.router, "--tc", "classic")
    wait_ready(proc)
    assert "pkttrace" in tc_state(lab.router)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "packets shown" in err
    state = tc_state(lab.router)
    assert "pkttrace" not in state and "clsact" not in state
    assert wait_no_links() == []


def test_json_lines_with_count(lab):
    proc = pkttrace("--netns", lab.router, "--json", "--proto", "icmp", "--dst", lab.addr["server4"], "-c", "1")
    try:
        wait_ready(proc)
        assert lab.ping(lab.client, lab.addr["server4"]) == 1
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    pkt = json.loads(lines[0])
    for key in ("id", "netns", "family", "proto", "src", "dst", "fate", "in_dev", "out_dev", "path"):
        assert key in pkt, key
    assert (pkt["family"], pkt["proto"], pkt["fate"]) == ("ipv4", "icmp", "forwarded")
    assert pkt["netns"] == lab.router
    for st in pkt["path"]:
        assert {"stage", "t_ns", "dev", "mark"} <= set(st)
    assert [s["stage"] for s in pkt["path"]][-1] == "tx"
    # the summary line accounts for what was not shown
    assert "1 packets shown" in err and "lost" in err and "aged out" in err


@pytest.mark.parametrize("args, needle", [
    (["--src", "10.0.0.300/8"], "invalid address"),
    (["--mark", "0xZZ"], "invalid mark"),
    (["--netns", "no-such-ns-pkttrace"], "unknown network namespace"),
    (["--iface", "nosuchif0"], "no interface"),
    (["--proto", "bogus"], "invalid protocol"),
])
def test_bad_input_one_line_exit_2(lab, args, needle):
    r = subprocess.run([sys.executable, "-m", "tracer", "--netns", lab.router, *args], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.fixture
def world_readable_dir():
    """pytest's tmp_path lives under a root-only directory: nobody cannot enter it."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="pkttrace-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield __import__("pathlib").Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_not_root_one_line_exit_2(world_readable_dir):
    """As an unprivileged user (nobody), with the tree copied where they can read it."""
    import shutil
    tmp_path = world_readable_dir
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dst = tmp_path / "src"
    shutil.copytree(os.path.join(repo, "tracer"), dst / "tracer")
    import click
    shutil.copytree(os.path.dirname(click.__file__), dst / "click")  # root's site-packages is not readable
    for root, _dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    env = {"PYTHONPATH": str(dst), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "tracer", "--proto", "icmp"], capture_output=True, text=True, env=env, timeout=30,
                       cwd=dst)
    if "Permission denied" in r.stderr and "python" in r.stderr.lower():
        pytest.skip("the Python interpreter is not readable by nobody on this machine")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing capabilities" in lines[0], r.stderr


def test_record_replays_to_the_same_json(lab, tmp_path):
    rec = tmp_path / "trace.jsonl"
    proc = pkttrace("--netns", lab.router, "--json", "--proto", "icmp", "--dst", lab.addr["server4"], "-c", "1",
                    "--record", str(rec))
    try:
        wait_ready(proc)
        assert lab.ping(lab.client, lab.addr["server4"]) == 1
        live, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    r = subprocess.run([sys.executable, "-m", "tracer", "replay", str(rec), "--json"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0]) == json.loads(live.splitlines()[0])


def tx_packets(ns: str, dev: str) -> int:
    r = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", dev], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)[0]["stats64"]["tx"]["packets"]


def test_small_ring_records_cross_its_end_whole(lab, tmp_path):
    """-B 128: a 128 KiB ring holds ~350 of these records, so 1,000 of them
    wrap round it ~3 times and some cross its end (read from two slices):
    every one comes out whole, with its own port and length."""
    out_path = tmp_path / "out.jsonl"
    with open(out_path, "w") as out_file:   # a file, not a pipe nobody reads while the flow runs
        proc = subprocess.Popen([sys.executable, "-m", "tracer", "--netns", lab.router, "--json", "--proto", "udp",
                                 "--dst", lab.addr["server4"], "-B", "128", "-c", "1000"],
                                stdout=out_file, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(proc)
            for i in range(20):     # paced: the ring is small, nothing should be lost
                lab.udp_send(lab.client, lab.addr["server4"], 6000 + i, b"y" * (10 + i), count=50)
                time.sleep(0.03)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "1000 packets shown" in err and " 0 lost" in err, err
    got = {}
    for line in out_path.read_text().splitlines():
        d = json.loads(line)
        assert (d["proto"], d["dst"], d["fate"]) == ("udp", lab.addr["server4"], "forwarded"), d
        assert d["len"] == 20 + 8 + 10 + d["dport"] - 6000, d     # IPv4 + UDP headers + payload
        got[d["dport"]] = got.get(d["dport"], 0) + 1
    assert got == {6000 + i: 50 for i in range(20)}


def test_stop_under_load_accounts_for_every_record(lab):
    """SIGTERM while the ring is full: every record is printed or counted.
    -B 256: the 3,000 records of the burst do not fit in it."""
    proc = pkttrace("--netns", lab.router, "--json", "--proto", "udp", "--dst", lab.addr["server4"],
                    "-B", "256")
    try:
        wait_ready(proc)
        sent = 3000
        tx0 = tx_packets(lab.router, "rs")
        lab.udp_send(lab.client, lab.addr["server4"], 5010, b"x" * 16, count=sent)
        # sendto returns before the router has forwarded: wait until it has
        deadline = time.monotonic() + 10
        while tx_packets(lab.router, "rs") - tx0 < sent and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    import re
    nums = {k: int(v) for v, k in re.findall(r"(\d+) (packets shown|lost|not traced|aged out|not printed)", err)}
    printed = len(out.splitlines())
    assert printed == nums["packets shown"]
    accounted = sum(nums.get(k, 0) for k in ("packets shown", "lost", "not traced", "aged out", "not printed"))
    # every datagram crossed the router before SIGTERM
    assert accounted == sent, err


def loading(pid: int) -> bool:
    """Has the process a BPF program yet (its fds: other tracers may run)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog":
                return True
        except OSError:
            pass    # closed meanwhile
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_start_stops_cleanly(lab, sig):
    """Ctrl-C (or SIGTERM) while the programs load: not lost (a
    KeyboardInterrupt raised inside a libbpf callback is dropped by ctypes,
    and the trace then ran on), not a traceback, nothing left behind: the
    trace stops once started, with its summary."""
    before = tc_state(lab.router)
    # classic tc filters (where tc observers run) are netlink state: the
    # clean-up that a lost signal would skip
    proc = pkttrace("--netns", lab.router, *(["--tc", "classic"] if the_plan().tc else []))
    try:
        os.set_blocking(proc.stderr.fileno(), False)
        deadline = time.monotonic() + 60     # (a TCG guest's start takes seconds)
        while not loading(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "pkttrace never loaded its programs"
            time.sleep(0.01)
        try:
            early = os.read(proc.stderr.fileno(), 65536).decode()
        except BlockingIOError:
            early = ""      # nothing written yet
        proc.send_signal(sig)
        os.set_blocking(proc.stderr.fileno(), True)
        # the rest of the start, then the stop: 15 s were too few for
        # Debian's 6.1 under qemu's TCG
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = early + err
    assert "tracing" not in early, "the signal came after the start: the test did not test the start"
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert "packets shown" in err                       # the summary: a stop, not a crash
    # (links are the process's fds: gone with it; classic filters are not)
    assert tc_state(lab.router) == before
