#!/usr/bin/env python3
"""Capture every connection of a real multifd live migration, one file each.

  capture-multifd.py -o OUTDIR/NAME --channels N [--qemu V | --src-qemu V --dst-qemu V]
                     [--param multifd-compression=zstd] [--param zero-page-detection=legacy]
                     [vm options as lab.py capture-live]

Boots a destination QEMU (-incoming defer, multifd on, N channels) and a source QEMU,
migrates source -> relay on 127.0.0.1 -> destination, and saves what the source sent
on each connection: the main channel (starts with "QEVM") to NAME.main.mig, each
multifd channel (starts with 0x11223344) to NAME.chK.mfd, K the channel id of its
greeting. Then checks: migration completed, every connection drained and saved
whole, one main channel and exactly N multifd channels with ids 0..N-1, the
destination guest running with its data's checksum equal to the source's READY sum
and a clean kernel log. NAME.json holds the details (versions, machine, caps, params
as QEMU applied them, files, relay counts, checks). On failure nothing is left at
NAME.*: the partial files go to the run directory, whose path is printed.

Built on harness/migharness (VM, QMP, the relay, the checks), as lab.py is;
MIGSTREAM_LAB_DIR names the lab (default <repo>/target/qemu-lab). Only
processes started here are ever signalled, by PID; every wait is bounded.
"""
import argparse
import json
import os
import signal
import sys

from migharness import assets
from migharness.common import Fail
from migharness.multifd import capture_multifd
from migharness.session import run_in_rundir


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True, help="OUTDIR/NAME: files NAME.main.mig, NAME.chK.mfd, NAME.json")
    ap.add_argument("--channels", type=int, default=2, help="multifd-channels (default 2)")
    ap.add_argument("--qemu", choices=("7.2", "10"), default="10")
    ap.add_argument("--src-qemu", choices=("7.2", "10"), help="source QEMU (default --qemu)")
    ap.add_argument("--dst-qemu", choices=("7.2", "10"), help="destination QEMU (default --qemu)")
    ap.add_argument("--machine", default="pc", help="pc, q35, pc-i440fx-7.2, ...")
    ap.add_argument("-m", "--mem", type=int, default=128, help="guest RAM in MiB (default 128)")
    ap.add_argument("-w", "--workload", choices=("idle", "fill", "dup", "dirty"), default="idle")
    ap.add_argument("--data-mb", type=int, help="MiB of guest data (default mem/2; dirty mem/4; idle 0)")
    ap.add_argument("--dirty-mb", type=int, default=8)
    ap.add_argument("--dirty-chunk", type=int, default=256)
    ap.add_argument("--cap", action="append", metavar="NAME=on", help="another migration capability")
    ap.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="migration parameter, e.g. multifd-compression=zstd, zero-page-detection=legacy")
    ap.add_argument("--bandwidth", type=int, metavar="BYTES_PER_S", help="max-bandwidth (default unthrottled)")
    ap.add_argument("--timeout", type=float, default=300, help="migration time limit in s (default 300)")
    ap.add_argument("--boot-timeout", type=float, default=120)
    ap.add_argument("--check-timeout", type=float, default=60)
    ap.add_argument("--ram-tail-kib", type=int, default=0,
                    help="add K KiB to the RAM (8 for QEMU 7.2 sources, as lab.py explains)")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--keep-run", action="store_true", help="keep the run dir (logs) even on success")
    a = ap.parse_args()
    # what the checks read from lab.py's options
    a.min_dirty_syncs = a.min_xbzrle_pages = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # still runs the cleanup
    try:
        if not 1 <= a.channels <= 255:
            raise Fail("--channels %d: 1 to 255" % a.channels)
        assets.require({a.src_qemu or a.qemu, a.dst_qemu or a.src_qemu or a.qemu})
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
        return 1

    def body(rundir, vms):
        meta, ok = capture_multifd(a, rundir, vms)
        meta["ok"] = ok
        with open(os.path.abspath(a.out) + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        m = meta["migration"]
        print("%s %s qemu=%s machine=%s workload=%s channels=%d params=%s sum=%s/%s total-time=%sms files=%s" % (
            "OK" if ok else "FAILED", a.out, meta["src_qemu"] + "->" + meta["dst_qemu"], meta["machine_type"],
            a.workload, a.channels, json.dumps({k: v for k, v in meta["params"].items() if k != "max-bandwidth"}),
            meta["ready_sum"], meta["check_sum"], m.get("total-time"),
            " ".join("%s:%d" % (f["file"], f["bytes"]) for f in meta["files"])))
        return ok

    # never leave an unverified capture where a good one is expected
    return run_in_rundir("multifd", body, a.keep_run, (os.path.abspath(a.out) + ".json",), "capture")


if __name__ == "__main__":
    sys.exit(main())
