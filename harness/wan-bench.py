#!/usr/bin/env python3
"""WAN benchmark: live migration of the lab's QEMU guests over an emulated WAN
link, QEMU alone against QEMU through the migstream proxies.

  wan-bench.py linktest [--links L]        check the emulated links (RTT, rate)
                                           and the delay relay's own ceiling
  wan-bench.py run [--links L] [--guests G] [--configs C] [--mem MiB] [--out DIR]
                                           the matrix, one migration at a time
  wan-bench.py report [--out DIR]          results.tsv, table.md and the PNG
                                           from DIR/results.jsonl

The link: three network namespaces, SRC -- WAN -- DST, joined by two veth
pairs (10.77.0.1 in SRC, 10.77.0.2 in DST). In WAN, harness/delay-relay.py
forwards every frame between the two veths RTT/2 later in each direction, and a
tbf qdisc on each WAN-side veth's egress limits the rate (both directions). The
source QEMU (and source proxy) run in SRC, the destination QEMU (and
destination proxy, and the Redis ring) in DST. One link per link spec, set up
once and used for every configuration; torn down (namespaces, processes) on
every exit path. Only processes started here are signalled, by PID.

Per run: boot a fresh source guest (the harness's VM, QEMU 10, TCG) and a fresh
destination (-incoming defer), wait for the guest's READY, migrate, wait until
the destination runs, check the guest's checksum. Recorded: QEMU's own
total-time and downtime (source query-migrate), the end-to-end time (migrate
command -> destination RESUME event) and downtime (source STOP event ->
destination RESUME event; both QEMUs stamp their QMP events with the same host
clock), bytes on the wire (the SRC veth's tx/rx counters), proxy CPU time
(utime+stime of each proxy, read from /proc/PID/stat when it exits, before it
is reaped, and cross-checked with wait4's rusage), the relay's CPU time, and the
TCP connections the migration used across the link with the bytes each carried
(the relay's per-connection counters, read with SIGUSR1 before and after).

Multifd: the configurations mfd4 and mfd4-zstd are QEMU with 4 multifd channels
(no compression, zstd); ms-seen-mfd4 and ms-catalog-mfd4 are the proxies carrying
the same 4 channels (QEMU connects 5 times to the source proxy, which opens a link
connection for each; the destination proxy connects 5 times to its QEMU). The link
needs nothing per connection: it delays and shapes frames, whatever connection
they belong to, and its tbf queue is shared by all of them as a router's would be.

The proxies are the harness's Proxy (harness/migharness), started through `ip
netns exec`; their link runs over mutual TLS with its Pki, made once per `run` in
OUT/work/pki (the destination's certificate names 10.77.0.2, the address the
source dials), or without TLS with `run --plaintext`.

Needs root, harness/setup.sh, `ip`, `tc` and `openssl`. Python 3 standard library (the
PNG: matplotlib, installed into target/wan-bench/venv on demand by `report`).
"""
import argparse
import json
import os
import shlex
import signal
import sys
import time

from migharness.assets import REPO
from migharness.common import Fail, log
from migharness.pki import Pki
from migharness.proc import sh
from migharness.wan.binaries import build, catalog_binary, dht_ready, ensure_catalog, proxy_ready
from migharness.wan.host import loadavg
from migharness.wan.link import Link, probe
from migharness.wan.matrix import CONFIGS, DST_IP, GUESTS, LINKS, REDIS_PORTS, split_list
from migharness.wan.owned import cleanup
from migharness.wan.report import write_report
from migharness.wan.run import fmt_rec, run_one

DEFAULT_OUT = os.path.join(REPO, "target", "wan-bench")


def cmd_run(o):
    links = split_list(o.links, LINKS, "link")
    guests = split_list(o.guests, GUESTS, "guest")
    configs = split_list(o.configs, CONFIGS, "config")
    os.makedirs(o.out, exist_ok=True)
    workdir = os.path.join(o.out, "work")
    os.makedirs(workdir, exist_ok=True)
    results = os.path.join(o.out, "results.jsonl")
    build(o)
    have_proxy, have_dht = proxy_ready(), dht_ready()
    pki = None
    if have_proxy and not o.plaintext and any("proxy" in CONFIGS[c] for c in configs):
        # once per run: the destination's certificate names DST_IP, where the source dials it
        pki = Pki(os.path.join(workdir, "pki"), server_ips=(DST_IP,))
    catalog = None
    if any(CONFIGS[c].get("catalog") for c in configs) and have_proxy:
        catalog = ensure_catalog(o, workdir)
    log("load average %s; %d links x %d guests x %d configs, one at a time"
        % (loadavg(), len(links), len(guests), len(configs)))
    with open(os.path.join(o.out, "commands.txt"), "a") as f:
        f.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%S"), " ".join(map(shlex.quote, sys.argv))))
    n_fail = 0
    for ln in links:
        link = Link(ln, workdir)
        try:
            link.up()
            if have_dht and "ms-dht" in configs:
                link.start_redis()
                urls = ",".join("redis://127.0.0.1:%d" % p for p in REDIS_PORTS)
                sh("ip", "netns", "exec", link.ns_d, catalog_binary(), "push", "--nodes", urls,
                   "--replicas", "2", catalog, timeout=900)
            for _ in range(o.repeat):
                for guest in guests:
                    for cname in configs:
                        cfg = CONFIGS[cname]
                        if "proxy" in cfg and not have_proxy:
                            rec = {"link": ln, "guest": guest, "config": cname, "ok": False, "pending": True,
                                   "error": "pending: target/release/examples/proxy not built"}
                        elif cfg.get("catalog") == "dht" and not have_dht:
                            rec = {"link": ln, "guest": guest, "config": cname, "ok": False, "pending": True,
                                   "error": "pending: no `catalog push` / `proxy --dht` yet"}
                        else:
                            rec = run_one(link, guest, cname, o, workdir, catalog, pki)
                            n_fail += not rec["ok"]
                        rec.setdefault("label", cfg["label"])
                        with open(results, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        print(fmt_rec(rec) if not rec.get("pending") else
                              "PEND %s %s %s: %s" % (ln, guest, cname, rec["error"]), flush=True)
        finally:
            st = link.down()
            if st:
                with open(os.path.join(o.out, "relay-stats.jsonl"), "a") as f:
                    f.write(json.dumps({"link": ln, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **st}) + "\n")
    write_report(o)
    return 1 if n_fail else 0


def cmd_linktest(o):
    """RTT and throughput of each link, and of the relay alone (no rate limit)."""
    links = split_list(o.links, LINKS, "link")
    os.makedirs(o.out, exist_ok=True)
    workdir = os.path.join(o.out, "work")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    cases = [("bridge, no relay, no rate limit", links[0], False, False, 0)]
    for ln in links:
        cases.append(("relay only, %g ms RTT, no rate limit" % LINKS[ln][1], ln, True, False, 0))
    for ln in links:
        cases.append(("%s (relay + tbf)" % ln, ln, True, True, 0))
    for what, ln, relay, rate, _ in cases:
        link = Link(ln, workdir)
        try:
            link.up(relay=relay, rate=rate)
            rtt = probe(link, "rtt", o.secs)
            r0 = link.relay_cpu()
            tput = probe(link, "tput", o.secs)
            r1 = link.relay_cpu()
            st = link.stop_relay()
            row = {"case": what, "link": ln, "rtt_ms": rtt, "goodput_mbit_s": tput["mbit_s"],
                   "seconds": tput["seconds"], "relay_cpu_s": round(r1 - r0, 2) if r0 is not None else None,
                   "relay": st, "loadavg": loadavg()}
            rows.append(row)
            print("%-40s RTT %s ms, goodput %.0f Mbit/s%s, load %s" % (
                what, rtt, tput["mbit_s"], ", relay CPU %.2f s in %.1f s" % (row["relay_cpu_s"], tput["seconds"])
                if row["relay_cpu_s"] is not None else "", row["loadavg"]), flush=True)
        finally:
            link.down()
    with open(os.path.join(o.out, "linktest.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "linktest", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=DEFAULT_OUT, help="results directory (default target/wan-bench)")
        if name in ("run", "linktest"):
            p.add_argument("--links", default=",".join(LINKS), help="comma list of %s" % ",".join(LINKS))
        if name == "run":
            p.add_argument("--guests", default=",".join(GUESTS), help="comma list of %s" % ",".join(GUESTS))
            p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of %s" % ",".join(CONFIGS))
            p.add_argument("--mem", type=int, default=512, help="guest RAM, MiB (default 512)")
            p.add_argument("--timeout", type=float, default=300, help="per migration, s (default 300)")
            p.add_argument("--boot-timeout", type=float, default=600)
            p.add_argument("--migrate-nice", type=int, default=0, metavar="N",
                           help="nice value of our QEMUs, proxies and relay during each migration only "
                                "(e.g. -10 on a box shared with builds; default 0: unchanged)")
            p.add_argument("--repeat", type=int, default=1, help="run the matrix N times (the last result counts)")
            p.add_argument("--catalog", help="catalog file (default: build target/wan-bench/work/catalog.cat)")
            p.add_argument("--catalog-inputs", default=os.path.join(REPO, "target", "ratio"),
                           help="dir with catalog-{idle,dup,fill}-{1,2,3}.mig (harness/baselines.sh)")
            p.add_argument("--no-build", action="store_true", help="do not run cargo build")
            p.add_argument("--build-rev", metavar="REV",
                           help="build the proxy from a clean git archive of REV (default: the work tree)")
            p.add_argument("--keep-runs", action="store_true", help="keep lab run dirs of successful runs")
            p.add_argument("--plaintext", action="store_true",
                           help="run the proxies' link without TLS (default: mutual TLS, lab.py's throwaway CA)")
        if name == "report":
            p.add_argument("--configs", help="only these configurations (comma list)")
        if name == "linktest":
            p.add_argument("--secs", type=float, default=8, help="seconds of bulk transfer per case")
    o = ap.parse_args()
    if o.cmd != "report" and os.geteuid() != 0:
        print("ERROR: needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # still runs the finally below
    try:
        return {"run": cmd_run, "linktest": cmd_linktest, "report": write_report}[o.cmd](o)
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
