// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The cost floor of a BPF program per attach kind pkttrace uses: programs
 * that do (next to) nothing.  Built and loaded by floor.py (CO-RE, same
 * flags as bpf/Makefile).  Section "netfilter" is unknown to libbpf 1.1:
 * floor.py sets the program type before load, as tracer/session.py does. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} floor_gate SEC(".maps");

/* empty: fires for every received skb, in every netns */
SEC("tp_btf/netif_receive_skb")
int BPF_PROG(floor_rx, struct sk_buff *skb)
{
	return 0;
}

/* "return at the first instruction after one load": one per-CPU array
 * lookup and a compare with an skb-less argument (the gate pkttrace's
 * on_napi_poll would pass when idle) */
SEC("tp_btf/napi_poll")
int BPF_PROG(floor_napi, struct napi_struct *napi, int work, int budget)
{
	__u32 k = 0;
	__u64 *v = bpf_map_lookup_elem(&floor_gate, &k);

	if (!v)
		return 0;
	return *v == (__u64)work;	/* tp_btf return values are ignored */
}

SEC("netfilter")
int floor_nf(struct bpf_nf_ctx *ctx)
{
	return 1;	/* NF_ACCEPT */
}

SEC("tc")
int floor_tcx(struct __sk_buff *ctx)
{
	return TCX_NEXT;
}
