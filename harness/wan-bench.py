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
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

from migharness.assets import make_rundir, qemu_binary
from migharness.common import Fail, log
from migharness.migration import UNTHROTTLED, effective_params, summary
from migharness.pki import Pki
from migharness.proc import cpu_ticks, reap_with_cpu, renice, sh, stop_proc, wait_line
from migharness.proxy import Proxy
from migharness.redis import RedisServer
from migharness.vm import VM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "target", "wan-bench")
SRC_IP, DST_IP = "10.77.0.1", "10.77.0.2"

# name -> (rate in bit/s, round-trip time in ms)
LINKS = {"100m-40ms": (100_000_000, 40.0), "1g-10ms": (1_000_000_000, 10.0)}
GUESTS = ("idle", "dup", "fill", "dirty")
# name -> how it migrates. caps/params go to both QEMUs; "proxy" = source proxy options
CONFIGS = {
    "direct":      {"label": "QEMU direct"},
    "xbzrle":      {"label": "QEMU xbzrle", "caps": {"xbzrle": True}},
    "mfd-zstd":    {"label": "QEMU multifd+zstd", "caps": {"multifd": True},
                    "params": {"multifd-compression": "zstd"}},
    "ms-fill":     {"label": "migstream fill", "proxy": ["--resolvers", "fill"]},
    "ms-seen":     {"label": "migstream fill,seen", "proxy": ["--resolvers", "fill,seen"]},
    "ms-catalog":  {"label": "migstream fill,seen+catalog", "proxy": ["--resolvers", "fill,seen"],
                    "catalog": "local"},
    "ms-dht":      {"label": "migstream fill,seen+Redis ring", "proxy": ["--resolvers", "fill,seen"],
                    "catalog": "dht"},
    # multifd, 4 channels: QEMU alone (no compression, zstd), and through the proxies
    # (one link connection per QEMU connection); "main" names the same proxies on the
    # main channel alone, whose wire bytes the multifd ones are held against
    "mfd4":        {"label": "QEMU multifd×4", "caps": {"multifd": True},
                    "params": {"multifd-channels": 4, "multifd-compression": "none"}},
    "mfd4-zstd":   {"label": "QEMU multifd×4+zstd", "caps": {"multifd": True},
                    "params": {"multifd-channels": 4, "multifd-compression": "zstd"}},
    "ms-seen-mfd4": {"label": "migstream fill,seen, multifd×4", "proxy": ["--resolvers", "fill,seen"],
                     "caps": {"multifd": True}, "params": {"multifd-channels": 4, "multifd-compression": "none"},
                     "main": "ms-seen"},
    "ms-catalog-mfd4": {"label": "migstream fill,seen+catalog, multifd×4", "proxy": ["--resolvers", "fill,seen"],
                        "catalog": "local", "caps": {"multifd": True},
                        "params": {"multifd-channels": 4, "multifd-compression": "none"}, "main": "ms-catalog"},
}
REDIS_PORTS = (6390, 6391, 6392)
TBF_BURST = 131072          # bytes: >= one 64 KiB GSO frame, >= 1 ms at 1 Gbit/s

# Every process and namespace this script created, for the cleanup on any exit.
OWNED_PROCS = []
OWNED_NS = []


# --------------------------------------------------------------------------- helpers
def spawn(argv, **kw):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
    OWNED_PROCS.append(p)
    return p


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def git_head():
    try:
        return sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD").strip()
    except (Fail, OSError):
        return None


# --------------------------------------------------------------------------- the link
class Link:
    """SRC -- WAN -- DST namespaces; delay relay in WAN; tbf both ways."""

    def __init__(self, name, workdir):
        self.name = name
        self.rate, self.rtt = LINKS[name]
        tag = "wanb%d" % os.getpid()
        self.ns_s, self.ns_w, self.ns_d = tag + "-s", tag + "-w", tag + "-d"
        self.workdir = workdir
        self.relay = None
        self.relay_stats = None
        self.relay_reader, self.relay_lines = None, queue.Queue()
        self.redis = []

    def up(self, relay=True, rate=True):
        for ns in (self.ns_s, self.ns_w, self.ns_d):
            sh("ip", "netns", "add", ns)
            OWNED_NS.append(ns)
        sh("ip", "link", "add", "wbs0", "netns", self.ns_s, "type", "veth", "peer", "name", "wbsa", "netns", self.ns_w)
        sh("ip", "link", "add", "wbd0", "netns", self.ns_d, "type", "veth", "peer", "name", "wbda", "netns", self.ns_w)
        sh("ip", "-n", self.ns_s, "addr", "add", SRC_IP + "/24", "dev", "wbs0")
        sh("ip", "-n", self.ns_d, "addr", "add", DST_IP + "/24", "dev", "wbd0")
        for ns in (self.ns_s, self.ns_w, self.ns_d):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.ns_s, "link", "set", "wbs0", "up")
        sh("ip", "-n", self.ns_d, "link", "set", "wbd0", "up")
        for i in ("wbsa", "wbda"):
            sh("ip", "-n", self.ns_w, "link", "set", i, "up", "promisc", "on")
        if rate:
            # queue of one bandwidth-delay product (at least 4 bursts), like a router's buffer
            limit = max(int(self.rate / 8 * self.rtt / 1000), 4 * TBF_BURST)
            for i in ("wbsa", "wbda"):
                sh("ip", "netns", "exec", self.ns_w, "tc", "qdisc", "replace", "dev", i, "root", "tbf",
                   "rate", str(self.rate), "burst", str(TBF_BURST), "limit", str(limit))
        if relay:
            self.start_relay(self.rtt / 2)
        else:   # no relay: bridge the two veths in WAN so that the link still works
            sh("ip", "-n", self.ns_w, "link", "add", "wbbr", "type", "bridge")
            for i in ("wbsa", "wbda"):
                sh("ip", "-n", self.ns_w, "link", "set", i, "master", "wbbr")
            sh("ip", "-n", self.ns_w, "link", "set", "wbbr", "up")
        log("link %s up: %s/%s/%s, rate %s bit/s, RTT %s ms%s" % (
            self.name, self.ns_s, self.ns_w, self.ns_d, self.rate if rate else "unlimited",
            self.rtt if relay else 0, "" if relay else " (no relay)"))
        return self

    def start_relay(self, one_way_ms):
        logf = open(os.path.join(self.workdir, "relay-%s.log" % self.name), "ab")
        self.relay = spawn(["ip", "netns", "exec", self.ns_w, sys.executable, os.path.join(HERE, "delay-relay.py"),
                            "wbsa", "wbda", "--delay-ms", str(one_way_ms)],
                           stdout=subprocess.PIPE, stderr=logf)
        line = wait_line(self.relay.stdout, 15, "the delay relay")
        if line.strip() != "ready":
            raise Fail("delay relay: %r" % line)
        # its later lines (SIGUSR1's flow counters, the final counters) through a queue
        self.relay_lines = queue.Queue()
        out, lines = self.relay.stdout, self.relay_lines

        def pump():
            for ln in out:
                lines.put(ln)
            lines.put(None)
        self.relay_reader = threading.Thread(target=pump, daemon=True)
        self.relay_reader.start()

    def flows(self, timeout=5.0):
        """The TCP connections the relay carried since the last call (SIGUSR1): per
        direction, [{sport, dport, frames, bytes}], biggest first; None without a relay."""
        if not self.relay or self.relay.poll() is not None:
            return None
        os.kill(self.relay.pid, signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                ln = self.relay_lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if ln is None:
                return None
            try:
                j = json.loads(ln)
            except ValueError:
                continue
            if "flows" in j:
                return j["flows"]
        log("the delay relay did not report its flows within %ss" % timeout)
        return None

    def stop_relay(self):
        if not self.relay:
            return None
        if self.relay.poll() is None:
            os.kill(self.relay.pid, signal.SIGTERM)
        try:
            self.relay.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_proc(self.relay)
        if self.relay_reader:
            self.relay_reader.join(5)
        self.relay, self.relay_reader = None, None
        self.relay_stats = None
        while True:                     # the last line that is not a flows line
            try:
                ln = self.relay_lines.get_nowait()
            except queue.Empty:
                break
            try:
                j = json.loads(ln) if ln else None
            except ValueError:
                continue
            if isinstance(j, dict) and "flows" not in j:
                self.relay_stats = j
        return self.relay_stats

    def relay_cpu(self):
        return cpu_ticks(self.relay.pid) if self.relay else None

    def counters(self):
        """Bytes and packets of the SRC and DST veths (whole frames, retransmissions included)."""
        out = {}
        for ns, dev in ((self.ns_s, "wbs0"), (self.ns_d, "wbd0")):
            j = json.loads(sh("ip", "-j", "-s", "-n", ns, "link", "show", "dev", dev))[0]["stats64"]
            out[dev] = {"tx_bytes": j["tx"]["bytes"], "rx_bytes": j["rx"]["bytes"],
                        "tx_packets": j["tx"]["packets"], "rx_packets": j["rx"]["packets"]}
        return out

    def start_redis(self):
        """The Redis ring of ms-dht, in DST."""
        for port in REDIS_PORTS:
            r = RedisServer(port, os.path.join(self.workdir, "redis-%d.log" % port),
                            prefix=["ip", "netns", "exec", self.ns_d]).start()
            OWNED_PROCS.append(r.proc)
            self.redis.append(r)
        for r in self.redis:
            r.wait_ready()

    def down(self):
        stats = self.stop_relay()
        for r in self.redis:
            r.stop()
        self.redis = []
        for ns in (self.ns_s, self.ns_w, self.ns_d):
            if ns in OWNED_NS:
                subprocess.run(["ip", "netns", "del", ns], timeout=30, capture_output=True)
                OWNED_NS.remove(ns)
        return stats


# --------------------------------------------------------------------------- QEMU in a namespace
def ns_vm(name, a, rundir, ns, workdir, incoming=None):
    """The harness's VM (QEMU 10) run inside namespace ns by a script that execs
    `ip netns exec` and QEMU (exec all the way down: the PID the VM sees is QEMU's)."""
    path = os.path.join(workdir, "qemu10-%s.sh" % ns)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n" % (shlex.quote(ns), shlex.quote(qemu_binary("10"))))
    os.chmod(path, 0o755)
    return VM(name, "10", a, rundir, incoming=incoming, binary=path)


def vm_args(guest, mem, boot_timeout):
    return types.SimpleNamespace(machine="pc", accel="tcg", mem=mem, ram_tail_kib=0, workload=guest,
                                 data_mb=None, dirty_mb=8, dirty_chunk=256,
                                 boot_timeout=boot_timeout, check_timeout=120)


# --------------------------------------------------------------------------- proxies
def start_proxy(name, role, ns, listen, to, extra, rundir, pki):
    """The harness's Proxy (--json --once; mutual TLS with pki, --plaintext if None),
    run inside namespace ns; `ip netns exec` execs it, so its PID is the proxy's."""
    px = Proxy(name, proxy_binary(), role, listen, to, extra, True, rundir, pki,
                   prefix=["ip", "netns", "exec", ns])
    px.start()
    OWNED_PROCS.append(px.proc)
    return px


def finish_proxy(px, timeout):
    """Wait for --once to end it; its CPU time (read before it is reaped) and report."""
    r = reap_with_cpu(px.proc, timeout)
    res = {"role": px.role}
    if r is None:
        stop_proc(px.proc)
        res["error"] = "did not exit within %ss after the migration" % timeout
        res["exit"] = px.proc.returncode
    else:
        res["exit"], res["cpu_stat_s"], res["cpu_rusage_s"] = r
    px.wait_streams(5)
    if px.results:
        res["json"] = px.results[-1]
    final = [x for x in px.stderr if px.FINAL.match(x)]
    if final:
        res["final_line"] = final[-1]
    res["t_final"] = px.final_times[-1] if px.final_times else None    # when this end finished
    return res


BIN_DIR = os.path.join(ROOT, "target", "release", "examples")
BUILT_FROM = {"rev": None}


def proxy_binary():
    return os.path.join(BIN_DIR, "proxy")


def catalog_binary():
    return os.path.join(BIN_DIR, "catalog")


def proxy_ready():
    return os.access(proxy_binary(), os.X_OK)


def dht_ready():
    """The Redis-ring mode needs `catalog push` and `proxy destination --dht`."""
    if not (proxy_ready() and os.access(catalog_binary(), os.X_OK)):
        return False
    r1 = subprocess.run([catalog_binary()], capture_output=True, text=True, timeout=10)
    r2 = subprocess.run([proxy_binary(), "destination", "--help"], capture_output=True, text=True, timeout=10)
    return "push" in (r1.stdout + r1.stderr) and "--dht" in (r2.stdout + r2.stderr)


# --------------------------------------------------------------------------- one run
def migrate_e2e(src, dst, uri, timeout):
    """migrate, poll both ends until the destination runs (or failure); bounded."""
    t_cmd = time.time()
    src.qmp.cmd("migrate", uri=uri)
    end = time.monotonic() + timeout
    last, info, completed_at = 0.0, {}, None
    while True:
        info = src.qmp.cmd("query-migrate")
        st = info.get("status")
        if st in ("failed", "cancelled"):
            return t_cmd, info, None
        dst_status = dst.status()       # raises Fail if the destination died
        if st == "completed":
            completed_at = completed_at or time.monotonic()
            if dst_status == "running":
                return t_cmd, info, dst_status
            if time.monotonic() - completed_at > 60:
                return t_cmd, info, dst_status
        if time.monotonic() > end:
            try:
                src.qmp.cmd("migrate_cancel")
            except Fail:
                pass
            raise Fail("migration not finished after %ss (status %s)" % (timeout, st))
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            r = info.get("ram", {})
            log("  %s: %.1f MiB sent, %.1f MiB remaining, dirty-sync-count %s" % (
                st, r.get("transferred", 0) / 2**20, r.get("remaining", 0) / 2**20, r.get("dirty-sync-count")))
        time.sleep(0.05)


def run_one(link, guest, cname, o, workdir, catalog, pki):
    cfg = CONFIGS[cname]
    caps = dict(cfg.get("caps", {}))
    caps["events"] = True       # MIGRATION status events, stamped by QEMU: the timeline below
    params = dict(cfg.get("params", {}))
    params["max-bandwidth"] = UNTHROTTLED         # the link limits, not QEMU
    rec = {"link": link.name, "rate_bit_s": link.rate, "rtt_ms": link.rtt, "guest": guest, "config": cname,
           "label": cfg["label"], "mem_mib": o.mem, "qemu": "10", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "commit": git_head(), "proxy_built_from": BUILT_FROM["rev"], "loadavg_before": loadavg(), "ok": False, "error": None}
    rundir = make_rundir("wan")
    rec["rundir"] = rundir
    a = vm_args(guest, o.mem, o.boot_timeout)
    vms, proxies = [], []
    t0 = time.monotonic()
    try:
        dst = ns_vm("dst", a, rundir, link.ns_d, workdir, incoming="defer")
        vms.append(dst)
        dst.start()
        dst.configure(caps, params)
        use_proxy = "proxy" in cfg
        listen_ip = "127.0.0.1" if use_proxy else DST_IP
        dst.qmp.cmd("migrate-incoming", uri="tcp:%s:0" % listen_ip)
        ports = [int(x["port"]) for x in dst.qmp.cmd("query-migrate").get("socket-address") or []
                 if x.get("type") == "inet"]
        if not ports:
            raise Fail("destination did not report its listening port")
        uri = "tcp:%s:%d" % (DST_IP, ports[0])
        if use_proxy:
            # the link runs over mutual TLS (the source checks the destination's
            # certificate for DST_IP, the address it dials), or --plaintext
            rec["proxy_link"] = "mutual TLS" if pki else "plaintext"
            dextra, sextra = [], list(cfg["proxy"])
            if cfg.get("catalog") == "local":
                dextra += ["--catalog", catalog]
            elif cfg.get("catalog") == "dht":
                dextra += ["--dht", ",".join("redis://127.0.0.1:%d" % p for p in REDIS_PORTS)]
            if cfg.get("catalog"):
                sextra += ["--catalog", catalog]
            pd = start_proxy("proxy-destination", "destination", link.ns_d, DST_IP + ":0",
                             "127.0.0.1:%d" % ports[0], dextra, rundir, pki)
            proxies.append(pd)
            dport = pd.wait_listening()
            ps = start_proxy("proxy-source", "source", link.ns_s, "127.0.0.1:0", "%s:%d" % (DST_IP, dport),
                             sextra, rundir, pki)
            proxies.append(ps)
            uri = "tcp:127.0.0.1:%d" % ps.wait_listening()
        src = ns_vm("src", a, rundir, link.ns_s, workdir)
        vms.append(src)
        src.start()
        ready = src.wait_ready()
        rec["boot_s"] = round(time.monotonic() - t0, 1)
        src.configure(caps, params)
        rec["effective_params"] = effective_params(src)
        link.flows()            # starts the relay's per-connection counters afresh
        c0, r0 = link.counters(), link.relay_cpu()
        rec["loadavg_at_migrate"] = loadavg()
        log("%s %s %s: migrate to %s" % (link.name, guest, cname, uri))
        ours = [vm.proc.pid for vm in vms] + [p.proc.pid for p in proxies] + ([link.relay.pid] if link.relay else [])
        if o.migrate_nice:
            renice(ours, o.migrate_nice)
        try:
            t_cmd, info, dst_status = migrate_e2e(src, dst, uri, o.timeout)
        finally:
            if o.migrate_nice:
                renice(ours, 0)
        rec["migrate_nice"] = o.migrate_nice
        rec["migration"] = summary(info)
        # the proxies exit after one migration (--once); bounded
        rec["proxies"] = {p.role: finish_proxy(p, 60) for p in proxies}
        if not proxies:
            time.sleep(1.0)     # let the last ACKs and FINs cross the link
        c1, r1 = link.counters(), link.relay_cpu()
        rec["wire"] = {"src_to_dst": c1["wbs0"]["tx_bytes"] - c0["wbs0"]["tx_bytes"],
                       "dst_to_src": c1["wbs0"]["rx_bytes"] - c0["wbs0"]["rx_bytes"],
                       "dst_rx": c1["wbd0"]["rx_bytes"] - c0["wbd0"]["rx_bytes"],
                       "dst_tx": c1["wbd0"]["tx_bytes"] - c0["wbd0"]["tx_bytes"],
                       "src_tx_packets": c1["wbs0"]["tx_packets"] - c0["wbs0"]["tx_packets"]}
        rec["wire"]["total"] = rec["wire"]["src_to_dst"] + rec["wire"]["dst_to_src"]
        fl = link.flows()
        if fl is not None:
            # the migration's TCP connections across the link, as the relay saw them
            # (src->dst bytes per connection, biggest first): one per QEMU connection,
            # QEMU's or the proxies' (nothing else crosses the link during a run)
            fwd = fl.get("wbsa->wbda", [])
            rec["wire"]["flows_src_to_dst"] = fwd
            rec["wire"]["connections"] = len(fwd)
        rec["relay_cpu_s"] = round(r1 - r0, 2) if r0 is not None and r1 is not None else None
        checks = {"completed": info.get("status") == "completed", "dst_running": dst_status == "running"}
        t_stop, t_resume = src.qmp.event_time("STOP"), dst.qmp.event_time("RESUME")
        if t_resume is None and dst_status == "running":
            dst.status()        # pick up a late event
            t_resume = dst.qmp.event_time("RESUME")
        # timeline, seconds after the migrate command (host clock; QEMU stamps its events with it)
        tl = {}
        for who, vm in (("src", src), ("dst", dst)):
            for e in vm.qmp.events:
                ts = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                name = e["event"] + ("." + e["data"]["status"] if e["event"] == "MIGRATION" else "")
                tl.setdefault("%s.%s" % (who, name), round(ts - t_cmd, 3))
        for p in rec["proxies"].values():
            if p.get("t_final"):
                tl["proxy_%s.final" % p["role"]] = round(p["t_final"] - t_cmd, 3)
        rec["timeline"] = dict(sorted(tl.items(), key=lambda kv: kv[1]))
        if t_resume is not None:
            rec["e2e_total_s"] = round(t_resume - t_cmd, 3)
            if t_stop is not None:
                rec["e2e_downtime_ms"] = round((t_resume - t_stop) * 1000, 1)
        if checks["dst_running"]:
            try:
                after, _ = dst.check()
                checks["sum_matches"] = after == ready
            except Fail as e:
                checks["sum_matches"] = False
                rec["error"] = str(e)
        for p in rec["proxies"].values():
            checks["proxy_%s_ok" % p["role"]] = p.get("exit") == 0 and (p.get("json") or {}).get("ok", True) is not False
        rec["checks"] = checks
        rec["ok"] = all(checks.values())
        if not rec["ok"] and not rec["error"]:
            rec["error"] = "failed checks: %s %s" % (",".join(k for k, v in checks.items() if not v),
                                                    info.get("error-desc", ""))
    except Fail as e:
        rec["error"] = str(e)
        log("FAILED: %s" % e)
    except Exception as e:          # a harness bug: record it, keep the matrix going
        import traceback
        rec["error"] = "harness: %r" % e
        log("HARNESS ERROR: %s" % traceback.format_exc())
    finally:
        for p in proxies:
            if p.proc.returncode is None and p.proc.poll() is None:
                stop_proc(p.proc)
                rec.setdefault("proxies", {}).setdefault(p.role, {"role": p.role, "error": "stopped by the harness"})
        for vm in reversed(vms):
            vm.stop()
        rec["run_s"] = round(time.monotonic() - t0, 1)
        rec["loadavg_after"] = loadavg()
    if rec["ok"] and not o.keep_runs:
        shutil.rmtree(rundir, ignore_errors=True)
        rec["rundir"] = None
    return rec


def fmt_rec(r):
    m = r.get("migration", {})
    pc = proxy_cpu(r)
    return ("%s %-9s %-6s %-10s total %6s ms (e2e %s s) downtime %5s ms (e2e %s ms) wire %s B in %s conns%s%s" % (
        "OK  " if r["ok"] else "FAIL", r["link"], r["guest"], r["config"], m.get("total-time"),
        r.get("e2e_total_s"), m.get("downtime"), r.get("e2e_downtime_ms"), (r.get("wire") or {}).get("total"),
        (r.get("wire") or {}).get("connections"),
        " proxy cpu %.2f s" % pc if pc is not None else "", "" if r["ok"] else "  ERROR " + str(r["error"])))


def proxy_cpu(r):
    ps = r.get("proxies") or {}
    vals = [p.get("cpu_stat_s") for p in ps.values()]
    if not ps or any(v is None for v in vals):
        return None
    return round(sum(vals), 2)


# --------------------------------------------------------------------------- catalog
def ensure_catalog(o, workdir):
    if o.catalog:
        return os.path.abspath(o.catalog)
    cat = os.path.join(workdir, "catalog.cat")
    if os.path.exists(cat):
        return cat
    inputs = [os.path.join(o.catalog_inputs, "catalog-%s-%d.mig" % (w, i)) for w in ("idle", "dup", "fill")
              for i in (1, 2, 3)]
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise Fail("catalog inputs missing (%s): run harness/baselines.sh %s, or pass --catalog"
                   % (", ".join(missing[:3]), o.catalog_inputs))
    log("building the catalog %s from %d other guests' streams" % (cat, len(inputs)))
    sh(catalog_binary(), "build", "--threshold", "2", "--out", cat + ".part", *inputs, timeout=1800)
    os.rename(cat + ".part", cat)
    return cat


def build(o):
    """cargo build the proxy and catalog examples: in the work tree, or (--build-rev)
    from a clean `git archive` of one commit into target/wan-bench/build, so
    that uncommitted work in the tree does not end up in the numbers."""
    global BIN_DIR
    if o.build_rev:
        rev = sh("git", "-C", ROOT, "rev-parse", "--short", o.build_rev).strip()
        src = os.path.join(ROOT, "target", "wan-bench", "build", "src-" + rev)
        tgt = os.path.join(ROOT, "target", "wan-bench", "build", "target-" + rev)
        if not os.path.exists(os.path.join(src, "Cargo.toml")):
            os.makedirs(src, exist_ok=True)
            subprocess.run("git -C %s archive %s | tar -x -C %s" % (shlex.quote(ROOT), rev, shlex.quote(src)),
                           shell=True, check=True, timeout=300)
        cwd, env = src, dict(os.environ, CARGO_TARGET_DIR=tgt)
        BIN_DIR = os.path.join(tgt, "release", "examples")
        BUILT_FROM["rev"] = rev
    else:
        cwd, env = ROOT, None
        BUILT_FROM["rev"] = "work tree at %s" % git_head()
    if o.no_build:
        return
    log("cargo build --release --example proxy --example catalog (in %s)" % cwd)
    r = subprocess.run(["cargo", "build", "--release", "--example", "proxy", "--example", "catalog"], cwd=cwd,
                       env=env, timeout=3600, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        log("cargo build failed (exit %d): the proxy configurations will be skipped" % r.returncode)


# --------------------------------------------------------------------------- subcommands
def split_list(s, allowed, what):
    items = [x for x in s.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise Fail("unknown %s %s (known: %s)" % (what, ",".join(bad), ",".join(allowed)))
    return items


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
    cmd_report(o)
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


PROBE = r'''
import socket, sys, time
mode, role = sys.argv[1], sys.argv[2]
if role == "srv":
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", 5299)); ls.listen(1); print("up", flush=True)
    c, _ = ls.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); buf = bytearray(1 << 20)
    while True:
        k = c.recv_into(buf)
        if not k: break
        if mode == "rtt": c.sendall(buf[:k])
else:
    s = socket.create_connection((sys.argv[3], 5299), timeout=10); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    secs = float(sys.argv[4])
    if mode == "rtt":
        r = []
        for i in range(30):
            t = time.monotonic(); s.sendall(b"x"); s.recv(16); r.append((time.monotonic() - t) * 1000)
        r.sort(); print('{"min": %.2f, "median": %.2f, "max": %.2f}' % (r[0], r[15], r[-1]))
    else:
        buf = b"\x5a" * (1 << 20); n = 0; t = time.monotonic()
        while time.monotonic() - t < secs:
            s.sendall(buf); n += len(buf)
        s.shutdown(socket.SHUT_WR); s.recv(1); dt = time.monotonic() - t
        print('{"bytes": %d, "seconds": %.3f, "mbit_s": %.1f}' % (n, dt, n * 8 / dt / 1e6))
'''


def probe(link, mode, secs):
    srv = spawn(["ip", "netns", "exec", link.ns_d, sys.executable, "-c", PROBE, mode, "srv"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        wait_line(srv.stdout, 10, "the probe server")
        r = subprocess.run(["ip", "netns", "exec", link.ns_s, sys.executable, "-c", PROBE, mode, "cli", DST_IP,
                            str(secs)], capture_output=True, text=True, timeout=secs + 60)
        if r.returncode != 0:
            raise Fail("probe %s: %s" % (mode, r.stderr.strip()))
        return json.loads(r.stdout)
    finally:
        stop_proc(srv)


# --------------------------------------------------------------------------- report
CONFIG_ORDER = list(CONFIGS)
PLOT_COLORS = ["#333333", "#7f7f7f", "#bdbdbd", "#c6dbef", "#6baed6", "#2171b5", "#08306b",
               "#fdae6b", "#e6550d", "#74c476", "#006d2c"]


def load_results(out):
    """Latest record per (link, guest, config)."""
    by = {}
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        raise Fail("%s: no results yet" % path)
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by[(r["link"], r["guest"], r["config"])] = r
    return by


def mb(x):
    return "%.1f" % (x / 1e6) if isinstance(x, (int, float)) else "-"


def cmd_report(o):
    by = load_results(o.out)
    if getattr(o, "configs", None):
        keep = split_list(o.configs, CONFIGS, "config")
        by = {k: v for k, v in by.items() if k[2] in keep}
    links = [x for x in LINKS if any(k[0] == x for k in by)]
    guests = [x for x in GUESTS if any(k[1] == x for k in by)]
    cols = ["link", "guest", "config", "ok", "qemu_total_ms", "qemu_downtime_ms", "e2e_total_s", "e2e_downtime_ms",
            "wire_src_to_dst", "wire_dst_to_src", "wire_total", "ram_transferred", "proxy_ratio",
            "proxy_cpu_src_s", "proxy_cpu_dst_s", "relay_cpu_s", "link_connections", "loadavg_at_migrate", "error"]
    rows = []
    for ln in links:
        for g in guests:
            for c in CONFIG_ORDER:
                r = by.get((ln, g, c))
                if not r:
                    continue
                m, w, ps = r.get("migration", {}), r.get("wire") or {}, r.get("proxies") or {}
                sj = (ps.get("source") or {}).get("json") or {}
                rows.append({"link": ln, "guest": g, "config": c, "ok": r["ok"] if not r.get("pending") else "pending",
                             "qemu_total_ms": m.get("total-time"), "qemu_downtime_ms": m.get("downtime"),
                             "e2e_total_s": r.get("e2e_total_s"), "e2e_downtime_ms": r.get("e2e_downtime_ms"),
                             "wire_src_to_dst": w.get("src_to_dst"), "wire_dst_to_src": w.get("dst_to_src"),
                             "wire_total": w.get("total"), "ram_transferred": m.get("ram-transferred"),
                             "proxy_ratio": sj.get("ratio"),
                             "proxy_cpu_src_s": (ps.get("source") or {}).get("cpu_stat_s"),
                             "proxy_cpu_dst_s": (ps.get("destination") or {}).get("cpu_stat_s"),
                             "relay_cpu_s": r.get("relay_cpu_s"), "link_connections": w.get("connections"),
                             "loadavg_at_migrate": r.get("loadavg_at_migrate"),
                             "error": r.get("error")})
    with open(os.path.join(o.out, "results.tsv"), "w") as f:
        f.write("#" + "\t".join(cols) + "\n")
        for x in rows:
            f.write("\t".join("" if x[c] is None else str(x[c]) for c in cols) + "\n")
    with open(os.path.join(o.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = table_md(by, links, guests) + "\n" + targets_md(by, links, guests) + "\n" + wire_md(by, links, guests)
    with open(os.path.join(o.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        png = plot(by, links, guests, o.out)
        log("plot: %s" % png)
    except Fail as e:
        log("no plot: %s" % e)
    return 0


def table_md(by, links, guests):
    out = []
    for ln in links:
        rate, rtt = LINKS[ln]
        out.append("**%s** (%g Mbit/s, %g ms RTT)\n" % (ln, rate / 1e6, rtt))
        out.append("| guest | configuration | total time s (QEMU / end-to-end) | downtime ms (QEMU / end-to-end) "
                   "| wire MB src→dst / dst→src | proxy ratio | proxy CPU s (src + dst) | link conns | ok |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for g in guests:
            for c in CONFIG_ORDER:
                r = by.get((ln, g, c))
                if not r:
                    continue
                if r.get("pending"):
                    out.append("| %s | %s | pending | pending | pending | | | | pending |" % (g, CONFIGS[c]["label"]))
                    continue
                m, w, ps = r.get("migration", {}), r.get("wire") or {}, r.get("proxies") or {}
                tt = m.get("total-time")
                sj = (ps.get("source") or {}).get("json") or {}
                cpu = ["%.2f" % ps[k]["cpu_stat_s"] if ps.get(k, {}).get("cpu_stat_s") is not None else "-"
                       for k in ("source", "destination")]
                out.append("| %s | %s | %s / %s | %s / %s | %s / %s | %s | %s | %s | %s |" % (
                    g, CONFIGS[c]["label"], "%.1f" % (tt / 1000) if tt else "-",
                    "%.1f" % r["e2e_total_s"] if r.get("e2e_total_s") else "-",
                    m.get("downtime", "-"), "%.0f" % r["e2e_downtime_ms"] if r.get("e2e_downtime_ms") else "-",
                    mb(w.get("src_to_dst")), mb(w.get("dst_to_src")),
                    "%.3f" % sj["ratio"] if isinstance(sj.get("ratio"), (int, float)) else "-",
                    " + ".join(cpu) if ps else "-",
                    w.get("connections", "-"),
                    "yes" if r["ok"] else "**no**: " + str(r.get("error", ""))[:80]))
        out.append("")
    return "\n".join(out)


def targets_md(by, links, guests):
    """The issue's targets, per migstream configuration, on QEMU's own numbers
    and on the end-to-end numbers."""
    def val(r, kind):
        if r and not r.get("ok") and "not finished after" in str(r.get("error")):
            return float("inf")     # did not converge within --timeout: anything that finishes beats it
        if not r or not r.get("ok"):
            return None
        if kind == "total":
            return r["migration"].get("total-time", 0) / 1000
        if kind == "e2e_total":
            return r.get("e2e_total_s")
        if kind == "down":
            return r["migration"].get("downtime")
        if kind == "e2e_down":
            return r.get("e2e_downtime_ms")
    def wire(r):
        return r["wire"]["src_to_dst"] / 1e6 if r and r.get("ok") and r.get("wire") else None

    def proxy_wire(r):
        sj = (((r or {}).get("proxies") or {}).get("source") or {}).get("json") or {}
        return sj["wire_bytes"] / 1e6 if r and r.get("ok") and sj.get("wire_bytes") else None
    lines = ["| target | link | guest | migstream config | measure | migstream | reference | holds? |",
             "|---|---|---|---|---|---:|---:|---|"]
    ms_configs = [c for c in CONFIG_ORDER if "proxy" in CONFIGS[c]]
    for ln in links:
        for g in guests:
            for c in ms_configs:
                r = by.get((ln, g, c))
                if not r or r.get("pending"):
                    continue
                d, z = by.get((ln, g, "direct")), by.get((ln, g, "mfd-zstd"))
                checks = []
                if "main" in CONFIGS[c]:
                    # multifd through the proxies: faster than QEMU's own multifd+zstd with
                    # as many channels, at both links; wire bytes within 5 % of the same
                    # proxies carrying the main channel alone
                    z4, m = by.get((ln, g, "mfd4-zstd")), by.get((ln, g, CONFIGS[c]["main"]))
                    for kind in ("total", "e2e_total"):
                        if z4:
                            checks.append(("time ≤ QEMU multifd×4+zstd", kind, val(r, kind), val(z4, kind), 1.0))
                    if m:
                        checks.append(("wire ≤ 1.05× %s" % CONFIGS[c]["main"], "wire", wire(r), wire(m), 1.05))
                        checks.append(("wire ≤ 1.05× %s" % CONFIGS[c]["main"], "proxy_wire", proxy_wire(r),
                                       proxy_wire(m), 1.05))
                for kind in ("total", "e2e_total") if "main" not in CONFIGS[c] else ():
                    if ln.startswith("100m") and g in ("idle", "dup") and d:
                        checks.append(("time ≤ 0.5× direct", kind, val(r, kind), val(d, kind), 0.5))
                    if ln.startswith("100m") and z:
                        checks.append(("time ≤ multifd+zstd", kind, val(r, kind), val(z, kind), 1.0))
                    if ln.startswith("1g") and d:
                        checks.append(("time ≤ direct", kind, val(r, kind), val(d, kind), 1.0))
                for kind in ("down", "e2e_down"):
                    if d:
                        checks.append(("downtime ≤ direct", kind, val(r, kind), val(d, kind), 1.0))
                for what, kind, mine, ref, f in checks:
                    if mine is None or ref is None:
                        holds, ms, qs = "n/a", "-", "-"
                    else:
                        holds = "yes" if mine <= f * ref else "**no**"
                        ms, qs = ["%.1f" % x if x != float("inf") else "no convergence" for x in (mine, ref)]
                    unit = "ms" if "down" in kind else "MB" if "wire" in kind else "s"
                    where = {"e2e_total": "end-to-end", "e2e_down": "end-to-end", "wire": "SRC veth tx",
                             "proxy_wire": "source proxy's wire_bytes"}.get(kind, "QEMU")
                    lines.append("| %s | %s | %s | %s | %s (%s) | %s | %s | %s |" % (
                        what, ln, g, c, where, unit, ms, qs, holds))
    return "\n".join(lines) + "\n"


def wire_md(by, links, guests):
    """Where the bytes on the wire come from, per run: the SRC veth's tx (what the
    tables call wire, retransmissions included), the DST veth's rx (what arrived:
    the difference is what the link's queue dropped and TCP sent again), the
    payload (the source proxy's wire bytes, or QEMU's ram-transferred without
    proxies), QEMU's bytes, and the TCP connections the migration had on the link."""
    out = ["| link | guest | configuration | conns | wire tx MB (SRC veth) | rx MB (DST veth) | dropped, sent again MB "
           "| payload MB (proxy wire / QEMU ram) | tx / payload | rx / payload | QEMU MB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ln in links:
        for g in guests:
            for c in CONFIG_ORDER:
                r = by.get((ln, g, c))
                if not r or not r.get("ok") or "dst_rx" not in (r.get("wire") or {}):
                    continue
                w, m = r["wire"], r.get("migration", {})
                sj = ((r.get("proxies") or {}).get("source") or {}).get("json") or {}
                qemu = sj.get("qemu_bytes") or m.get("ram-transferred")
                pay = sj.get("wire_bytes") or m.get("ram-transferred")
                if not pay:
                    continue
                out.append("| %s | %s | %s | %s | %.1f | %.1f | %.1f | %.1f | %.3f | %.3f | %s |" % (
                    ln, g, CONFIGS[c]["label"], w.get("connections", "-"), w["src_to_dst"] / 1e6,
                    w["dst_rx"] / 1e6, (w["src_to_dst"] - w["dst_rx"]) / 1e6, pay / 1e6,
                    w["src_to_dst"] / pay, w["dst_rx"] / pay, mb(qemu)))
    return "\n".join(out) + "\n"


def venv_python(out):
    venv = os.path.join(ROOT, "target", "wan-bench", "venv")
    py = os.path.join(venv, "bin", "python")
    ok = os.access(py, os.X_OK) and subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0
    if not ok:
        log("installing matplotlib into %s" % venv)
        if subprocess.run([sys.executable, "-m", "venv", venv], timeout=300).returncode != 0 or \
           subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], timeout=900).returncode != 0:
            raise Fail("could not install matplotlib into %s" % venv)
    return py


PLOT = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.load(open(sys.argv[1]))
links, guests, configs, labels = d["links"], d["guests"], d["configs"], d["labels"]
rows = (("time", "total migration time, s (end to end)"),
        ("down", "downtime, ms (end to end)"),
        ("wire", "bytes on the wire, MB (src→dst)"))
fig, axes = plt.subplots(len(rows), len(links), figsize=(max(6.5, 0.9 * len(configs) + 1.5) * len(links), 11),
                         squeeze=False)
from matplotlib.patches import Patch
colors = d["colors"]
w = 0.8 / len(configs)
for j, ln in enumerate(links):
    for i, (key, ylabel) in enumerate(rows):
        ax = axes[i][j]
        for k, c in enumerate(configs):
            xs, ys = [], []
            for gi, g in enumerate(guests):
                v = d["values"].get("%s/%s/%s" % (ln, g, c), {}).get(key)
                if v is not None:
                    xs.append(gi + (k - (len(configs) - 1) / 2) * w); ys.append(v)
            ax.bar(xs, ys, w, color=colors[c])
        ax.set_xticks(range(len(guests))); ax.set_xticklabels(guests)
        ax.set_ylabel(ylabel); ax.set_title(d["titles"][ln]); ax.grid(axis="y", alpha=0.3)
fig.legend(handles=[Patch(color=colors[c], label=labels[c]) for c in configs], loc="lower center",
           ncol=min(4, len(configs)), fontsize=9)
fig.tight_layout(rect=(0, 0.05, 1, 1))
fig.savefig(sys.argv[2], dpi=80)
'''


def plot(by, links, guests, out):
    configs = [c for c in CONFIG_ORDER if any(by.get((ln, g, c), {}).get("ok") for ln in links for g in guests)]
    vals = {}
    for (ln, g, c), r in by.items():
        if r.get("ok"):
            vals["%s/%s/%s" % (ln, g, c)] = {"time": r.get("e2e_total_s"), "down": r.get("e2e_downtime_ms"),
                                             "wire": r["wire"]["src_to_dst"] / 1e6}
    data = {"links": links, "guests": guests, "configs": configs,
            "labels": {c: CONFIGS[c]["label"] for c in configs},
            "colors": {c: PLOT_COLORS[CONFIG_ORDER.index(c)] for c in configs},
            "titles": {ln: "%s: %g Mbit/s, %g ms RTT" % (ln, LINKS[ln][0] / 1e6, LINKS[ln][1]) for ln in links},
            "values": vals}
    jp = os.path.join(out, "plot-data.json")
    with open(jp, "w") as f:
        json.dump(data, f)
    png = os.path.join(out, "wan-bench.png")
    r = subprocess.run([venv_python(out), "-c", PLOT, jp, png], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise Fail("plot: %s" % r.stderr.strip()[-500:])
    return png


# --------------------------------------------------------------------------- main
def cleanup():
    for p in reversed(OWNED_PROCS):
        try:
            stop_proc(p, 3)
        except Exception:
            pass
    for ns in list(OWNED_NS):
        subprocess.run(["ip", "netns", "del", ns], timeout=30, capture_output=True)
        OWNED_NS.remove(ns)


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
            p.add_argument("--catalog-inputs", default=os.path.join(ROOT, "target", "ratio"),
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
        return {"run": cmd_run, "linktest": cmd_linktest, "report": cmd_report}[o.cmd](o)
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
