#!/usr/bin/env bash
# Packs the guest initramfs: the statically linked husk-agent as /init and
# the device nodes needed before /dev is mounted: /dev/console for the
# kernel to hand /init its stdio, /dev/kmsg for the agent's boot timing.
# Uncompressed: the kernel copies it in faster than it could inflate it.
#
#   build-initramfs.sh AGENT_BINARY OUT_FILE
set -euo pipefail

agent=${1:?usage: build-initramfs.sh AGENT_BINARY OUT_FILE}
out=${2:?usage: build-initramfs.sh AGENT_BINARY OUT_FILE}

if ! file -L "$agent" 2>/dev/null | grep -q 'statically linked\|static-pie linked'; then
    echo "build-initramfs: $agent is not a static executable (build it with crt-static)" >&2
    exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/dev" "$stage/proc" "$stage/sys" "$stage/run" "$stage/tmp"
install -m 0755 "$agent" "$stage/init"
mknod -m 0600 "$stage/dev/console" c 5 1
mknod -m 0644 "$stage/dev/kmsg" c 1 11
# Fixed timestamps and owners: the same agent gives the same archive.
find "$stage" -exec touch -h -d @0 {} +
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$out.tmp"
mv "$out.tmp" "$out"
echo "build-initramfs: $out ($(stat -c %s "$out") bytes)"
