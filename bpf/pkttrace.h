/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The one definition of everything the BPF programs share with user space:
 * the load-time config, the per-packet record, the stage kinds and the
 * counters.  Fixed-width types only, so the Python mirror (tracer/events.py)
 * is exact; tests/unit/test_btf_mirror.py checks that mirror against the
 * BTF of the built object, so a change here that is not made there fails CI.
 */
#ifndef PKTTRACE_H
#define PKTTRACE_H

#define PT_MAX_STAGES 32   /* stages kept per packet; more are counted, not kept */
#define PT_TUN_PORTS 8     /* struct pt_config.tun_ports */
#define PT_HEAD_LEN 96     /* header bytes a record can carry: IPv6 + TCP with 36 bytes of options */
#define PT_MAX_NETNS 1024  /* network namespaces traced at once */
#define PT_NS_SLOTS 4096   /* map traced_ns: slot = netns inode % PT_NS_SLOTS */
#define PT_SLOTS 4         /* records kept per CPU while their packet is processed there */
#define PT_MAX_ROUTE 16    /* route lookups buffered per CPU between two stages */
#define PT_NF_SLOTS 16     /* netfilter observer slots: two banks of eight, so */
#define PT_NF_BANK 8       /* observers can be re-placed while the old ones still
			      run; slot % PT_NF_BANK == 0 is the first observer of
			      its hook.  One program per bank (nf_obs_0, nf_obs_1)
			      is attached at every slot: it counts where it is */
#define PT_NF_POS 4        /* packets per CPU whose place in a hook is counted:
			      nested hook traversals (a reply generated inside
			      a hook) each keep their own */

/* What a stage is.  The numbers are part of the record format. */
enum pt_stage_kind {
	PT_STAGE_RX = 1,          /* net:netif_receive_skb in a traced netns */
	PT_STAGE_TC_INGRESS = 2,  /* TCX / cls_bpf ingress observer */
	PT_STAGE_PREROUTING = 3,  /* netfilter observers, by hook */
	PT_STAGE_INPUT = 4,
	PT_STAGE_FORWARD = 5,
	PT_STAGE_OUTPUT = 6,
	PT_STAGE_POSTROUTING = 7,
	PT_STAGE_ROUTE = 8,       /* fib lookup attributed to the packet */
	PT_STAGE_REROUTE = 9,     /* fib lookup inside LOCAL_OUT (mark/daddr changed) */
	PT_STAGE_TC_EGRESS = 10,
	PT_STAGE_TX = 11,         /* net:net_dev_queue: handed to the device */
	PT_STAGE_DELIVER = 12,    /* queued to a socket, read, or taken by the local stack */
	PT_STAGE_DROP = 13,       /* skb:kfree_skb */
	PT_STAGE_ADDR = 14,       /* struct pt_addr_stage: an address belonging to the
				     stage before it (NAT rewrite, route gateway) */
	PT_STAGE_QDISC = 15,      /* a device's qdisc (tracepoints qdisc:qdisc_enqueue /
				     qdisc_dequeue): slot = enum pt_qdisc_event, aux = the
				     root qdisc's handle, aux2 = queue length after the
				     enqueue (enqueue only: per packet, not in the path
				     signature), ifindex = the device */
};

/* struct pt_stage.slot of a PT_STAGE_QDISC stage */
enum pt_qdisc_event {
	PT_QDISC_ENQUEUED = 1,    /* the qdisc took it (ts: enqueue) */
	PT_QDISC_DEQUEUED = 2,    /* it left the qdisc for the driver (ts: dequeue) */
	PT_QDISC_REQUEUED = 3,    /* dequeued again: the driver was busy, the qdisc requeued it */
};

/* Count mode: queueing time of a qdisc, in buckets of powers of 4 from
 * 1 us (bucket i: up to 4^i us; the last one: more) */
#define PT_QDISC_BUCKETS 12
#define PT_QDISC_BULK 8   /* skbs of one bulk dequeue followed (skb->next) */

/* struct pt_stage.flags */
#define PT_STF_REDIRECTED 1       /* skb->redirected: tc (mirred, bpf_redirect) sent it here */
#define PT_STF_NF_DROP 2          /* fentry backend: the table observed here said drop */
#define PT_STF_NFT_TABLE 8        /* fentry/kprobe backends: aux is the nft table's handle */
#define PT_STF_HOOK_SLOW 16       /* drop: freed by nf_hook_slow (see pt_config.hook_slow_start) */
#define PT_STF_CHANGING 4         /* netfilter links: what is registered at this hook is not
				     what the observers were placed for (a ruleset change, or
				     pkttrace moving them): which table did what is unknown */

/* struct pt_stage.slot of a netfilter stage.  Netfilter links (nflink
 * backend): the observer slot 0..PT_NF_SLOTS-1, whose priority user space
 * knows.  fentry backend (kernels without netfilter links): the hook's
 * entry is slot 0; these two follow a table: */
#define PT_SLOT_TABLE 0xfe        /* after the table (nft base chain, x_tables
				     table) at priority aux2 */
#define PT_SLOT_EXIT 0xff         /* after every hook function of the hook */

/* struct pt_stage.aux2 of a tc stage: what the kernel did with the packet
 * after the tc programs and filters, when seen from outside tc (0: nothing
 * seen, user space infers ok / shot / redirect from the next stage) */
enum pt_tc_verdict {
	PT_TC_MIRROR = 1,         /* a copy went to aux (ifindex); the packet went on */
	PT_TC_REDIRECT = 2,       /* a copy went to aux and the packet itself ended */
};

/* struct pt_stage.ct: conntrack state when a netfilter observer saw it */
enum pt_ct {
	PT_CT_NONE = 0,           /* no conntrack entry (yet, or invalid) */
	PT_CT_NEW = 1,
	PT_CT_ESTABLISHED = 2,
	PT_CT_RELATED = 3,
	PT_CT_UNTRACKED = 4,      /* raw NOTRACK */
};
#define PT_CT_REPLY 0x80          /* or-ed in: packet of the reply direction */

/* struct pt_stage.ct of a route stage */
#define PT_ROUTE_SRC_CHECK 1      /* a lookup of the source (fib_validate_source) */

/* struct pt_addr_stage.what */
enum pt_addr_what {
	PT_ADDR_NAT_SRC = 1,      /* source address/port after NAT */
	PT_ADDR_NAT_DST = 2,      /* destination address/port after NAT */
	PT_ADDR_GW = 3,           /* gateway of the route lookup before it */
	PT_ADDR_NEXTHOP = 4,      /* what the kernel attached to the packet after the
				     lookups before it (skb dst): the nexthop chosen
				     (ECMP), its device and the route type */
};

/* How a record ended (struct pt_record.fate). */
enum pt_fate {
	PT_FATE_NONE = 0,         /* still in flight (never emitted like this) */
	PT_FATE_FORWARDED = 1,
	PT_FATE_DELIVERED = 2,
	PT_FATE_SENT = 3,
	PT_FATE_DROPPED = 4,
	PT_FATE_CONSUMED = 5,     /* consume_skb before any local delivery was seen */
	PT_FATE_REDIRECTED = 6,   /* left on a device tc redirected it to */
	PT_FATE_REASSEMBLED = 7,  /* an IP fragment absorbed by reassembly (pt_record.link) */
	PT_FATE_ENCAPSULATED = 8, /* became the payload of an outer packet (pt_record.encap) */
	PT_FATE_DECAPSULATED = 9, /* an outer packet whose payload went on (pt_record.inner) */
};

/* struct pt_record.seen: which hooks the packet crossed, for the fate */
#define PT_SEEN_INPUT   (1u << 0)
#define PT_SEEN_FORWARD (1u << 1)
#define PT_SEEN_OUTPUT  (1u << 2)
#define PT_SEEN_RX      (1u << 3)   /* received on a device (not generated here) */
#define PT_SEEN_LEFT    (1u << 4)   /* passed POSTROUTING or was handed to a device: seen
				       at LOCAL_OUT again, it is being encapsulated */
#define PT_SEEN_TUNNEL  (1u << 5)   /* taken by the local stack as a tunnel packet (UDP
				       without a socket, GRE, IPIP, ESP...): it ends when
				       its payload shows up decapsulated, or it is freed */
#define PT_SEEN_SHARED  (1u << 6)   /* its record was parked in the shared table: it may
				       go on later or on another CPU (stage_time) */

/* struct pt_record.ext_hdrs: the IPv6 extension headers walked to reach the
 * upper-layer protocol */
#define PT_EXT_HOP      (1u << 0)   /* hop-by-hop options */
#define PT_EXT_ROUTING  (1u << 1)
#define PT_EXT_FRAG     (1u << 2)
#define PT_EXT_DEST     (1u << 3)   /* destination options */
#define PT_EXT_AH       (1u << 4)   /* authentication header (walked: its length is known) */

/* Filter criteria.  A packet is shown when every active criterion matched at
 * some stage of its path (not necessarily the same stage): a mark set late
 * still shows the stages before it, and a NATed packet still matches the
 * address it had before translation. */
#define PT_F_MARK  (1u << 0)
#define PT_F_SRC   (1u << 1)
#define PT_F_DST   (1u << 2)
#define PT_F_PROTO (1u << 3)
#define PT_F_PORT  (1u << 4)
#define PT_F_IFACE (1u << 5)
#define PT_F_PCAP  (1u << 6)   /* the pcap-filter expression (struct pt_config.pcap) */

/* The pcap-filter expression: libpcap's classic BPF for DLT_RAW (offset 0 is
 * the IP header), run in the kernel by bpf/pcap_filter.h.  'tcp port 443 and
 * host 192.0.2.1' is 22 instructions, a dozen-term expression about 90. */
#define PT_PCAP_MAX 128    /* instructions; longer programs are refused */
#define PT_PCAP_CAP 256    /* bytes of the IP packet the expression sees; a
			      load past them (or past the packet) rejects */

/* Flags in struct pt_record.flags */
#define PT_REC_TRUNCATED (1u << 0)  /* more than PT_MAX_STAGES stages */
#define PT_REC_LATE      (1u << 1)  /* matched the filter only after NAT: earlier stages not kept */
#define PT_REC_QUEUED    (1u << 2)  /* handed to a device (net_dev_queue): ends when it leaves */
#define PT_REC_CAUSED    (1u << 3)  /* the kernel generated a packet in reply while processing it */
#define PT_REC_REDIRECTED (1u << 4) /* tc redirected it */
#define PT_REC_FRAG      (1u << 5)  /* an IP fragment (frag_id set) */
#define PT_REC_NAT_NS    (1u << 6)  /* first seen in a netns whose ruleset has NAT */
#define PT_REC_L4        (1u << 7)  /* its L4 header was read (tcp_flags, icmp_type/code hold) */

/* Per-CPU counters (array index).  Every packet that is not shown is counted
 * in exactly one of FILTERED, LOST, CREATE_FAILED or aged out (user space). */
enum pt_stat {
	PT_STAT_CREATED = 0,       /* records started */
	PT_STAT_EMITTED = 1,       /* records written to the ring buffer */
	PT_STAT_FILTERED = 2,      /* records ended without matching the filter */
	PT_STAT_LOST = 3,          /* ring buffer full: record lost */
	PT_STAT_CREATE_FAILED = 4, /* in-flight table full: packet not traced */
	PT_STAT_TRUNCATED = 5,     /* records that hit PT_MAX_STAGES */
	PT_STAT_ROUTE_DROPPED = 6, /* route lookups not kept (per-CPU buffer full) */
	PT_STAT_REJECTED = 7,      /* no record: the header filter failed at first sight */
	PT_STAT_LATE = 8,          /* rejected, then matched after NAT: record from there */
	PT_STAT_PATH_OVERFLOW = 9, /* count mode: path_counts full, packet not counted by path */
	PT_STAT_HANDOFF_LOST = 10, /* continuation in the next netns reserved, never claimed */
	PT_STAT_PARKED = 11,       /* records moved from a CPU's slots to the shared table */
	PT_STAT_DROP_OVERFLOW = 12,/* count mode: drop_totals full, a drop not in drops_total */
	PT_STAT_QDISC_OVERFLOW = 13,/* count mode: qdisc_hist full, a dequeue not counted */
	PT_STAT__MAX = 14,
};

/* One classic BPF instruction, as struct sock_filter / libpcap's bpf_insn. */
struct pt_sock_filter {
	__u16 code;
	__u8 jt;
	__u8 jf;
	__u32 k;
};

struct pt_config {
	__u32 filter;                  /* PT_F_* criteria that are active */
	__u32 mark_value;
	__u32 mark_mask;
	__u8 src_addr[16];             /* CIDR criteria; family 4 or 6 */
	__u8 src_mask[16];
	__u8 dst_addr[16];
	__u8 dst_mask[16];
	__u8 src_family;
	__u8 dst_family;
	__u8 proto;                    /* IPPROTO_* */
	__u8 emit;                     /* 1: write matching records to the ring buffer */
	/* filter has only header criteria (SRC/DST/PROTO/PORT): a packet can be
	 * judged at first sight and needs no record when it does not match,
	 * except in a namespace where NAT may rewrite it (map netns_nat) */
	__u8 early_reject;
	__u8 count;                    /* 1: count packets per path in the kernel (serve) */
	__u8 snap;                     /* 1: copy each record's first PT_HEAD_LEN bytes (pcap-ng, -w) */
	__u8 _pad1;
	__u16 port;                    /* host order; matches sport or dport */
	__u16 _pad0;
	__u32 _pad2;
	/* UDP ports tunnels listen on (0: unused): with a header-only filter, a
	 * packet to one of them is not judged at first sight, since its payload
	 * may match (VXLAN, GENEVE, WireGuard, ESP in UDP...) */
	__u16 tun_ports[PT_TUN_PORTS];
	/* nf_hook_slow's code (0, 0: unknown): a netfilter drop freed there is a
	 * hook function's NF_DROP (conntrack, NAT, x_tables), not an nft
	 * chain's, which frees its packet itself */
	__u64 hook_slow_start;
	__u64 hook_slow_end;
	__u32 pcap_len;                /* instructions in pcap (PT_F_PCAP) */
	__u32 _pad3;
	struct pt_sock_filter pcap[PT_PCAP_MAX];
};

struct pt_stage {
	__u64 ts;       /* bpf_ktime_get_ns() */
	__u32 ifindex;  /* device at this stage: out if known, else in */
	__u32 mark;     /* skb->mark when this stage saw the packet */
	__u32 aux;      /* route: table id; netfilter: in-ifindex; tc: 0 */
	__s32 aux2;     /* route: error (0 or -errno); tc: 0 */
	__u8 kind;      /* enum pt_stage_kind */
	__u8 slot;      /* netfilter: observer slot (user space knows its priority) */
	__u8 tos;       /* IPv4 TOS / IPv6 traffic class */
	__u8 family;    /* 4 or 6 */
	__u8 ct;        /* netfilter: enum pt_ct | PT_CT_REPLY; route: PT_ROUTE_* */
	__u8 flags;     /* PT_STF_* */
	__u8 _pad[2];
};

/* A stage of kind PT_STAGE_ADDR: same size, kind at the same offset. */
struct pt_addr_stage {
	__u8 addr[16];  /* NAT: new address; GW, NEXTHOP: gateway (zero: none) */
	__u16 port;     /* host order; NAT of TCP/UDP only */
	__u8 what;      /* enum pt_addr_what */
	__u8 rtype;     /* NEXTHOP: RTN_* of the route attached (0: unknown) */
	__u32 ifindex;  /* NEXTHOP: device the route sends it to */
	__u8 kind;      /* PT_STAGE_ADDR */
	__u8 slot;      /* NAT: the observer slot that saw the rewrite */
	__u8 _pad2;
	__u8 family;
	__u32 _pad3;
};

struct pt_record {
	__u64 id;                 /* unique per traversal: (per-CPU counter << 8) | cpu */
	__u64 first_ts;
	__u64 last_ts;
	__u64 drop_location;      /* kernel address for kfree_skb */
	/* Everything that decides how a path reads, contiguous: user space keys
	 * its cache of resolved paths by these 24 bytes (PT_SHAPE_OFF/LEN). */
	__u32 netns;              /* inode of the netns the packet was seen in */
	__u32 drop_reason;        /* enum skb_drop_reason value */
	__u32 in_ifindex;
	__u32 out_ifindex;
	__u32 path_sig;           /* hash of the stages' kind, slot, device, table and
				     outcome: equal for packets that took the same path */
	__u8 family;              /* 4 or 6 */
	__u8 proto;
	__u8 fate;                /* enum pt_fate */
	__u8 n_stages;
	/* per-packet values */
	__u8 match;               /* PT_F_* criteria matched so far */
	__u8 seen;                /* PT_SEEN_* */
	__u8 flags;               /* PT_REC_* */
	__u8 rel_ts;              /* 1: each stage's ts is ns after first_ts (pt_emit
				     writes them so: the reader need not subtract);
				     0: absolute, as in the in-flight map */
	__u16 sport;              /* host order */
	__u16 dport;
	__u8 saddr[16];           /* addresses and ports at first sight */
	__u8 daddr[16];
	__u32 pid;                /* process that read it (deliver) */
	char comm[16];
	__u16 cur_sport;          /* addresses and ports now: NAT is seen as a change */
	__u16 cur_dport;
	__u8 cur_saddr[16];
	__u8 cur_daddr[16];
	/* Links to other records (ids; 0: none).  The kernel decides them when
	 * the packet's record ends, so each record is emitted complete. */
	__u64 cause;              /* the packet being processed when the kernel made
				     this one (ICMP error, RST, echo reply) */
	__u64 prev;               /* this packet's record in the netns it came from */
	__u64 next;               /* ... in the netns it went on to (veth) */
	__u64 link;               /* REASSEMBLED: the packet it became */
	__u32 next_netns;         /* inode of the netns of `next` */
	__u32 prev_netns;         /* inode of the netns of `prev` */
	__u32 frag_id;            /* PT_REC_FRAG: IP id (v4) / fragment id (v6) */
	__u16 ns_index;           /* index of its netns (struct pt_ns_slot) */
	/* the header line's facts, at first sight (0: unknown, or another protocol) */
	__u16 len;                /* IP total length */
	__u8 tcp_flags;           /* TCP: the header's flag byte (FIN 0x01 ... CWR 0x80) */
	__u8 icmp_type;           /* ICMP / ICMPv6 */
	__u8 icmp_code;
	__u8 head_len;            /* bytes of head[] captured (cfg.snap; else 0) */
	__u32 _pad1;
	__u8 head[PT_HEAD_LEN];   /* the packet's first bytes from its IP header (-w) */
	/* Tunnels (ids; 0: none), appended (recording format 3): an
	 * encapsulated packet and the outer packet it travels in name each
	 * other, as do an outer packet and the payload it delivered. */
	__u64 encap;              /* encapsulated: the outer packet it became the payload of */
	__u64 decap;              /* decapsulated: the outer packet that carried it */
	__u64 inner;              /* an outer packet: the packet it carries */
	__u32 tun_ifindex;        /* the tunnel's device (0: none, as for an xfrm policy) */
	__u8 ext_hdrs;            /* PT_EXT_*: IPv6 extension headers walked */
	__u8 _pad3[3];
	struct pt_stage stages[PT_MAX_STAGES];
};

#define PT_SHAPE_OFF 32
#define PT_SHAPE_LEN 24

/* A route lookup waiting, per CPU, for the packet it belongs to: the one
 * whose addresses are the flow's (lookups carry no skb). */
struct pt_route_ev {
	__u64 ts;
	__u32 table;
	__s32 err;
	__u32 oif;        /* result device */
	__u32 mark;       /* flow mark used for the lookup */
	__u8 family;      /* 0: claimed */
	__u8 gw_family;   /* 4, 6 or 0: no gateway (directly connected) */
	__u8 weak;        /* made while a packet without a record was in flight
			     here: most likely nobody's, overwritten silently */
	__u8 _pad[5];
	__u8 gw[16];
	__u8 daddr[16];   /* destination looked up (the source, for a source check) */
	__u8 saddr[16];   /* source of the flow (zero: not chosen yet) */
};

/* Per CPU: the packet last seen at LOCAL_IN, until the local stack is done
 * with it.  The id guards against the skb pointer being reused meanwhile. */
struct pt_pending {
	__u64 skb;
	__u64 id;
};

/* struct pt_stage.aux2 of a DELIVER stage: how delivery was seen */
enum pt_deliver_how {
	PT_DELIVER_QUEUED = 1,    /* sk_data_ready: queued to a socket (aux = socket inode) */
	PT_DELIVER_READ = 2,      /* skb_copy_datagram_iovec: a process read it */
	PT_DELIVER_CONSUMED = 3,  /* consume_skb after INPUT (ICMP echo, ...) */
	PT_DELIVER_STACK = 4,     /* passed INPUT, then the next packet started: taken silently (TCP ACK) */
};

struct pt_route_buf {
	__u32 n;          /* lookups pushed since the buffer was last empty */
	__u32 live;       /* of those, not claimed yet */
	struct pt_route_ev ev[PT_MAX_ROUTE];
};

/* Runtime, per traced netns (map nat_slots): the observer slots that
 * follow a NAT table, per family (0: IPv4, 1: IPv6) and hook.  Only there
 * can a packet's addresses have changed since the observer before. */
/* Map traced_ns: the traced namespaces by inode number.  Netns inodes come
 * from one small dense allocator (proc inums), so inode % PT_NS_SLOTS
 * rarely collides; a slot taken by another traced netns sends the lookup
 * to the hash map traced_ns_more. */
struct pt_ns_slot {
	__u32 inum;
	__u32 index;             /* index + 1 (0: an empty slot) */
};

struct pt_nat_slots {
	__u16 after_nat[10];     /* [family * 5 + hook], family 0: IPv4, 1: IPv6 */
	__u8 observers[20];      /* [bank * 10 + family * 5 + hook]: observers attached */
	/* [family * 5 + hook]: the kernel's nf_hook_entries of the hook the
	 * observers were placed for (anything registered or unregistered there
	 * replaces it).  PT_HOOKS_LEARN: take the next one seen; PT_HOOKS_PLACING:
	 * pkttrace is moving its observers. */
	__u64 hooks[10];
	__u32 changed;           /* bit family * 5 + hook: seen replaced (user space re-reads) */
	/* bit bank * 10 + family * 5 + hook: no observer before the hook's
	 * first table (the stage before it says how the packet came in), so
	 * the bank's first observer there runs after a table */
	__u32 entryless;
};
#define PT_HOOKS_LEARN 0
#define PT_HOOKS_PLACING 1

/* Per CPU: where in a hook each packet being observed is.  Netfilter links
 * carry no cookie, so one program serves every slot of its bank and counts
 * its runs for one packet in one hook: the first observer of a hook comes
 * before every table, at the lowest priority. */
struct pt_nf_pos {
	__u64 skb[PT_NF_POS];
	__u32 where[PT_NF_POS];  /* netns inode ^ (bank, family, hook) */
	__u8 count[PT_NF_POS];   /* observers of the hook seen so far - 1 */
	__u8 next;               /* entry to take for a packet not listed */
	__u8 pad[3];
};

/* Per CPU: which packet (skb pointer, 0: free) each record slot holds.  A
 * packet is processed on one CPU from its first stage to its end unless it
 * is queued (a qdisc, the neighbour or reassembly queue, a socket backlog):
 * then its record is parked in the shared `inflight` table. */
struct pt_slots {
	__u64 skb[PT_SLOTS];
	__u64 arg;       /* the skb a global function (rec_park_arg, rec_forget_arg)
			    is for: the verifier takes no pointer as a scalar argument */
};

/* Per CPU: the packet whose processing this CPU is in (last stage seen), so
 * a packet the kernel generates meanwhile (ICMP error, RST) names its cause. */
struct pt_active {
	__u64 skb;
	__u64 id;
	__u64 ts;
};

/* A packet handed to a veth whose peer is in a traced netns: its record in
 * the next netns takes the reserved id (key: skb pointer). */
struct pt_handoff {
	__u64 prev;
	__u64 next;
	__u64 ts;
	__u32 prev_netns;
	__u32 tun_ifindex;        /* PT_HANDOFF_ENCAP: the tunnel device */
	__u8 how;                 /* enum pt_handoff_how */
	__u8 match;               /* PT_HANDOFF_ENCAP: the payload's PT_F_* matched */
	__u8 _pad[6];
};

/* struct pt_handoff.how: what the packet that takes the reserved id is */
enum pt_handoff_how {
	PT_HANDOFF_NETNS = 0,     /* the same packet in the next netns (veth) */
	PT_HANDOFF_ENCAP = 1,     /* the outer packet its payload is sent in later
				     (WireGuard encrypts in a worker) */
};

/* Fragments of one datagram (key) and the id of the packet they become. */
struct pt_frag_key {
	__u32 netns;
	__u32 frag_id;
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 family;
	__u8 proto;
	__u8 _pad[2];
};

/* Per CPU: the packet tc saw last, so a clone that tc sends elsewhere
 * (mirred) is known by its shared data. */
struct pt_tc_last {
	__u64 skb;
	__u64 head;
	__u64 id;
};

/* Count mode (pkttrace serve): packets per distinct path, no event per
 * packet.  The first record of each key is kept in path_examples, from
 * which user space derives every label (hooks, tables, routes, drops). */
struct pt_path_key {
	__u32 netns;
	__u32 path_sig;
	__u32 drop_reason;
	__u8 fate;
	__u8 family;
	__u8 proto;
	__u8 _pad;
};

/* Count mode: drops per netns, reason and family (map drop_totals), apart
 * from the paths: a drop is in drops_total even when path_counts is full. */
struct pt_drop_key {
	__u32 netns;
	__u32 reason;
	__u8 family;
	__u8 _pad[3];
};

/* Count mode: packets that left a qdisc, per netns, device, root qdisc and
 * bucket of queueing time (map qdisc_hist, per CPU). */
struct pt_qdisc_key {
	__u32 netns;
	__u32 ifindex;
	__u32 handle;
	__u32 bucket;             /* 0 .. PT_QDISC_BUCKETS - 1 */
};

struct pt_qdisc_val {
	__u64 packets;
	__u64 ns;                 /* their queueing time, summed */
};

#endif /* PKTTRACE_H */
