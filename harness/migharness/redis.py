"""A throwaway redis-server (no persistence) for the catalog's Redis ring."""
import shutil
import subprocess

from .common import Fail, deadline_loop
from .proc import stop_proc


class RedisServer:
    """redis-server on 127.0.0.1:`port`, its output in `logpath`; `prefix` runs it
    and redis-cli through another program (wan-bench.py: `ip netns exec NS`)."""

    def __init__(self, port, logpath, prefix=()):
        self.port, self.logpath, self.prefix = port, logpath, list(prefix)
        self.proc = None

    def start(self):
        if not shutil.which("redis-server"):
            raise Fail("redis-server not installed (apt-get install redis-server)")
        with open(self.logpath, "ab") as logf:
            self.proc = subprocess.Popen(
                self.prefix + ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout=20):
        """Wait until it answers PING."""
        for _ in deadline_loop(timeout, "redis-server on port %d" % self.port):
            if self.proc.poll() is not None:
                raise Fail("redis-server on port %d exited with %s (log: %s)"
                           % (self.port, self.proc.returncode, self.logpath))
            r = subprocess.run(self.prefix + ["redis-cli", "-p", str(self.port), "ping"],
                               capture_output=True, text=True, timeout=10)
            if r.stdout.strip() == "PONG":
                return self

    def stop(self):
        if self.proc:
            stop_proc(self.proc)
