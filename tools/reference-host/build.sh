#!/usr/bin/env bash
# Build blimp's reference host: Debian's QEMU 7.2 with qemu-7.2-balloon-chunks.patch (the chunked
# inflate extension and MUST_TELL_HOST behind device properties) and qemu-7.2-balloon-quirks.patch
# (hosts as they were: QEMU < 7.0 used lengths, crosvm's fixed queue indices, also behind
# properties; host bugs on purpose for the conformance checks) and qemu-7.2-tcg-dirty-sync.patch
# (TCG live migration lost guest writes) applied, as a minimal qemu-system-x86_64. Prints the
# binary's path as its last line.
#
#   tools/reference-host/build.sh            build if the cache has no binary for this patch
#   tools/reference-host/build.sh --path     print the cached binary's path, or fail
#
# The binary is cached in $BLIMP_CACHE_DIR (default /var/cache/blimp), keyed by the hash of the
# patches, this script and the Debian source version, so a fresh clone on the same machine finds
# it again and only a change to one of them rebuilds. A build takes about 5 minutes on two idle
# cores (15 under load). The machine's apt sources are never edited: the deb-src entry is given
# to apt only for this command, through -o options and a private state directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
patch_file=$here/qemu-7.2-balloon-chunks.patch
quirks_file=$here/qemu-7.2-balloon-quirks.patch
# TCG: live migration lost guest writes (the dirty-bitmap sync fast path left TLB entries
# writable without logging); docs/hosts.md, "Reference host".
tcg_file=$here/qemu-7.2-tcg-dirty-sync.patch
cache_root=${BLIMP_CACHE_DIR:-/var/cache/blimp}
log() { echo "reference-host: $*" >&2; }

# The source matching the installed qemu-system-x86 when there is one (same fixes, same
# behaviour as the stock binary the rest of the suite uses), else whatever 7.2 apt offers.
source_version=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null || true)
case "$source_version" in 1:7.2*) ;; *) source_version="" ;; esac
key=$(cat "$patch_file" "$quirks_file" "$tcg_file" "$0" <(echo "$source_version") | sha256sum | cut -c1-16)
dest=$cache_root/qemu-7.2-ref-$key
binary=$dest/qemu-system-x86_64

if [ -x "$binary" ] && "$binary" --version >/dev/null 2>&1; then
    echo "$binary"
    exit 0
fi
if [ "${1:-}" = "--path" ]; then
    log "no reference host built for this patch yet (run tools/reference-host/build.sh)"
    exit 1
fi

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
deps=(dpkg-dev meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev
      flex bison python3 xz-utils patch)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    "${sudo[@]}" apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" >&2
fi

"${sudo[@]}" mkdir -p "$cache_root"
exec 9>"$cache_root/.qemu-ref.lock"
flock 9 # one build at a time; a second caller then finds the first one's binary
if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi

work=$(mktemp -d "$cache_root/build-XXXXXX")
trap 'rm -rf "$work"' EXIT
buildlog=$cache_root/qemu-7.2-ref-$key.log
log "building in $work (log: $buildlog)"

# apt, told about the Debian source archive for this command only.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
mkdir -p "$work/apt/lists/partial"
cat >"$work/apt/sources.list" <<EOF
deb-src http://deb.debian.org/debian $codename main
deb-src http://deb.debian.org/debian $codename-updates main
deb-src http://deb.debian.org/debian-security $codename-security main
EOF
apt_opts=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/apt/lists")
log "fetching Debian's QEMU source ${source_version:-(newest)}"
apt-get "${apt_opts[@]}" update -q >>"$buildlog" 2>&1
(cd "$work" && apt-get "${apt_opts[@]}" source -q "qemu${source_version:+=$source_version}" \
    >>"$buildlog" 2>&1)
src=$(find "$work" -maxdepth 1 -type d -name 'qemu-7.2*' | head -1)
[ -n "$src" ] || { log "apt-get source qemu gave no qemu-7.2 tree (see $buildlog)"; exit 1; }

log "patching $src"
(cd "$src" && patch -p1 --forward <"$patch_file" >>"$buildlog")
(cd "$src" && patch -p1 --forward <"$quirks_file" >>"$buildlog")
(cd "$src" && patch -p1 --forward <"$tcg_file" >>"$buildlog")
# Debian's source carries no edk2 blobs; do not try to unpack them.
sed -i 's/    unpack_edk2_blobs = bzip2.found()/    unpack_edk2_blobs = false/' "$src/meson.build"

log "configuring (x86_64-softmmu, optional features off)"
mkdir -p "$work/build"
(cd "$work/build" && "$src/configure" --target-list=x86_64-softmmu --without-default-features \
    --enable-tcg --enable-kvm --enable-fdt=system --disable-docs --disable-werror \
    --disable-user >>"$buildlog" 2>&1)
log "compiling ($(nproc) jobs; about 5-15 minutes)"
ninja -C "$work/build" -j "$(nproc)" qemu-system-x86_64 >>"$buildlog" 2>&1 ||
    { log "build failed; the end of $buildlog:"; tail -30 "$buildlog" >&2; exit 1; }

mkdir -p "$dest.tmp"
cp "$work/build/qemu-system-x86_64" "$dest.tmp/"
cp "$patch_file" "$quirks_file" "$tcg_file" "$dest.tmp/"
echo "$source_version" >"$dest.tmp/source-version"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
"$binary" --version | head -1 >&2
echo "$binary"
