#!/usr/bin/env bash
# baselines.sh OUTDIR - data for the compression-ratio table: real QEMU 10.0
# streams and QEMU's own wire bytes, machine pc, 512 MiB guests (TCG).
#
# Needs harness/setup.sh to have run (same MIGSTREAM_LAB_DIR). Captures run one
# after the other; every one is attempted, the exit status is 1 if any failed.
# Each capture is bounded: lab.py's own limits (boot 600 s, migration 600 s)
# and an outer `timeout` of $BASELINES_TIMEOUT s (default 1500) per capture.
# Per-capture logs: OUTDIR/logs/NAME.log.
#
# What it writes into OUTDIR (every X.mig has an X.mig.json from lab.py):
#   heldout-{idle,dup,fill}.mig        plain precopy, no capabilities,
#                                      unthrottled, `lab.py capture-file`
#   catalog-{idle,dup,fill}-{1,2,3}.mig  the same from 3 other boots each (the
#                                      guest writes a random 64 KiB marker per
#                                      boot, so contents differ; idle guests
#                                      share their kernel/boot pages)
#   live-{idle,dup,fill}-MODE.mig.json live migration src -> lab relay -> dst,
#                                      unthrottled, `lab.py capture-live`. The
#                                      captured .mig (MAIN channel only) is
#                                      deleted once recorded unless
#                                      BASELINES_KEEP_LIVE=1; the bytes of ALL
#                                      connections are in the json
#                                      ("wire": src_to_dst, dst_to_src, total,
#                                      per connection in "connections"). MODE:
#       plain    no capabilities
#       xbzrle   xbzrle=on (default cache size)
#       multifd  multifd=on, multifd-compression=none (reference for the next two)
#       zstd     multifd=on, multifd-compression=zstd  (set on both ends;
#                default level, recorded in effective_params.*.multifd-zstd-level)
#       zlib     multifd=on, multifd-compression=zlib  (likewise, multifd-zlib-level)
#   summary.tsv   one line per capture: name workload mode kind ok bytes
#                 (file size; for live the wire src->dst over all connections)
#                 wire_dst_to_src connections main_src_to_dst total_time_ms
#                 downtime_ms ram_transferred level channels xbzrle_pages
#   table.md      workload x mode table built from the jsons
#
# Env: BASELINES_MEM (MiB, default 512), BASELINES_CATALOG (boots per workload,
# default 3), BASELINES_KEEP_LIVE=1 keeps the live main-channel .mig files
# (~1.6 GB more at 512 MiB), BASELINES_TIMEOUT (s/capture).
# Disk: ~3.2 GB at 512 MiB (heldout + catalog files), plus logs.
# The QEMU 7.2 TCG dirty-bitmap caveat (README) does not apply: 10.0 only.
set -uo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
mkdir -p "$OUT/logs"
MEM=${BASELINES_MEM:-512}
NCAT=${BASELINES_CATALOG:-3}
TMO=${BASELINES_TIMEOUT:-1500}
WORKLOADS=(idle dup fill)
COMMON=(--qemu 10 --machine pc -m "$MEM" --boot-timeout 600 --timeout 600 --check-timeout 120)
FAILED=()
T_ALL=$SECONDS

capture() {     # capture NAME file|live LAB-ARGS...
  local name=$1 kind=$2 t=$SECONDS; shift 2
  echo "+ lab.py capture-$kind -o $OUT/$name ${COMMON[*]} $*" >> "$OUT/commands.txt"
  if timeout -k 30 "$TMO" python3 "$HERE/lab.py" "capture-$kind" -o "$OUT/$name" "${COMMON[@]}" "$@" \
       >"$OUT/logs/$name.log" 2>&1; then
    printf '%-28s ok   %4ds %11d bytes in file\n' "$name" $((SECONDS - t)) "$(stat -c %s "$OUT/$name")"
    if [ "$kind" = live ] && [ "${BASELINES_KEEP_LIVE:-0}" != 1 ]; then
      rm -f "$OUT/$name"      # FILE.json keeps its size and the all-connection bytes
    fi
  else
    FAILED+=("$name")
    printf '%-28s FAIL %4ds (see logs/%s.log)\n' "$name" $((SECONDS - t)) "$name"
  fi
}

: > "$OUT/commands.txt"
for w in "${WORKLOADS[@]}"; do
  capture "heldout-$w.mig" file -w "$w"
  for i in $(seq 1 "$NCAT"); do
    capture "catalog-$w-$i.mig" file -w "$w"
  done
done

for w in "${WORKLOADS[@]}"; do
  capture "live-$w-plain.mig" live -w "$w"
  capture "live-$w-xbzrle.mig" live -w "$w" --cap xbzrle=on
  capture "live-$w-multifd.mig" live -w "$w" --cap multifd=on --param multifd-compression=none
  capture "live-$w-zstd.mig" live -w "$w" --cap multifd=on --param multifd-compression=zstd
  capture "live-$w-zlib.mig" live -w "$w" --cap multifd=on --param multifd-compression=zlib
done

python3 - "$OUT" "${WORKLOADS[@]}" <<'PY'
import glob, json, os, sys
out, wls = sys.argv[1], sys.argv[2:]
modes = ["plain", "xbzrle", "multifd", "zstd", "zlib"]
rows, by = [], {}
for p in sorted(glob.glob(os.path.join(out, "*.mig.json"))):
    m = json.load(open(p))
    name = m["file"][:-4]
    mode = name.rsplit("-", 1)[1] if m["kind"] == "live" else ("heldout" if name.startswith("heldout") else "catalog")
    mig, w = m["migration"], m.get("wire", {})
    ep = m.get("effective_params") or {}
    ep = ep.get("src", ep) if m["kind"] == "live" else ep
    ep = ep or {}
    comp = ep.get("multifd-compression") if m["caps"].get("multifd") else None
    level = ep.get("multifd-%s-level" % comp) if comp in ("zstd", "zlib") else ""
    r = dict(name=m["file"], workload=m["workload"], mode=mode, kind=m["kind"], ok=m.get("ok"),
             bytes=w.get("src_to_dst", m["size"]), wire_dst_to_src=w.get("dst_to_src", ""),
             connections=w.get("connections", ""), main_src_to_dst=w.get("main_src_to_dst", ""),
             total_time_ms=mig.get("total-time"), downtime_ms=mig.get("downtime"),
             ram_transferred=mig.get("ram-transferred"), level=level,
             channels=ep.get("multifd-channels", "") if m["caps"].get("multifd") else "",
             xbzrle_pages=mig.get("xbzrle-cache", {}).get("pages", ""))
    rows.append(r)
    by[(r["workload"], mode)] = r
cols = list(rows[0]) if rows else []
with open(os.path.join(out, "summary.tsv"), "w") as f:
    f.write("#" + "\t".join(cols) + "\n")
    for r in rows:
        f.write("\t".join(str(r[c]) for c in cols) + "\n")
def cell(w, mode):
    r = by.get((w, mode))
    if not r:
        return "FAILED"
    s = "%d (%.1f MiB)" % (r["bytes"], r["bytes"] / 2**20)
    if r["kind"] == "live":
        s += ", %d ms" % r["total_time_ms"]
    return s
hdr = ["workload", "heldout file bytes", "catalog file bytes (1/2/3)"] + ["live %s src->dst, total-time" % m for m in modes]
lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
for w in wls:
    cats = [r["bytes"] for r in rows if r["workload"] == w and r["mode"] == "catalog"]
    lines.append("| " + " | ".join([w, cell(w, "heldout"), "/".join(map(str, cats)) or "FAILED"]
                                   + [cell(w, m) for m in modes]) + " |")
with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY

echo "$(ls "$OUT"/*.mig.json 2>/dev/null | wc -l) captures in $OUT ($(du -sh "$OUT" | cut -f1)), $((SECONDS - T_ALL))s"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}" >&2
  exit 1
fi
