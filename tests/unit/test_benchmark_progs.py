"""benchmarks.run sums the BPF time of its own tracer's programs only (those
tracer.probes.prog_ids_of finds in the process): a pkttrace serve left on
beside it (issue 12's point) runs programs of the same names, and their
runs are not the benchmarked tracer's cost."""
import os

from tracer.probes import fdinfo_prog_id, prog_ids_of

# fdinfo texts recorded from a pkttrace serve (kernel 6.18)
PROG_FD = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t1038
prog_type:\t26
prog_jited:\t1
prog_tag:\tdd285e9a0a189db0
memlock:\t4096
prog_id:\t165
run_time_ns:\t27738931
run_cnt:\t336948
recursion_misses:\t0
verified_insns:\t1774
"""
LINK_FD = """pos:\t0
flags:\t02000000
mnt_id:\t17
ino:\t1038
link_type:\traw_tracepoint
link_id:\t179
prog_tag:\ta499755a79cf30ca
prog_id:\t169
tp_name:\tnet_dev_xmit
cookie:\t0
"""
MAP_FD = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t1038
map_type:\t6
key_size:\t4
value_size:\t56
max_entries:\t1
map_flags:\t0x0
map_extra:\t0x0
memlock:\t432
map_id:\t136
frozen:\t0
"""


def test_a_program_fd_and_a_link_fd_name_their_program():
    assert fdinfo_prog_id(PROG_FD) == 165
    assert fdinfo_prog_id(LINK_FD) == 169


def test_other_fds_name_none():
    assert fdinfo_prog_id(MAP_FD) is None
    assert fdinfo_prog_id("pos:\t0\nflags:\t02\n") is None
    # a field that only ends in prog_id is not it
    assert fdinfo_prog_id("xprog_id:\t3\n") is None


def test_a_process_without_bpf_fds_holds_no_programs():
    assert prog_ids_of(os.getpid()) == set()
