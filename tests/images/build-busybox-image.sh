#!/usr/bin/env bash
# Builds a busybox OCI image archive from Debian's busybox-static, with no
# registry: one uncompressed layer (busybox, its applet links, a minimal
# /etc, a setuid-root /bin/euid-suid, the host's iproute2 as /opt/iproute2/ip
# and iptables (nft and legacy), /bin/inotify-watch, /bin/code-reuse
# and the two programs it runs), an image config, a manifest and an index, packed as an OCI layout
# tarball that `ctr images import` accepts. Output is reproducible.
# With --pause, the image also holds a static /pause (pause.c beside this
# script) as its entrypoint: a pod sandbox image for CRI, with no registry.
#
#   build-busybox-image.sh [--pause] OUT_TAR [IMAGE_NAME]
set -euo pipefail

pause=
if [[ ${1:-} == --pause ]]; then
    pause=1
    shift
fi
out=$(realpath -m "${1:?usage: build-busybox-image.sh [--pause] OUT_TAR [IMAGE_NAME]}")
name=${2:-docker.io/husk/busybox:latest}
busybox=/bin/busybox

if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
    echo "build-busybox-image: $busybox is missing or not static; apt-get install busybox-static" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,root,run,var} "$work/oci/blobs/sha256"
chmod 1777 "$root/tmp"
install -m 0755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done
# A setuid-root program that prints its ids (euid.c beside this script).
gcc -static -Os -s -o "$root/bin/euid-suid" "$(dirname "$0")/euid.c"
# An inotify watcher that prints what it sees (inotify-watch.c beside this
# script; Debian's busybox has no inotifyd).
gcc -static -Os -s -o "$root/bin/inotify-watch" "$(dirname "$0")/inotify-watch.c"
# Two one-page programs that print their letter, and what runs them to see
# whether a program runs its own code after its page held another's
# (code-reuse.c, letter.c).
for l in a b; do
    gcc -static -nostdlib -O1 -fno-pie -no-pie -DLETTER="'$l'" -o "$root/bin/letter-$l" "$(dirname "$0")/letter.c"
done
gcc -static -O1 -s -o "$root/bin/code-reuse" "$(dirname "$0")/code-reuse.c"
chmod 4755 "$root/bin/euid-suid"
# Host programs with the libraries and loader they need, at their own
# paths: iproute2's `ip` at /opt/iproute2/ip (JSON output, every field, for
# the network comparisons; busybox's `ip` stays the image's `ip`), and
# Debian's iptables (nft and legacy, with their xtables extensions), as
# a service mesh's init container carries it.
host_program() { # path in the image, host binary
    install -D -m 0755 "$2" "$root$1"
    for lib in $(ldd "$2" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        [[ -e $root$lib ]] || install -D -m 0755 "$(realpath "$lib")" "$root$lib"
    done
}
host_program /opt/iproute2/ip "$(command -v ip)"
xt=/usr/lib/x86_64-linux-gnu/xtables
if [[ ! -d $xt ]]; then
    echo "build-busybox-image: $xt is missing; apt-get install iptables" >&2
    exit 1
fi
for multi in xtables-nft-multi xtables-legacy-multi; do
    host_program "/usr/sbin/$multi" "/usr/sbin/$multi"
done
for ext in "$xt"/*.so; do
    host_program "$ext" "$ext"
done
for t in iptables ip6tables; do
    for v in "" -save -restore; do
        ln -s xtables-nft-multi "$root/usr/sbin/$t$v"
        ln -s xtables-nft-multi "$root/usr/sbin/$t-nft$v"
        ln -s xtables-legacy-multi "$root/usr/sbin/$t-legacy$v"
    done
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
entrypoint=
if [[ -n $pause ]]; then
    gcc -static -Os -s -o "$root/pause" "$(dirname "$0")/pause.c"
    entrypoint='"Entrypoint":["/pause"],'
fi

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .

blob() { # file -> digest, moves it into the blob store
    local d
    d=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$work/oci/blobs/sha256/$d"
    echo "$d"
}
size() { stat -c %s "$work/oci/blobs/sha256/$1"; }

layer=$(blob "$work/layer.tar")
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{$entrypoint"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:$layer"]}}
JSON
config=$(blob "$work/config.json")
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$(size "$config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:$layer","size":$(size "$layer")}]}
JSON
manifest=$(blob "$work/manifest.json")
cat > "$work/oci/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$(size "$manifest"),"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"$name","org.opencontainers.image.ref.name":"${name##*:}"}}]}
JSON
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "build-busybox-image: $out ($name)"
