"""The guest's serial console on a unix socket."""
import re
import socket
import threading
import time

from .common import Fail
from .qmp import connect_unix


class Console:
    """Guest serial console on a unix socket: logs everything, finds lines by regex."""

    def __init__(self, path, proc, name, logpath):
        self.name = name
        self.sock = connect_unix(path, proc, 60, name + " serial socket")
        self.logf = open(logpath, "ab")
        self.lines = []
        self.cv = threading.Condition()
        self.eof = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        part = b""
        while True:
            try:
                d = self.sock.recv(65536)
            except OSError:
                d = b""
            with self.cv:
                if not d:
                    self.eof = True
                    self.cv.notify_all()
                    return
                self.logf.write(d)
                self.logf.flush()
                part += d
                *full, part = part.split(b"\n")
                self.lines += [x.decode("utf-8", "replace").strip("\r") for x in full]
                self.cv.notify_all()

    def wait(self, regex, timeout, since=0):
        """Return (match, index) of the first line >= since matching regex."""
        rx, end = re.compile(regex), time.monotonic() + timeout
        with self.cv:
            while True:
                for i in range(since, len(self.lines)):
                    m = rx.search(self.lines[i])
                    if m:
                        return m, i
                since = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or self.eof:
                    raise Fail("%s: %s waiting for /%s/ on the guest console"
                               % (self.name, "timed out" if left <= 0 else "console closed", regex))
                self.cv.wait(min(left, 1.0))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.cv:
            self.logf.close()
