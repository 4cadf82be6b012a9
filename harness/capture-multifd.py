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

Reuses harness/lab.py (VM, QMP, the relay, the checks) by import and changes nothing
in it; MIGSTREAM_LAB_DIR names the lab (default <repo>/target/qemu-lab). Only
processes started here are ever signalled, by PID; every wait is bounded.
"""
import argparse
import glob
import json
import os
import shutil
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402

MULTIFD_MAGIC = bytes.fromhex("11223344")


class SplitRelay(lab.Relay):
    """lab.Relay (accept, forward both ways, totals, finish) whose source->destination
    bytes of EVERY connection go to a file of their own, `<prefix>.conn<index>`;
    `kind` is set from the first 4 bytes: main, multifd or other. Overrides
    lab.Relay._pump, which lab.Relay._accept calls as _pump(src, dst, info, forward)."""

    def __init__(self, dst_port, prefix):
        self.prefix = prefix
        super().__init__(dst_port, None)

    def conn_file(self, index):
        return "%s.conn%d" % (self.prefix, index)

    def _pump(self, a, b, info, forward):
        out, head = None, b""
        try:
            if forward:
                out = open(self.conn_file(info["index"]), "wb")
            while True:
                data = a.recv(1 << 20)
                if not data:
                    break
                if out:
                    out.write(data)
                    if info["kind"] is None:
                        head += data[:4]
                        if len(head) >= 4:
                            info["kind"] = {lab.QEVM: "main", MULTIFD_MAGIC: "multifd"}.get(head[:4], "other")
                b.sendall(data)
                info["src_to_dst" if forward else "dst_to_src"] += len(data)
            if forward:
                info["eof"] = True
                info["closed_s"] = round(time.monotonic() - self.t0, 3)
        except OSError as e:
            if not self.stopping:
                self.errors.append("connection %d %s: %s" % (info["index"], "src->dst" if forward else "dst->src", e))
        finally:
            if out:
                out.close()
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def name_files(relay, prefix, checks):
    """Renames each connection's file after what it carries; returns the file list."""
    files, ids = [], []
    for c in relay.conns:
        part = relay.conn_file(c["index"])
        size = os.path.getsize(part) if os.path.exists(part) else 0
        with open(part, "rb") as f:
            head = f.read(25)
        entry = {"connection": c["index"], "kind": c["kind"], "bytes": size,
                 "complete": bool(c["eof"]) and size == c["src_to_dst"]}
        if c["kind"] == "main":
            path = prefix + ".main.mig"
        elif c["kind"] == "multifd" and len(head) == 25:
            entry["channel_id"] = head[24]
            ids.append(head[24])
            path = "%s.ch%d.mfd" % (prefix, head[24])
        else:
            path = "%s.other%d.bin" % (prefix, c["index"])
        if os.path.exists(path):
            checks["channel_ids_distinct"] = False
            path += ".dup%d" % c["index"]
        os.rename(part, path)
        entry["file"] = os.path.basename(path)
        files.append(entry)
    return files, sorted(ids)


def run(a, rundir, vms):
    prefix = os.path.abspath(a.out)
    for pattern in (".json", ".main.mig", ".ch*.mfd"):
        for old in glob.glob(glob.escape(prefix) + pattern):
            raise lab.Fail("%s exists: remove the old capture first" % old)
    caps, params = lab.parse_caps(a), lab.parse_params(a)
    caps["multifd"] = True
    params["multifd-channels"] = a.channels
    a.qemu = a.src_qemu or a.qemu
    dst_ver = a.dst_qemu or a.qemu
    dst, port = lab.start_destination(a, rundir, vms, "dst", dst_ver, caps, params)
    src, ready = lab.start_source(a, rundir, vms, caps, params)
    eff = {"src": lab.effective_params(src), "dst": lab.effective_params(dst)}
    relay = SplitRelay(port, os.path.join(rundir, "capture"))
    vms.append(relay)
    lab.log("relay 127.0.0.1:%d -> destination 127.0.0.1:%d, every connection saved" % (relay.port, port))
    info = lab.migrate(src, "tcp:127.0.0.1:%d" % relay.port, a.timeout)
    drained = relay.finish(60)

    checks = {"relay_drained": drained, "relay_no_errors": not relay.errors}
    files, ids = name_files(relay, os.path.join(rundir, os.path.basename(prefix)), checks)
    checks["one_main_channel"] = sum(1 for f in files if f["kind"] == "main") == 1
    checks["no_other_connections"] = all(f["kind"] in ("main", "multifd") for f in files)
    checks["multifd_channel_ids"] = ids == list(range(a.channels))
    checks["captures_complete"] = all(f["complete"] and f["bytes"] > 0 for f in files)
    after = lab.check_arrival(a, src, dst, info, ready, checks)
    checks.setdefault("channel_ids_distinct", True)
    meta = lab.base_meta(a, src, prefix, "multifd-live", caps, params, ready)
    del meta["file"]
    meta.update(name=os.path.basename(prefix), channels=a.channels, files=files, src_qemu=a.qemu,
                dst_qemu=dst_ver, dst_qemu_version=dst.version, check_sum=after,
                migration=lab.summary(info), connections=relay.conns, relay_errors=relay.errors,
                checks=checks, wire=relay.totals(), effective_params=eff)
    ok = lab.report_failed(a, checks, relay.errors or info.get("error-desc", ""))
    if ok:
        for f in files:
            os.rename(os.path.join(rundir, f["file"]), os.path.join(os.path.dirname(prefix), f["file"]))
    else:
        meta["run_dir"] = rundir
    return meta, ok


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
    # what lab.py's helpers read from its own options
    a.min_dirty_syncs = a.min_xbzrle_pages = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # still runs the finally below
    try:
        if not 1 <= a.channels <= 255:
            raise lab.Fail("--channels %d: 1 to 255" % a.channels)
        for v in {a.src_qemu or a.qemu, a.dst_qemu or a.src_qemu or a.qemu}:
            lab.qemu_binary(v)
    except lab.Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
        return 1
    rundir = lab.make_rundir("multifd")
    vms, ok, meta = [], False, None
    try:
        meta, ok = run(a, rundir, vms)
        meta["ok"] = ok
        with open(os.path.abspath(a.out) + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        m = meta["migration"]
        print("%s %s qemu=%s machine=%s workload=%s channels=%d params=%s sum=%s/%s total-time=%sms files=%s" % (
            "OK" if ok else "FAILED", a.out, meta["src_qemu"] + "->" + meta["dst_qemu"], meta["machine_type"],
            a.workload, a.channels, json.dumps({k: v for k, v in meta["params"].items() if k != "max-bandwidth"}),
            meta["ready_sum"], meta["check_sum"], m.get("total-time"),
            " ".join("%s:%d" % (f["file"], f["bytes"]) for f in meta["files"])))
    except lab.Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
    finally:
        for vm in reversed(vms):
            vm.stop()
        if not ok:      # never leave an unverified capture where a good one is expected
            json_path = os.path.abspath(a.out) + ".json"
            if os.path.exists(json_path):
                shutil.move(json_path, os.path.join(rundir, os.path.basename(json_path)))
        if ok and not a.keep_run:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            print("run dir (logs%s): %s" % ("" if ok else ", failed capture", rundir), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
