"""Every process and namespace the benchmark started, stopped or removed on any
exit by cleanup() (by PID: only our own)."""
import subprocess

from ..proc import stop_proc

OWNED_PROCS = []
OWNED_NS = []


def spawn(argv, **kw):
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
    OWNED_PROCS.append(p)
    return p


def cleanup():
    """Stop every process still running and remove every namespace still there."""
    for p in reversed(OWNED_PROCS):
        try:
            stop_proc(p, 3)
        except Exception:
            pass
    for ns in list(OWNED_NS):
        subprocess.run(["ip", "netns", "del", ns], timeout=30, capture_output=True)
        OWNED_NS.remove(ns)
