#!/usr/bin/env python3
"""Capture real QEMU live-migration streams (x86, TCG) for migstream's tests.

  lab.py capture-file -o FILE [vm options] [--cap N=on] [--param N=V]
      boot a guest, wait for READY, migrate it to "exec:cat > FILE".
  lab.py capture-live -o FILE [vm options] [--src-qemu V --dst-qemu V]
      live-migrate source -> relay on 127.0.0.1 -> destination (-incoming tcp:),
      save the main channel (the connection starting with "QEVM") to FILE, and
      verify: completed, destination running, guest checksum unchanged.
  lab.py migrate --proxy BIN [-o REPORT.json] [vm options] [--fault kill-dst-proxy|corrupt]
      the same live migration through `BIN source` and `BIN destination` (the
      dedup proxies, examples/proxy.rs), the same checks plus the proxies' own
      reports; with a fault, a first migration must fail cleanly and a retry
      to a new destination must succeed.

The capture commands write FILE.json (versions, machine, workload, caps, params, READY sum,
size, query-migrate summary). Needs harness/setup.sh to have run. Python 3
standard library only. Only processes started here are ever signalled, by PID.
"""
import argparse
import json
import signal
import sys

from migharness import assets
from migharness.capture import capture_file, capture_live
from migharness.common import Fail
from migharness.proxied import migrate_through_proxies
from migharness.session import run_in_rundir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("capture-file", capture_file), ("capture-live", capture_live),
                     ("migrate", migrate_through_proxies)):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        if name == "migrate":
            p.add_argument("-o", "--out", help="write the report (JSON) to this file")
        else:
            p.add_argument("-o", "--out", required=True, help="stream file to write (plus FILE.json)")
        p.add_argument("--qemu", choices=("7.2", "10"), default="7.2")
        p.add_argument("--machine", default="pc", help="pc, q35, pc-i440fx-7.2, pc-q35-7.2, ...")
        p.add_argument("-m", "--mem", type=int, default=128, help="guest RAM in MiB (default 128)")
        p.add_argument("-w", "--workload", choices=("idle", "fill", "dup", "dirty"), default="idle")
        p.add_argument("--data-mb", type=int, help="MiB of guest data (default mem/2; dirty mem/4; idle 0)")
        p.add_argument("--dirty-mb", type=int, default=8, help="dirty: MiB rewritten forever (default 8)")
        p.add_argument("--dirty-chunk", type=int, default=256,
                       help="dirty: bytes changed per 4 KiB page and pass (default 256; 4096 = whole page)")
        p.add_argument("--cap", action="append", metavar="NAME=on", help="migration capability (repeatable)")
        p.add_argument("--param", action="append", metavar="NAME=VALUE", help="migration parameter (repeatable)")
        p.add_argument("--bandwidth", type=int, metavar="BYTES_PER_S",
                       help="max-bandwidth (default: unthrottled, 1 TiB/s)")
        p.add_argument("--timeout", type=float, default=300, help="migration time limit in s (default 300)")
        p.add_argument("--boot-timeout", type=float, default=120)
        p.add_argument("--check-timeout", type=float, default=60)
        p.add_argument("--ram-tail-kib", type=int, default=0,
                       help="add K KiB to the RAM (8 avoids a QEMU 7.2 TCG dirty-tracking bug; see README)")
        p.add_argument("--accel", default="tcg", help="-accel value (default tcg)")
        p.add_argument("--keep-run", action="store_true", help="keep the run dir (logs) even on success")
        if name in ("capture-live", "migrate"):
            p.add_argument("--src-qemu", choices=("7.2", "10"), help="source QEMU (default --qemu)")
            p.add_argument("--dst-qemu", choices=("7.2", "10"), help="destination QEMU (default --qemu)")
            p.add_argument("--min-dirty-syncs", type=int, default=0,
                           help="fail unless query-migrate's dirty-sync-count reaches N")
            p.add_argument("--min-xbzrle-pages", type=int, default=0,
                           help="fail unless at least N pages were sent xbzrle-encoded")
        if name == "migrate":
            p.add_argument("--proxy", required=True, help="the proxy binary (target/release/examples/proxy)")
            p.add_argument("--src-proxy-arg", action="append", default=[], metavar="ARG",
                           help="extra argument(s) for the source proxy, split like a shell "
                                "(repeatable; write --src-proxy-arg='--catalog FILE' or --src-proxy-arg=--once)")
            p.add_argument("--dst-proxy-arg", action="append", default=[], metavar="ARG",
                           help="the same for the destination proxy")
            p.add_argument("--plaintext", action="store_true",
                           help="run the proxies' link without TLS (default: mutual TLS with a throwaway "
                                "CA made in the run dir)")
            p.add_argument("--qemu-unix", action="store_true",
                           help="Unix sockets between each QEMU and its proxy: migrate unix:RUNDIR/src.sock, "
                                "-incoming unix:RUNDIR/dst.sock")
            p.add_argument("--fault", choices=("none", "kill-dst-proxy", "corrupt", "template-store"),
                           default="none",
                           help="fail a first migration, then retry with a new destination QEMU (see README); "
                                "template-store: the caller damaged a template in the destination's store")
            p.add_argument("--kill-after", type=int, default=8 << 20, metavar="BYTES",
                           help="kill-dst-proxy: once the source QEMU has sent this much RAM (default 8 MiB)")
            p.add_argument("--corrupt-offset", type=int, default=1 << 20, metavar="BYTES",
                           help="corrupt: flip the byte at this offset of the dedup stream (default 1 MiB)")
            p.add_argument("--fault-connection", type=int, default=0, metavar="N",
                           help="corrupt: the link connection to corrupt, in the order the proxies open them "
                                "(default 0, the first: the main channel's; with multifd 1.. are the channels')")
            p.add_argument("--fault-bandwidth", type=int, default=32 << 20, metavar="BYTES_PER_S",
                           help="max-bandwidth of the faulty first attempt (default 32 MiB/s)")
            p.add_argument("--min-proxy-pages", action="append", metavar="KIND=N",
                           help="fail unless the source proxy reports at least N pages of KIND (raw, fill, "
                                "seen, template, xbzrle; repeatable)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # still runs the finally below
    try:
        assets.require({a.qemu, getattr(a, "src_qemu", None) or a.qemu, getattr(a, "dst_qemu", None) or a.qemu})
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
        return 1

    def body(rundir, vms):
        out, meta, ok = a.fn(a, rundir, vms)
        meta["ok"] = ok
        m = meta["migration"]
        if a.cmd == "migrate":
            meta["run_dir"] = None if ok and not a.keep_run else rundir
            if out:
                with open(out, "w") as f:
                    json.dump(meta, f, indent=1)
            print("%s migrate qemu=%s machine=%s workload=%s caps=%s link=%s qemu-side=%s fault=%s sum=%s/%s "
                  "qemu_bytes=%s wire_bytes=%s ratio=%s pages=%s xbzrle-pages=%s total-time=%sms" % (
                      "OK" if ok else "FAILED", meta["src_qemu"] + "->" + meta["dst_qemu"], meta["machine_type"],
                      a.workload, ",".join(k for k, v in meta["caps"].items() if v) or "-",
                      "plaintext" if a.plaintext else "tls", meta["qemu_side"], a.fault,
                      meta["ready_sum"], meta["check_sum"], meta["qemu_bytes"], meta["wire_bytes"], meta["ratio"],
                      json.dumps(meta["pages"], separators=(",", ":")), m.get("xbzrle-cache", {}).get("pages", "-"),
                      m.get("total-time")))
            return ok
        with open(out + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        print("%s %s %d bytes qemu=%s machine=%s workload=%s caps=%s sum=%s dirty-sync-count=%s "
              "xbzrle-pages=%s total-time=%sms" % ("OK" if ok else "FAILED", out, meta["size"],
              meta.get("src_qemu", a.qemu) + ("->" + meta["dst_qemu"] if meta.get("dst_qemu", a.qemu) != a.qemu else ""),
              meta["machine_type"], a.workload, ",".join(k for k, v in meta["caps"].items() if v) or "-",
              meta["ready_sum"], m.get("ram-dirty-sync-count"), m.get("xbzrle-cache", {}).get("pages", "-"),
              m.get("total-time")))
        return ok

    # never leave a partial or unverified stream where a good one is expected
    unverified = () if a.cmd == "migrate" else (a.out, a.out + ".json", a.out + ".part")
    return run_in_rundir(a.cmd, body, a.keep_run, unverified)


if __name__ == "__main__":
    sys.exit(main())
