// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * pkttrace: follow each packet through the stack of the traced network
 * namespaces and emit one record per packet when its traversal ends.
 *
 * Attach points (all observe only; none changes a verdict):
 *   tp_btf  netif_receive_skb, net_dev_queue, net_dev_xmit, kfree_skb,
 *           consume_skb, skb_copy_datagram_iovec, sk_data_ready, napi_poll,
 *           fib_table_lookup, fib6_table_lookup
 *   netfilter links  nf_obs_N at chosen priorities of each hook (user space
 *           knows which priority slot N was attached at)
 *   TCX / cls_bpf  tc_ingress, tc_egress (return TCX_NEXT == TC_ACT_UNSPEC)
 *
 * A packet is identified by its struct sk_buff pointer while it is in
 * flight; the record lives in the `inflight` hash until the kernel's last
 * word on it: it left a device (net_dev_xmit), was delivered, consumed,
 * absorbed by reassembly or freed.  Records whose end is never seen are
 * aged out by user space, so none is lost without being counted.
 *
 * Everything a record says must be the kernel's answer for that packet:
 * route lookups are claimed by the packet whose addresses they looked up,
 * the route's result is read from the dst the kernel attached to the skb,
 * and a packet the kernel generates while processing another (ICMP error,
 * RST) names that packet as its cause.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "pkttrace.h"

#define NF_ACCEPT 1
#define TCX_NEXT (-1)          /* == TC_ACT_UNSPEC for classic cls_bpf */
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define NFPROTO_IPV4 2
#define NFPROTO_IPV6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_FRAGMENT 44
#define IPPROTO_ICMPV6 58
#define AF_INET 2
#define AF_INET6 10
#define RTF_GATEWAY 0x0002
#define RTF_LOCAL 0x80000000
#define NETDEV_TX_OK 0
/* Route lookups older than this are not attributed to a new packet: the
 * lookup for a locally generated packet happens just before LOCAL_OUT. */
#define ROUTE_MAX_AGE_NS (10 * 1000 * 1000ULL)
/* A reply is generated while its cause is being processed (nested in the
 * same softirq pass): microseconds, generous for slow (emulated) CPUs. */
#define CAUSE_MAX_AGE_NS (5 * 1000 * 1000ULL)
/* A packet handed to a veth reaches the peer's backlog at once and is
 * received in the same or the next softirq run. */
#define HANDOFF_MAX_AGE_NS (1000 * 1000 * 1000ULL)
#define ARPHRD_NONE 0xFFFE   /* a device without link-layer header (WireGuard) */
/* Records waiting in the ring before the reader is woken (~100 records). */
#define RINGBUF_WAKEUP_BYTES (64 * 1024)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Criteria NAT can change the answer to: matched again after NAT. */
#define PT_F_NAT_CHANGES (PT_F_SRC | PT_F_DST | PT_F_PORT | PT_F_PCAP)

/* Set by user space between open and load; see struct pt_config. */
const volatile struct pt_config cfg = {};

#include "pcap_filter.h"

/* Records of packets in flight.  Each CPU keeps the records of the packets
 * it is processing in its slots (no hashing, no sharing); a record whose
 * packet is queued for later (qdisc, neighbour, reassembly, socket backlog),
 * or that a new packet needs the slot of, is parked in `inflight`. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_slots);
} slots_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PT_SLOTS);
	__type(key, __u32);
	__type(value, struct pt_record);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192); /* resized by user space before load */
	__type(key, __u64);
	__type(value, struct pt_record);
} inflight SEC(".maps");

/* How many records are parked: while none is, a packet not in this CPU's
 * slots has no record and the shared table is not searched.  [0]: parked
 * minus ended by the kernel; [1]: deleted by user space (aged out). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __s64);
} parked SEC(".maps");

/* A record is too big for the BPF stack: copy one here (count_path). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_record);
} scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_nf_pos);
} nf_pos SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PT_STAT__MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_route_buf);
} route_buf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} id_seq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_pending);
} pending_in SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_active);
} active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_tc_last);
} tc_last SEC(".maps");

/* Runtime, per traced netns (index in cfg.netns_ino): 1 when its ruleset
 * has NAT, so a header filter cannot judge a packet at first sight. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PT_MAX_NETNS);
	__type(key, __u32);
	__type(value, __u32);
} netns_nat SEC(".maps");

/* Per CPU, fentry/kprobe backends: the nft chain a packet entered last
 * (skb, table handle << 32 | priority).  Since 6.1 an nft chain that
 * drops frees the packet itself (NF_DROP_REASON) and returns NF_STOLEN:
 * the drop tracepoint, inside the chain, names the chain from here. */
struct pt_chain_now {
	__u64 skb;
	__u64 word;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_chain_now);
} chain_now SEC(".maps");

/* Runtime: the traced namespaces (struct pt_ns_slot); namespaces come and
 * go while tracing (--netns all, a traced name created again). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PT_NS_SLOTS);
	__type(key, __u32);
	__type(value, struct pt_ns_slot);
} traced_ns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PT_MAX_NETNS);
	__type(key, __u32);             /* netns inode */
	__type(value, __u32);           /* index */
} traced_ns_more SEC(".maps");

/* Runtime, per traced netns: the observers right after a NAT table, how
 * many observers each hook has, and the hook entries they were placed for. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PT_MAX_NETNS);
	__type(key, __u32);
	__type(value, struct pt_nat_slots);
} nat_slots SEC(".maps");

/* Runtime: PT_F_IFACE's device, by the ifindex its name has now in the
 * traced netns (0: no device of that name there now).  User space follows
 * renames and re-creation (rtnetlink) and writes it again. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} iface_want SEC(".maps");

/* Runtime, per traced netns: the nftables generation (net->nft.base_seq)
 * at which user space read the ruleset the observers are placed for. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PT_MAX_NETNS);
	__type(key, __u32);
	__type(value, __u32);
} ruleset_gen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct pt_handoff);
} handoff SEC(".maps");

/* Hand-offs reserved and not claimed yet (or evicted unclaimed): while
 * none is, a packet's first sight needs no look in `handoff`. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} handoffs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct pt_frag_key);
	__type(value, __u64);
} frag_groups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* resized by user space before load */
} events SEC(".maps");

/* Count mode: packets that left a qdisc by queueing time (struct
 * pt_qdisc_key); a few keys per shaped device.  Resized by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct pt_qdisc_key);
	__type(value, struct pt_qdisc_val);
} qdisc_hist SEC(".maps");

/* Count mode: packets per path (per CPU), and one example record per path.
 * Both resized by user space before load. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct pt_path_key);
	__type(value, __u64);
} path_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct pt_path_key);
	__type(value, struct pt_record);
} path_examples SEC(".maps");

/* Count mode: drops by netns, reason and family, kept apart from the paths
 * (a few keys per namespace: sized by user space to far more than that). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pt_drop_key);
	__type(value, __u64);
} drop_totals SEC(".maps");

/* Per CPU: the last packet judged at first sight not to match (no record). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} rejected SEC(".maps");

/* 6.2+: weak, so the object loads on older kernels (without tc observers) */
extern void *bpf_cast_to_kern_ctx(void *) __ksym __weak;
/* 6.2+, weak likewise: a kernel address as a read-only, untrusted pointer
 * to a type.  Loads through it are inlined fault-safe loads (the verifier
 * makes the cast a register move), where bpf_probe_read_kernel is a helper
 * call: ~20-25 ns each on the AMD machine (SRSO return thunks), 24 ns of
 * the netfilter observer's ~200 for the one byte of DSCP alone.  Used only
 * in programs that load where the kfuncs are: netfilter links (6.4+) and
 * tc observers (which need bpf_cast_to_kern_ctx anyway); the shared code
 * takes a constant `cast` that compiles the other reads out of them.  Only
 * for types in vmlinux: a type-id relocation has no module BTF to go to
 * (nf_conn, whose kernel BTF also has nf_conn___init, is read by CO-RE). */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

/* p (any kernel address) as a read-only pointer to TYPE */
#define CAST(TYPE, p) ((TYPE *)bpf_rdonly_cast((const void *)(p), bpf_core_type_id_kernel(TYPE)))

/* Addresses, protocol and ports read from an IP header. */
struct pkt_info {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u8 tos;
	__u8 frag;      /* a fragment (not reassembled) */
	__u32 frag_id;
	__u16 len;      /* IP total length */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 l4;        /* the L4 header was read (not a later fragment) */
	/* for the filter expression, run only when another criterion does not
	 * settle it first (no pointers here: spilled pointers cost the verifier
	 * states, and 6.1's fx_nft_chain is near its limit) */
	__u8 pcap;      /* 0: not run yet, 1: no match, 2: match */
	__u8 l3_at_data; /* the IP header is at skb->data (receive: its offset
			    may not be set yet), else at network_header */
	__u8 ext_hdrs;  /* PT_EXT_*: IPv6 extension headers walked */
};

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += 1;
}

/* Index of a traced netns, or -1: one inlined array load for most
 * packets (a netns traced or not), a hash lookup on a slot collision. */
static __always_inline int netns_index(__u32 ino)
{
	__u32 k = ino & (PT_NS_SLOTS - 1);
	struct pt_ns_slot *s = bpf_map_lookup_elem(&traced_ns, &k);
	__u32 *i;

	if (!s || !s->index)
		return -1;
	if (s->inum == ino)
		return s->index - 1;
	i = bpf_map_lookup_elem(&traced_ns_more, &ino);
	return i ? (int)*i : -1;
}

static __always_inline bool netns_traced(__u32 ino)
{
	return netns_index(ino) >= 0;
}

static __always_inline bool netns_may_nat(__u32 ino)
{
	int i = netns_index(ino);
	__u32 k, *v;

	if (i < 0)
		return false;
	k = i;
	v = bpf_map_lookup_elem(&netns_nat, &k);
	return v && *v;
}

static __always_inline __u8 family_of_ethertype(__u16 proto_be)
{
	if (proto_be == bpf_htons(ETH_P_IP))
		return 4;
	if (proto_be == bpf_htons(ETH_P_IPV6))
		return 6;
	return 0;
}

/* IPv6 extension headers (uapi in6.h; vmlinux.h has only AH's and ESP's
 * numbers, from the IPPROTO_* enum) */
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ROUTING 43
#define IPPROTO_DSTOPTS 60
/* Extension headers walked at most before the upper-layer header: a bound
 * for the verifier; real packets carry one to three (hop-by-hop, routing,
 * fragment, destination options). */
#define PT_EXT_WALK 6
/* The next headers that are one of them, a bit each (all below 64) */
#define PT_EXT_NEXTHDRS (1ULL << IPPROTO_HOPOPTS | 1ULL << IPPROTO_ROUTING | 1ULL << IPPROTO_FRAGMENT | \
			 1ULL << IPPROTO_DSTOPTS | 1ULL << IPPROTO_AH)

/* PT_EXT_* of an extension header's number; 0: not one walked */
static __always_inline __u32 ext_bit(__u32 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS ? PT_EXT_HOP :
	       nexthdr == IPPROTO_ROUTING ? PT_EXT_ROUTING :
	       nexthdr == IPPROTO_FRAGMENT ? PT_EXT_FRAG :
	       nexthdr == IPPROTO_DSTOPTS ? PT_EXT_DEST :
	       nexthdr == IPPROTO_AH ? PT_EXT_AH : 0;
}

/* Walk the IPv6 extension headers that follow the fixed header at kernel
 * address l3, whose next header is nexthdr, to the upper-layer header.
 * Global: verified once, not in each of parse_l3's inlined copies (inlined,
 * 6.1 refused fe_hook_entry as too complex; unrolled without branches, it
 * overflowed the 512-byte stack).  The call has a price before 6.5, whose
 * verifier marks every scalar precise when it backtracks across a call: on
 * 6.1, kr_nft_chain verifies twice the instructions (216k -> 439k of the
 * 1M limit), the other programs 1-14 % more.  Only scalars in and out: a
 * pointer argument would let it write the caller's stack behind the
 * verifier's back.  Returns, packed:
 *   bits  0-7   the upper-layer protocol, or the header the walk stopped at
 *               (ESP, NONE, unknown, unreadable, or one past the bound)
 *   bits  8-15  PT_EXT_* of the headers walked
 *   bits 16-31  the upper-layer header's offset from l3; 0: none to read
 *               (a later fragment, a header not readable, not reached)
 *   bits 32-63  the fragment header's identification (PT_EXT_FRAG)
 * Each header starts with its next header and a length: (len + 1) * 8
 * bytes, AH's (len + 2) * 4; the fragment header is 8 bytes, and only the
 * first fragment (offset 0) carries the upper-layer header. */
__noinline __u64 ipv6_ext_walk(__u64 l3, __u32 nexthdr)
{
	__u32 off = sizeof(struct ipv6hdr), ext = 0, id = 0;
	union {
		__u8 b[8];      /* next header, length */
		struct frag_hdr fh;
	} h;
	int i;

	for (i = 0; i < PT_EXT_WALK; i++) {
		__u32 bit = ext_bit(nexthdr);

		if (!bit)
			break;
		/* 8 bytes: every one of these is at least that long */
		if (bpf_probe_read_kernel(&h, sizeof(h), (const void *)(l3 + off)))
			return (__u64)id << 32 | ext << 8 | nexthdr;
		ext |= bit;
		nexthdr = h.b[0];
		if (bit == PT_EXT_FRAG) {
			id = bpf_ntohl(h.fh.identification);
			if (h.fh.frag_off & bpf_htons(0xfff8)) /* a later fragment */
				return (__u64)id << 32 | ext << 8 | nexthdr;
			off += sizeof(h.fh);
		} else if (bit == PT_EXT_AH) {
			off += (h.b[1] + 2) * 4;
		} else {
			off += (h.b[1] + 1) * 8;
		}
	}
	/* the bound reached with another extension header to go: no
	 * upper-layer header known */
	if (ext_bit(nexthdr))
		off = 0;
	return (__u64)id << 32 | (off & 0xffff) << 16 | ext << 8 | nexthdr;
}

/* The L4 facts parse_l3 takes from the first 4 bytes: TCP's and UDP's
 * ports, or ICMP's type and code (user space picks what the protocol has).
 * TCP's flag byte, 13 bytes in, is read on its own (the stack of the
 * kprobe and netfilter programs has no room for a bigger buffer). */
static __always_inline void l4_facts(struct pkt_info *pi, const __u8 *b, const void *l4, bool cast)
{
	pi->l4 = 1;
	pi->icmp_type = b[0];
	pi->icmp_code = b[1];
	if (pi->proto == IPPROTO_TCP || pi->proto == IPPROTO_UDP) {
		pi->sport = (b[0] << 8) | b[1];
		pi->dport = (b[2] << 8) | b[3];
	}
	if (pi->proto == IPPROTO_TCP && cast)
		pi->tcp_flags = *((const __u8 *)CAST(struct tcphdr, l4) + 13); /* fin..cwr */
	else if (pi->proto == IPPROTO_TCP)
		bpf_probe_read_kernel(&pi->tcp_flags, 1, l4 + 13);
}

/* An IP header and the 4 bytes after it (the first 4 of any L4 header). */
struct ip4_head {
	struct iphdr iph;
	__u8 l4[4];
};

struct ip6_head {
	struct ipv6hdr ip6;
	__u8 l4[4];
};

/* The first 4 bytes of the L4 header at l4, as inlined loads (CAST): read
 * as UDP's two ports, which is where TCP has its ports and ICMP its type,
 * code and checksum. */
static __always_inline void l4_word_cast(__u8 *b, const void *l4)
{
	const struct udphdr *u = CAST(struct udphdr, l4);
	__u16 sport = u->source, dport = u->dest;

	__builtin_memcpy(b, &sport, 2);
	__builtin_memcpy(b + 2, &dport, 2);
}

/* The fields parse_l3 reads of the IPv4 header at l3 (the first byte holds
 * version and ihl) and the 4 bytes after it, as inlined loads (CAST); the
 * rest of h is zero. */
static __always_inline void ip4_head_cast(struct ip4_head *h, const void *l3)
{
	const struct iphdr *ip = CAST(struct iphdr, l3);

	__builtin_memset(h, 0, sizeof(*h));
	*(__u8 *)&h->iph = *(const __u8 *)ip;
	h->iph.tos = ip->tos;
	h->iph.tot_len = ip->tot_len;
	h->iph.id = ip->id;
	h->iph.frag_off = ip->frag_off;
	h->iph.protocol = ip->protocol;
	h->iph.saddr = ip->saddr;
	h->iph.daddr = ip->daddr;
	l4_word_cast(h->l4, l3 + sizeof(struct iphdr));
}

/* The same for IPv6 (the first byte: version and priority). */
static __always_inline void ip6_head_cast(struct ip6_head *h, const void *l3)
{
	const struct ipv6hdr *ip = CAST(struct ipv6hdr, l3);

	__builtin_memset(h, 0, sizeof(*h));
	*(__u8 *)&h->ip6 = *(const __u8 *)ip;
	h->ip6.flow_lbl[0] = ip->flow_lbl[0];
	h->ip6.payload_len = ip->payload_len;
	h->ip6.nexthdr = ip->nexthdr;
	for (int i = 0; i < 4; i++) {
		h->ip6.saddr.in6_u.u6_addr32[i] = ip->saddr.in6_u.u6_addr32[i];
		h->ip6.daddr.in6_u.u6_addr32[i] = ip->daddr.in6_u.u6_addr32[i];
	}
	l4_word_cast(h->l4, l3 + sizeof(struct ipv6hdr));
}

static __always_inline bool l4_known(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6;
}

/* Parse the IP header at kernel address l3.  Returns 0 on success.
 * The header and the L4 facts after it in one read where they follow each
 * other (no IPv4 options, no IPv6 extension headers: nearly every packet):
 * each probe read costs ~9 ns (~20 on the AMD machine), and this runs at
 * every packet's first sight; cast (a program with the kfuncs): inlined
 * loads instead.  Past a short packet's end the read takes the skb's own
 * buffer (tailroom, shared info), as rec_new's head copy does; user space
 * reads only what the protocol has. */
static __always_inline int parse_l3_by(const void *l3, __u8 family, struct pkt_info *pi, bool cast)
{
	const void *l4;

	__builtin_memset(pi, 0, sizeof(*pi));
	if (family == 4) {
		struct ip4_head h;

		if (cast)
			ip4_head_cast(&h, l3);
		else if (bpf_probe_read_kernel(&h, sizeof(h), l3))
			return -1;
		if (h.iph.version != 4)
			return -1;
		pi->family = 4;
		pi->len = bpf_ntohs(h.iph.tot_len);
		pi->proto = h.iph.protocol;
		pi->tos = h.iph.tos;
		__builtin_memcpy(pi->saddr, &h.iph.saddr, 4);
		__builtin_memcpy(pi->daddr, &h.iph.daddr, 4);
		if (h.iph.frag_off & bpf_htons(0x3fff)) { /* MF or an offset */
			pi->frag = 1;
			pi->frag_id = bpf_ntohs(h.iph.id);
		}
		/* ports only in the first fragment */
		if (h.iph.frag_off & bpf_htons(0x1fff))
			return 0;
		if (h.iph.ihl == 5) {
			if (l4_known(pi->proto))
				l4_facts(pi, h.l4, l3 + sizeof(h.iph), cast);
			return 0;
		}
		l4 = l3 + h.iph.ihl * 4;
	} else if (family == 6) {
		struct ip6_head h;
		__u64 w;

		if (cast)
			ip6_head_cast(&h, l3);
		else if (bpf_probe_read_kernel(&h, sizeof(h), l3))
			return -1;
		if (h.ip6.version != 6)
			return -1;
		pi->family = 6;
		pi->len = bpf_ntohs(h.ip6.payload_len) + sizeof(h.ip6);
		pi->proto = h.ip6.nexthdr;
		pi->tos = (h.ip6.priority << 4) | (h.ip6.flow_lbl[0] >> 4);
		__builtin_memcpy(pi->saddr, &h.ip6.saddr, 16);
		__builtin_memcpy(pi->daddr, &h.ip6.daddr, 16);
		/* one test here (as the fragment header alone was tested
		 * before): a packet without extension headers pays nothing */
		if (!(h.ip6.nexthdr < 64 && ((PT_EXT_NEXTHDRS >> h.ip6.nexthdr) & 1))) {
			if (l4_known(pi->proto))
				l4_facts(pi, h.l4, l3 + sizeof(h.ip6), cast);
			return 0;
		}
		/* l3 as a number: newer verifiers type skb->head a pointer
		 * (6.18: read-only untrusted memory), which a global function
		 * does not take, and a pointer negated is a number to a
		 * privileged program: twice, l3 again.  (Not read back from
		 * the stack with a helper: l3 in memory cost 6.1's fx_nft_chain
		 * 80 % more verified instructions.) */
		w = (__u64)l3;
		asm volatile("%[w] = -%[w]; %[w] = -%[w]" : [w] "+r"(w));
		w = ipv6_ext_walk(w, h.ip6.nexthdr);
		pi->proto = w;
		pi->ext_hdrs = w >> 8;
		pi->frag = (w >> 8 & PT_EXT_FRAG) / PT_EXT_FRAG; /* 0 or 1, no branch */
		pi->frag_id = w >> 32;
		if (!(w & 0xffff0000))
			return 0;
		l4 = l3 + ((w >> 16) & 0xffff);
	} else {
		return -1;
	}
	/* after IPv4 options or IPv6 extension headers: a read of its own */
	if (l4_known(pi->proto)) {
		__u8 b[4];

		if (!bpf_probe_read_kernel(b, sizeof(b), l4))
			l4_facts(pi, b, l4, false);
	}
	return 0;
}

/* Parse the IP header at kernel address l3 with helper calls: any program. */
static __always_inline int parse_l3(const void *l3, __u8 family, struct pkt_info *pi)
{
	return parse_l3_by(l3, family, pi, false);
}

/* The DSCP/ECN byte of the IP header at l3: IPv4's TOS, or IPv6's traffic
 * class, split over the first two bytes (after the version, before the flow
 * label).  One helper read, or (cast) inlined loads. */
static __always_inline __u8 l3_tos(const void *l3, __u8 family, bool cast)
{
	__u8 b[2] = {};

	if (family == 4) {
		if (cast)
			return CAST(struct iphdr, l3)->tos;
		bpf_probe_read_kernel(b, 1, l3 + 1);
		return b[0];
	}
	if (cast) {
		const struct ipv6hdr *ip6 = CAST(struct ipv6hdr, l3);

		b[0] = *(const __u8 *)ip6;      /* version, priority */
		b[1] = ip6->flow_lbl[0];
	} else {
		bpf_probe_read_kernel(b, 2, l3);
	}
	return (b[0] << 4) | (b[1] >> 4);
}

static __always_inline const void *skb_l3(const struct sk_buff *skb)
{
	return skb->head + skb->network_header;
}

static __always_inline bool addr_eq(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

static __always_inline bool addr_zero(const __u8 *a)
{
	__u64 a0, a1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	return !a0 && !a1;
}

/* net and mask live in the const volatile config: read them through volatile
 * pointers, or clang folds them to the initializer (all zero: match all). */
static __always_inline bool addr_match(const __u8 *a, const volatile __u64 *net,
				       const volatile __u64 *mask)
{
	__u64 a0, a1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	return (a0 & mask[0]) == net[0] && (a1 & mask[1]) == net[1];
}

/* Does the filter expression match skb's packet, parsed in pi?  Run once
 * per parse. */
static __always_inline bool match_pcap(const struct sk_buff *skb, struct pkt_info *pi)
{
	__u64 head, l3;

	if (!pi->pcap) {
		/* read as numbers (CO-RE), not the pointers the verifier follows:
		 * the interpreter is a global function */
		head = (__u64)BPF_CORE_READ(skb, head);
		l3 = pi->l3_at_data ? (__u64)BPF_CORE_READ(skb, data) : head + BPF_CORE_READ(skb, network_header);
		/* skb->tail is an offset from head, as network_header is */
		pi->pcap = 1 + pt_pcap_l3(l3, head + BPF_CORE_READ(skb, tail), pi->len);
	}
	return pi->pcap == 2;
}

/* Criteria an IP header's fields satisfy (PT_F_SRC/DST/PROTO/PORT). */
static __always_inline __u8 match_fields(const struct pkt_info *pi)
{
	__u32 f = cfg.filter;
	__u8 m = 0;

	if ((f & PT_F_SRC) && pi->family == cfg.src_family &&
	    addr_match(pi->saddr, (const volatile __u64 *)cfg.src_addr,
		       (const volatile __u64 *)cfg.src_mask))
		m |= PT_F_SRC;
	if ((f & PT_F_DST) && pi->family == cfg.dst_family &&
	    addr_match(pi->daddr, (const volatile __u64 *)cfg.dst_addr,
		       (const volatile __u64 *)cfg.dst_mask))
		m |= PT_F_DST;
	if ((f & PT_F_PROTO) && pi->proto == cfg.proto)
		m |= PT_F_PROTO;
	if ((f & PT_F_PORT) && (pi->sport == cfg.port || pi->dport == cfg.port) &&
	    (pi->proto == IPPROTO_TCP || pi->proto == IPPROTO_UDP))
		m |= PT_F_PORT;
	return m;
}

/* Criteria an IP packet satisfies (PT_F_SRC/DST/PROTO/PORT/PCAP). */
static __always_inline __u8 match_header(const void *skb, struct pkt_info *pi)
{
	__u8 m = match_fields(pi);

	if ((cfg.filter & PT_F_PCAP) && match_pcap(skb, pi))
		m |= PT_F_PCAP;
	return m;
}

/* Criteria that the mark and devices at one stage satisfy. */
static __always_inline __u8 match_stage(__u32 mark, __u32 in_ifindex, __u32 out_ifindex)
{
	__u32 f = cfg.filter;
	__u8 m = 0;

	if ((f & PT_F_MARK) && (mark & cfg.mark_mask) == cfg.mark_value)
		m |= PT_F_MARK;
	if (f & PT_F_IFACE) {
		__u32 zero = 0, *want = bpf_map_lookup_elem(&iface_want, &zero);

		if (want && *want && (in_ifindex == *want || out_ifindex == *want))
			m |= PT_F_IFACE;
	}
	return m;
}

static __always_inline __u64 next_id(void)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&id_seq, &zero);

	if (!seq)
		return 0;
	*seq += 1;
	return (*seq << 8) | (bpf_get_smp_processor_id() & 0xff);
}

static __always_inline __u64 *rejected_slot(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&rejected, &zero);
}

static __always_inline bool rejected_in_flight(void)
{
	__u64 *slot = rejected_slot();

	return slot && *slot;
}

/* The slot holds the rejected skb's address; its low bit (an skb is
 * aligned) says the packet was judged knowing its header after NAT, so
 * nothing later can make it match. */
#define PT_REJECTED_FINAL 1ULL

static __always_inline bool is_rejected(const void *skb)
{
	__u64 *slot = rejected_slot();

	return slot && (*slot & ~PT_REJECTED_FINAL) == (__u64)skb;
}

static __always_inline bool rejected_final(void)
{
	__u64 *slot = rejected_slot();

	return slot && (*slot & PT_REJECTED_FINAL);
}

/* The packet ended without a record: forget it was rejected (the pointer
 * will be reused for another packet).  Also where a packet generated here
 * is first seen, OUTPUT's entry: a rejected skb there is a new packet in
 * the memory of one freed without a tracepoint (TCP frees most packets it
 * takes so), or the same skb output anew (a tunnel's outer packet), judged
 * anew.  (Called by the entry programs, not in nf_observe_dev: one branch
 * more there and 6.1's verifier gives up on fx_nft_chain.) */
static __always_inline void rejected_forget(const void *skb)
{
	__u64 *slot = rejected_slot();

	if (slot && (*slot & ~PT_REJECTED_FINAL) == (__u64)skb)
		*slot = 0;
}

/* A packet whose payload a tunnel may deliver: by its protocol, or its UDP
 * destination port (one of the tunnels' ports user space set). */
static __always_inline bool carrier_of(__u8 proto, __u16 dport)
{
	if (proto == IPPROTO_GRE || proto == IPPROTO_IPIP || proto == IPPROTO_IPV6 || proto == IPPROTO_ESP)
		return true;
	if (proto != IPPROTO_UDP || !dport)
		return false;
	for (int i = 0; i < PT_TUN_PORTS; i++)
		if (cfg.tun_ports[i] == dport)
			return true;
	return false;
}

/* Its headers say little of what it carries, so a header filter does not
 * judge it at first sight. */
static __always_inline bool tunnel_carrier(const struct pkt_info *pi)
{
	return carrier_of(pi->proto, pi->dport);
}

/* A record's packet, by its headers now (DNAT may have changed the port). */
static __always_inline bool carrier_record(const struct pt_record *r)
{
	return carrier_of(r->proto, r->cur_dport);
}

/* First sight of a packet: with a header-only filter it can be judged now,
 * and a packet that does not match gets no record at all (every later probe
 * then returns at once) -- unless NAT in its netns may make it match later:
 * then its whole path is kept and judged at its end.  False when rejected. */
static __always_inline bool first_sight_wanted(const void *skb, struct pkt_info *pi, __u32 netns)
{
	__u32 f = cfg.filter;
	__u64 *slot;

	if (!cfg.early_reject)
		return true;
	/* the expression last, and only if the rest matched: it costs the
	 * most (its verdict stays in pi for the record) */
	if (((match_fields(pi) | PT_F_PCAP) & f) == f && (!(f & PT_F_PCAP) || match_pcap(skb, pi)))
		return true;
	if (netns_may_nat(netns) || tunnel_carrier(pi))
		return true;
	slot = rejected_slot();
	if (slot)
		*slot = (__u64)skb;
	stat_inc(PT_STAT_REJECTED);
	return false;
}

static __always_inline struct pt_slots *slots_of_cpu(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&slots_meta, &zero);
}

static __always_inline bool any_parked(void)
{
	__u32 zero = 0, one = 1;
	__s64 *n = bpf_map_lookup_elem(&parked, &zero);
	__s64 *gone = bpf_map_lookup_elem(&parked, &one);

	return n && gone && *n - *gone > 0;
}

static __always_inline void parked_add(__s64 d)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&parked, &zero);

	if (n)
		__sync_fetch_and_add(n, d);
}

/* The slot of this CPU holding skb's record, or -1. */
static __always_inline int slot_of(const struct pt_slots *m, __u64 key)
{
	for (int i = 0; i < PT_SLOTS; i++)
		if (m->skb[i] == key)
			return i;
	return -1;
}

static __always_inline struct pt_record *slot_record(int i)
{
	__u32 k = i;

	if (i < 0 || i >= PT_SLOTS)
		return NULL;
	return bpf_map_lookup_elem(&slots, &k);
}

static __always_inline struct pt_record *rec_lookup(const void *skb)
{
	struct pt_slots *m = slots_of_cpu();
	__u64 key = (__u64)skb;
	int i;

	if (!m)
		return NULL;
	i = slot_of(m, key);
	if (i >= 0)
		return slot_record(i);
	if (!any_parked())
		return NULL;
	return bpf_map_lookup_elem(&inflight, &key);
}

/* Move the record in slot i to the shared table: its packet goes on later,
 * maybe on another CPU.  Returns false if the table is full (the record
 * stays in its slot: the packet may still end on this CPU). */
static __always_inline bool slot_park(struct pt_slots *m, int i)
{
	struct pt_record *r = slot_record(i);
	__u64 key;

	if (!r || i < 0 || i >= PT_SLOTS)
		return false;
	key = m->skb[i];
	if (!key)
		return false;
	r->seen |= PT_SEEN_SHARED;
	if (bpf_map_update_elem(&inflight, &key, r, BPF_ANY)) {
		stat_inc(PT_STAT_CREATE_FAILED);
		return false;
	}
	m->skb[i] = 0;
	parked_add(1);
	stat_inc(PT_STAT_PARKED);
	return true;
}

/* Global, as are slot_take and rec_forget_arg: verified once, not at each
 * of their callers (inline, their loops over the slots were a third of
 * the observer program's verification once route_take's was gone).  The
 * skb they are for comes in m->arg: a pointer is no scalar argument to the
 * verifier. */
__noinline int rec_park_arg(void)
{
	struct pt_slots *m = slots_of_cpu();

	if (m)
		slot_park(m, slot_of(m, m->arg));
	return 0;
}

/* skb's packet is queued where it may go on later or elsewhere. */
static __always_inline void rec_park(const void *skb)
{
	struct pt_slots *m = slots_of_cpu();

	if (m) {
		m->arg = (__u64)skb;
		rec_park_arg();
	}
}

/* A slot for a new record: a free one, else the least recently used one
 * after parking its record.  -1 if none can be had. */
__noinline int slot_take(void)
{
	struct pt_slots *m = slots_of_cpu();
	int i, oldest = 0;

	if (!m)
		return -1;
	for (i = 0; i < PT_SLOTS; i++)
		if (!m->skb[i])
			break;
	if (i == PT_SLOTS) {
		/* the record whose last stage is the oldest */
		__u64 t, best = ~0ULL;

		for (int j = 0; j < PT_SLOTS; j++) {
			struct pt_record *o = slot_record(j);

			t = o ? o->last_ts : 0;
			if (t < best) {
				best = t;
				oldest = j;
			}
		}
		if (!slot_park(m, oldest))
			return -1;
		i = oldest;
	}
	return i & (PT_SLOTS - 1);
}

/* Start a record for a packet first seen now (id 0: a new one).  NULL if
 * no slot can be had. */
static __always_inline struct pt_record *rec_new(const void *skb, __u32 netns,
						 struct pkt_info *pi, __u64 now, __u64 id)
{
	struct pt_slots *m = slots_of_cpu();
	struct pt_record *r;
	int i;

	if (!m)
		return NULL;
	i = slot_take();
	if (i >= 0)
		m->skb[i & (PT_SLOTS - 1)] = (__u64)skb;
	r = slot_record(i);
	if (!r) {
		if (i >= 0)
			m->skb[i & (PT_SLOTS - 1)] = 0;
		stat_inc(PT_STAT_CREATE_FAILED);
		return NULL;
	}
	/* Only the header is reset: stages past n_stages, and head[] past
	 * head_len, are never read. */
	__builtin_memset(r, 0, offsetof(struct pt_record, head));
	r->encap = 0;
	r->decap = 0;
	r->inner = 0;
	r->tun_ifindex = 0;
	r->ext_hdrs = pi->ext_hdrs;
	r->id = id ? id : next_id();
	r->first_ts = now;
	r->last_ts = now;
	r->netns = netns;
	__builtin_memcpy(r->saddr, pi->saddr, 16);
	__builtin_memcpy(r->daddr, pi->daddr, 16);
	r->sport = pi->sport;
	r->dport = pi->dport;
	__builtin_memcpy(r->cur_saddr, pi->saddr, 16);
	__builtin_memcpy(r->cur_daddr, pi->daddr, 16);
	r->cur_sport = pi->sport;
	r->cur_dport = pi->dport;
	r->family = pi->family;
	r->proto = pi->proto;
	r->len = pi->len;
	r->tcp_flags = pi->tcp_flags;
	r->icmp_type = pi->icmp_type;
	r->icmp_code = pi->icmp_code;
	/* a fixed-size read: past a short packet's end it reads the skb's own
	 * buffer (tailroom, shared info), which head_len leaves unread.  The
	 * skb is read with CO-RE: it is a plain address in kprobe programs. */
	if (cfg.snap) {
		const struct sk_buff *sk_b = skb;
		const void *l3 = BPF_CORE_READ(sk_b, head) + BPF_CORE_READ(sk_b, network_header);

		if (!bpf_probe_read_kernel(r->head, PT_HEAD_LEN, l3))
			r->head_len = pi->len < PT_HEAD_LEN ? pi->len : PT_HEAD_LEN;
	}
	r->match = match_header(skb, pi);
	if (pi->frag) {
		r->flags = PT_REC_FRAG;
		r->frag_id = pi->frag_id;
	}
	if (pi->l4)
		r->flags |= PT_REC_L4;
	/* only where NAT may rewrite it are headers compared after NAT tables */
	r->ns_index = netns_index(netns) & (PT_MAX_NETNS - 1);
	if (netns_may_nat(netns))
		r->flags |= PT_REC_NAT_NS;
	stat_inc(PT_STAT_CREATED);
	return r;
}

/* Forget the record of the skb in m->arg, wherever it is. */
__noinline int rec_forget_arg(void)
{
	struct pt_slots *m = slots_of_cpu();
	__u64 key;
	int i;

	if (!m)
		return 0;
	key = m->arg;
	i = slot_of(m, key);
	if (i >= 0) {
		m->skb[i & (PT_SLOTS - 1)] = 0;
		return 0;
	}
	if (!bpf_map_delete_elem(&inflight, &key))
		parked_add(-1);
	return 0;
}

/* Forget skb's record, wherever it is. */
static __always_inline void rec_forget(__u64 key)
{
	struct pt_slots *m = slots_of_cpu();

	if (m) {
		m->arg = key;
		rec_forget_arg();
	}
}

/* ---- the packet this CPU is processing, and what it causes ---- */

int route_take(struct pt_record *r, __u8 kind, __u64 since, __u32 how);
int route_result(struct pt_record *r, __u64 refdst, __u64 ts);
int route_result_cast(struct pt_record *r, __u64 refdst, __u64 ts);
static __always_inline struct pt_stage *last_stage(struct pt_record *r);

/* The route attached to a packet no observer of INPUT/FORWARD saw (their
 * first observer comes after a table): forwarded, it names the device the
 * packet was to leave by, as FORWARD's observer would have. */
static __always_inline void route_attached(struct pt_record *r, __u64 refdst, __u32 mark, __u64 now)
{
	struct dst_entry *dst = (struct dst_entry *)(refdst & ~1UL);
	__u32 out;

	if (!dst || BPF_CORE_READ(dst, error) || route_result(r, refdst, now) != RTN_UNICAST)
		return;
	out = BPF_CORE_READ(dst, dev, ifindex);
	r->out_ifindex = out;
	r->match |= match_stage(mark, 0, out);
}

/* A packet routed since its last stage (PREROUTING) makes the kernel
 * generate another (a REJECT's RST or ICMP error, from a table of FORWARD
 * or INPUT, whose first observer comes after a table): it claims its own
 * lookups first, which the reply's source check would otherwise take, with
 * the route the kernel attached to it. */
static __always_inline void route_claim(struct pt_record *p, __u64 skb, __u64 now)
{
	struct pt_stage *s = last_stage(p);

	if (!s || s->kind != PT_STAGE_PREROUTING || !route_take(p, PT_STAGE_ROUTE, p->last_ts, 0))
		return;
	route_attached(p, BPF_CORE_READ((struct sk_buff *)skb, _skb_refdst),
		       BPF_CORE_READ((struct sk_buff *)skb, mark), now);
}

static __always_inline struct pt_active *active_slot(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&active, &zero);
}

static __always_inline void active_set(const void *skb, const struct pt_record *r, __u64 now)
{
	struct pt_active *a = active_slot();

	if (a) {
		a->skb = (__u64)skb;
		a->id = r->id;
		a->ts = now;
	}
}

/* A locally generated packet seen for the first time: if this CPU is in the
 * middle of processing a packet from the address it is sent to, the kernel
 * made it in reply (ICMP error, RST from REJECT or a closed port, echo
 * reply).  Marks that packet and returns its id (0: no cause). */
static __always_inline __u64 cause_of(const void *skb, const struct pkt_info *pi, __u64 now)
{
	struct pt_active *a = active_slot();
	struct pt_record *p;
	__u64 key;

	if (!a || !a->skb || a->skb == (__u64)skb || now - a->ts > CAUSE_MAX_AGE_NS)
		return 0;
	key = a->skb;
	p = rec_lookup((const void *)key);
	if (!p || p->id != a->id || p->family != pi->family || !addr_eq(pi->daddr, p->cur_saddr))
		return 0;
	p->flags |= PT_REC_CAUSED;
	route_claim(p, key, now);
	return p->id;
}

/* FNV-1a step over 64-bit words.  The path signature identifies a path's
 * shape, so user space resolves names once per shape and the kernel can
 * count paths by it. */
static __always_inline __u64 sig_mix(__u64 h, __u64 v)
{
	h ^= v;
	return h * 1099511628211ULL;
}

/* 1 if d (< 2^63) is not zero, without a branch: BPF has no setcc, so a
 * compare is a jump, which the verifier would walk both ways at every
 * stage of path_signature's loop.  (The barrier keeps clang from making
 * the compare of it again.) */
static __always_inline __u64 nonzero(__u64 d)
{
	d |= -d;
	barrier_var(d);
	return d >> 63;
}

/* Stage kinds as bits, for tests by shift and mask (no branch) */
#define SIG_HOOKS ((1u << PT_STAGE_PREROUTING) | (1u << PT_STAGE_INPUT) | (1u << PT_STAGE_FORWARD) | \
		   (1u << PT_STAGE_OUTPUT) | (1u << PT_STAGE_POSTROUTING))

/* Over what names a path: never times, addresses or other per-packet
 * values (conntrack state, a deliver stage's socket inode, a qdisc stage's
 * queue length, a NAT's port), but whether a table changed the mark or
 * DSCP against the last observation of any hook (a path that mangle marks
 * is another path than one it lets by; a hook's first observer may come
 * after its first table).  A stage is three words of struct pt_stage
 * (bytes 8-31: device and mark; aux and aux2; kind, slot, tos, family, ct,
 * flags), masked by kind; an address stage keeps its kind, slot, what,
 * route type and device (zero but for a next hop).  Branch-free but for
 * the loop's end, so the verifier walks it once a program: a loop calling
 * a global function per stage (to spare the verifier the branches) cost
 * ~10 ns a stage in calls and in the state passed through memory. */
_Static_assert(sizeof(struct pt_stage) == 32 && sizeof(struct pt_addr_stage) == 32 &&
	       __builtin_offsetof(struct pt_record, stages) % 8 == 0, "path_signature reads a stage as 4 words");
_Static_assert(__builtin_offsetof(struct pt_stage, ifindex) == 8 && __builtin_offsetof(struct pt_stage, mark) == 12 &&
	       __builtin_offsetof(struct pt_stage, aux) == 16 && __builtin_offsetof(struct pt_stage, aux2) == 20 &&
	       __builtin_offsetof(struct pt_stage, kind) == 24 && __builtin_offsetof(struct pt_stage, slot) == 25 &&
	       __builtin_offsetof(struct pt_stage, tos) == 26 && __builtin_offsetof(struct pt_stage, flags) == 29,
	       "path_signature's masks");
_Static_assert(__builtin_offsetof(struct pt_addr_stage, port) == 16 && __builtin_offsetof(struct pt_addr_stage, what) == 18 &&
	       __builtin_offsetof(struct pt_addr_stage, ifindex) == 20 && __builtin_offsetof(struct pt_addr_stage, kind) == 24 &&
	       __builtin_offsetof(struct pt_addr_stage, _pad3) == 28, "path_signature's masks of an address stage");
static __always_inline __u32 path_signature(const struct pt_record *r, __u32 n)
{
	__u64 h = 14695981039346656037ULL, pmark = 0, ptos = 0, seen_hook = 0;

	h = sig_mix(h, r->fate | (r->family << 8) | (r->proto << 16) | ((r->flags & PT_REC_CAUSED) << 24) |
		       (__u64)r->drop_reason << 32);
	for (int i = 0; i < PT_MAX_STAGES; i++) {
		const __u64 *w;
		__u64 w1, w2, w3, kind, hook, addr, mark, tos, ch, m2;

		if (i >= n)
			break;
		w = (const __u64 *)&r->stages[i];
		w1 = w[1];
		w2 = w[2];
		w3 = w[3];
		kind = w3 & 15;
		hook = (SIG_HOOKS >> kind) & 1;
		addr = ((1u << PT_STAGE_ADDR) >> kind) & 1;
		mark = w1 >> 32;
		tos = (w3 >> 16) & 0xff;
		ch = (nonzero(mark ^ pmark) | nonzero(tos ^ ptos) << 1) & -(hook & seen_hook);
		seen_hook |= hook;
		pmark ^= (pmark ^ mark) & -hook;
		ptos ^= (ptos ^ tos) & -hook;
		m2 = ~(0xffffffffULL * (((1u << PT_STAGE_DELIVER) >> kind) & 1)) &
		     ~(0xffffffff00000000ULL * (((1u << PT_STAGE_QDISC) >> kind) & 1)) &
		     ~(0xffffULL * addr);
		/* kind, slot, flags; the changes where tos was */
		h = sig_mix(h, (w3 & 0x0000ff000000ffffULL) | ch << 16);
		/* the device (an address stage: address bytes, not hashed) */
		h = sig_mix(h, w1 & (0xffffffffULL & (addr - 1)));
		h = sig_mix(h, w2 & m2);
	}
	/* a product's low bits depend on the inputs' low bits only */
	return (__u32)(h ^ (h >> 32));
}

/* Count mode: one more in a per-CPU u64 counter map.  1 if this added the
 * key, 0 if it was there (or another CPU added it meanwhile), -1 if the map
 * is full (counted in stat `full`). */
static __always_inline int counter_inc(void *map, const void *key, __u32 full)
{
	__u64 one = 1, *c = bpf_map_lookup_elem(map, key);

	if (c) {
		*c += 1;
		return 0;
	}
	if (!bpf_map_update_elem(map, key, &one, BPF_NOEXIST))
		return 1;
	c = bpf_map_lookup_elem(map, key);
	if (c) {
		*c += 1;
		return 0;
	}
	stat_inc(full);
	return -1;
}

/* Count mode: one more drop of this reason in this netns. */
static __always_inline void count_drop(const struct pt_record *r)
{
	struct pt_drop_key k = { .netns = r->netns, .reason = r->drop_reason, .family = r->family };

	counter_inc(&drop_totals, &k, PT_STAT_DROP_OVERFLOW);
}

/* Count mode: one more packet on this path. */
static __always_inline void count_path(const struct pt_record *r)
{
	struct pt_path_key k = {
		.netns = r->netns, .path_sig = r->path_sig, .drop_reason = r->drop_reason,
		.fate = r->fate, .family = r->family, .proto = r->proto,
	};
	struct pt_record *ex;
	__u32 zero = 0;

	if (counter_inc(&path_counts, &k, PT_STAT_PATH_OVERFLOW) != 1)
		return;
	/* its first packet is the path's example.  Older verifiers (6.1) take
	 * only stack or map memory as a map value, and r may be neither (a
	 * global function's argument): copied through a map first */
	ex = bpf_map_lookup_elem(&scratch, &zero);
	if (ex && !bpf_probe_read_kernel(ex, sizeof(*ex), r))
		bpf_map_update_elem(&path_examples, &k, ex, BPF_NOEXIST);
}

/* The time of a stage of r taken now.  Where records are not emitted
 * (serve counts them; the library may only follow them), no stage's time
 * is shown: times only order a packet's stages against the route lookups
 * of its CPU (route_take's window: the lookups since its previous stage)
 * and age what it may have caused (cause_of).  A record still in this
 * CPU's slot is in the same pass through the stack as its last stage
 * (slots are parked at the end of each poll and where a packet is queued),
 * so there its last time does: never later than the true time, so no
 * lookup made since is missed, and no clocksource read (kvm-clock's costs
 * ~36 ns on the AMD machine; bpf_ktime_get_coarse_ns is refused to
 * netfilter and tracing programs).  A record taken from the shared table
 * may have waited: the clock. */
static __always_inline __u64 stage_time(const struct pt_record *r)
{
	if (!cfg.emit && !(r->seen & PT_SEEN_SHARED))
		return r->last_ts;
	return bpf_ktime_get_ns();
}

/* The time of the stage that ends r (sent, delivered, dropped): not
 * emitted, nothing is ordered after it, so r's last time does. */
static __always_inline __u64 end_time(const struct pt_record *r)
{
	return cfg.emit ? bpf_ktime_get_ns() : r->last_ts;
}

static __always_inline struct pt_stage *stage_add(struct pt_record *r, __u8 kind, __u64 ts)
{
	__u32 n = r->n_stages;
	struct pt_stage *s;

	if (n >= PT_MAX_STAGES) {
		if (!(r->flags & PT_REC_TRUNCATED)) {
			r->flags |= PT_REC_TRUNCATED;
			stat_inc(PT_STAT_TRUNCATED);
		}
		return NULL;
	}
	/* keep the mask: clang may otherwise reuse a bound the verifier
	 * lost track of when stages are added back to back */
	barrier_var(n);
	s = &r->stages[n & (PT_MAX_STAGES - 1)];
	__builtin_memset(s, 0, sizeof(*s));
	s->ts = ts;
	s->kind = kind;
	s->family = r->family;
	r->n_stages = n + 1;
	if (ts > r->last_ts)
		r->last_ts = ts;
	return s;
}

static __always_inline struct pt_stage *last_stage(struct pt_record *r)
{
	__u32 n = r->n_stages;

	if (!n || n > PT_MAX_STAGES)
		return NULL;
	return &r->stages[(n - 1) & (PT_MAX_STAGES - 1)];
}

/* Make the stage times relative to the first: every view prints them so,
 * and a subtraction here is cheaper than one per time in Python, where it
 * was a quarter of the cost of a JSON line.  The record is emitted and
 * forgotten right after: nothing reads its times again.
 * Global, verified once on its own: inline, each of the loop's 32 ways out
 * had the rest of pt_emit verified again (+15,000 instructions a program,
 * the start 0.2 -> 0.33 s). */
__noinline int pt_rel_times(struct pt_record *r, __u32 n)
{
	__u64 first;
	__u32 i;

	if (!r || r->rel_ts)
		return 0;       /* (never twice: the times would go below zero) */
	first = r->first_ts;
	for (i = 0; i < PT_MAX_STAGES; i++) {
		if (i >= n)
			break;
		/* (an address stage holds an address where others have a time) */
		if (r->stages[i].kind != PT_STAGE_ADDR)
			r->stages[i].ts -= first;
	}
	r->rel_ts = 1;
	return 0;
}

/* A record is complete: count or emit it if it matched the filter.
 * Global (verified once, not at every caller): it is the heaviest piece. */
__noinline int pt_emit(struct pt_record *r)
{
	__u32 n;

	if (!r)
		return 0;
	n = r->n_stages;
	if (n > PT_MAX_STAGES)
		n = PT_MAX_STAGES;
	if ((r->match & cfg.filter) != cfg.filter) {
		stat_inc(PT_STAT_FILTERED);
	} else if (cfg.count) {
		r->path_sig = path_signature(r, n);
		if (r->fate == PT_FATE_DROPPED)
			count_drop(r);
		count_path(r);
	} else if (cfg.emit) {
		/* Wake the reader only once a batch waits: a wakeup per record
		 * (irq_work, epoll) costs more than the record; user space also
		 * polls on a short timeout, so a lone record is not delayed long. */
		__u64 wake = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= RINGBUF_WAKEUP_BYTES ?
			BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;

		__u64 size;

		r->path_sig = path_signature(r, n);
		pt_rel_times(r, n);
		/* Send only the stages used: most paths need a third of them.
		 * (Bounded again right here: older verifiers lose n's bound.) */
		size = offsetof(struct pt_record, stages) + n * sizeof(struct pt_stage);
		barrier_var(size);
		if (size > sizeof(struct pt_record))
			size = sizeof(struct pt_record);
		if (bpf_ringbuf_output(&events, r, size, wake))
			stat_inc(PT_STAT_LOST);
		else
			stat_inc(PT_STAT_EMITTED);
	}
	return 0;
}

/* The packet's traversal ended: emit it if it matched, and forget it. */
static __always_inline void rec_finish(const void *skb, struct pt_record *r, __u8 fate)
{
	__u64 key = (__u64)skb;
	struct pt_active *a = active_slot();

	if (a && a->skb == key)
		a->skb = 0;
	r->fate = fate;
	pt_emit(r);
	rec_forget(key);
}

/* How a packet that left a device ends. */
static __always_inline __u8 fate_tx(const struct pt_record *r)
{
	if (r->flags & PT_REC_REDIRECTED)
		return PT_FATE_REDIRECTED;
	/* (received and sent on: forwarded, even where no FORWARD hook ran
	 * that we could see) */
	return (r->seen & (PT_SEEN_FORWARD | PT_SEEN_RX)) ? PT_FATE_FORWARDED : PT_FATE_SENT;
}

/* ---- fragments ---- */

/* The id of the packet the fragments of r's datagram become (created on
 * first ask: the first fragment absorbed may end before it exists). */
static __always_inline __u64 frag_group_id(const struct pt_record *r)
{
	struct pt_frag_key k = {};
	__u64 id, *v;

	k.netns = r->netns;
	k.frag_id = r->frag_id;
	__builtin_memcpy(k.saddr, r->saddr, 16);
	__builtin_memcpy(k.daddr, r->daddr, 16);
	k.family = r->family;
	k.proto = r->proto;
	v = bpf_map_lookup_elem(&frag_groups, &k);
	if (v)
		return *v;
	id = next_id();
	bpf_map_update_elem(&frag_groups, &k, &id, BPF_NOEXIST);
	v = bpf_map_lookup_elem(&frag_groups, &k);
	return v ? *v : id;
}

/* A fragment's skb ended while its datagram was being reassembled, or a
 * fragment's skb now carries the whole datagram: it was absorbed.  Returns
 * the id of the packet it became. */
static __always_inline __u64 frag_absorbed(const void *skb, struct pt_record *r)
{
	__u64 into = frag_group_id(r);

	r->link = into;
	rec_finish(skb, r, PT_FATE_REASSEMBLED);
	return into;
}

/* A drop reason of this kernel, by name (numbers differ between kernels). */
#define DROP_REASON(name) \
	(bpf_core_enum_value_exists(enum skb_drop_reason, SKB_DROP_REASON_##name) ? \
	 bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_##name) : -1)

/* Reasons with which the kernel gives up on a fragment (not absorbed). */
static __always_inline bool frag_failed(__u32 reason)
{
	return reason == DROP_REASON(FRAG_REASM_TIMEOUT) || reason == DROP_REASON(FRAG_TOO_FAR) ||
	       reason == DROP_REASON(DUP_FRAG) || reason == DROP_REASON(NETFILTER_DROP) ||
	       reason == DROP_REASON(NOMEM) || reason == DROP_REASON(PKT_TOO_BIG);
}

/* ---- local delivery ---- */

static __always_inline struct pt_record *decap_late(const void *skb, struct pt_record *r);

static __always_inline void deliver(const void *skb, struct pt_record *r, __s32 how, __u32 sock_ino)
{
	struct pt_stage *s;

	r = decap_late(skb, r);
	if (!r)
		return;
	s = stage_add(r, PT_STAGE_DELIVER, end_time(r));

	if (s) {
		s->mark = BPF_CORE_READ((struct sk_buff *)skb, mark);
		s->aux = sock_ino;
		s->aux2 = how;
	}
	rec_finish(skb, r, PT_FATE_DELIVERED);
}

static __always_inline struct pt_pending *pending(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pending_in, &zero);
}

/* The packet pending at LOCAL_IN on this CPU, if it is still in flight.
 * Clears the slot: whoever asks resolves it. */
static __always_inline struct pt_record *pending_take(__u64 *key)
{
	struct pt_pending *p = pending();
	struct pt_record *r;
	__u64 id;

	if (!p || !p->skb)
		return NULL;
	*key = p->skb;
	id = p->id;
	p->skb = 0;
	r = rec_lookup((const void *)*key);
	if (!r || r->id != id)
		return NULL; /* it ended already (and the pointer may be reused) */
	return r;
}

/* A packet the local stack took without a sign (INPUT passed, no socket,
 * no free): a tunnel's if it is one of their carriers.  It is kept: its
 * payload shows up later (GRO cells, WireGuard's decryption worker), or it
 * is freed. */
static __always_inline bool decap_candidate(const struct pt_record *r)
{
	return r->proto == IPPROTO_UDP || r->proto == IPPROTO_GRE || r->proto == IPPROTO_IPIP ||
	       r->proto == IPPROTO_IPV6 || r->proto == IPPROTO_ESP;
}

/* A new packet starts or the poll ended on this CPU: the packet pending at
 * LOCAL_IN passed INPUT and the local stack neither dropped it nor queued
 * it where we can see (a TCP ACK is freed without a tracepoint). */
static __always_inline void pending_resolve(const void *except)
{
	struct pt_pending *p = pending();
	struct pt_record *r;
	__u64 key;

	if (!p || !p->skb || p->skb == (__u64)except)
		return;
	r = pending_take(&key);
	if (!r)
		return;
	/* a tunnel's: in flight until its payload shows up (or it is freed) */
	if (decap_candidate(r)) {
		r->seen |= PT_SEEN_TUNNEL;
		return;
	}
	deliver((const void *)key, r, PT_DELIVER_STACK, 0);
}

/* ---- route lookups: buffered per CPU, claimed by the packet whose flow they are ---- */

static __always_inline struct pt_route_buf *route_buffer(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&route_buf, &zero);
}

/* An IPv6 address from a BTF pointer, in 4-byte loads: 6.1's verifier
 * takes a wider load inside a union (nhc_gw) as one past its first
 * member's end. */
static __always_inline void in6_copy(__u8 *dst, const struct in6_addr *a)
{
	__u32 w[4];

	w[0] = a->in6_u.u6_addr32[0];
	w[1] = a->in6_u.u6_addr32[1];
	w[2] = a->in6_u.u6_addr32[2];
	w[3] = a->in6_u.u6_addr32[3];
	__builtin_memcpy(dst, w, 16);
}

/* A ring: lookups nobody claims (ARP's, those of packets without a record)
 * are overwritten by newer ones.  Returns the entry for the caller to fill
 * with the addresses (read directly from the tracepoint's BTF pointers: a
 * probe-read helper call each cost ~10 ns a lookup), then route_commit. */
static __always_inline struct pt_route_ev *route_push(struct pt_route_buf *b, __u8 family, __u32 table, __s32 err,
						       __u32 oif, __u32 mark, __u8 gw_family)
{
	__u64 now = bpf_ktime_get_ns();
	struct pt_route_ev *ev;
	__u32 n;

	n = b->n;
	if (n && (!b->live || now - b->ev[(n - 1) & (PT_MAX_ROUTE - 1)].ts > ROUTE_MAX_AGE_NS)) {
		n = 0; /* nobody claimed those: not ours */
		b->live = 0;
		b->n = 0;
	}
	ev = &b->ev[n & (PT_MAX_ROUTE - 1)];
	if (n >= PT_MAX_ROUTE && ev->family) {
		/* overwritten unclaimed: a loss when every slot waits to be
		 * claimed; else newer lookups were claimed past it, so it was
		 * nobody's (ARP's, a packet without a record) */
		if (b->live >= PT_MAX_ROUTE && !ev->weak)
			stat_inc(PT_STAT_ROUTE_DROPPED);
		if (b->live)
			b->live -= 1;
	}
	*ev = (struct pt_route_ev){
		.ts = now, .table = table, .err = err, .oif = oif, .mark = mark, .family = family,
		.gw_family = gw_family, .weak = rejected_in_flight(),
	};
	return ev;
}

/* The entry route_push gave is filled: count it in. */
static __always_inline void route_commit(struct pt_route_buf *b)
{
	b->n += 1;
	b->live += 1;
}

/* An input route lookup (its flow names the receiving device; output
 * lookups and reverse-path checks name loopback) is made for the packet
 * this CPU is receiving, after its first sight.  While this CPU processes
 * a packet the filter turned down at first sight, with no record in its
 * slots and none parked, that packet is the one: nothing would claim the
 * lookup, and the filter that matches nothing skips recording it.  (Only
 * then: a packet first seen after its lookup -- on a device the tc
 * observers reach only at the next netns check -- claims it later.) */
static __always_inline bool input_lookup_unclaimed(__u32 iif)
{
	struct pt_slots *m;

	if (iif == 1 /* LOOPBACK_IFINDEX */ || !rejected_in_flight())
		return false;
	m = slots_of_cpu();
	if (!m)
		return false;
	for (int i = 0; i < PT_SLOTS; i++)
		if (m->skb[i])
			return false;
	return !any_parked();
}

/* Is lookup ev for the packet with these addresses?  The decision looks up
 * its destination from its source (a locally generated packet: from no
 * source yet); fib_validate_source looks up its source from its destination.
 * Lookups made for the ICMP error about a packet look up its source from no
 * source, or its destination from no source (xfrm's address-type checks):
 * neither matches a received packet's decision. */
#define ROUTE_LOCAL_OUT 1    /* the packet is locally generated */
#define ROUTE_CHECKS 2       /* take source checks too */
static __always_inline __u8 route_match(const struct pt_route_ev *ev, const __u8 *saddr, const __u8 *daddr,
					__u32 how)
{
	if (addr_eq(ev->daddr, daddr) &&
	    (addr_eq(ev->saddr, saddr) || ((how & ROUTE_LOCAL_OUT) && addr_zero(ev->saddr))))
		return 1;
	if ((how & ROUTE_CHECKS) && addr_eq(ev->daddr, saddr) && addr_eq(ev->saddr, daddr))
		return 2;
	return 0;
}

/* route_step's answer: bits, so that route_take's loop has one branch. */
#define ROUTE_STEP_STOP 1      /* take no more lookups */
#define ROUTE_STEP_DECISION 2  /* it took a routing decision of the packet */
#define ROUTE_STEP_TAKEN 4     /* it took a lookup */
#define ROUTE_HOW(how, kind, taken) ((how) | (__u32)(kind) << 8 | (taken) << 16)

/* One lookup of route_take's walk: claim ev for r's packet if it is its
 * own (then its stages are added to r).  `arg` packs route_take's `how`,
 * the stage kind and whether a lookup was taken already (ROUTE_HOW).
 * Global, verified once, and route_take's loop branches only on STOP:
 * inline, its branches were most of the verifier's work on every program
 * that calls route_take (6.18: ~270,000 of nf_obs_0's 384,000
 * instructions; 6.1, whose verifier prunes less: ~240,000 of each of 35
 * programs', and still ~200,000 with only the claim made global). */
__noinline int route_step(struct pt_record *r, struct pt_route_ev *ev, __u64 since, __u32 arg)
{
	struct pt_route_buf *b = route_buffer();
	bool taken = arg >> 16 & 1;
	struct pt_stage *s;
	int m;

	if (!r || !ev || !b)
		return ROUTE_STEP_STOP;
	if (ev->ts < since)
		return 0;
	m = ev->family == r->family ? route_match(ev, r->cur_saddr, r->cur_daddr, arg & 0xff) : 0;
	if (!m)
		/* a packet's lookups are made one after the other: what
		 * comes after another's (the ICMP error's, say) is not its
		 * own, even where it looks alike */
		return taken ? ROUTE_STEP_STOP : 0;
	ev->family = 0;
	if (b->live)
		b->live -= 1;
	/* a locally generated packet is routed before its first hook */
	if (ev->ts < r->first_ts)
		r->first_ts = ev->ts;
	s = stage_add(r, arg >> 8 & 0xff, ev->ts);
	if (!s)
		return ROUTE_STEP_TAKEN | ROUTE_STEP_STOP;
	s->ifindex = ev->oif;
	s->mark = ev->mark;
	s->aux = ev->table;
	s->aux2 = ev->err;
	s->ct = m == 2 ? PT_ROUTE_SRC_CHECK : 0;
	if (ev->gw_family && !ev->err) {
		struct pt_addr_stage *a = (void *)stage_add(r, PT_STAGE_ADDR, ev->ts);

		if (a) {
			__builtin_memcpy(a->addr, ev->gw, 16);
			a->what = PT_ADDR_GW;
			a->family = ev->gw_family;
		}
	}
	return ROUTE_STEP_TAKEN | (m == 1 ? ROUTE_STEP_DECISION : 0);
}

/* Move this packet's lookups made since `since` on this CPU into the
 * record.  Returns how many decision lookups (not source checks) it took.
 * Global: verified once. */
__noinline int route_take(struct pt_record *r, __u8 kind, __u64 since, __u32 how)
{
	struct pt_route_buf *b = route_buffer();
	__u32 n, start, taken = 0;
	int decisions = 0;

	if (!r || !b || !b->n || !b->live)
		return 0;
	n = b->n;
	start = n > PT_MAX_ROUTE ? n - PT_MAX_ROUTE : 0;
	for (int i = 0; i < PT_MAX_ROUTE; i++) {
		int rc;

		if (start + i >= n)
			break;
		rc = route_step(r, &b->ev[(start + i) & (PT_MAX_ROUTE - 1)], since,
				ROUTE_HOW(how & 0xff, kind, taken));
		decisions += (rc & ROUTE_STEP_DECISION) >> 1;
		taken |= (rc & ROUTE_STEP_TAKEN) >> 2;
		if (rc & ROUTE_STEP_STOP)
			break;
	}
	if (!b->live)
		b->n = 0;
	return decisions;
}

/* One dst field, read by CO-RE or, cast, by an inlined load. */
#define DST_READ(cast, TYPE, p, field) ((cast) ? CAST(TYPE, p)->field : BPF_CORE_READ((TYPE *)(p), field))

/* What routing attached to the packet (skb dst): the nexthop the kernel
 * chose (one of an ECMP group), its device and the route type (local, even
 * where the lookup reported the merged local/main table as main).
 * Returns that type (RTN_*, 0: none). */
static __always_inline int route_result_by(struct pt_record *r, __u64 refdst, __u64 ts, bool cast)
{
	struct dst_entry *dst = (struct dst_entry *)(refdst & ~1UL);
	struct pt_addr_stage *a;

	if (!r || !dst)
		return 0;
	a = (void *)stage_add(r, PT_STAGE_ADDR, ts);
	if (!a)
		return 0;
	__builtin_memset(a->addr, 0, sizeof(a->addr)); /* stage_add put the time there */
	a->what = PT_ADDR_NEXTHOP;
	a->family = r->family;
	a->ifindex = cast ? CAST(struct dst_entry, dst)->dev->ifindex : BPF_CORE_READ(dst, dev, ifindex);
	if (r->family == 4) {
		struct rtable *rt = (struct rtable *)dst;
		__u8 gwf = DST_READ(cast, struct rtable, rt, rt_gw_family);

		a->rtype = DST_READ(cast, struct rtable, rt, rt_type);
		if (gwf == AF_INET) {
			__u32 gw4 = DST_READ(cast, struct rtable, rt, rt_gw4);

			__builtin_memcpy(a->addr, &gw4, 4);
		} else if (gwf == AF_INET6) {
			if (cast)
				__builtin_memcpy(a->addr, CAST(struct rtable, rt)->rt_gw6.in6_u.u6_addr8, 16);
			else
				bpf_core_read(a->addr, 16, &rt->rt_gw6);
			a->family = 6;
		}
	} else {
		struct rt6_info *rt = (struct rt6_info *)dst;
		__u32 flags = DST_READ(cast, struct rt6_info, rt, rt6i_flags);

		a->rtype = (flags & RTF_LOCAL) ? RTN_LOCAL : RTN_UNICAST;
		if (flags & RTF_GATEWAY) {
			if (cast)
				__builtin_memcpy(a->addr, CAST(struct rt6_info, rt)->rt6i_gateway.in6_u.u6_addr8, 16);
			else
				bpf_core_read(a->addr, 16, &rt->rt6i_gateway);
		}
	}
	return a->rtype;
}

__noinline int route_result(struct pt_record *r, __u64 refdst, __u64 ts)
{
	return route_result_by(r, refdst, ts, false);
}

/* The same, for programs that have the kfuncs (CAST). */
__noinline int route_result_cast(struct pt_record *r, __u64 refdst, __u64 ts)
{
	return route_result_by(r, refdst, ts, true);
}

/* A rule walk ended in a table whose result is in a netns nobody traces:
 * the tables it missed before (no result, so no device to tell their netns
 * by) were that walk's, in that netns.  Take them back out of this CPU's
 * ring, newest first, while they are misses of this flow: else another
 * namespace's policy routing (every walk with rules misses the local table
 * first) fills the ring with lookups nothing claims, counted as route
 * lookups lost (route_dropped) at ~16 in 10 ms.  (IPv6's tracepoint names
 * its netns: never pushed there.) */
static __always_inline void route_forget_walk(__be32 saddr, __be32 daddr)
{
	struct pt_route_buf *b = route_buffer();

	if (!b)
		return;
	for (int i = 0; i < PT_MAX_ROUTE; i++) {
		struct pt_route_ev *ev;
		__be32 s4, d4;
		__u32 n = b->n;

		if (!n || !b->live)
			break;
		ev = &b->ev[(n - 1) & (PT_MAX_ROUTE - 1)];
		__builtin_memcpy(&s4, ev->saddr, 4);
		__builtin_memcpy(&d4, ev->daddr, 4);
		if (ev->family != 4 || ev->oif || !ev->err || s4 != saddr || d4 != daddr)
			break;
		ev->family = 0;
		b->n = n - 1;
		b->live -= 1;
	}
}

SEC("tp_btf/fib_table_lookup")
int BPF_PROG(on_fib_lookup, u32 tb_id, const struct flowi4 *flp,
	     const struct fib_nh_common *nhc, int err)
{
	struct pt_route_buf *b;
	struct pt_route_ev *ev;
	__be32 daddr, saddr;
	__u32 oif = 0;
	__u8 gw_family = 0;

	/* no input interface, not even loopback: an address-type check
	 * (inet_addr_type, for ICMP errors and xfrm), not a packet's route */
	if (!flp->__fl_common.flowic_iif || input_lookup_unclaimed(flp->__fl_common.flowic_iif))
		return 0;
	if (nhc) {
		struct net_device *dev = nhc->nhc_dev;

		/* the flow has no netns; the result device does */
		if (dev) {
			if (!netns_traced(dev->nd_net.net->ns.inum)) {
				route_forget_walk(flp->saddr, flp->daddr);
				return 0;
			}
			oif = dev->ifindex;
		}
		gw_family = nhc->nhc_gw_family == AF_INET ? 4 : nhc->nhc_gw_family == AF_INET6 ? 6 : 0;
	}
	b = route_buffer();
	if (!b)
		return 0;
	ev = route_push(b, 4, tb_id, err, oif, flp->__fl_common.flowic_mark, gw_family);
	daddr = flp->daddr;
	saddr = flp->saddr;
	__builtin_memcpy(ev->daddr, &daddr, 4);
	__builtin_memcpy(ev->saddr, &saddr, 4);
	if (gw_family == 4) {
		__be32 gw = nhc->nhc_gw.ipv4;

		__builtin_memcpy(ev->gw, &gw, 4);
	} else if (gw_family == 6) {
		in6_copy(ev->gw, &nhc->nhc_gw.ipv6);
	}
	route_commit(b);
	return 0;
}

SEC("tp_btf/fib6_table_lookup")
int BPF_PROG(on_fib6_lookup, const struct net *net, const struct fib6_result *res,
	     struct fib6_table *table, const struct flowi6 *flp)
{
	const struct fib6_nh *nh;
	struct pt_route_buf *b;
	struct pt_route_ev *ev;
	struct net_device *dev;
	__u32 oif = 0;
	__s32 err = 0;
	__u8 gw_family = 0;
	bool null_entry;
	__u8 type;

	if (!netns_traced(net->ns.inum) || input_lookup_unclaimed(flp->__fl_common.flowic_iif))
		return 0;
	/* pointer fields read once (see struct nf_ptrs) */
	nh = res->nh;
	barrier_var(nh);
	null_entry = res->f6i == net->ipv6.fib6_null_entry;
	dev = nh ? nh->nh_common.nhc_dev : NULL;
	if (dev)
		oif = dev->ifindex;
	if (nh && nh->nh_common.nhc_gw_family == AF_INET6)
		gw_family = 6;
	/* fib6 reports failures as route types; map them to errnos like fib4.
	 * Nothing found in this table is the null entry: like fib4's -EAGAIN
	 * (the rules go on to the next table), not an unreachable route. */
	type = res->fib6_type;
	if (null_entry)
		err = -11; /* EAGAIN */
	else if (type == RTN_UNREACHABLE)
		err = -113; /* EHOSTUNREACH */
	else if (type == RTN_PROHIBIT)
		err = -13;  /* EACCES */
	else if (type == RTN_BLACKHOLE)
		err = -22;  /* EINVAL */
	b = route_buffer();
	if (!b)
		return 0;
	ev = route_push(b, 6, table ? table->tb6_id : 0, err, oif, flp->__fl_common.flowic_mark, gw_family);
	if (gw_family && nh)
		in6_copy(ev->gw, &nh->nh_common.nhc_gw.ipv6);
	in6_copy(ev->daddr, &flp->daddr);
	in6_copy(ev->saddr, &flp->saddr);
	route_commit(b);
	return 0;
}

/* ---- netfilter observers ---- */

/* Conntrack's view of the packet: skb->_nfct is the nf_conn pointer with
 * the ctinfo in its low 3 bits (IP_CT_UNTRACKED and no entry for NOTRACK). */
static __always_inline __u8 ct_state(__u64 nfct)
{
	__u8 info = nfct & 7;

	if (!nfct)
		return PT_CT_NONE;
	if (info == IP_CT_UNTRACKED)
		return PT_CT_UNTRACKED;
	switch (info) {
	case IP_CT_ESTABLISHED:
		return PT_CT_ESTABLISHED;
	case IP_CT_RELATED:
		return PT_CT_RELATED;
	case IP_CT_NEW:
		return PT_CT_NEW;
	case IP_CT_ESTABLISHED_REPLY:
		return PT_CT_ESTABLISHED | PT_CT_REPLY;
	case IP_CT_RELATED_REPLY:
		return PT_CT_RELATED | PT_CT_REPLY;
	}
	return PT_CT_NONE;
}

/* Does the packet's connection have a NAT binding?  Only then can a hook
 * rewrite addresses, so only then are headers compared at every observer. */
static __always_inline bool ct_natted(__u64 nfct)
{
	struct nf_conn *ct = (struct nf_conn *)(nfct & ~7ULL);

	if (!ct)
		return false;
	return BPF_CORE_READ(ct, status) & (IPS_SRC_NAT | IPS_DST_NAT);
}

static __always_inline void nat_stage(struct pt_record *r, __u8 what, __u8 slot, __u64 now,
				      const __u8 *addr, __u16 port)
{
	struct pt_addr_stage *a = (void *)stage_add(r, PT_STAGE_ADDR, now);

	if (!a)
		return;
	/* struct pt_addr_stage is only ever cast to, so clang leaves it out of
	 * the object's BTF, which the Python mirror is checked against.  A CO-RE
	 * existence check keeps it there; the kernel has no such type, so
	 * libbpf patches this to 0 at load. */
	a->rtype = bpf_core_type_exists(struct pt_addr_stage);
	__builtin_memcpy(a->addr, addr, 16);
	a->port = port;
	a->what = what;
	a->slot = slot;
	a->family = r->family;
}

/* Addresses or ports differ from what the packet had: a NAT table rewrote
 * them since the last observer.  Record the new values after this stage. */
static __always_inline void nat_check(struct pt_record *r, const struct pkt_info *pi, __u8 slot, __u64 now)
{
	if (!addr_eq(pi->saddr, r->cur_saddr) || pi->sport != r->cur_sport) {
		nat_stage(r, PT_ADDR_NAT_SRC, slot, now, pi->saddr, pi->sport);
		__builtin_memcpy(r->cur_saddr, pi->saddr, 16);
		r->cur_sport = pi->sport;
	}
	if (!addr_eq(pi->daddr, r->cur_daddr) || pi->dport != r->cur_dport) {
		nat_stage(r, PT_ADDR_NAT_DST, slot, now, pi->daddr, pi->dport);
		__builtin_memcpy(r->cur_daddr, pi->daddr, 16);
		r->cur_dport = pi->dport;
	}
}

/* Match bits of the header a packet of a confirmed connection has after
 * every NAT table: its NAT bindings are fixed by then, and that header is
 * the other direction's tuple turned around.  -1 when not known yet (no
 * conntrack entry, untracked, or a connection still unconfirmed, whose
 * NAT the nat tables are about to decide). */
static __always_inline int ct_post_nat_match(__u64 nfct, __u8 family, __u8 proto)
{
	struct nf_conn *ct = (struct nf_conn *)(nfct & ~7ULL);
	struct nf_conntrack_tuple t;
	struct pkt_info pi = {};
	__u8 info = nfct & 7;

	if (!ct || info == IP_CT_UNTRACKED || !(BPF_CORE_READ(ct, status) & IPS_CONFIRMED))
		return -1;
	if (bpf_core_read(&t, sizeof(t), &ct->tuplehash[info >= IP_CT_IS_REPLY ? IP_CT_DIR_ORIGINAL :
										    IP_CT_DIR_REPLY].tuple))
		return -1;
	pi.family = family;
	pi.proto = proto;
	__builtin_memcpy(pi.saddr, &t.dst.u3, 16);
	__builtin_memcpy(pi.daddr, &t.src.u3, 16);
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		pi.sport = bpf_ntohs(t.dst.u.all);
		pi.dport = bpf_ntohs(t.src.u.all);
	}
	/* the expression cannot be run on a header made from conntrack: say
	 * it may match, so that only the other criteria can rule it out (it
	 * is run on the packet itself after the NAT tables) */
	return match_fields(&pi) | PT_F_PCAP;
}

/* A record kept only because NAT might make its packet match (a header
 * filter in a netns with NAT): once conntrack has confirmed the packet's
 * connection, its header after NAT is known; if neither that nor what the
 * record saw matches, the packet is judged here as it would have been at
 * first sight, and every later probe returns at once. */
static __always_inline bool ct_reject(const void *skb, const struct pt_record *r, __u64 nfct)
{
	__u64 *slot;
	int m;

	if (!cfg.early_reject || !nfct || !(r->flags & PT_REC_NAT_NS) || (r->flags & PT_REC_FRAG) ||
	    (r->match & cfg.filter) == cfg.filter)
		return false;
	m = ct_post_nat_match(nfct, r->family, r->proto);
	if (m < 0 || ((r->match | m) & cfg.filter) == cfg.filter)
		return false;
	rec_forget((__u64)skb);
	slot = rejected_slot();
	if (slot) {
		/* the verifier refuses bit operations on a pointer: set the
		 * bit on the stored value (volatile: not folded back) */
		*(volatile __u64 *)slot = (__u64)skb;
		*(volatile __u64 *)slot |= PT_REJECTED_FINAL;
	}
	stat_inc(PT_STAT_FILTERED);
	return true;
}

/* Does observer `slot` of this hook follow a NAT table in r's netns? */
static __always_inline bool after_nat(const struct pt_record *r, __u8 family, __u8 hook, __u8 slot)
{
	__u32 k = r->ns_index;
	struct pt_nat_slots *ns = bpf_map_lookup_elem(&nat_slots, &k);

	if (slot >= PT_NF_SLOTS)
		return true; /* fentry backend: any observation after the first */
	__u32 i = (family == 6 ? 5 : 0) + hook;

	/* bounded right at the access: older verifiers lose hook's bound */
	barrier_var(i);
	if (!ns || i >= 10)
		return false;
	return ns->after_nat[i] & (1u << slot);
}

/* The fields of an skb an observation reads.  Filled by the caller: with
 * direct loads where skb is a BTF pointer (netfilter links, tracepoints,
 * fentry), with CO-RE reads where it is a plain address (kprobes). */
/* ---- tunnels: an outer packet and the packet it carries, one journey ----
 *
 * Tunnels encapsulate and decapsulate in place: the skb that carried the
 * payload carries the outer packet next (VXLAN, GENEVE, GRE, IPIP, SIT,
 * WireGuard, xfrm), and the other way round.  A packet that already left
 * (PT_SEEN_LEFT) and is seen at LOCAL_OUT or handed to a device again with
 * other headers was encapsulated; a packet that passed INPUT and is
 * received again with other headers was decapsulated.  Either's headers
 * matching the filter shows both. */

static __always_inline bool handoffs_waiting(void);
static __always_inline void handoffs_add(__s64 d);
static __always_inline __u64 handoff_take(const void *skb, __u64 now, struct pt_handoff *out);

/* Does the skb carry another packet than the one r follows? */
static __always_inline bool hdr_differs(const struct pt_record *r, const struct pkt_info *pi)
{
	const __u32 *a = (const __u32 *)pi->saddr, *b = (const __u32 *)r->cur_saddr;
	const __u32 *c = (const __u32 *)pi->daddr, *d = (const __u32 *)r->cur_daddr;

	if (pi->family != r->family || pi->proto != r->proto)
		return true;
	return (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
	       (c[0] ^ d[0]) | (c[1] ^ d[1]) | (c[2] ^ d[2]) | (c[3] ^ d[3]);
}

/* One packet's criteria matched, and the other's: each shows if either
 * matched the whole filter (one journey, one verdict), else the criteria
 * each matched count for both. */
static __always_inline __u8 match_joined(__u8 m)
{
	return (m & cfg.filter) == cfg.filter ? (__u8)cfg.filter : m;
}

/* The skb of r now carries another packet, pi, under id: r ends (fate) and
 * the other packet's record starts, each naming the other.  encap: pi is
 * r's outer packet (r.encap, outer.inner), else r's payload (r.inner,
 * payload.decap; a received packet).  tun: the tunnel device (0: none,
 * xfrm). */
static __always_inline struct pt_record *tunnel_switch(const void *skb, struct pt_record *r, struct pkt_info *pi,
						       __u32 netns, __u32 tun, __u64 now, __u64 id, bool encap)
{
	__u64 was = r->id;
	__u8 m;

	r->match |= match_header(skb, pi);
	m = match_joined(r->match);
	r->match = m;
	if (encap)
		r->encap = id;
	else
		r->inner = id;
	r->tun_ifindex = tun;
	rec_finish(skb, r, encap ? PT_FATE_ENCAPSULATED : PT_FATE_DECAPSULATED);
	r = rec_new(skb, netns, pi, now, id);
	if (!r)
		return NULL;
	if (encap) {
		r->inner = was;
	} else {
		r->decap = was;
		r->seen |= PT_SEEN_RX;
	}
	r->tun_ifindex = tun;
	r->match = match_joined(r->match | m);
	return r;
}

/* r, which already left by tunnel device tun (0: none, xfrm), is now the
 * payload of the outer packet pi in the same skb. */
static __always_inline struct pt_record *encap_start(const void *skb, struct pt_record *r, struct pkt_info *pi,
						     __u32 netns, __u32 tun, __u64 now)
{
	__u64 outer = r->encap;
	struct pt_handoff h;

	/* reserved already (a WireGuard device's payload): taken here */
	if (outer)
		handoff_take(skb, now, &h);
	else
		outer = next_id();
	return tunnel_switch(skb, r, pi, netns, tun, now, outer, true);
}

/* r, an outer packet the local stack took, now carries its payload pi,
 * received on ifindex. */
static __always_inline struct pt_record *decap_start(const void *skb, struct pt_record *r, struct pkt_info *pi,
						     __u32 netns, __u32 ifindex, __u64 now)
{
	return tunnel_switch(skb, r, pi, netns, ifindex, now, next_id(), false);
}

/* Received again after INPUT (r): decapsulated, if the headers at l3 are
 * another packet's.  Returns the record to go on with. */
static __always_inline struct pt_record *decap_check(const void *skb, struct pt_record *r, const void *l3,
						     bool l3_at_data, __u8 family, __u32 netns, __u32 ifindex,
						     __u64 now)
{
	struct pkt_info pi;

	if (!family) {
		/* a payload not traced (ARP through a VXLAN tunnel) */
		r->tun_ifindex = ifindex;
		rec_finish(skb, r, PT_FATE_DECAPSULATED);
		return NULL;
	}
	if (parse_l3(l3, family, &pi))
		return r;
	pi.l3_at_data = l3_at_data;
	if (!hdr_differs(r, &pi))
		return r;
	return decap_start(skb, r, &pi, netns, ifindex, now);
}

/* A record past INPUT that ends with other headers than it followed: xfrm
 * transport mode decapsulated it in place where no hook was observed again
 * (kprobes without tables).  The outer packet ends decapsulated, and the
 * payload's record (past INPUT too) takes the end.  NULL: no record left. */
static __always_inline struct pt_record *decap_late(const void *skb, struct pt_record *r)
{
	const struct sk_buff *sk_b = skb;
	struct net_device *dev;
	struct pkt_info pi;
	const void *l3;

	if (r->proto != IPPROTO_ESP || !(r->seen & PT_SEEN_INPUT))
		return r;
	l3 = BPF_CORE_READ(sk_b, head) + BPF_CORE_READ(sk_b, network_header);
	if (parse_l3(l3, r->family, &pi) || !hdr_differs(r, &pi))
		return r;
	dev = BPF_CORE_READ(sk_b, dev);
	r = decap_start(skb, r, &pi, r->netns, dev ? BPF_CORE_READ(dev, ifindex) : 0, bpf_ktime_get_ns());
	if (r)
		r->seen |= PT_SEEN_INPUT;
	return r;
}

/* Handed to a device again (r was already: PT_REC_QUEUED): encapsulated,
 * if the headers are another packet's (where LOCAL_OUT is not observed:
 * kprobes without a table there).  Not the first hand-over: POSTROUTING's
 * NAT may have rewritten the headers unseen before it. */
static __always_inline struct pt_record *encap_check(const void *skb, struct pt_record *r, const void *l3,
						     __u8 family, __u32 netns, __u64 now)
{
	struct pkt_info pi;

	if (!family || parse_l3(l3, family, &pi) || !hdr_differs(r, &pi))
		return r;
	return encap_start(skb, r, &pi, netns, r->out_ifindex, now);
}

/* The id reserved for the packet skb carries now, if any (h: what for). */
static __always_inline __u64 handoff_take(const void *skb, __u64 now, struct pt_handoff *out)
{
	__u64 key = (__u64)skb, id = 0;
	struct pt_handoff *h = handoffs_waiting() ? bpf_map_lookup_elem(&handoff, &key) : NULL;

	if (!h)
		return 0;
	if (now - h->ts < HANDOFF_MAX_AGE_NS) {
		*out = *h;
		id = h->next;
	} else {
		stat_inc(PT_STAT_HANDOFF_LOST);
	}
	if (!bpf_map_delete_elem(&handoff, &key))
		handoffs_add(-1);
	return id;
}

struct skb_view {
	__u32 mark;
	__u64 nfct;
	const void *l3;
	__u64 refdst;
	bool cast;      /* a constant: the program has the kfuncs (CAST) */
};

static __always_inline void skb_view_direct(const struct sk_buff *skb, struct skb_view *v)
{
	v->mark = skb->mark;
	v->nfct = skb->_nfct;
	v->l3 = skb_l3(skb);
	v->refdst = skb->_skb_refdst;
	v->cast = false;
}

static __always_inline void skb_view_core(const struct sk_buff *skb, struct skb_view *v)
{
	v->mark = BPF_CORE_READ(skb, mark);
	v->nfct = BPF_CORE_READ(skb, _nfct);
	v->l3 = BPF_CORE_READ(skb, head) + BPF_CORE_READ(skb, network_header);
	v->refdst = BPF_CORE_READ(skb, _skb_refdst);
	v->cast = false;
}

/* One observation of a packet at a netfilter hook.  first: an observation
 * before every table of the hook (its entry); slot, prio, flags: see
 * PT_SLOT_* and struct pt_stage. */
static __always_inline int nf_observe_dev(struct sk_buff *skb, const struct skb_view *v, __u8 pf, __u8 hook,
					  __u32 in, __u32 out, __u32 netns, __u8 slot, bool first, __s32 prio,
					  __u8 stflags, __u32 table)
{
	__u8 family = pf == NFPROTO_IPV4 ? 4 : pf == NFPROTO_IPV6 ? 6 : 0;
	__u32 mark = v->mark;
	__u64 nfct = v->nfct;
	const void *l3 = v->l3;
	bool parsed = false;
	__u64 now;
	struct pt_record *r;
	struct pt_stage *s;
	struct pkt_info pi;
	bool rejected_pkt;
	__u8 kind;

	if (!family || hook > 4)
		return NF_ACCEPT;
	kind = PT_STAGE_PREROUTING + hook; /* enum order follows NF_INET_* */
	/* a rejected packet has no record: the per-CPU slot is cheaper than
	 * the hash, and it is checked before anything else is read */
	rejected_pkt = is_rejected(skb);
	if (rejected_pkt && (first || rejected_final() ||
			     (kind != PT_STAGE_PREROUTING && kind != PT_STAGE_OUTPUT &&
			      kind != PT_STAGE_POSTROUTING)))
		return NF_ACCEPT;
	/* the clock (~36 ns on the AMD machine) only for a packet followed on:
	 * taken where the branches below know, else after them */
	now = 0;
	r = rejected_pkt ? NULL : rec_lookup(skb);
	if (rejected_pkt) {
		/* Judged at first sight; only NAT can make it match since (a
		 * ruleset that gained NAT after the packet was first seen).
		 * Its route lookups were pushed weak: overwritten silently,
		 * and claimable only by a packet of their flow. */
		if (!ct_natted(nfct))
			return NF_ACCEPT;
		if (parse_l3_by(l3, family, &pi, v->cast) || (match_header(skb, &pi) & cfg.filter) != cfg.filter)
			return NF_ACCEPT;
		rejected_forget(skb);
		stat_inc(PT_STAT_LATE);
		now = bpf_ktime_get_ns();
		r = rec_new(skb, netns, &pi, now, 0);
		if (!r)
			return NF_ACCEPT;
		r->flags |= PT_REC_LATE;
		parsed = true;
	} else if (!r) {
		struct pt_handoff h = {};
		__u64 cause = 0, id = 0;

		/* links are per netns: only traced namespaces reach here */
		if (parse_l3_by(l3, family, &pi, v->cast))
			return NF_ACCEPT;
		/* first seen at OUTPUT: generated here, maybe in reply, or the
		 * outer packet of a payload a tunnel sent from a worker */
		if (kind == PT_STAGE_OUTPUT) {
			now = bpf_ktime_get_ns();
			id = handoff_take(skb, now, &h);
			if (h.how != PT_HANDOFF_ENCAP)
				id = 0;
			if (!id)
				cause = cause_of(skb, &pi, now);
		}
		if (!id && !first_sight_wanted(skb, &pi, netns))
			return NF_ACCEPT;
		if (!now)
			now = bpf_ktime_get_ns();
		r = rec_new(skb, netns, &pi, now, id);
		if (!r)
			return NF_ACCEPT;
		r->cause = cause;
		if (id) {
			r->inner = h.prev;
			r->tun_ifindex = h.tun_ifindex;
			r->match = match_joined(r->match | h.match);
		}
		parsed = true;
	} else if (kind == PT_STAGE_OUTPUT && (r->seen & PT_SEEN_LEFT)) {
		/* it left already: now the payload of an outer packet */
		if (parse_l3_by(l3, family, &pi, v->cast))
			return NF_ACCEPT;
		parsed = true;
		now = bpf_ktime_get_ns();
		if (hdr_differs(r, &pi)) {
			r = encap_start(skb, r, &pi, netns, r->out_ifindex, now);
			if (!r)
				return NF_ACCEPT;
		}
	} else if ((kind == PT_STAGE_PREROUTING || (kind == PT_STAGE_INPUT && r->proto == IPPROTO_ESP)) &&
		   (r->seen & PT_SEEN_INPUT)) {
		/* past INPUT already: its payload, decapsulated (xfrm
		 * transport mode goes through PREROUTING again, or straight
		 * to INPUT where PREROUTING has no table to observe) */
		if (parse_l3_by(l3, family, &pi, v->cast))
			return NF_ACCEPT;
		parsed = true;
		now = bpf_ktime_get_ns();
		if (hdr_differs(r, &pi)) {
			r = decap_start(skb, r, &pi, netns, in, now);
			if (!r)
				return NF_ACCEPT;
		}
	} else if (ct_reject(skb, r, nfct)) {
		return NF_ACCEPT;
	} else if ((r->flags & PT_REC_FRAG) ||
		   ((r->flags & PT_REC_NAT_NS) && after_nat(r, family, hook, slot) && ct_natted(nfct))) {
		if (!parse_l3_by(l3, family, &pi, v->cast)) {
			parsed = true;
			if (!pi.frag && (r->flags & PT_REC_FRAG)) {
				/* reassembled: this skb now carries the whole
				 * datagram, a new packet with its own record */
				__u8 match = r->match;
				__u64 into = frag_absorbed(skb, r);

				now = bpf_ktime_get_ns();
				r = rec_new(skb, netns, &pi, now, into);
				if (!r)
					return NF_ACCEPT;
				r->match |= match & ~(PT_F_NAT_CHANGES | PT_F_PROTO);
			}
			/* NAT may have rewritten addresses or ports: match again */
			if ((cfg.filter & PT_F_NAT_CHANGES) & ~r->match)
				r->match |= match_header(skb, &pi);
		}
	}
	if (!now)
		now = stage_time(r);
	if (kind == PT_STAGE_INPUT || kind == PT_STAGE_FORWARD || kind == PT_STAGE_OUTPUT) {
		bool local = kind == PT_STAGE_OUTPUT || (r->seen & PT_SEEN_OUTPUT);

		/* only OUTPUT routes again inside the hook (mangle, DNAT); the
		 * first observer of INPUT/FORWARD may come after a table */
		/* a packet routed for output has no source check (that is
		 * input routing's, fib_validate_source): a lookup with its
		 * addresses reversed is another packet's -- the one it answers,
		 * or ARP's for its peer at a first contact */
		if (route_take(r, first || kind != PT_STAGE_OUTPUT ? PT_STAGE_ROUTE : PT_STAGE_REROUTE,
			       r->n_stages ? r->last_ts : now - ROUTE_MAX_AGE_NS,
			       (kind == PT_STAGE_OUTPUT ? 0 : ROUTE_CHECKS) | (local ? ROUTE_LOCAL_OUT : 0))) {
			if (v->cast)
				route_result_cast(r, v->refdst, now);
			else
				route_result(r, v->refdst, now);
		}
	}
	if (kind == PT_STAGE_INPUT) {
		struct pt_pending *p = pending();

		r->seen |= PT_SEEN_INPUT;
		if (p) {
			p->skb = (__u64)skb;
			p->id = r->id;
		}
	}
	else if (kind == PT_STAGE_FORWARD)
		r->seen |= PT_SEEN_FORWARD;
	else if (kind == PT_STAGE_OUTPUT)
		r->seen |= PT_SEEN_OUTPUT;
	else if (kind == PT_STAGE_POSTROUTING)
		r->seen |= PT_SEEN_LEFT;
	if (in && !r->in_ifindex)
		r->in_ifindex = in;
	if (out)
		r->out_ifindex = out;
	r->match |= match_stage(mark, in, out);
	active_set(skb, r, now);
	s = stage_add(r, kind, now);
	if (!s)
		return NF_ACCEPT;
	s->ifindex = out ? out : in;
	/* an nft base chain observed by itself: its table, by the handle
	 * nftables gave it (never reused in a netns) */
	s->aux = (stflags & PT_STF_NFT_TABLE) ? table : in;
	s->aux2 = prio;
	s->flags = stflags;
	s->mark = mark;
	s->slot = slot;
	s->ct = ct_state(nfct);
	/* DSCP/ECN byte: from the parse, if there was one */
	if (parsed) {
		s->tos = pi.tos;
		nat_check(r, &pi, slot, now);
	} else {
		s->tos = l3_tos(l3, family, v->cast);
	}
	/* a tunnel's carrier taken locally: its payload may be received on
	 * another CPU before this one's poll ends (WireGuard decrypts on
	 * any CPU; so may async crypto for ESP), so it is shared now.
	 * Last: r is not ours after this. */
	if (kind == PT_STAGE_INPUT && carrier_record(r))
		rec_park(skb);
	return NF_ACCEPT;
}

/* The pointer fields of a trusted pointer (the hook state, the skb), read
 * once where a program starts: newer verifiers (6.18 here; not 6.1) search
 * the kernel's BTF by name, for a "__safe_trusted" variant of the type, at
 * every such read on every path they explore -- ~1 ms each on this
 * machine, and half of the programs' verification time at start.  What is
 * read through the untrusted pointers they give costs the verifier
 * nothing, and the program the same at run time. */
struct nf_ptrs {
	const struct net *net;
	const struct net_device *in;
	const struct net_device *out;
};

static __always_inline void nf_ptrs_read(const struct nf_hook_state *state, struct nf_ptrs *p)
{
	p->net = state->net;
	p->in = state->in;
	p->out = state->out;
	barrier_var(p->net);
	barrier_var(p->in);
	barrier_var(p->out);
}

/* nf_observe_at with the state's pointers read already. */
static __always_inline int nf_observe_with(struct sk_buff *skb, const struct nf_hook_state *state,
					   const struct nf_ptrs *p, __u8 slot, bool first, __s32 prio,
					   __u8 stflags, __u32 table, bool cast)
{
	struct skb_view v;

	skb_view_direct(skb, &v);
	v.cast = cast;
	return nf_observe_dev(skb, &v, state->pf, state->hook, p->in ? p->in->ifindex : 0,
			      p->out ? p->out->ifindex : 0, p->net->ns.inum, slot, first, prio, stflags, table);
}

/* core: skb and state are plain addresses (kprobes), read with CO-RE; else
 * BTF pointers, read directly.  A constant at every call: the other branch
 * is compiled out. */
static __always_inline int nf_observe_at(struct sk_buff *skb, const struct nf_hook_state *state, __u8 slot,
					 bool first, __s32 prio, __u8 stflags, __u32 table, bool core)
{
	struct skb_view v;
	struct nf_ptrs p;

	if (core) {
		struct net_device *in = BPF_CORE_READ(state, in), *out = BPF_CORE_READ(state, out);

		skb_view_core(skb, &v);
		return nf_observe_dev(skb, &v, BPF_CORE_READ(state, pf), BPF_CORE_READ(state, hook),
				      in ? BPF_CORE_READ(in, ifindex) : 0, out ? BPF_CORE_READ(out, ifindex) : 0,
				      BPF_CORE_READ(state, net, ns.inum), slot, first, prio, stflags, table);
	}
	nf_ptrs_read(state, &p);
	return nf_observe_with(skb, state, &p, slot, first, prio, stflags, table, false);
}

/* Forget where a freed packet was in its hook: its pointer will be reused. */
static __always_inline void nf_pos_forget(const void *skb)
{
	__u32 zero = 0;
	struct pt_nf_pos *p = bpf_map_lookup_elem(&nf_pos, &zero);

	if (!p)
		return;
	for (int i = 0; i < PT_NF_POS; i++)
		if (p->skb[i] == (__u64)skb)
			p->skb[i] = 0;
}

/* Which observer of its hook (0: the first) this run of bank's program is.
 * A packet listed at the same hook continues there, unless every observer
 * the hook has has seen it (then it is there again: a new traversal); any
 * other packet starts at the first.  A packet freed mid-hook is forgotten
 * (kfree_skb/consume_skb), so a new packet at its address starts afresh. */
static __always_inline __u8 nf_position(const void *skb, const struct nf_hook_state *state,
					const struct net *net, __u8 bank)
{
	__u32 zero = 0, where, k;
	struct pt_nf_pos *p = bpf_map_lookup_elem(&nf_pos, &zero);
	struct pt_nat_slots *ns;
	__u8 fh = (state->pf == NFPROTO_IPV6 ? 5 : 0) + state->hook;
	int i, found = -1, ns_i;

	if (!p)
		return 0;
	where = net->ns.inum ^ ((__u32)bank << 24 | (__u32)fh << 16);
	for (i = 0; i < PT_NF_POS; i++)
		if (p->skb[i] == (__u64)skb)
			found = i;
	if (found >= 0 && found < PT_NF_POS && p->where[found] == where) {
		ns_i = netns_index(net->ns.inum);
		k = ns_i;
		ns = ns_i >= 0 ? bpf_map_lookup_elem(&nat_slots, &k) : NULL;
		/* bounded right at the access: older verifiers lose fh's bound */
		barrier_var(fh);
		if (ns && bank < 2 && fh < 10 && p->count[found] + 1 < ns->observers[bank * 10 + fh])
			return ++p->count[found];
	}
	if (found < 0)
		found = p->next++ & (PT_NF_POS - 1);
	barrier_var(found);
	if (found < 0 || found >= PT_NF_POS)
		return 0;
	p->skb[found] = (__u64)skb;
	p->where[found] = where;
	p->count[found] = 0;
	return 0;
}

/* The kernel's nf_hook_entries of this hook in this netns: replaced
 * whenever anything registers or unregisters there (a table, a base chain,
 * conntrack, another tool's hook, our own observers).  Constant indices:
 * a BTF pointer takes no variable offset. */
static __always_inline __u64 hook_entries(const struct net *net, __u8 fh)
{
	const struct netns_nf *nf = &net->nf;

	switch (fh) {
	case 0: return (__u64)nf->hooks_ipv4[0];
	case 1: return (__u64)nf->hooks_ipv4[1];
	case 2: return (__u64)nf->hooks_ipv4[2];
	case 3: return (__u64)nf->hooks_ipv4[3];
	case 4: return (__u64)nf->hooks_ipv4[4];
	case 5: return (__u64)nf->hooks_ipv6[0];
	case 6: return (__u64)nf->hooks_ipv6[1];
	case 7: return (__u64)nf->hooks_ipv6[2];
	case 8: return (__u64)nf->hooks_ipv6[3];
	case 9: return (__u64)nf->hooks_ipv6[4];
	}
	return 0;
}

/* nftables' generation in this netns: every nft commit bumps it, before
 * its new rules take effect and before it unregisters what it deletes */
static __always_inline __u32 nft_generation(const struct net *net)
{
	if (bpf_core_field_exists(net->nft.base_seq))
		return net->nft.base_seq;
	return 0;
}

/* At a hook's first observer: is what is registered there still what the
 * observers were placed for?  Two things say it is: the hook's entries are
 * the ones learnt after placing (anything registered or unregistered there
 * replaces them), and nftables' generation is the one user space read the
 * ruleset at (a commit can also bring a freed entries blob back at the
 * same address, or make new rules of a chain take effect).  If not, which
 * table did what is unknown: the stage says so (PT_STF_CHANGING), and user
 * space is told to read the ruleset again.  No window: the first packet
 * after a change sees it.  A replaced hook stays "changing"
 * (PT_HOOKS_PLACING) until user space has placed the observers again. */
static __always_inline __u8 hook_changing(const struct nf_hook_state *state, const struct net *net, __u8 bank,
					  bool *entry)
{
	__u8 fh = (state->pf == NFPROTO_IPV6 ? 5 : 0) + state->hook;
	struct pt_nat_slots *ns;
	__u32 k, *gen;
	__u64 now, want;
	int ns_i;

	*entry = true;
	ns_i = netns_index(net->ns.inum);
	if (ns_i < 0)
		return 0;
	k = ns_i;
	ns = bpf_map_lookup_elem(&nat_slots, &k);
	gen = bpf_map_lookup_elem(&ruleset_gen, &k);
	if (!ns || !gen || fh >= 10)
		return 0;
	*entry = !(ns->entryless & (1u << (bank * 10 + fh)));
	now = hook_entries(net, fh);
	barrier_var(fh);
	if (fh >= 10)
		return 0;
	want = ns->hooks[fh];
	if (want == PT_HOOKS_PLACING)
		return PT_STF_CHANGING;
	if (want == PT_HOOKS_LEARN) {
		ns->hooks[fh] = now;
		want = now;
	}
	if (want != now)
		ns->hooks[fh] = PT_HOOKS_PLACING;
	else if (*gen == nft_generation(net))
		return 0;
	ns->changed |= 1u << fh; /* racy but only read as "any" */
	return PT_STF_CHANGING;
}

static __always_inline int nf_observe(struct bpf_nf_ctx *ctx, __u8 bank)
{
	__u64 *rj = rejected_slot();
	bool entry = false;
	__u8 i, changing = 0;
	struct nf_ptrs p;

	/* A rejected packet (most packets, with a filter) costs one load
	 * here: only NAT could still make it match, and only where its
	 * connection was not known to be NATed when it was judged.  Not at
	 * OUTPUT: a packet generated here may have the skb of a rejected one
	 * that TCP freed without a tracepoint (nf_observe_dev tells). */
	if (rj && (*rj & ~PT_REJECTED_FINAL) == (__u64)ctx->skb && ctx->state->hook != NF_INET_LOCAL_OUT &&
	    ((*rj & PT_REJECTED_FINAL) || !ct_natted(ctx->skb->_nfct)))
		return NF_ACCEPT;
	nf_ptrs_read(ctx->state, &p);
	i = nf_position(ctx->skb, ctx->state, p.net, bank);
	if (i == 0)
		changing = hook_changing(ctx->state, p.net, bank, &entry);
	if (i == 0 && entry && ctx->state->hook == NF_INET_LOCAL_OUT)
		rejected_forget(ctx->skb);
	return nf_observe_with(ctx->skb, ctx->state, &p, bank * PT_NF_BANK + (i & (PT_NF_BANK - 1)), entry, 0,
			       changing, 0, true);
}

/* A packet netfilter dropped: was any hook of its netns that has no
 * observer before its first table being changed?  A drop there can come
 * before the hook's first observer, which would have said so. */
static __always_inline bool nf_drop_changing(const struct net_device *dev)
{
	const struct net *net = dev ? dev->nd_net.net : NULL;
	struct pt_nat_slots *ns;
	__u32 k, *gen, bits;
	int ns_i;

	if (!net)
		return false;
	ns_i = netns_index(net->ns.inum);
	if (ns_i < 0)
		return false;
	k = ns_i;
	ns = bpf_map_lookup_elem(&nat_slots, &k);
	gen = bpf_map_lookup_elem(&ruleset_gen, &k);
	if (!ns || !gen)
		return false;
	bits = (ns->entryless | ns->entryless >> 10) & 0x3ff;
	if (!bits)
		return false;
	/* as hook_changing does: user space is told (the dropped packets
	 * may be all a hook sees) and a replaced hook stays "changing" */
	if (*gen != nft_generation(net)) {
		ns->changed |= bits;
		return true;
	}
	for (int fh = 0; fh < 10; fh++) {
		__u64 want = ns->hooks[fh];

		if (!(bits & (1u << fh)) || want == PT_HOOKS_LEARN)
			continue;
		if (want == PT_HOOKS_PLACING)
			return true;
		if (want != hook_entries(net, fh)) {
			ns->hooks[fh] = PT_HOOKS_PLACING;
			ns->changed |= 1u << fh;
			return true;
		}
	}
	return false;
}

/* One program per bank, attached at every observer slot of the bank: it
 * works out which slot it runs at (nf_position), so only one program is
 * verified per bank.  Section "netfilter" is unknown to libbpf 1.1: user
 * space sets the program type before load. */
SEC("netfilter")
int nf_obs_0(struct bpf_nf_ctx *ctx)
{
	return nf_observe(ctx, 0);
}

SEC("netfilter")
int nf_obs_1(struct bpf_nf_ctx *ctx)
{
	return nf_observe(ctx, 1);
}

/* ---- netfilter, fentry backend (kernels without netfilter links) ----
 *
 * Where netfilter BPF links are missing (before 6.4), the hook machinery
 * itself is observed: nf_hook_slow runs the hook functions of one hook for
 * one packet; each nft base chain (nft_do_chain) and x_tables table
 * (ip(6)t_do_table) says its verdict.  These fire in every netns: the
 * packet's must be traced.  A hook with no table registered does not run
 * nf_hook_slow at all: there is nothing between the stages around it. */

#define NF_DROP 0
#define NF_ACCEPT_V 1
#define NF_VERDICT_MASK 0xff

SEC("fentry/nf_hook_slow")
int BPF_PROG(fe_hook_entry, struct sk_buff *skb, struct nf_hook_state *state,
	     const struct nf_hook_entries *e, unsigned int s)
{
	if (!netns_traced(state->net->ns.inum))
		return 0;
	if (state->hook == NF_INET_LOCAL_OUT)
		rejected_forget(skb);
	nf_observe_at(skb, state, 0, true, 0, 0, 0, false);
	return 0;
}

SEC("fexit/nf_hook_slow")
int BPF_PROG(fx_hook_exit, struct sk_buff *skb, struct nf_hook_state *state,
	     const struct nf_hook_entries *e, unsigned int s, int ret)
{
	/* 1: every hook function accepted it (else it may be freed already) */
	if (ret == 1 && netns_traced(state->net->ns.inum))
		nf_observe_at(skb, state, PT_SLOT_EXIT, false, 0x7fffffff, 0, 0, false);
	return 0;
}

/* After one table: its priority, and whether it dropped the packet (then
 * nf_hook_slow frees it after we return: it is still whole here). */
/* table: an nft table's handle (0: an x_tables table, known by priority) */
static __always_inline void table_done(struct sk_buff *skb, const struct nf_hook_state *state, __s32 prio,
				       unsigned int ret, __u32 table, bool core)
{
	__u8 v = ret & NF_VERDICT_MASK;

	if ((v != NF_DROP && v != NF_ACCEPT_V) ||
	    !netns_traced(core ? BPF_CORE_READ(state, net, ns.inum) : state->net->ns.inum))
		return; /* stolen or queued: no longer ours to read */
	nf_observe_at(skb, state, PT_SLOT_TABLE, false, prio,
		      (v == NF_DROP ? PT_STF_NF_DROP : 0) | (table ? PT_STF_NFT_TABLE : 0), table, core);
}

/* The handle of the table of an nft chain: what names it, unlike its
 * priority (two tables can share one, and a swap of tables keeps it). */
static __always_inline __u32 nft_table_handle(void *chain)
{
	return (__u32)BPF_CORE_READ((struct nft_chain *)chain, table, handle);
}

static __always_inline __u64 chain_word(void *chain)
{
	struct nft_base_chain *bc = chain - bpf_core_field_offset(struct nft_base_chain, chain);

	return (__u64)nft_table_handle(chain) << 32 | (__u32)BPF_CORE_READ(bc, ops.priority);
}

static __always_inline void chain_enter(__u64 skb, __u64 word)
{
	__u32 zero = 0;
	struct pt_chain_now *c = bpf_map_lookup_elem(&chain_now, &zero);

	if (c) {
		c->skb = skb;
		c->word = word;
	}
}

SEC("fentry/nft_do_chain")
int BPF_PROG(fe_nft_chain, struct nft_pktinfo *pkt, void *priv)
{
	chain_enter((__u64)pkt->skb, chain_word(priv));
	return 0;
}

SEC("fexit/nft_do_chain")
int BPF_PROG(fx_nft_chain, struct nft_pktinfo *pkt, void *priv, unsigned int ret)
{
	/* priv is the chain of a base chain: its hook priority is the table's */
	struct nft_base_chain *bc = (void *)priv - bpf_core_field_offset(struct nft_base_chain, chain);

	table_done(pkt->skb, pkt->state, BPF_CORE_READ(bc, ops.priority), ret, nft_table_handle(priv), false);
	return 0;
}

SEC("fexit/ipt_do_table")
int BPF_PROG(fx_ipt_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state, unsigned int ret)
{
	table_done(skb, state, BPF_CORE_READ((struct xt_table *)priv, priority), ret, 0, false);
	return 0;
}

SEC("fexit/ip6t_do_table")
int BPF_PROG(fx_ip6t_table, void *priv, struct sk_buff *skb, const struct nf_hook_state *state, unsigned int ret)
{
	table_done(skb, state, BPF_CORE_READ((struct xt_table *)priv, priority), ret, 0, false);
	return 0;
}

/* ---- tc: verdicts seen from outside ---- */

static __always_inline __u8 skb_redirected(const struct sk_buff *skb)
{
	if (!bpf_core_field_exists(skb->redirected))
		return 0;
	/* a direct load: skb is a BTF pointer in every program that asks */
	return BPF_CORE_READ_BITFIELD(skb, redirected) ? PT_STF_REDIRECTED : 0;
}

/* An skb without a record appeared on a device of a traced netns: a copy
 * that tc (mirred) made of the packet it just saw shares that packet's
 * data.  Name it on the packet's tc stage: mirror (the packet went on) or
 * redirect (the packet itself ends there). */
static __always_inline void tc_copy_seen(const struct sk_buff *skb, __u32 ifindex)
{
	__u32 zero = 0;
	struct pt_tc_last *t = bpf_map_lookup_elem(&tc_last, &zero);
	struct pt_record *r;
	struct pt_stage *s;
	__u64 key;

	if (!t || !t->skb || t->skb == (__u64)skb || t->head != (__u64)skb->head)
		return;
	key = t->skb;
	r = rec_lookup((const void *)key);
	if (!r || r->id != t->id)
		return;
	s = last_stage(r);
	if (!s || (s->kind != PT_STAGE_TC_INGRESS && s->kind != PT_STAGE_TC_EGRESS) || s->aux)
		return;
	s->aux = ifindex;
	if (skb_redirected(skb)) {
		s->aux2 = PT_TC_REDIRECT;
		r->flags |= PT_REC_REDIRECTED;
		r->out_ifindex = ifindex;
	} else {
		s->aux2 = PT_TC_MIRROR;
	}
}

/* ---- device-level tracepoints ---- */

static __always_inline void handoffs_add(__s64 d)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&handoffs, &zero);

	if (n)
		__sync_fetch_and_add(n, d);
}

static __always_inline bool handoffs_waiting(void)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&handoffs, &zero);

	return n && *n > 0;
}

/* A veth's peer device (the priv area follows struct net_device; since
 * 6.12 it is the flexible member `priv`). */
static __always_inline struct net_device *veth_peer(const struct net_device *dev)
{
	char kind[5] = {};
	const char *k = BPF_CORE_READ(dev, rtnl_link_ops, kind);
	const void *priv;

	if (!k || bpf_probe_read_kernel(kind, sizeof(kind), k) ||
	    kind[0] != 'v' || kind[1] != 'e' || kind[2] != 't' || kind[3] != 'h' || kind[4])
		return NULL;
	if (bpf_core_field_exists(struct net_device, priv))
		priv = (const void *)dev + bpf_core_field_offset(struct net_device, priv);
	else
		priv = (const void *)dev + ((bpf_core_type_size(struct net_device) + 31) & ~31);
	return BPF_CORE_READ((struct veth_priv *)priv, peer);
}

/* The packet leaves on dev: when dev is a veth whose peer is in a traced
 * netns, the packet goes on there as the same skb.  Reserve the id of its
 * record there, so both records name each other. */
static __always_inline void handoff_reserve(const void *skb, struct pt_record *r, const struct net_device *dev)
{
	struct pt_handoff h = {};
	struct net_device *peer;
	__u64 key = (__u64)skb;
	__u32 ino;

	/* only for a record that is shown: the continuation is kept whatever
	 * the filter says of it (one journey, one verdict).  Checked before
	 * the device is read (three probe reads): counting never needs it. */
	if (!cfg.emit || (r->match & cfg.filter) != cfg.filter)
		return;
	peer = veth_peer(dev);
	if (!peer)
		return;
	ino = BPF_CORE_READ(peer, nd_net.net, ns.inum);
	if (!netns_traced(ino))
		return;
	h.prev = r->id;
	h.next = next_id();
	h.ts = bpf_ktime_get_ns();
	h.prev_netns = r->netns;
	if (bpf_map_update_elem(&handoff, &key, &h, BPF_ANY))
		return;
	handoffs_add(1);
	r->next = h.next;
	r->next_netns = ino;
}

/* A WireGuard device: it takes packets to encrypt in a worker, which
 * sends each later, maybe on another CPU, in an outer UDP packet. */
static __always_inline bool dev_is_wireguard(const struct net_device *dev)
{
	char kind[10] = {};
	const char *k = BPF_CORE_READ(dev, rtnl_link_ops, kind);

	return k && !bpf_probe_read_kernel(kind, sizeof(kind), k) && kind[0] == 'w' && kind[1] == 'i' &&
	       kind[2] == 'r' && kind[3] == 'e' && kind[4] == 'g' && kind[5] == 'u' && kind[6] == 'a' &&
	       kind[7] == 'r' && kind[8] == 'd' && !kind[9];
}

/* The payload r is handed to a tunnel device that sends it later, from a
 * worker that may run on another CPU before the hand-over returns: reserve
 * the id of the outer packet now; it takes it at LOCAL_OUT.  r ends
 * encapsulated when the device took it (net_dev_xmit). */
static __always_inline bool encap_reserve(const void *skb, struct pt_record *r, __u32 ifindex)
{
	struct pt_handoff h = {};
	__u64 key = (__u64)skb;

	h.prev = r->id;
	h.next = next_id();
	h.ts = bpf_ktime_get_ns();
	h.prev_netns = r->netns;
	h.tun_ifindex = ifindex;
	h.how = PT_HANDOFF_ENCAP;
	h.match = r->match;
	if (bpf_map_update_elem(&handoff, &key, &h, BPF_ANY))
		return false;
	handoffs_add(1);
	r->encap = h.next;
	r->tun_ifindex = ifindex;
	return true;
}

/* Handed to dev: a WireGuard device's payload has its outer packet's id
 * reserved (a device without link-layer header: one load for others). */
static __always_inline void encap_handover(const void *skb, struct pt_record *r, const struct net_device *dev)
{
	if (!r->encap && dev->type == ARPHRD_NONE && dev_is_wireguard(dev))
		encap_reserve(skb, r, dev->ifindex);
}

/* A packet handed to a device (tc egress, or net_dev_queue without tc):
 * the reply of a translated connection gets its addresses back in
 * POSTROUTING's NAT, where no observer may follow (nat chains only at
 * PREROUTING still make the NAT core hook there): the header it leaves with
 * is matched too.  Only where NAT may have rewritten it. */
static __always_inline void match_leaving(struct sk_buff *skb, struct pt_record *r)
{
	struct pkt_info pi;

	if (!(r->flags & PT_REC_NAT_NS) || !((cfg.filter & PT_F_NAT_CHANGES) & ~r->match) ||
	    !ct_natted(BPF_CORE_READ(skb, _nfct)))
		return;
	if (!parse_l3(skb_l3(skb), r->family, &pi))
		r->match |= match_header(skb, &pi);
}

/* First sight of a packet entering a traced netns on a device: a packet
 * handed over by a veth from another traced netns takes the id reserved for
 * it; a copy tc made is named on the original; else the filter decides. */
/* now: the time of this observation, 0 until taken -- only once the packet
 * is to be followed (a clock read is ~36 ns on the AMD machine, where a
 * packet the filter rejects costs ~170 in all). */
static __always_inline struct pt_record *rx_first_sight(struct sk_buff *skb, const void *l3, bool l3_at_data,
							__u8 family, __u32 netns, __u32 ifindex, __u64 *now, bool cast)
{
	struct pt_handoff h = {};
	__u64 id = 0, prev = 0;
	__u32 prev_netns = 0;
	struct pt_record *r;
	struct pkt_info pi;

	if (parse_l3_by(l3, family, &pi, cast))
		return NULL;
	pi.l3_at_data = l3_at_data;
	if (handoffs_waiting()) {
		if (!*now)
			*now = bpf_ktime_get_ns();
		id = handoff_take(skb, *now, &h);
	}
	if (id && h.how == PT_HANDOFF_NETNS) {
		prev = h.prev;
		prev_netns = h.prev_netns;
	} else {
		id = 0;
	}
	tc_copy_seen(skb, ifindex);
	/* a continuation is kept whatever the filter: its first part matched */
	if (!prev && !first_sight_wanted(skb, &pi, netns))
		return NULL;
	if (!*now)
		*now = bpf_ktime_get_ns();
	r = rec_new(skb, netns, &pi, *now, id);
	if (r)
		r->seen |= PT_SEEN_RX;
	if (r && prev) {
		r->prev = prev;
		r->prev_netns = prev_netns;
		r->match = cfg.filter;
	}
	return r;
}

/* Received on a device: only attached without tc observers (tc ingress
 * marks the receive then, and runs in the traced namespaces only, where
 * this tracepoint runs for every packet of the host). */
SEC("tp_btf/netif_receive_skb")
int BPF_PROG(on_rx, struct sk_buff *skb)
{
	struct net_device *dev = skb->dev;
	__u32 netns = dev->nd_net.net->ns.inum;
	__u8 family = family_of_ethertype(skb->protocol);
	__u32 ifindex, mark;
	struct pt_record *r;
	struct pt_stage *s;
	__u64 now;

	pending_resolve(skb);
	if (!family || !netns_traced(netns))
		return 0;
	now = bpf_ktime_get_ns();
	ifindex = dev->ifindex;
	mark = skb->mark;
	r = rec_lookup(skb);
	/* the network header is not reset yet here; data is at L3 */
	if (r && (r->seen & PT_SEEN_INPUT))
		r = decap_check(skb, r, skb->data, true, family, netns, ifindex, now);
	else if (!r)
		r = rx_first_sight(skb, skb->data, true, family, netns, ifindex, &now, false);
	if (!r)
		return 0;
	if (!r->in_ifindex)
		r->in_ifindex = ifindex;
	r->match |= match_stage(mark, ifindex, 0);
	active_set(skb, r, now);
	s = stage_add(r, PT_STAGE_RX, now);
	if (s) {
		s->ifindex = ifindex;
		s->mark = mark;
		s->flags = skb_redirected(skb);
	}
	return 0;
}

/* Does the device queue packets in a qdisc (as opposed to noqueue, which
 * hands them to the driver right away)?  At tc egress the tx queue is not
 * picked yet: the root qdisc, or the first queue's for multiqueue (mq). */
static __always_inline bool dev_has_qdisc(const struct net_device *dev)
{
	/* direct loads: dev comes from a BTF pointer (skb->dev) */
	struct netdev_queue *txq;
	struct Qdisc *q = dev->qdisc;

	if (q && q->enqueue)
		return true;
	txq = dev->_tx;
	q = txq ? txq->qdisc : NULL;
	return q && q->enqueue;
}

/* Handed to a device (after tc egress): queued to its qdisc, or straight
 * to the driver.  Not the end yet: a qdisc may still drop it.  Only
 * attached without tc observers (tc egress marks the hand-over then). */
SEC("tp_btf/net_dev_queue")
int BPF_PROG(on_dev_queue, struct sk_buff *skb)
{
	struct pt_record *r = rec_lookup(skb);
	__u32 ifindex, mark;
	struct pt_stage *s;
	__u8 redirected;

	if (!r) {
		rejected_forget(skb);
		if (netns_traced(skb->dev->nd_net.net->ns.inum))
			tc_copy_seen(skb, skb->dev->ifindex);
		return 0;
	}
	ifindex = skb->dev->ifindex;
	mark = skb->mark;
	redirected = skb_redirected(skb);
	if (r->flags & PT_REC_QUEUED) {
		r = encap_check(skb, r, skb_l3(skb), family_of_ethertype(skb->protocol),
				skb->dev->nd_net.net->ns.inum, bpf_ktime_get_ns());
		if (!r)
			return 0;
	}
	r->seen |= PT_SEEN_LEFT;
	encap_handover(skb, r, skb->dev);
	/* no hook took its route (fentry backend, a hook we could not see):
	 * its lookups are still waiting */
	if (!(r->seen & (PT_SEEN_INPUT | PT_SEEN_FORWARD | PT_SEEN_OUTPUT)) &&
	    route_take(r, PT_STAGE_ROUTE, r->first_ts, (r->seen & PT_SEEN_RX) ? ROUTE_CHECKS : ROUTE_LOCAL_OUT))
		route_result(r, skb->_skb_refdst, bpf_ktime_get_ns());
	r->out_ifindex = ifindex;
	r->match |= match_stage(mark, 0, ifindex);
	match_leaving(skb, r);
	r->flags |= PT_REC_QUEUED;
	if (redirected)
		r->flags |= PT_REC_REDIRECTED;
	s = stage_add(r, PT_STAGE_TX, bpf_ktime_get_ns());
	if (s) {
		s->ifindex = ifindex;
		s->mark = mark;
		s->flags = redirected;
	}
	/* a qdisc queues it: it may leave later, from another CPU */
	if (dev_has_qdisc(skb->dev))
		rec_park(skb);
	return 0;
}

/* An IFB device (tc redirects packets to it to shape them): it queues
 * them and its tasklet sends them on, later, as the same skb. */
static __always_inline bool dev_is_ifb(const struct net_device *dev)
{
	char kind[4] = {};
	const char *k = BPF_CORE_READ(dev, rtnl_link_ops, kind);

	return k && !bpf_probe_read_kernel(kind, sizeof(kind), k) &&
	       kind[0] == 'i' && kind[1] == 'f' && kind[2] == 'b' && !kind[3];
}

/* The driver took it: the packet left this netns on dev. */
SEC("tp_btf/net_dev_xmit")
int BPF_PROG(on_dev_xmit, struct sk_buff *skb, int rc, struct net_device *dev, unsigned int len)
{
	struct pt_record *r;
	struct pt_stage *s;
	bool ifb;

	if (rc != NETDEV_TX_OK)
		return 0; /* busy: requeued, it will be sent again */
	r = rec_lookup(skb);
	if (!r) {
		/* a rejected packet left by a device: its end here may be the
		 * last this netns sees of it (a veth peer's TCP frees it
		 * without a tracepoint), and the next packet may reuse its skb */
		rejected_forget(skb);
		return 0;
	}
	s = last_stage(r);
	/* only a packet tc redirected reaches an IFB device: others pay nothing */
	ifb = (r->flags & PT_REC_REDIRECTED) && dev_is_ifb(dev);
	if (!s || s->kind != PT_STAGE_TX) {
		/* (the skb may be freed already: only the arguments are read;
		 * the mark is the one it had at the device, at tc egress) */
		__u32 mark = s ? s->mark : 0;

		/* its end here, unless an IFB device or a tunnel sends it on */
		s = stage_add(r, PT_STAGE_TX, ifb || r->encap ? bpf_ktime_get_ns() : end_time(r));
		if (s) {
			s->ifindex = dev->ifindex;
			s->mark = mark;
			s->flags = (r->flags & PT_REC_REDIRECTED) ? PT_STF_REDIRECTED : 0;
		}
		r->out_ifindex = dev->ifindex;
	}
	if (ifb) {
		/* not the end: the IFB device's tasklet sends it on (received
		 * again on its device, or handed to it), maybe on another CPU */
		r->flags &= ~(PT_REC_QUEUED | PT_REC_REDIRECTED);
		r->out_ifindex = 0;
		rec_park(skb);
		return 0;
	}
	if (r->encap) {
		/* a tunnel's worker sends its outer packet (id reserved) */
		rec_finish(skb, r, PT_FATE_ENCAPSULATED);
		return 0;
	}
	handoff_reserve(skb, r, dev);
	rec_finish(skb, r, fate_tx(r));
	return 0;
}

/* ---- qdiscs: the queue between the hand-over to a device and its driver ---- */

/* A qdisc took a packet (fired only when the enqueue succeeded; a packet
 * the qdisc refused is freed, kfree_skb).  q is the device's root qdisc. */
SEC("tp_btf/qdisc_enqueue")
int BPF_PROG(on_qdisc_enqueue, struct Qdisc *q, const struct netdev_queue *txq, struct sk_buff *skb)
{
	struct net_device *dev = skb->dev;
	struct pt_record *r;
	struct pt_stage *s;

	if (!dev || !netns_traced(dev->nd_net.net->ns.inum))
		return 0;
	r = rec_lookup(skb);
	if (!r)
		return 0;
	s = stage_add(r, PT_STAGE_QDISC, bpf_ktime_get_ns());
	if (!s)
		return 0;
	s->ifindex = dev->ifindex;
	s->mark = skb->mark;
	s->slot = PT_QDISC_ENQUEUED;
	s->aux = q->handle;
	s->aux2 = q->q.qlen;
	return 0;
}

/* Count mode: one more packet out of this qdisc after waiting d ns. */
static __always_inline void qdisc_count(const struct pt_record *r, __u32 ifindex, __u32 handle, __u64 d)
{
	struct pt_qdisc_key k = { .netns = r->netns, .ifindex = ifindex, .handle = handle };
	struct pt_qdisc_val one = { .packets = 1, .ns = d }, *v;
	__u64 bound = 1000;   /* 1 us, then x4 */

	for (int i = 0; i < PT_QDISC_BUCKETS - 1; i++) {
		if (d <= bound)
			break;
		k.bucket++;
		bound <<= 2;
	}
	v = bpf_map_lookup_elem(&qdisc_hist, &k);
	if (v) {
		v->packets += 1;
		v->ns += d;
		return;
	}
	if (bpf_map_update_elem(&qdisc_hist, &k, &one, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(&qdisc_hist, &k);
		if (v) {
			v->packets += 1;
			v->ns += d;
		} else {
			stat_inc(PT_STAT_QDISC_OVERFLOW);
		}
	}
}

/* One packet the qdisc gave up: the end of its wait. */
static __always_inline void qdisc_left(struct sk_buff *skb, __u32 ifindex, __u32 handle, __u64 now)
{
	struct pt_record *r = rec_lookup(skb);
	struct pt_stage *s;
	__u64 enq = 0;
	__u8 ev = PT_QDISC_DEQUEUED;

	if (!r)
		return;
	s = last_stage(r);
	if (s && s->kind == PT_STAGE_QDISC) {
		if (s->slot == PT_QDISC_ENQUEUED)
			enq = s->ts;
		else
			ev = PT_QDISC_REQUEUED;   /* dequeued before: the driver refused it */
	} else if (s && (s->kind == PT_STAGE_TC_EGRESS || s->kind == PT_STAGE_TX)) {
		/* taken without the enqueue tracepoint: the qdisc made room by
		 * dropping others (NET_XMIT_CN, fq_codel); the hand-over to the
		 * device, just before, stands for the enqueue */
		enq = s->ts;
	}
	s = stage_add(r, PT_STAGE_QDISC, now);
	if (!s)
		return;
	s->ifindex = ifindex;
	s->mark = skb->mark;
	s->slot = ev;
	s->aux = handle;
	if (cfg.count && enq && (r->match & cfg.filter) == cfg.filter)
		qdisc_count(r, ifindex, handle, now - enq);
}

/* The qdisc gave packets to the driver: skb and, with bulk dequeue, the
 * packets chained after it (skb->next), `packets` in all.  Fired for every
 * dequeue attempt (skb NULL: nothing ready). */
SEC("tp_btf/qdisc_dequeue")
int BPF_PROG(on_qdisc_dequeue, struct Qdisc *q, const struct netdev_queue *txq, int packets, struct sk_buff *skb)
{
	struct net_device *dev;
	__u32 ifindex, handle;
	__u64 now;

	if (!skb || !txq)
		return 0;
	dev = txq->dev;
	if (!dev || !netns_traced(dev->nd_net.net->ns.inum))
		return 0;
	ifindex = dev->ifindex;
	handle = q->handle;
	now = bpf_ktime_get_ns();
	for (int i = 0; i < PT_QDISC_BULK; i++) {
		if (!skb || i >= packets)
			break;
		qdisc_left(skb, ifindex, handle, now);
		skb = skb->next;
	}
	return 0;
}

/* fentry/kprobe backends: dropped inside an nft chain (which frees the
 * packet itself): the chain says so, as the table observation its return
 * would have been.  Netfilter links never fill chain_now. */
static __always_inline void chain_dropped(struct sk_buff *skb, const struct net_device *dev, struct pt_record *r,
					  __u8 kind)
{
	__u32 zero = 0;
	struct pt_chain_now *c = bpf_map_lookup_elem(&chain_now, &zero);
	struct pt_stage *s;
	__u64 word;

	if (!c || c->skb != (__u64)skb)
		return;
	word = c->word;
	c->skb = 0;
	s = stage_add(r, kind, bpf_ktime_get_ns());
	if (!s)
		return;
	s->ifindex = dev ? dev->ifindex : 0;
	s->mark = skb->mark;
	s->slot = PT_SLOT_TABLE;
	s->aux = word >> 32;
	s->aux2 = (__s32)(__u32)word;
	s->flags = PT_STF_NF_DROP | (s->aux ? PT_STF_NFT_TABLE : 0);
	s->ct = ct_state(skb->_nfct);
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(on_kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason)
{
	/* read first, on the one path there is (see struct nf_ptrs) */
	const struct net_device *dev = skb->dev;
	struct pt_record *r;
	struct pt_stage *s;
	__u8 kind;

	barrier_var(dev);
	r = rec_lookup(skb);
	nf_pos_forget(skb);
	if (r)
		r = decap_late(skb, r);
	if (!r) {
		rejected_forget(skb);
		return 0;
	}
	if ((r->flags & PT_REC_FRAG) && !frag_failed(reason)) {
		frag_absorbed(skb, r);
		return 0;
	}
	/* Before drop reasons covered it (6.1), ICMPv6 freed a message it
	 * had answered (echo request) with plain kfree_skb: taken by the
	 * local stack, its answer sent -- not a drop */
	if ((r->seen & PT_SEEN_INPUT) && (r->flags & PT_REC_CAUSED) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_NOT_SPECIFIED)) {
		deliver(skb, r, PT_DELIVER_CONSUMED, 0);
		return 0;
	}
	/* input routing failed (no route, unreachable): its lookups are why
	 * (no source check is made then: lookups of its source since were
	 * made for the ICMP error) */
	s = last_stage(r);
	kind = s ? s->kind : 0;
	/* routed, then dropped by a table of INPUT/FORWARD before their first
	 * observer (which comes after a table): the route the kernel attached
	 * says which of the two */
	if (kind == PT_STAGE_PREROUTING &&
	    route_take(r, PT_STAGE_ROUTE, r->last_ts, 0) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_NETFILTER_DROP))
		route_attached(r, skb->_skb_refdst, skb->mark, bpf_ktime_get_ns());
	if (kind >= PT_STAGE_PREROUTING && kind <= PT_STAGE_POSTROUTING &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_NETFILTER_DROP))
		chain_dropped(skb, dev, r, kind);
	r->drop_reason = reason;
	r->drop_location = (__u64)location;
	s = stage_add(r, PT_STAGE_DROP, end_time(r));
	if (s) {
		s->ifindex = dev ? dev->ifindex : 0;
		s->mark = skb->mark;
		if (reason == bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_NETFILTER_DROP)) {
			if (nf_drop_changing(dev))
				s->flags = PT_STF_CHANGING;
			/* which of conntrack and the nft chains sharing its
			 * observer dropped it (see placement.py) */
			if ((__u64)location >= cfg.hook_slow_start && (__u64)location < cfg.hook_slow_end)
				s->flags |= PT_STF_HOOK_SLOW;
		}
	}
	/* the packet tc redirected a copy of ends here: it went on as the copy */
	rec_finish(skb, r, (r->flags & PT_REC_REDIRECTED) && !(r->flags & PT_REC_QUEUED) ?
		   PT_FATE_REDIRECTED : PT_FATE_DROPPED);
	return 0;
}

SEC("tp_btf/consume_skb")
int BPF_PROG(on_consume_skb, struct sk_buff *skb)
{
	struct pt_record *r = rec_lookup(skb);

	nf_pos_forget(skb);
	if (!r) {
		rejected_forget(skb);
		return 0;
	}
	if (r->flags & PT_REC_FRAG) {
		frag_absorbed(skb, r);
		return 0;
	}
	/* handed to a device and freed without being sent as itself: GSO
	 * made segments of it, which left instead */
	if (r->flags & (PT_REC_QUEUED | PT_REC_REDIRECTED)) {
		rec_finish(skb, r, fate_tx(r));
		return 0;
	}
	if (!(r->seen & PT_SEEN_INPUT)) {
		rec_finish(skb, r, PT_FATE_CONSUMED);
		return 0;
	}
	/* consumed by the local stack after INPUT (ICMP echo, ...) */
	deliver(skb, r, PT_DELIVER_CONSUMED, 0);
	return 0;
}

SEC("tp_btf/skb_copy_datagram_iovec")
int BPF_PROG(on_copy_datagram, const struct sk_buff *skb, int len)
{
	struct pt_record *r = rec_lookup(skb);

	if (!r)
		return 0;
	r->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(r->comm, sizeof(r->comm));
	deliver(skb, r, PT_DELIVER_READ, 0);
	return 0;
}

/* Fires in sock_def_readable right after a protocol queued data for a
 * socket, on the CPU that is processing the packet pending at LOCAL_IN.
 * UDP reads linear skbs without the copy tracepoint and frees them without
 * consume_skb, so this is where UDP delivery is seen. */
static __always_inline void data_ready(const struct sock *sk, bool core)
{
	const struct socket *so;
	struct pt_record *r;
	__u64 key;
	__u16 fam = core ? BPF_CORE_READ(sk, __sk_common.skc_family) : sk->__sk_common.skc_family;

	/* data queued to a netlink socket meanwhile (pkttrace --rules' own
	 * nftables trace events, sent while the packet crosses a hook) is
	 * not the packet's delivery */
	if (fam != AF_INET && fam != AF_INET6)
		return;
	/* read before the branches (see struct nf_ptrs) */
	so = core ? NULL : sk->sk_socket;
	barrier_var(so);
	r = pending_take(&key);
	if (r)
		deliver((const void *)key, r, PT_DELIVER_QUEUED,
			core ? BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino) :
			so && so->file ? so->file->f_inode->i_ino : 0);
}

SEC("tp_btf/sk_data_ready")
int BPF_PROG(on_sk_data_ready, const struct sock *sk)
{
	data_ready(sk, false);
	return 0;
}

/* The end of a poll: packets whose records are still in this CPU's slots
 * are held somewhere (neighbour or reassembly queue, socket backlog) and
 * may go on from another CPU: park them. */
/* ---- fentry backend: the end of each hook, whether or not a table ran ----
 *
 * nf_hook_slow runs only where a hook function is registered: the
 * function the hook hands the packet to next (its okfn) says the packet
 * crossed it.  Its observation is the hook's last: after every table.
 * Where nf_hook_slow ran, its exit said that already. */

static __always_inline __u32 dst_ifindex(__u64 refdst)
{
	struct dst_entry *dst = (struct dst_entry *)(refdst & ~1UL);

	return dst ? BPF_CORE_READ(dst, dev, ifindex) : 0;
}

/* core: skb is a plain address (kprobes), read with CO-RE; else a BTF
 * pointer, read directly.  A constant at every call: the other branch is
 * compiled out. */
static __always_inline void hook_done(struct sk_buff *skb, __u8 pf, __u8 hook, bool core)
{
	struct net_device *dev = core ? BPF_CORE_READ(skb, dev) : skb->dev;
	struct skb_view v;
	struct pt_record *r;
	struct pt_stage *s;
	__u32 netns, in = 0, out = 0, ifindex = 0;
	bool first;

	if (core)
		skb_view_core(skb, &v);
	else
		skb_view_direct(skb, &v);
	if (dev) {
		netns = core ? BPF_CORE_READ(dev, nd_net.net, ns.inum) : dev->nd_net.net->ns.inum;
		ifindex = core ? BPF_CORE_READ(dev, ifindex) : dev->ifindex;
	} else {
		/* a locally generated packet has no device before ip_output:
		 * its route's device says which netns it is in */
		struct dst_entry *dst = (struct dst_entry *)(v.refdst & ~1UL);

		if (!dst)
			return;
		netns = BPF_CORE_READ(dst, dev, nd_net.net, ns.inum);
	}
	if (!netns_traced(netns))
		return;
	r = rec_lookup(skb);
	/* past PREROUTING already: an input route lookup of the packet made
	 * for something else (icmp_send routes its reply with the packet
	 * it answers, REJECT) is not its PREROUTING */
	if (hook == 0 && r && (r->seen & (PT_SEEN_FORWARD | PT_SEEN_INPUT)))
		return;
	s = r ? last_stage(r) : NULL;
	/* nf_hook_slow's exit saw it already */
	if (s && s->kind == PT_STAGE_PREROUTING + hook && s->slot == PT_SLOT_EXIT)
		return;
	/* the hook's first observation unless its entry was seen */
	first = true;
	if (s) {
		for (int i = 0; i < PT_MAX_STAGES; i++) {
			__u32 n = r->n_stages;
			struct pt_stage *t;

			if (i >= n)
				break;
			t = &r->stages[(n - 1 - i) & (PT_MAX_STAGES - 1)];
			if (t->kind == PT_STAGE_PREROUTING + hook) {
				first = false;
				break;
			}
			if (t->kind != PT_STAGE_ADDR && t->kind != PT_STAGE_ROUTE && t->kind != PT_STAGE_REROUTE)
				break;
		}
	}
	if (hook == NF_INET_LOCAL_OUT && first)
		rejected_forget(skb);
	if (hook == 0 || hook == 1)
		in = ifindex;
	else if (hook == 2) {
		in = ifindex;
		out = dst_ifindex(v.refdst);
	} else if (hook == 3)
		out = dst_ifindex(v.refdst);
	else
		out = dev ? ifindex : dst_ifindex(v.refdst);
	nf_observe_dev(skb, &v, pf, hook, in, out, netns, PT_SLOT_EXIT, first, 0x7fffffff, 0, 0);
}

#define HOOK_DONE(NAME, FUNC, PF, HOOK)                                                         \
	SEC("fentry/" #FUNC)                                                                    \
	int BPF_PROG(NAME, struct net *net, struct sock *sk, struct sk_buff *skb)              \
	{                                                                                       \
		hook_done(skb, PF, HOOK, false);                                                \
		return 0;                                                                       \
	}
HOOK_DONE(fd_pre4, ip_rcv_finish, NFPROTO_IPV4, 0)
HOOK_DONE(fd_in4, ip_local_deliver_finish, NFPROTO_IPV4, 1)
HOOK_DONE(fd_fwd4, ip_forward_finish, NFPROTO_IPV4, 2)
HOOK_DONE(fd_post4, ip_finish_output, NFPROTO_IPV4, 4)
HOOK_DONE(fd_pre6, ip6_rcv_finish, NFPROTO_IPV6, 0)
HOOK_DONE(fd_in6, ip6_input_finish, NFPROTO_IPV6, 1)
HOOK_DONE(fd_fwd6, ip6_forward_finish, NFPROTO_IPV6, 2)
HOOK_DONE(fd_post6, ip6_finish_output, NFPROTO_IPV6, 4)

/* Where ip6_forward_finish cannot be traced (6.1: EBUSY), the output
 * function it hands the packet to: a received packet reaching ip6_output
 * without a LOCAL_OUT crossed FORWARD.  Attached only as that fallback. */
static __always_inline void fwd6_by_output(struct sk_buff *skb, bool core)
{
	struct pt_record *r = rec_lookup(skb);

	if (r && !(r->seen & PT_SEEN_OUTPUT))
		hook_done(skb, NFPROTO_IPV6, 2, core);
}

SEC("fentry/ip6_output")
int BPF_PROG(fd_fwd6_out, struct net *net, struct sock *sk, struct sk_buff *skb)
{
	fwd6_by_output(skb, false);
	return 0;
}

/* Where no hook function is registered, NF_HOOK calls the okfn directly,
 * and the compiler may inline that call (6.1: ip_rcv_finish): the input
 * route lookup, which every received packet without a route goes through
 * right after PREROUTING, says it crossed the hook then. */
SEC("fentry/ip_route_input_noref")
int BPF_PROG(fd_pre4_route, struct sk_buff *skb)
{
	hook_done(skb, NFPROTO_IPV4, 0, false);
	return 0;
}

SEC("fentry/ip6_route_input")
int BPF_PROG(fd_pre6_route, struct sk_buff *skb)
{
	hook_done(skb, NFPROTO_IPV6, 0, false);
	return 0;
}

/* LOCAL_OUT: __ip_local_out runs the hook and says 1 when it may go on. */
SEC("fexit/__ip_local_out")
int BPF_PROG(fd_out4, struct net *net, struct sock *sk, struct sk_buff *skb, int ret)
{
	if (ret == 1)
		hook_done(skb, NFPROTO_IPV4, 3, false);
	return 0;
}

SEC("fexit/__ip6_local_out")
int BPF_PROG(fd_out6, struct net *net, struct sock *sk, struct sk_buff *skb, int ret)
{
	if (ret == 1)
		hook_done(skb, NFPROTO_IPV6, 3, false);
	return 0;
}

/* Before 6.3 there is no sk_data_ready tracepoint: the function it sits in
 * (sock_def_readable, UDP's and TCP's data_ready) observed at entry. */
SEC("fentry/sock_def_readable")
int BPF_PROG(fe_sk_data_ready, struct sock *sk)
{
	data_ready(sk, false);
	return 0;
}

/* ---- kprobe backend: the fentry backend's observations where fentry is
 * refused (kernels without ftrace direct calls: arm64 before 6.4).  The same
 * bodies, with CO-RE reads: a kprobe's arguments are plain addresses.  A
 * return probe has no arguments: the entry keeps them, per task and
 * function, as a stack (a softirq that nests a hook in a task's hook runs
 * on that task; a task that is preempted keeps its own). */

#define PT_STASH_DEPTH 4
enum pt_stash_fn {
	STASH_HOOK = 1, STASH_CHAIN, STASH_IPT, STASH_IP6T, STASH_OUT4, STASH_OUT6,
};

struct pt_stash_key {
	__u64 task;
	__u32 fn;
	__u32 pad;
};

struct pt_stash {
	__u64 a[PT_STASH_DEPTH];
	__u64 b[PT_STASH_DEPTH];
	__s64 c[PT_STASH_DEPTH];
	__u32 depth;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct pt_stash_key);
	__type(value, struct pt_stash);
} kstash SEC(".maps");

static __always_inline void stash_push(__u32 fn, __u64 a, __u64 b, __s64 c)
{
	struct pt_stash_key k = { .task = bpf_get_current_task(), .fn = fn };
	struct pt_stash *st = bpf_map_lookup_elem(&kstash, &k);
	__u32 d;

	if (!st) {
		struct pt_stash z = {};

		bpf_map_update_elem(&kstash, &k, &z, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&kstash, &k);
		if (!st)
			return;
	}
	d = st->depth;
	if (d < PT_STASH_DEPTH) {
		st->a[d & (PT_STASH_DEPTH - 1)] = a;
		st->b[d & (PT_STASH_DEPTH - 1)] = b;
		st->c[d & (PT_STASH_DEPTH - 1)] = c;
	}
	/* counted past the depth too: the returns stay paired */
	st->depth = d + 1;
}

static __always_inline bool stash_pop(__u32 fn, __u64 *a, __u64 *b, __s64 *c)
{
	struct pt_stash_key k = { .task = bpf_get_current_task(), .fn = fn };
	struct pt_stash *st = bpf_map_lookup_elem(&kstash, &k);
	__u32 d;

	if (!st || !st->depth)
		return false;
	d = st->depth - 1;
	st->depth = d;
	if (d >= PT_STASH_DEPTH)
		return false;
	*a = st->a[d & (PT_STASH_DEPTH - 1)];
	*b = st->b[d & (PT_STASH_DEPTH - 1)];
	*c = st->c[d & (PT_STASH_DEPTH - 1)];
	return true;
}

SEC("kprobe/nf_hook_slow")
int BPF_KPROBE(kp_hook_entry, struct sk_buff *skb, struct nf_hook_state *state)
{
	stash_push(STASH_HOOK, (__u64)skb, (__u64)state, 0);
	if (!netns_traced(BPF_CORE_READ(state, net, ns.inum)))
		return 0;
	if (BPF_CORE_READ(state, hook) == NF_INET_LOCAL_OUT)
		rejected_forget(skb);
	nf_observe_at(skb, state, 0, true, 0, 0, 0, true);
	return 0;
}

SEC("kretprobe/nf_hook_slow")
int BPF_KRETPROBE(kr_hook_exit, int ret)
{
	__u64 skb, state;
	__s64 unused;

	if (!stash_pop(STASH_HOOK, &skb, &state, &unused))
		return 0;
	/* 1: every hook function accepted it (else it may be freed already) */
	if (ret == 1 && netns_traced(BPF_CORE_READ((struct nf_hook_state *)state, net, ns.inum)))
		nf_observe_at((struct sk_buff *)skb, (struct nf_hook_state *)state, PT_SLOT_EXIT, false,
			      0x7fffffff, 0, 0, true);
	return 0;
}

SEC("kprobe/nft_do_chain")
int BPF_KPROBE(kp_nft_chain, struct nft_pktinfo *pkt, void *priv)
{
	/* the priority and the table's handle, in one stash word */
	__u64 word = chain_word(priv);

	stash_push(STASH_CHAIN, (__u64)BPF_CORE_READ(pkt, skb), (__u64)BPF_CORE_READ(pkt, state), (__s64)word);
	chain_enter((__u64)BPF_CORE_READ(pkt, skb), word);
	return 0;
}

SEC("kretprobe/nft_do_chain")
int BPF_KRETPROBE(kr_nft_chain, unsigned int ret)
{
	__u64 skb, state;
	__s64 prio;

	if (stash_pop(STASH_CHAIN, &skb, &state, &prio))
		table_done((struct sk_buff *)skb, (struct nf_hook_state *)state, (__s32)(__u32)prio, ret,
			   (__u32)((__u64)prio >> 32), true);
	return 0;
}

#define KP_TABLE(ENTRY, EXIT, FUNC, FN)                                                         \
	SEC("kprobe/" #FUNC)                                                                    \
	int BPF_KPROBE(ENTRY, void *priv, struct sk_buff *skb, struct nf_hook_state *state)    \
	{                                                                                       \
		stash_push(FN, (__u64)skb, (__u64)state,                                        \
			   BPF_CORE_READ((struct xt_table *)priv, priority));                   \
		return 0;                                                                       \
	}                                                                                       \
	SEC("kretprobe/" #FUNC)                                                                 \
	int BPF_KRETPROBE(EXIT, unsigned int ret)                                               \
	{                                                                                       \
		__u64 skb, state;                                                               \
		__s64 prio;                                                                     \
                                                                                                \
		if (stash_pop(FN, &skb, &state, &prio))                                         \
			table_done((struct sk_buff *)skb, (struct nf_hook_state *)state, prio,  \
				   ret, 0, true);                                               \
		return 0;                                                                       \
	}
KP_TABLE(kp_ipt_table, kr_ipt_table, ipt_do_table, STASH_IPT)
KP_TABLE(kp_ip6t_table, kr_ip6t_table, ip6t_do_table, STASH_IP6T)

#define KHOOK_DONE(NAME, FUNC, PF, HOOK)                                                        \
	SEC("kprobe/" #FUNC)                                                                    \
	int BPF_KPROBE(NAME, struct net *net, struct sock *sk, struct sk_buff *skb)            \
	{                                                                                       \
		hook_done(skb, PF, HOOK, true);                                                 \
		return 0;                                                                       \
	}
KHOOK_DONE(kd_pre4, ip_rcv_finish, NFPROTO_IPV4, 0)
KHOOK_DONE(kd_in4, ip_local_deliver_finish, NFPROTO_IPV4, 1)
KHOOK_DONE(kd_fwd4, ip_forward_finish, NFPROTO_IPV4, 2)
KHOOK_DONE(kd_post4, ip_finish_output, NFPROTO_IPV4, 4)
KHOOK_DONE(kd_pre6, ip6_rcv_finish, NFPROTO_IPV6, 0)
KHOOK_DONE(kd_in6, ip6_input_finish, NFPROTO_IPV6, 1)
KHOOK_DONE(kd_fwd6, ip6_forward_finish, NFPROTO_IPV6, 2)
KHOOK_DONE(kd_post6, ip6_finish_output, NFPROTO_IPV6, 4)

SEC("kprobe/ip_route_input_noref")
int BPF_KPROBE(kd_pre4_route, struct sk_buff *skb)
{
	hook_done(skb, NFPROTO_IPV4, 0, true);
	return 0;
}

SEC("kprobe/ip6_route_input")
int BPF_KPROBE(kd_pre6_route, struct sk_buff *skb)
{
	hook_done(skb, NFPROTO_IPV6, 0, true);
	return 0;
}

SEC("kprobe/ip6_output")
int BPF_KPROBE(kd_fwd6_out, struct net *net, struct sock *sk, struct sk_buff *skb)
{
	fwd6_by_output(skb, true);
	return 0;
}

#define KP_LOCAL_OUT(ENTRY, EXIT, FUNC, FN, PF)                                                \
	SEC("kprobe/" #FUNC)                                                                    \
	int BPF_KPROBE(ENTRY, struct net *net, struct sock *sk, struct sk_buff *skb)           \
	{                                                                                       \
		stash_push(FN, (__u64)skb, 0, 0);                                               \
		return 0;                                                                       \
	}                                                                                       \
	SEC("kretprobe/" #FUNC)                                                                 \
	int BPF_KRETPROBE(EXIT, int ret)                                                        \
	{                                                                                       \
		__u64 skb, unused;                                                              \
		__s64 unused2;                                                                  \
                                                                                                \
		if (stash_pop(FN, &skb, &unused, &unused2) && ret == 1)                         \
			hook_done((struct sk_buff *)skb, PF, 3, true);                          \
		return 0;                                                                       \
	}
KP_LOCAL_OUT(kp_out4, kd_out4, __ip_local_out, STASH_OUT4, NFPROTO_IPV4)
KP_LOCAL_OUT(kp_out6, kd_out6, __ip6_local_out, STASH_OUT6, NFPROTO_IPV6)

SEC("kprobe/sock_def_readable")
int BPF_KPROBE(kp_data_ready, struct sock *sk)
{
	data_ready(sk, true);
	return 0;
}

SEC("tp_btf/napi_poll")
int BPF_PROG(on_napi_poll, struct napi_struct *napi, int work, int budget)
{
	struct pt_slots *m;

	pending_resolve(NULL);
	m = slots_of_cpu();
	if (!m)
		return 0;
	for (int i = 0; i < PT_SLOTS; i++)
		if (m->skb[i])
			slot_park(m, i);
	return 0;
}

/* ---- tc ---- */

static __always_inline void tc_observe(struct __sk_buff *ctx, __u8 kind)
{
	struct sk_buff *skb = bpf_cast_to_kern_ctx(ctx);
	/* read first, on the one path there is (see struct nf_ptrs) */
	const struct net_device *dev = skb->dev;
	bool ingress = kind == PT_STAGE_TC_INGRESS;
	struct pt_tc_last *t;
	struct pt_record *r;
	struct pt_stage *s;
	__u32 zero = 0;
	__u8 redirected;
	__u64 now;

	barrier_var(dev);
	if (ingress)
		pending_resolve(skb);
	if (is_rejected(skb)) {
		if (!ingress)
			return;
		/* received: a new packet in the skb of a rejected one freed
		 * without a tracepoint (a packet that left by a device forgot
		 * its rejection at net_dev_xmit); judged at first sight */
		rejected_forget(skb);
	}
	r = rec_lookup(skb);
	/* a packet without a record: the clock once it is wanted */
	now = r ? stage_time(r) : 0;
	if (r && (ingress ? r->seen & PT_SEEN_INPUT : r->flags & PT_REC_QUEUED)) {
		__u8 family = family_of_ethertype(ctx->protocol);
		__u32 netns = dev->nd_net.net->ns.inum;

		r = ingress ? decap_check(skb, r, skb_l3(skb), false, family, netns, ctx->ifindex, now) :
			      encap_check(skb, r, skb_l3(skb), family, netns, now);
		if (!r)
			return;
	}
	if (!r) {
		__u8 family = family_of_ethertype(ctx->protocol);
		__u32 netns = dev->nd_net.net->ns.inum;

		/* programs are attached to traced namespaces' devices only */
		if (!family)
			return;
		if (ingress) {
			/* (tc programs run with data at the MAC header) */
			r = rx_first_sight(skb, skb_l3(skb), false, family, netns, ctx->ifindex, &now, true);
		} else {
			struct pkt_info pi;

			/* a copy tc made of the packet it saw last (mirred to egress) */
			tc_copy_seen(skb, ctx->ifindex);
			if (parse_l3_by(skb_l3(skb), family, &pi, true) || !first_sight_wanted(skb, &pi, netns))
				return;
			now = bpf_ktime_get_ns();
			r = rec_new(skb, netns, &pi, now, 0);
		}
		if (!r)
			return;
	}
	redirected = ingress ? 0 : skb_redirected(skb);
	if (redirected)
		r->flags |= PT_REC_REDIRECTED;
	if (ingress && !r->in_ifindex)
		r->in_ifindex = ctx->ifindex;
	r->match |= match_stage(ctx->mark, ingress ? ctx->ifindex : 0, ingress ? 0 : ctx->ifindex);
	active_set(skb, r, now);
	s = stage_add(r, kind, now);
	if (s) {
		s->ifindex = ctx->ifindex;
		s->mark = ctx->mark;
		s->flags = redirected;
	}
	t = bpf_map_lookup_elem(&tc_last, &zero);
	if (t) {
		t->skb = (__u64)skb;
		t->head = (__u64)skb->head;
		t->id = r->id;
	}
	if (!ingress) {
		/* handed to the device: it ends when a driver takes it; a
		 * qdisc may queue it for later, maybe for another CPU */
		match_leaving(skb, r);
		r->out_ifindex = ctx->ifindex;
		r->flags |= PT_REC_QUEUED;
		r->seen |= PT_SEEN_LEFT;
		encap_handover(skb, r, dev);
		if (dev_has_qdisc(dev))
			rec_park(skb);
	}
}

SEC("tc")
int tc_ingress(struct __sk_buff *ctx)
{
	tc_observe(ctx, PT_STAGE_TC_INGRESS);
	return TCX_NEXT;
}

SEC("tc")
int tc_egress(struct __sk_buff *ctx)
{
	tc_observe(ctx, PT_STAGE_TC_EGRESS);
	return TCX_NEXT;
}

/* Test only (never attached; the session does not load it): the filter
 * expression's verdict on an Ethernet frame given to BPF_PROG_TEST_RUN, so
 * tests compare the kernel's interpreter with libpcap's on many packets. */
SEC("tc")
int pt_pcap_selftest(struct __sk_buff *ctx)
{
	struct pcap_run *s = pcap_run_of_cpu();
	__u64 len = ctx->len, n;   /* 64-bit: the verifier follows the bounds */

	if (!s || len <= 14)
		return 0;
	len -= 14;
	n = len < PT_PCAP_CAP ? len : PT_PCAP_CAP;
	barrier_var(n);
	if (n < 1 || n > PT_PCAP_CAP || bpf_skb_load_bytes(ctx, 14, s->buf, n))
		return 0;
	s->caplen = n;
	s->wirelen = len;
	return pt_pcap_exec();
}
