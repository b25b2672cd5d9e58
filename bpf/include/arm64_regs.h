/* Forced in front of pkttrace.bpf.c for ARCH=arm64 (bpf/Makefile).
 *
 * The vendored vmlinux.h is x86-64's.  Everything else the programs read is
 * relocated by CO-RE to the running kernel's layout, but the kprobe
 * programs read their arguments straight from the context, and for arm64
 * bpf_tracing.h casts it to `struct user_pt_regs`, which x86's BTF does not
 * have.  Its layout is uapi (arch/arm64/include/uapi/asm/ptrace.h) and is
 * the start of arm64's struct pt_regs: regs[0..7] are the arguments, regs[0]
 * the return value.  Declared after vmlinux.h's preserve_access_index
 * pragma ends, so these are plain offsets (a context access must not be
 * relocated). */
#ifndef PKTTRACE_ARM64_REGS_H
#define PKTTRACE_ARM64_REGS_H
#include "vmlinux.h"

#if defined(__TARGET_ARCH_arm64)
struct user_pt_regs {
	__u64 regs[31];
	__u64 sp;
	__u64 pc;
	__u64 pstate;
};
#endif
#endif
