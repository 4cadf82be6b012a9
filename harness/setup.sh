#!/usr/bin/env bash
# setup.sh - install and unpack everything harness/lab.py needs (Debian 12, as root).
#
# Idempotent: a second run only checks. Everything it downloads or builds goes
# under $LAB = ${MIGSTREAM_LAB_DIR:-<repo>/target/qemu-lab}:
#   debs/                          downloaded .deb files
#   kernel/vmlinuz                 Debian cloud kernel (only vmlinuz is extracted; nothing goes to /boot)
#   qemu7.2/, qemu10/              root/ = dpkg -x of Debian's qemu-system-x86 (+ -common,
#                                  -data, seabios); bin/qemu-system-x86_64 = wrapper
#   guest/initramfs.cpio.gz        static busybox + guest-init.sh as /init
# System changes (root, only if missing): apt packages busybox-static cpio openssl
# python3 redis-server (the DHT tests' store nodes) zstd (versus-zstd.py's
# reference) and the shared libraries the two QEMUs link against; an apt source for
# bookworm-backports on the machine's own Debian mirror (QEMU 10.0 lives there).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB=${MIGSTREAM_LAB_DIR:-$(dirname "$HERE")/target/qemu-lab}
PKGS=(busybox-static cpio python3 redis-server openssl zstd)
KPKG=linux-image-cloud-amd64
BPO_LIST=/etc/apt/sources.list.d/migstream-bookworm-backports.list

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: ERROR: $*" >&2; exit 1; }
mkdir -p "$LAB"/{debs,kernel,guest,runs}
# apt-get download normally drops to the _apt user, which may not be able to
# write into $LAB (e.g. under /root); download as the caller instead.
APT_DL=(-o APT::Sandbox::User=root -qq)

UPDATED=0
apt_update() {      # at most once per run
  [ "$UPDATED" = 1 ] && return 0
  say "apt-get update"
  timeout 300 apt-get update -qq || die "apt-get update failed (or timed out)"
  UPDATED=1
}
is_root() { [ "$(id -u)" = 0 ]; }
# newest known version of package $1 matching the regex $2 (empty if none)
newest() { apt-cache madison "$1" 2>/dev/null | awk -F'|' -v re="$2" '{gsub(/ /, "", $2)} $2 ~ re {print $2}' | sort -uV | tail -1; }
candidate() { apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" {print $2}'; }
fetch() {           # fetch PKG VERSION -> prints the path of the .deb
  local f
  ( cd "$LAB/debs" && timeout 300 apt-get download "${APT_DL[@]}" "$1=$2" ) >&2 \
    || die "apt-get download $1=$2 failed (or timed out)"
  f=$(ls -1 "$LAB/debs/$1_${2/:/%3a}_"*.deb 2>/dev/null | head -1)
  [ -n "$f" ] || die "downloaded $1=$2 but its .deb is not in $LAB/debs"
  echo "$f"
}

# ---------------------------------------------------------------- apt sources
# Added before anything else so that a single apt-get update serves everything.
if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  is_root || die "bookworm-backports is not in the apt sources; run as root"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || die "cannot find the Debian mirror in /etc/apt/sources.list{,.d/debian.sources}"
  say "adding $BPO_LIST ($mirror bookworm-backports)"
  # backports has pin priority 100: nothing installed gets upgraded from it
  echo "deb $mirror bookworm-backports main" > "$BPO_LIST"
  apt_update
fi

# ---------------------------------------------------------------- packages
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || MISSING+=("$p")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  is_root || die "missing packages ${MISSING[*]}; run as root"
  [ -n "$(newest busybox-static .)" ] || apt_update     # never-updated machine
  say "apt-get install ${MISSING[*]}"
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends "${MISSING[@]}" \
    >/dev/null || die "apt-get install ${MISSING[*]} failed"
fi

# ---------------------------------------------------------------- kernel
if [ ! -s "$LAB/kernel/vmlinuz" ]; then
  # the candidate, i.e. bookworm's own kernel, not a newer one from backports
  kver=$(candidate "$KPKG")
  [ -n "$kver" ] || { apt_update; kver=$(candidate "$KPKG"); }
  [ -n "$kver" ] || die "no $KPKG in the apt sources"
  # the meta package only depends on the versioned image package, which has vmlinuz
  img=$(apt-cache show "$KPKG=$kver" | awk '/^Depends:/ {print $2; exit}')
  [[ "$img" == linux-image-[0-9]* ]] || die "cannot resolve $KPKG $kver to an image package (got '$img')"
  deb=$(fetch "$img" "$(candidate "$img")")
  tmp=$(mktemp -d "$LAB/kernel/x.XXXXXX")
  # only vmlinuz: the rest of the package is modules, which the guest does not use
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*' \
    || die "no vmlinuz in $deb"
  mv "$tmp"/boot/vmlinuz-* "$LAB/kernel/vmlinuz"
  echo "$img" > "$LAB/kernel/PACKAGE"
  rm -rf "$tmp"
fi
say "kernel: $LAB/kernel/vmlinuz ($(cat "$LAB/kernel/PACKAGE"))"

# ---------------------------------------------------------------- QEMU 7.2 and 10.0
# Both are Debian's own qemu-system-x86 builds, unpacked side by side with
# dpkg -x instead of installed: 10.0 cannot be co-installed with 7.2, and 7.2
# cannot be installed at all next to a backports qemu-utils 10 (it Breaks
# qemu-system-common << 8.0), which some images carry. Only the shared
# libraries they link against are installed, by apt-get satisfy on the
# packages' own Depends fields.
setup_qemu() {   # setup_qemu NAME VERSION-REGEX SEABIOS-VERSION
  local name=$1 re=$2 sver=$3 q=$LAB/qemu$1 p v deb deps missing
  if [ ! -s "$q/VERSION" ]; then
    [ -n "$(newest qemu-system-x86 "$re")" ] || apt_update
    rm -rf "$q"; mkdir -p "$q/root" "$q/bin"
    : > "$q/DEPENDS"; : > "$q/PACKAGES"
    for p in qemu-system-x86 qemu-system-common qemu-system-data seabios; do
      if [ "$p" = seabios ]; then v=$sver; else v=$(newest "$p" "$re"); fi
      [ -n "$v" ] || die "no $p matching /$re/ in the apt sources (bookworm-backports missing?)"
      deb=$(fetch "$p" "$v")
      dpkg -x "$deb" "$q/root"
      echo "$p=$v" >> "$q/PACKAGES"
      # ipxe option ROMs are never loaded (-nodefaults: no NIC)
      dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/^ *//' \
        | { grep -vE '^(qemu-system-|seabios|ipxe-qemu)' || true; } | grep . >> "$q/DEPENDS" || true
    done
    cat > "$q/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# $(head -1 "$q/PACKAGES"), unpacked by harness/setup.sh.
# -L: firmware (seabios, linuxboot_dma.bin, ...) from this copy rather than from
# the system-wide /usr/share/{seabios,qemu}; QEMU_MODULE_DIR: its own modules.
R="$q/root"
export QEMU_MODULE_DIR="\$R/usr/lib/x86_64-linux-gnu/qemu"
exec "\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/seabios" -L "\$R/usr/share/qemu" "\$@"
EOF
    chmod +x "$q/bin/qemu-system-x86_64"
    cp "$q/PACKAGES" "$q/VERSION"     # written last: marks a complete unpack
  fi
  deps=$(sort -u "$q/DEPENDS" | paste -sd, | sed 's/,/, /g')
  if apt-get satisfy -s "$deps" 2>/dev/null | grep -q '^Inst '; then
    is_root || die "QEMU $name needs libraries installed; run as root"
    say "QEMU $name: installing the libraries it needs (apt-get satisfy)"
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get satisfy -y -qq --no-install-recommends "$deps" \
      >/dev/null || die "apt-get satisfy for the QEMU $name libraries failed"
  fi
  missing=$(ldd "$q/root/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
  [ -z "$missing" ] || die "QEMU $name lacks libraries:
$missing"
  # a real start: machine pc under TCG, firmware found, QMP answers (-S: no guest code runs)
  timeout 30 "$q/bin/qemu-system-x86_64" -machine pc -accel tcg -nodefaults -display none \
    -no-user-config -S -qmp stdio <<<'{"execute":"qmp_capabilities"} {"execute":"quit"}' \
    >"$q/smoke.log" 2>&1 || die "QEMU $name smoke test failed: $(cat "$q/smoke.log")"
  say "QEMU $name: $q/bin/qemu-system-x86_64 ($("$q/bin/qemu-system-x86_64" --version | head -1))"
}
# 7.2 gets bookworm's seabios (the candidate: what a Debian 12 install runs);
# 10.0 the newest, from backports, which its package depends on (>> 1.16.3-1~)
setup_qemu 7.2 '^1:7\.2\+' "$(candidate seabios)"
setup_qemu 10 '^1:10\.0\.' "$(newest seabios .)"

# ---------------------------------------------------------------- guest initramfs
BB=/bin/busybox
INITRD=$LAB/guest/initramfs.cpio.gz
if [ ! -s "$INITRD" ] || [ "$HERE/guest-init.sh" -nt "$INITRD" ] || [ "$BB" -nt "$INITRD" ]; then
  { [ -x "$BB" ] && ! ldd "$BB" >/dev/null 2>&1; } || die "$BB is missing or not static (busybox-static)"
  stage=$(mktemp -d "$LAB/guest/stage.XXXXXX")
  mkdir -p "$stage"/{bin,dev,proc,sys,data}
  cp "$BB" "$stage/bin/busybox"
  install -m 0755 "$HERE/guest-init.sh" "$stage/init"
  # the kernel opens /dev/console for init before devtmpfs is mounted
  mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
  ( cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet ) \
    | gzip -9 > "$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
  rm -rf "$stage"
fi
say "initramfs: $INITRD ($(stat -c %s "$INITRD") bytes)"
say "done; MIGSTREAM_LAB_DIR=$LAB"
