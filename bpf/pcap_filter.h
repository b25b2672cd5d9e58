/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The pcap-filter expression in the kernel: an interpreter of the classic
 * BPF program libpcap compiled (tracer/pcapfilter.py, cfg.pcap), run on the
 * first PT_PCAP_CAP bytes of the IP packet.
 *
 * Why an interpreter: libbpf 1.1 cannot splice instructions into the CO-RE
 * object before load, tail calls need programs of one type (ours are
 * tp_btf, netfilter, tc, fentry, kprobe), and freplace needs tracing
 * attachment, refused on some kernels.  One instruction per bpf_loop
 * iteration: the callback is verified once whatever the program, and
 * classic BPF jumps only forward, so a program of n instructions ends in at
 * most n iterations.
 *
 * Semantics are libpcap's bpf_filter (the reference the tests compare with):
 * a load past the captured bytes, or a division by zero, rejects; a shift by
 * 32 or more gives 0.  Included by pkttrace.bpf.c after `cfg`.
 */
#ifndef PCAP_FILTER_H
#define PCAP_FILTER_H

/* classic BPF opcodes (linux/filter.h, pcap/bpf.h); own names: vmlinux.h
 * may carry some of the kernel's */
#define PCB_CLASS(c) ((c) & 0x07)
#define PCB_LD 0x00
#define PCB_LDX 0x01
#define PCB_ST 0x02
#define PCB_STX 0x03
#define PCB_ALU 0x04
#define PCB_JMP 0x05
#define PCB_RET 0x06
#define PCB_MISC 0x07
#define PCB_SIZE(c) ((c) & 0x18)
#define PCB_W 0x00
#define PCB_H 0x08
#define PCB_B 0x10
#define PCB_MODE(c) ((c) & 0xe0)
#define PCB_IMM 0x00
#define PCB_ABS 0x20
#define PCB_IND 0x40
#define PCB_MEM 0x60
#define PCB_LEN 0x80
#define PCB_MSH 0xa0
#define PCB_OP(c) ((c) & 0xf0)
#define PCB_ADD 0x00
#define PCB_SUB 0x10
#define PCB_MUL 0x20
#define PCB_DIV 0x30
#define PCB_OR 0x40
#define PCB_AND 0x50
#define PCB_LSH 0x60
#define PCB_RSH 0x70
#define PCB_NEG 0x80
#define PCB_MOD 0x90
#define PCB_XOR 0xa0
#define PCB_JA 0x00
#define PCB_JEQ 0x10
#define PCB_JGT 0x20
#define PCB_JGE 0x30
#define PCB_JSET 0x40
#define PCB_X 0x08
#define PCB_RVAL(c) ((c) & 0x18)
#define PCB_RA 0x10
#define PCB_TXA 0x80
#define PCB_MEMWORDS 16

/* Per CPU: one run of the program (too big for the BPF stack, and the
 * bpf_loop callback reaches it without pointers passed through ctx). */
struct pcap_run {
	__u32 a;
	__u32 x;
	__u32 pc;
	__u32 ret;
	__u32 caplen;           /* bytes in buf */
	__u32 wirelen;          /* length of the IP packet (BPF_LEN) */
	__u32 mem[PCB_MEMWORDS];
	__u8 buf[PT_PCAP_CAP];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pcap_run);
} pcap_runs SEC(".maps");

static __always_inline struct pcap_run *pcap_run_of_cpu(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pcap_runs, &zero);
}

/* size bytes at off, big endian (network order, as classic BPF loads). */
static __always_inline int pcap_load(const struct pcap_run *s, __u64 off, __u32 size, __u32 *v)
{
	__u32 o;

	if (off + size > s->caplen || off > PT_PCAP_CAP - 4)
		return -1;
	o = off;
	barrier_var(o);
	if (o > PT_PCAP_CAP - 4)   /* again, on the register the verifier follows */
		return -1;
	if (size == 4)
		*v = (__u32)s->buf[o] << 24 | (__u32)s->buf[o + 1] << 16 | (__u32)s->buf[o + 2] << 8 |
		     s->buf[o + 3];
	else if (size == 2)
		*v = (__u32)s->buf[o] << 8 | s->buf[o + 1];
	else
		*v = s->buf[o];
	return 0;
}

static __always_inline __u32 pcap_size(__u16 code)
{
	return PCB_SIZE(code) == PCB_W ? 4 : PCB_SIZE(code) == PCB_H ? 2 : 1;
}

/* One instruction.  Returns 1 when the program has returned (s->ret). */
static long pcap_step(__u64 i, void *ctx)
{
	struct pcap_run *s = pcap_run_of_cpu();
	__u32 pc, k, v, src;
	__u16 code;
	__u8 jt, jf;
	bool cond;

	if (!s)
		return 1;
	pc = s->pc;
	if (pc >= PT_PCAP_MAX || pc >= cfg.pcap_len) {
		s->ret = 0;   /* ran off the end: libpcap never emits that */
		return 1;
	}
	code = cfg.pcap[pc].code;
	jt = cfg.pcap[pc].jt;
	jf = cfg.pcap[pc].jf;
	k = cfg.pcap[pc].k;
	s->pc = pc + 1;
	switch (PCB_CLASS(code)) {
	case PCB_LD:
	case PCB_LDX:
		switch (PCB_MODE(code)) {
		case PCB_IMM:
			v = k;
			break;
		case PCB_LEN:
			v = s->wirelen;
			break;
		case PCB_MEM:
			v = s->mem[k & (PCB_MEMWORDS - 1)];
			break;
		case PCB_ABS:
			if (pcap_load(s, k, pcap_size(code), &v))
				goto reject;
			break;
		case PCB_IND:
			if (pcap_load(s, (__u64)s->x + k, pcap_size(code), &v))
				goto reject;
			break;
		case PCB_MSH:   /* ldx 4*([k]&0xf): an IPv4 header length */
			if (pcap_load(s, k, 1, &v))
				goto reject;
			v = (v & 0xf) << 2;
			break;
		default:
			goto reject;
		}
		if (PCB_CLASS(code) == PCB_LD)
			s->a = v;
		else
			s->x = v;
		return 0;
	case PCB_ST:
		s->mem[k & (PCB_MEMWORDS - 1)] = s->a;
		return 0;
	case PCB_STX:
		s->mem[k & (PCB_MEMWORDS - 1)] = s->x;
		return 0;
	case PCB_ALU:
		src = (code & PCB_X) ? s->x : k;
		switch (PCB_OP(code)) {
		case PCB_ADD: s->a += src; break;
		case PCB_SUB: s->a -= src; break;
		case PCB_MUL: s->a *= src; break;
		case PCB_DIV:
			if (!src)
				goto reject;
			s->a /= src;
			break;
		case PCB_MOD:
			if (!src)
				goto reject;
			s->a %= src;
			break;
		case PCB_AND: s->a &= src; break;
		case PCB_OR: s->a |= src; break;
		case PCB_XOR: s->a ^= src; break;
		/* libpcap: a shift by 32 or more gives 0 (C leaves it undefined) */
		case PCB_LSH: s->a = src < 32 ? s->a << src : 0; break;
		case PCB_RSH: s->a = src < 32 ? s->a >> src : 0; break;
		case PCB_NEG: s->a = -s->a; break;
		default:
			goto reject;
		}
		return 0;
	case PCB_JMP:
		src = (code & PCB_X) ? s->x : k;
		switch (PCB_OP(code)) {
		case PCB_JA:
			s->pc = pc + 1 + k;   /* past the end: rejected at the next step */
			return 0;
		case PCB_JEQ: cond = s->a == src; break;
		case PCB_JGT: cond = s->a > src; break;
		case PCB_JGE: cond = s->a >= src; break;
		case PCB_JSET: cond = s->a & src; break;
		default:
			goto reject;
		}
		s->pc = pc + 1 + (cond ? jt : jf);
		return 0;
	case PCB_RET:
		s->ret = PCB_RVAL(code) == PCB_RA ? s->a : PCB_RVAL(code) == PCB_X ? s->x : k;
		return 1;
	case PCB_MISC:
		if (PCB_OP(code) == PCB_TXA)
			s->a = s->x;
		else
			s->x = s->a;
		return 0;
	}
reject:
	s->ret = 0;
	return 1;
}

/* Run the program on this CPU's pcap_run (buf, caplen, wirelen filled in).
 * Global: verified once, not at each of its callers. */
__noinline int pt_pcap_exec(void)
{
	struct pcap_run *s = pcap_run_of_cpu();

	if (!s)
		return 0;
	s->a = 0;
	s->x = 0;
	s->pc = 0;
	s->ret = 0;
	__builtin_memset(s->mem, 0, sizeof(s->mem));
	bpf_loop(PT_PCAP_MAX, pcap_step, NULL, 0);
	return s->ret != 0;
}

/* Does the expression match the IP packet at kernel address l3?  end: the
 * address where the skb's linear part ends (the rest of a paged skb is
 * elsewhere); len: the packet's length (BPF_LEN; 0: unknown, the linear
 * bytes).  Global, verified once: its callers are inlined in most programs,
 * and 6.1's verifier refuses fx_nft_chain (E2BIG) with it inlined there too.
 * So its arguments are plain numbers: callers read them with CO-RE. */
__noinline int pt_pcap_l3(__u64 l3, __u64 end, __u32 len)
{
	struct pcap_run *s = pcap_run_of_cpu();
	__u64 lin = end > l3 ? end - l3 : 0, n;

	if (!s || !l3)
		return 0;
	if (!len)
		len = lin > 0xffff ? 0xffff : lin;   /* a GSO packet over 64 KiB (BIG TCP) */
	n = len < lin ? len : lin;
	if (n > PT_PCAP_CAP)
		n = PT_PCAP_CAP;
	barrier_var(n);
	if (n > PT_PCAP_CAP)
		return 0;
	if (bpf_probe_read_kernel(s->buf, n, (const void *)l3))
		return 0;
	s->caplen = n;
	s->wirelen = len;
	return pt_pcap_exec();
}

#endif /* PCAP_FILTER_H */
