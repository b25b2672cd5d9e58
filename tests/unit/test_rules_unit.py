"""--rules without root: the nf_tables messages pkttrace writes (compared
with the bytes nft itself sends), the trace-event decoder, the filter's
compilation, the listing parser and the join of trace groups to paths."""
from __future__ import annotations

import struct

from tracer import model, nftables as nft, rulejoin, ruletrace
from tracer.filters import PacketFilter

# NFTA_RULE_EXPRESSIONS of `nft add rule inet t c meta l4proto udp udp dport 53 goto sel`, as
# nft 1.0.6 sent it (strace -xx of its sendmsg)
NFT_EXPRS = bytes.fromhex(
    "24000180090001006d657461000000001400028008000200000000100800010000000001"
    "2c0001800800010063 6d70002000028008000100000000010800020000000000 0c00038005000100 11000000"
    "340001800c0001007061796c6f61640024000280080001000000000108000200000000020800030000000002"
    "0800040000000002"
    "2c000180080001006 36d700020000280080001000000000108000200000000000c000380060001000035 0000"
    "380001800e000100696d6d6564696174650000002400028008000100000000001800028014000280080001 00"
    "fffffffc0800020073656c00".replace(" ", ""))


def test_rule_expressions_are_the_bytes_nft_sends():
    mine = b"".join([nft.meta(nft.NFT_META_L4PROTO), nft.cmp_eq(bytes([17])),
                     nft.payload(nft.NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2), nft.cmp_eq(struct.pack(">H", 53)),
                     nft.verdict(nft.NFT_GOTO, "sel")])
    assert mine == NFT_EXPRS


def test_newrule_message_frames_the_expressions():
    msg = nft.new_rule(7, nft.NFPROTO_INET, "t", "c", [NFT_EXPRS[:0x24]])
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, mtype, seq, pid) == (len(msg), 10 << 8 | 6, 7, 0)
    assert flags == nft.NLM_F_REQUEST | nft.NLM_F_CREATE | nft.NLM_F_APPEND | nft.NLM_F_ACK
    assert msg[16:20] == b"\x01\x00\x00\x00"                      # nfgenmsg: inet, v0, res_id 0
    a = nft.attrs(msg, 20)
    assert a[1] == b"t\0" and a[2] == b"c\0" and a[4] == NFT_EXPRS[:0x24]


def test_table_is_created_owned_so_the_kernel_deletes_it_with_the_socket():
    msg = nft.new_table(3, nft.NFPROTO_INET, "pkttrace_42")
    a = nft.attrs(msg, 20)
    assert a[nft.NFTA_TABLE_NAME] == b"pkttrace_42\0"
    assert a[nft.NFTA_TABLE_FLAGS] == b"\x00\x00\x00\x02"         # NFT_TABLE_F_OWNER, big-endian


def test_base_chain_sits_at_int_min():
    msg = nft.new_chain(4, nft.NFPROTO_INET, "t", "forward", nft.HOOK_NUMBERS["forward"])
    a = nft.attrs(msg, 20)
    hook = nft.attrs(a[nft.NFTA_CHAIN_HOOK])
    assert hook[1] == b"\x00\x00\x00\x02" and hook[2] == b"\x80\x00\x00\x00"
    assert a[nft.NFTA_CHAIN_TYPE] == b"filter\0" and a[nft.NFTA_CHAIN_POLICY] == b"\x00\x00\x00\x01"


def test_batch_wraps_messages_between_begin_and_end():
    b = nft.batch([nft.new_table(2, 1, "x")], 1)
    kinds = [t for t, _seq, _body in nft.messages(b)]
    assert kinds == [nft.NFNL_MSG_BATCH_BEGIN, 10 << 8 | 0, nft.NFNL_MSG_BATCH_END]


def _trace_msg(**kw) -> bytes:
    """An NFT_MSG_TRACE body as the kernel builds it (nfgenmsg + attributes)."""
    a = [nft.nla(nft.NFTA_TRACE_TABLE, b"filter\0"), nft.nla(nft.NFTA_TRACE_CHAIN, kw.get("chain", b"fw\0")),
         nft.nla(nft.NFTA_TRACE_ID, struct.pack(">I", kw.get("id", 0xabcdef01))),
         nft.nla(nft.NFTA_TRACE_TYPE, struct.pack(">I", kw.get("type", nft.TRACE_RULE)))]
    if "handle" in kw:
        a.append(nft.nla(nft.NFTA_TRACE_RULE_HANDLE, struct.pack(">Q", kw["handle"])))
    if "verdict" in kw:
        v = [nft.nla(nft.NFTA_VERDICT_CODE, struct.pack(">i", kw["verdict"]))]
        if "target" in kw:
            v.append(nft.nla(nft.NFTA_VERDICT_CHAIN, kw["target"] + b"\0"))
        a.append(nft.nest(nft.NFTA_TRACE_VERDICT, *v))
    if "policy" in kw:
        a.append(nft.nla(nft.NFTA_TRACE_POLICY, struct.pack(">I", kw["policy"])))
    if "network" in kw:
        a.append(nft.nla(nft.NFTA_TRACE_NETWORK_HEADER, kw["network"]))
        a.append(nft.nla(nft.NFTA_TRACE_TRANSPORT_HEADER, kw["transport"]))
    a.append(nft.nla(nft.NFTA_TRACE_NFPROTO, struct.pack(">I", 2)))
    return struct.pack("=BBH", kw.get("family", 2), 0, 0) + b"".join(a)


IP4 = bytes.fromhex("4500001d1234400040110000") + bytes([10, 0, 1, 2]) + bytes([10, 0, 2, 2])
UDP = struct.pack(">HHHH", 40000, 5009, 9, 0)


def test_trace_event_decoded():
    ev = nft.decode_trace(_trace_msg(handle=5, verdict=nft.NFT_JUMP, target=b"check", network=IP4, transport=UDP))
    assert (ev.table, ev.chain, ev.handle, ev.id, ev.family) == ("filter", "fw", 5, 0xabcdef01, 2)
    assert ev.verdict_text == "jump check"
    assert ruletrace.header_key(ev.nfproto, ev.network, ev.transport) == \
        (4, 17, "10.0.1.2", "10.0.2.2", 40000, 5009, 0x1234)
    assert nft.decode_trace(_trace_msg(handle=7, verdict=nft.NF_DROP)).verdict_text == "drop"
    pol = nft.decode_trace(_trace_msg(type=nft.TRACE_POLICY, policy=nft.NF_ACCEPT))
    assert pol.verdict_text == "accept" and pol.handle is None
    assert nft.decode_trace(_trace_msg(type=nft.TRACE_RETURN, verdict=nft.NFT_RETURN)).verdict_text == "return"


def test_filter_compiles_to_alternatives():
    assert ruletrace.compile_filter(PacketFilter()) == [[]]                   # every packet
    assert len(ruletrace.compile_filter(PacketFilter.parse(port="53"))) == 4  # tcp/udp x sport/dport
    assert len(ruletrace.compile_filter(PacketFilter.parse(proto="udp", port="53", iface="eth0"))) == 4
    assert ruletrace.compile_filter(PacketFilter.parse(proto="icmp", port="53")) == []
    assert ruletrace.compile_filter(PacketFilter.parse(src="10.0.0.0/8", dst="fd00::1")) == []
    (one,) = ruletrace.compile_filter(PacketFilter.parse(src="10.0.0.0/8", mark="0x1/0xff"))
    assert nft.bitwise(bytes([255, 0, 0, 0])) in one and nft.cmp_eq(bytes([10, 0, 0, 0])) in one
    assert nft.bitwise(struct.pack("=I", 0xff)) in one and nft.cmp_eq(struct.pack("=I", 1)) in one


LISTING = """\
table ip filter { # handle 3
	chain FORWARD { # handle 1
		type filter hook forward priority filter; policy accept;
		meta l4proto udp udp dport 5009 counter drop # handle 2
	}
}
table inet lab { # handle 4
	set ports { # handle 9
		type inet_service
		elements = { 1, 2 }
	}
	chain fw { # handle 1
		type filter hook forward priority filter; policy drop;
		udp dport 6002 jump "user chain" # handle 5
	}
	chain "user chain" { # handle 2
		udp dport 6002 counter drop # handle 7
	}
}
"""


def test_listing_parsed_into_chains_hooks_and_rule_texts():
    rs = ruletrace.parse_listing(LISTING)
    assert rs[("ip", "filter")]["FORWARD"].rules == {2: "meta l4proto udp udp dport 5009 counter drop"}
    assert (rs[("inet", "lab")]["fw"].hook, rs[("inet", "lab")]["fw"].policy) == ("forward", "drop")
    assert rs[("inet", "lab")]["user chain"].hook is None
    assert rs[("inet", "lab")]["user chain"].rules == {7: "udp dport 6002 counter drop"}


class _FakeNs:
    """An NsRules without a kernel: the listing above, no netns."""
    ns, ino, table = None, None, "pkttrace_1"

    def __init__(self):
        self.rules = ruletrace.parse_listing(LISTING)

    base_of = ruletrace.NsRules.base_of

    def refresh(self, force=False):
        pass


class _FakeTracer:
    def __init__(self, groups, drained=False):
        self.ns = {None: _FakeNs()}
        self.groups = groups
        self.drained = drained

    def take(self):
        out, self.groups = self.groups, []
        return out


def _packet(sport=40000):
    fwd = model.Stage("forward", 1000, "rs", 0, mark_out=0, tables=[
        model.TableStep("filter, lab/fw", 0, 0, 0, None, "drop")])
    p = model.Packet(1, "lab", "ipv4", "udp", "10.0.1.2", "10.0.2.2", sport, 5009, "dropped", "rc", "rs",
                     path=[model.Stage("tc_ingress", 0, "rc", 0), fwd], proto_num=17)
    p.head = IP4 + UDP               # the record's header capture: the IPv4 id joins
    return p


def _group(events):
    evs = [nft.decode_trace(m) for m in events]
    return ruletrace.Group(None, evs[0].id, __import__("time").monotonic(),
                           ruletrace.header_key(2, IP4, UDP), evs)


def test_join_puts_rules_under_their_table_user_chains_included():
    g = _group([
        _trace_msg(family=1, chain=b"fw\0", handle=5, verdict=nft.NFT_JUMP, target=b"user chain",
                   network=IP4, transport=UDP),
        _trace_msg(family=1, chain=b"user chain\0", handle=7, verdict=nft.NF_DROP)])
    g.events = [type(e)(**{**e.__dict__, "table": "lab"}) for e in g.events]
    j = rulejoin.Joiner(_FakeTracer([g]))
    (p,) = j.feed([_packet()])
    assert p.stage("forward").tables[0].rules == [
        {"chain": "fw", "handle": 5, "rule": 'udp dport 6002 jump "user chain"', "verdict": "jump user chain"},
        {"chain": "user chain", "handle": 7, "rule": "udp dport 6002 counter drop", "verdict": "drop"}]
    assert p.to_json()["path"][1]["tables"][0]["rules"][1]["verdict"] == "drop"
    assert j.counts.joined == 1


def test_a_path_without_its_group_waits_then_goes_out_counted():
    j = rulejoin.Joiner(_FakeTracer([]), wait=0.05)
    assert j.feed([_packet(sport=1)]) == []             # waits for its events
    __import__("time").sleep(0.06)
    (p,) = j.feed([])
    assert p.stage("forward").tables[0].rules is None and "rules" not in p.to_json()["path"][1]["tables"][0]
    assert j.counts.without == 1


def test_a_path_goes_out_at_once_when_the_socket_was_read_empty():
    # its events would have been queued before its record: none will come
    j = rulejoin.Joiner(_FakeTracer([], drained=True), wait=10)
    (p,) = j.feed([_packet(sport=1)])
    assert j.counts.without == 1


class _RawSock:
    def bind(self, addr):
        pass

    def setsockopt(self, *a):
        pass

    def close(self):
        pass


def test_a_kernel_without_owned_tables_is_named(monkeypatch):
    monkeypatch.setattr(nft, "open_socket", lambda: _RawSock())

    def refuse(self, build):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(nft.Socket, "commit", refuse)
    try:
        ruletrace.NsRules(None, "pkttrace_1", [[]], 10, 1)
    except ruletrace.RulesError as e:
        assert "NFT_TABLE_F_OWNER, Linux 5.12+" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("no RulesError")


def test_no_nf_tables_is_named(monkeypatch):
    def nope():
        raise OSError(93, "Protocol not supported")
    monkeypatch.setattr(nft, "open_socket", nope)
    try:
        ruletrace.NsRules(None, "pkttrace_1", [[]], 10, 1)
    except ruletrace.RulesError as e:
        assert str(e).startswith("--rules needs nf_tables")
    else:
        raise AssertionError("no RulesError")


def test_human_view_prints_rules_under_their_table_escaped():
    from tracer.output import plain_text
    p = _packet()
    p.stage("forward").tables[0].rules = [
        {"chain": "fw", "handle": 5, "rule": 'udp dport 6002 jump "evil\x1b[31m"', "verdict": "jump evil\x1b[31m"},
        {"chain": "fw", "handle": 6, "rule": "udp dport 6002 counter", "verdict": "continue"},
        {"chain": "fw", "handle": None, "rule": "policy drop", "verdict": "drop"}]
    text = plain_text(p)
    assert "\x1b" not in text
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if "· filter, lab/fw" in ln)
    assert lines[i + 1].strip().startswith('fw #5  udp dport 6002 jump "evil\\x1b[31m"  → jump evil\\x1b[31m')
    assert lines[i + 2].strip() == "fw #6  udp dport 6002 counter  → continue"
    assert lines[i + 3].strip() == "fw  policy drop"


def test_the_end_of_a_base_chain_is_no_rule_on_either_kernel():
    # before the policy, 6.18 reports a rule event without a handle, 6.1 a return
    evs = [_trace_msg(family=1, chain=b"fw\0", handle=4, verdict=nft.NFT_CONTINUE, network=IP4, transport=UDP),
           _trace_msg(family=1, chain=b"fw\0", verdict=nft.NFT_CONTINUE),
           _trace_msg(family=1, chain=b"fw\0", type=nft.TRACE_RETURN, verdict=nft.NFT_CONTINUE),
           _trace_msg(family=1, chain=b"fw\0", type=nft.TRACE_POLICY, policy=nft.NF_ACCEPT)]
    g = _group(evs)
    g.events = [type(e)(**{**e.__dict__, "table": "lab"}) for e in g.events]
    found = rulejoin.rules_by_table(g, _FakeNs())
    assert [(r["handle"], r["verdict"]) for r in found[("forward", "lab/fw")]] == [(4, "continue"), (None, "accept")]
