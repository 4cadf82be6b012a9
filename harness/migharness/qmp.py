"""A QMP client on QEMU's unix socket: one command at a time, every read bounded."""
import json
import socket
import time

from .common import Fail, deadline_loop


def connect_unix(path, proc, timeout, what):
    """Connect to a socket that QEMU (`proc`) creates once it has started."""
    for _ in deadline_loop(timeout, what, 0.05):
        if proc.poll() is not None:
            raise Fail("%s: QEMU exited with %s before its socket appeared" % (what, proc.returncode))
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()


class QMP:
    """`events` keeps every event QEMU sent between replies, in order: wan-bench.py
    times a migration by them (QEMU stamps them with the host clock)."""

    def __init__(self, path, proc, name):
        self.name = name
        self.sock = connect_unix(path, proc, 60, name + " QMP socket")
        self.buf = b""
        self.id = 0
        self.events = []
        if "QMP" not in self._read(30):
            raise Fail("%s: no QMP greeting" % name)
        self.cmd("qmp_capabilities")

    def _read(self, timeout):
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise Fail("%s: QMP reply timed out" % self.name)
            self.sock.settimeout(left)
            try:
                d = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not d:
                raise Fail("%s: QMP connection closed (QEMU died?)" % self.name)
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, timeout=30, **args):
        self.id += 1
        msg = {"execute": name, "id": self.id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read(timeout)
            if "event" in r:
                self.events.append(r)
                continue
            if r.get("id") != self.id:      # stale replies
                continue
            if "error" in r:
                raise Fail("%s: %s: %s" % (self.name, name, r["error"].get("desc", r["error"])))
            return r.get("return")

    def event_time(self, name):
        """The host-clock time (s) of the first event `name`, or None."""
        for e in self.events:
            if e["event"] == name:
                ts = e["timestamp"]
                return ts["seconds"] + ts["microseconds"] / 1e6
        return None
