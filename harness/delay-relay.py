#!/usr/bin/env python3
"""delay-relay.py IF_A IF_B --delay-ms D: a packet-level delay line between two
interfaces (used by wan-bench.py, run inside the middle network namespace).

Every Ethernet frame received on IF_A is sent out of IF_B D ms later, and vice
versa (each direction delayed by D, so the round trip gains 2*D). It works on
frames, not on TCP connections: the end hosts' TCP sees the real round-trip
time (slow start, window growth, ACK clocking), which a relay that terminates
TCP would hide. AF_PACKET sockets with PACKET_VNET_HDR carry the kernel's
GSO super-frames (up to 64 KiB) whole, so at 1 Gbit/s it handles a few
thousand frames per second, not 80,000. The rate limit is not done here: a tbf
qdisc on the egress of IF_A/IF_B (set up by wan-bench.py) queues and drops
what this relay sends, like a router's bottleneck queue.

Prints "ready" on stdout once both sockets are open; on SIGTERM/SIGINT prints
one JSON line of counters (frames/bytes per direction, drops, max queue) and
exits 0. On SIGUSR1 it prints one JSON line {"flows": {DIRECTION: [...]}}: the
IPv4 TCP connections seen since the last SIGUSR1 (or the start), one entry per
port pair and direction with its frames and bytes (whole frames, as on the
wire), and starts counting afresh. wan-bench.py sends it before and after each
migration, to tell how many connections a migration used (a multifd migration
has one per channel plus the main one) and what each carried. Python 3 standard
library only; Linux, root (or CAP_NET_RAW).
"""
import argparse
import collections
import errno
import json
import select
import signal
import socket
import sys
import threading
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15            # frames carry a struct virtio_net_hdr (GSO/csum info)
PACKET_IGNORE_OUTGOING = 23     # do not see what we send ourselves
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32


def open_if(name, bufsize):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for opt in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
        s.setsockopt(socket.SOL_SOCKET, opt, bufsize)
    s.bind((name, 0))
    s.setblocking(False)
    return s


class Direction(threading.Thread):
    """Frames from `rx` go out of `tx` `delay` seconds after they arrived."""

    def __init__(self, name, rx, tx, delay, max_queue_bytes, stop):
        super().__init__(daemon=True, name=name)
        self.rx, self.tx, self.delay, self.maxq, self.stop = rx, tx, delay, max_queue_bytes, stop
        self.stats = {"frames": 0, "bytes": 0, "sent": 0, "tx_drops": 0, "queue_drops": 0,
                      "max_queue_bytes": 0, "max_late_ms": 0.0,
                      "late_ms_sum": 0.0, "late_over_1ms": 0}
        self.flows = {}                 # (sport, dport) -> [frames, bytes], since the last take_flows
        self.error = None

    def take_flows(self):
        """The per-connection counters so far, and a fresh set (the swap is one
        bytecode; a frame counted in between lands in either set, not lost twice)."""
        flows, self.flows = self.flows, {}
        return [{"sport": k[0], "dport": k[1], "frames": v[0], "bytes": v[1]}
                for k, v in sorted(flows.items(), key=lambda kv: -kv[1][1])]

    def run(self):
        try:
            self._run()
        except Exception as e:          # reported in the final JSON line
            self.error = repr(e)

    def _run(self):
        q = collections.deque()         # (due, frame); arrival order = due order
        qbytes = 0
        st = self.stats
        poller = select.poll()
        poller.register(self.rx, select.POLLIN)
        recv, send, mono = self.rx.recv, self.tx.send, time.monotonic
        while not self.stop.is_set():
            now = mono()
            timeout = 200 if not q else max(0.0, (q[0][0] - now) * 1000)
            if poller.poll(timeout):
                now = mono()
                due = now + self.delay
                while True:             # drain what is there
                    try:
                        f = recv(70000)
                    except BlockingIOError:
                        break
                    st["frames"] += 1
                    st["bytes"] += len(f) - 10      # without the 10-byte virtio_net_hdr
                    # IPv4 (ethertype at 10+12) TCP (protocol at 10+14+9): count per port pair
                    o = 24 + (f[24] & 0x0F) * 4 if len(f) > 34 else 0
                    if o and f[22:24] == b"\x08\x00" and f[33] == 6 and len(f) >= o + 4:
                        key = (f[o] << 8 | f[o + 1], f[o + 2] << 8 | f[o + 3])
                        c = self.flows.get(key)
                        if c is None:
                            self.flows[key] = [1, len(f) - 10]
                        else:
                            c[0] += 1
                            c[1] += len(f) - 10
                    if qbytes + len(f) > self.maxq:
                        st["queue_drops"] += 1
                        continue
                    q.append((due, f))
                    qbytes += len(f)
                if qbytes > st["max_queue_bytes"]:
                    st["max_queue_bytes"] = qbytes
            now = mono()
            while q and q[0][0] <= now:
                d, f = q.popleft()
                qbytes -= len(f)
                late = (now - d) * 1000
                st["late_ms_sum"] += late
                if late > 1.0:
                    st["late_over_1ms"] += 1
                if late > st["max_late_ms"]:
                    st["max_late_ms"] = round(late, 3)
                try:
                    send(f)
                    st["sent"] += 1
                except BlockingIOError:
                    st["tx_drops"] += 1     # socket buffer full: the frame is lost, as on a wire
                except OSError as e:
                    if e.errno in (errno.ENOBUFS, errno.EAGAIN):
                        st["tx_drops"] += 1  # the egress qdisc (tbf) queue is full
                    else:
                        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("if_a")
    ap.add_argument("if_b")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction")
    ap.add_argument("--bufsize", type=int, default=32 << 20, help="socket buffers (bytes)")
    ap.add_argument("--max-queue", type=int, default=256 << 20,
                    help="bytes held per direction before frames are dropped")
    a = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dump = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: dump.set())
    sa, sb = open_if(a.if_a, a.bufsize), open_if(a.if_b, a.bufsize)
    d = a.delay_ms / 1000.0
    dirs = [Direction("%s->%s" % (a.if_a, a.if_b), sa, sb, d, a.max_queue, stop),
            Direction("%s->%s" % (a.if_b, a.if_a), sb, sa, d, a.max_queue, stop)]
    for t in dirs:
        t.start()
    print("ready", flush=True)
    while not stop.is_set() and all(t.is_alive() for t in dirs):
        if dump.wait(0.05):
            dump.clear()
            print(json.dumps({"flows": {t.name: t.take_flows() for t in dirs}}), flush=True)
    stop.set()
    for t in dirs:
        t.join(2)
    print(json.dumps({"delay_ms": a.delay_ms,
                      "directions": {t.name: dict(t.stats, error=t.error) for t in dirs}}), flush=True)
    return 1 if any(t.error for t in dirs) else 0


if __name__ == "__main__":
    sys.exit(main())
