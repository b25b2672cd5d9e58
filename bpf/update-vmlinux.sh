#!/bin/sh
# Regenerate the vendored vmlinux.h from the running kernel's BTF.
# CO-RE relocations make the object portable across kernels, so this only needs
# re-running to pick up types that did not exist when it was last generated.
set -eu
here=$(dirname "$0")
btf=${1:-/sys/kernel/btf/vmlinux}
[ -r "$btf" ] || { echo "no BTF at $btf (kernel built without CONFIG_DEBUG_INFO_BTF?)" >&2; exit 1; }
bpftool btf dump file "$btf" format c > "$here/include/vmlinux.h.tmp"
mv "$here/include/vmlinux.h.tmp" "$here/include/vmlinux.h"
echo "wrote $here/include/vmlinux.h from $btf ($(uname -r))"
