#!/usr/bin/env bash
# Builds the husk guest kernel from Debian's linux-source-6.1 and the config
# fragment beside this script. The result is cached outside the repository,
# keyed by a hash of the source package version, the fragment and RECIPE, so
# a second build with the same inputs only copies three files. Bump RECIPE
# when a change to this script changes what it builds.
#
#   build-kernel.sh OUT_DIR        -> OUT_DIR/vmlinux (ELF, PVH entry), OUT_DIR/bzImage
#
# Environment: HUSK_CACHE (default /var/cache/husk), JOBS (default nproc).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build-kernel.sh OUT_DIR}")
cache=${HUSK_CACHE:-/var/cache/husk}
jobs=${JOBS:-$(nproc)}
src_tar=/usr/src/linux-source-6.1.tar.xz
fragment=$here/kernel.config
RECIPE=1

if [[ ! -f $src_tar ]]; then
    echo "build-kernel: $src_tar is missing; install it with: apt-get install linux-source-6.1" >&2
    exit 1
fi

src_version=$(dpkg-query -W -f '${Version}' linux-source-6.1)
key=$( { echo "recipe $RECIPE"; echo "$src_version"; cat "$fragment"; } | sha256sum | cut -c1-16)
dest=$cache/kernel/$key
mkdir -p "$out"

if [[ -f $dest/vmlinux && -f $dest/bzImage ]]; then
    echo "build-kernel: cached $dest (linux-source $src_version)"
else
    build=$cache/build-$key
    rm -rf "$build"
    mkdir -p "$build"
    trap 'rm -rf "$build"' EXIT
    echo "build-kernel: building linux-source $src_version with $jobs jobs in $build"
    tar -xf "$src_tar" -C "$build" --strip-components=1
    cd "$build"
    make -s allnoconfig
    scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
    make -s olddefconfig
    # Every line of the fragment must have survived Kconfig's dependency
    # resolution; a silently dropped option is a broken guest.
    missing=0
    while IFS= read -r line; do
        [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]] || continue
        name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
        if [[ $value == n ]]; then
            if grep -q "^$name=" .config; then echo "build-kernel: $name should be off" >&2; missing=1; fi
        elif ! grep -qx "$name=$value" .config; then
            echo "build-kernel: $name=$value did not take (got: $(grep "^$name=" .config || echo unset))" >&2
            missing=1
        fi
    done < "$fragment"
    [[ $missing == 0 ]] || exit 1
    make -s -j"$jobs" vmlinux bzImage
    mkdir -p "$dest.tmp"
    cp vmlinux "$dest.tmp/vmlinux"
    cp arch/x86/boot/bzImage "$dest.tmp/bzImage"
    cp .config "$dest.tmp/config"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    cd /
    echo "build-kernel: cached $dest"
fi

cp "$dest/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp "$dest/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
cp "$dest/config" "$out/kernel.config"
