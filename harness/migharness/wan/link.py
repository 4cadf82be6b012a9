"""The emulated WAN link: SRC -- WAN -- DST network namespaces, the delay relay
in WAN, tbf both ways; and the probes that measure it (linktest)."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from ..assets import HARNESS
from ..common import Fail, log
from ..proc import cpu_ticks, sh, stop_proc, wait_line
from ..redis import RedisServer
from .matrix import DST_IP, LINKS, REDIS_PORTS, SRC_IP
from .owned import OWNED_NS, OWNED_PROCS, spawn

TBF_BURST = 131072          # bytes: >= one 64 KiB GSO frame, >= 1 ms at 1 Gbit/s


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
        self.relay = spawn(["ip", "netns", "exec", self.ns_w, sys.executable, os.path.join(HARNESS, "delay-relay.py"),
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
