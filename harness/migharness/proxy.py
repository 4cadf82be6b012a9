"""One dedup proxy process (examples/proxy.rs), its output read as it comes."""
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time

from .common import Fail, log
from .proc import stop_proc


class Proxy:
    """One `proxy source|destination` process (examples/proxy.rs) with --json,
    over mutual TLS with `tls`'s credentials (a Pki), or --plaintext if None.
    `listen` and `to` are addresses as the proxy takes them (HOST:PORT or
    unix:PATH); `prefix` runs it through another program (wan-bench.py: `ip netns
    exec NS`). Its stderr goes to NAME.stderr.log (the `listening on ADDR` line is
    picked out of it), its stdout to NAME.stdout.log, one JSON object a migration."""

    LISTENING = re.compile(r"^listening on (\S+)")
    # the line a migration ends with, at either end
    FINAL = re.compile(r"^(wire \d+ bytes qemu \d+ bytes|migration failed: )")

    def __init__(self, name, binary, role, listen, to, extra, once, rundir, tls=None, prefix=()):
        self.name, self.role = name, role
        self.argv = list(prefix) + [binary, role, "--listen", listen, "--to", to, "--json"]
        self.argv += tls.args(role) if tls else ["--plaintext"]
        if once:
            self.argv.append("--once")
        self.argv += extra
        self.rundir = rundir
        self.proc = None
        self.addr = self.port = None    # as its `listening on` line names it; port for HOST:PORT
        self.plaintext = None           # whether that line says the link is plaintext
        self.results = []               # the JSON objects from stdout, in order
        self.result_times = []          # time.time() at which each came
        self.final_times = []           # time.time() of each final stderr line (FINAL)
        self.stderr = []                # stderr lines (progress lines split at \r too)
        self.garbage = []               # stdout lines that are not JSON objects
        self.cv = threading.Condition()
        self.open_streams = 0
        self.killed = False

    def start(self):
        with open(os.path.join(self.rundir, self.name + ".argv"), "w") as f:
            f.write(" ".join(map(shlex.quote, self.argv)) + "\n")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise Fail("%s: cannot run %s: %s" % (self.name, self.argv[0], e))
        log("%s: %s started, pid %d" % (self.name, " ".join(self.argv), self.proc.pid))
        self.open_streams = 2
        for stream, fn in ((self.proc.stdout, self._on_stdout), (self.proc.stderr, self._on_stderr)):
            threading.Thread(target=self._reader, args=(stream, fn), daemon=True).start()
        return self

    def _reader(self, stream, fn):
        suffix = ".stdout.log" if fn == self._on_stdout else ".stderr.log"
        with open(os.path.join(self.rundir, self.name + suffix), "wb") as logf:
            part = b""
            while True:
                d = stream.read1(65536)
                logf.write(d)
                logf.flush()
                part += d
                if d:
                    *full, part = re.split(rb"[\r\n]", part)
                else:
                    full, part = [part], b""
                with self.cv:
                    for x in full:
                        if x.strip():
                            fn(x.decode("utf-8", "replace").strip())
                    if not d:
                        self.open_streams -= 1
                    self.cv.notify_all()
                if not d:
                    return

    def _on_stdout(self, line):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            self.results.append(obj)
            self.result_times.append(time.time())
        else:
            self.garbage.append(line)

    def _on_stderr(self, line):
        self.stderr.append(line)
        m = self.LISTENING.match(line)
        if m and self.addr is None:
            self.addr = m.group(1)
            self.plaintext = "plaintext" in line[m.end():]
            if not self.addr.startswith("unix:"):
                self.port = int(self.addr.rsplit(":", 1)[1])
        if self.FINAL.match(line):
            self.final_times.append(time.time())

    def saw(self, regex):
        """Whether a stderr line so far matches regex."""
        with self.cv:
            return any(re.search(regex, x) for x in self.stderr)

    def _wait(self, pred, timeout, what):
        end = time.monotonic() + timeout
        with self.cv:
            while not pred():
                left = end - time.monotonic()
                if self.open_streams == 0 or left <= 0:
                    tail = " | ".join(self.stderr[-5:])
                    raise Fail("%s: %s waiting for %s (stderr: %s)" % (
                        self.name, "exited with %s" % self.proc.poll() if self.open_streams == 0 else
                        "timed out after %.0fs" % timeout, what, tail or "-"))
                self.cv.wait(min(left, 1.0))

    def wait_listening(self, timeout=30):
        """Wait for the `listening on ADDR` line; the port (None for unix:PATH)."""
        self._wait(lambda: self.addr is not None, timeout, "its 'listening on ADDR' line")
        log("%s: listening on %s (%s link)" % (self.name, self.addr, "plaintext" if self.plaintext else "TLS"))
        return self.port

    def wait_streams(self, timeout):
        """Wait (bounded) until its stdout and stderr are read to their end."""
        end = time.monotonic() + timeout
        with self.cv:
            while self.open_streams and time.monotonic() < end:
                self.cv.wait(1.0)

    def wait_results(self, n, timeout):
        """Wait for the n-th JSON line (a proxy reports each migration once it ends)."""
        self._wait(lambda: len(self.results) >= n, timeout, "its JSON line for migration %d" % n)
        return self.results[n - 1]

    def wait_exit(self, timeout):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.wait_streams(10)           # its last lines may still be in the pipes
        return rc

    def kill(self):
        """SIGKILL our own child by PID: the fault injection of --fault kill-dst-proxy."""
        log("%s: SIGKILL pid %d" % (self.name, self.proc.pid))
        self.killed = True
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc:
            stop_proc(self.proc, 10)
