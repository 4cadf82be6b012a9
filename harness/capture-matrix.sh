#!/usr/bin/env bash
# capture-matrix.sh OUTDIR - capture the reference set of real QEMU migration
# streams into OUTDIR and describe them in OUTDIR/manifest.tsv.
#
# Needs harness/setup.sh to have run (same MIGSTREAM_LAB_DIR). Captures run one
# after the other: they are TCG guests on a small box, and the live ones
# depend on timing (precopy iterations). Every capture is attempted; the exit
# status is non-zero if any of them failed. Per-capture logs: OUTDIR/logs/.
#
# manifest.tsv: a '#' header line, then one tab-separated line per stream:
#   file  qemu  machine  workload  kind  caps  machine_type  ram_bytes  bytes
# qemu is 7.2, 10 or SRC->DST; caps is comma-separated or '-'; machine_type is
# what the stream names (pc -> pc-i440fx-7.2 ...); ram_bytes is the guest RAM
# size; each FILE has a FILE.json with the full details.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
mkdir -p "$OUT/logs"
LAB=(python3 "$HERE/lab.py")
MANIFEST=$OUT/manifest.tsv
printf '#file\tqemu\tmachine\tworkload\tkind\tcaps\tmachine_type\tram_bytes\tbytes\n' > "$MANIFEST.tmp"
FAILED=()
T_ALL=$SECONDS

# live migrations whose source is QEMU 7.2 get 8 KiB more RAM: 7.2 under TCG
# otherwise loses guest writes during precopy (see README.md)
FIX72=(--ram-tail-kib 8)

capture() {     # capture NAME file|live LAB-ARGS...
  local name=$1 kind=$2 t=$SECONDS; shift 2
  if "${LAB[@]}" "capture-$kind" -o "$OUT/$name" "$@" >"$OUT/logs/$name.log" 2>&1; then
    python3 - "$OUT/$name.json" >> "$MANIFEST.tmp" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
q = m["qemu"] if m.get("dst_qemu", m["qemu"]) == m["qemu"] else "%s->%s" % (m["qemu"], m["dst_qemu"])
caps = ",".join(k for k, v in sorted(m["caps"].items()) if v) or "-"
print("\t".join(map(str, (m["file"], q, m["machine"], m["workload"], m["kind"], caps,
                          m["machine_type"], m["ram_bytes"], m["size"]))))
PY
    printf '%-44s ok   %4ds %11d bytes\n' "$name" $((SECONDS - t)) "$(stat -c %s "$OUT/$name")"
  else
    FAILED+=("$name")
    printf '%-44s FAIL %4ds (see logs/%s.log)\n' "$name" $((SECONDS - t)) "$name"
  fi
}

for q in 7.2 10; do
  for w in idle fill dup dirty; do
    capture "qemu$q-pc-$w-file.mig" file --qemu $q --machine pc -w $w
  done
  capture "qemu$q-q35-fill-file.mig" file --qemu $q --machine q35 -w fill
done
capture "qemu10-pc-i440fx-7.2-fill-file.mig" file --qemu 10 --machine pc-i440fx-7.2 -w fill

# xbzrle: a dirtying guest behind 16 MiB/s, so precopy needs several passes
# and re-dirtied pages go out as xbzrle deltas
for q in 7.2 10; do
  extra=(); [ $q = 7.2 ] && extra=("${FIX72[@]}")
  capture "qemu$q-pc-dirty-xbzrle-live.mig" live --qemu $q --machine pc -w dirty \
    --cap xbzrle=on --bandwidth $((16 << 20)) --min-dirty-syncs 4 --min-xbzrle-pages 1 "${extra[@]}"
done
# multifd: RAM goes over extra connections; the file is the main channel only
for q in 7.2 10; do
  extra=(); [ $q = 7.2 ] && extra=("${FIX72[@]}")
  capture "qemu$q-pc-fill-multifd-live.mig" live --qemu $q --machine pc -w fill --cap multifd=on "${extra[@]}"
done
capture "qemu7.2to10-pc-i440fx-7.2-fill-live.mig" live --src-qemu 7.2 --dst-qemu 10 \
  --machine pc-i440fx-7.2 -w fill "${FIX72[@]}"

# multifd: every connection of a live multifd migration, one file each, the guest
# checked on the destination (tests/multifd.rs round-trips every channel file)
mkdir -p "$OUT/multifd"
mcap() {
  local name=$1 t=$SECONDS
  shift
  if python3 "$HERE/capture-multifd.py" -o "$OUT/multifd/$name" "$@" >"$OUT/logs/multifd-$name.log" 2>&1; then
    printf '%-44s ok   %4ds\n' "multifd/$name" $((SECONDS - t))
  else
    FAILED+=("multifd/$name")
    printf '%-44s FAIL (see logs/multifd-%s.log)\n' "multifd/$name" "$name"
  fi
}
mcap qemu10-q35-idle-4ch --qemu 10 --machine q35 -w idle --channels 4
mcap qemu10-pc-idle-2ch-legacy --qemu 10 --machine pc -w idle --channels 2 --param zero-page-detection=legacy
mcap qemu10-pc-dup-2ch-zstd --qemu 10 --machine pc -w dup --channels 2 --param multifd-compression=zstd
mcap qemu7.2-pc-fill-2ch --qemu 7.2 --machine pc -w fill --channels 2 "${FIX72[@]}"
mcap qemu7.2-pc-dup-2ch-zstd --qemu 7.2 --machine pc -w dup --channels 2 "${FIX72[@]}" --param multifd-compression=zstd
mcap qemu7.2to10-pc-i440fx-7.2-idle-2ch --src-qemu 7.2 --dst-qemu 10 --machine pc-i440fx-7.2 -w idle --channels 2 "${FIX72[@]}"

mv "$MANIFEST.tmp" "$MANIFEST"
echo "$(( $(wc -l < "$MANIFEST") - 1 )) streams in $OUT, manifest $MANIFEST, $((SECONDS - T_ALL))s"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}" >&2
  exit 1
fi
