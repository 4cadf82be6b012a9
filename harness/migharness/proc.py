"""Running and stopping our own child processes. Only processes started here are
ever signalled, by PID; every wait is bounded."""
import os
import signal
import subprocess
import threading
import time

from .common import Fail

CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*argv, timeout=30, check=True, capture=True):
    """Run a command to its end (bounded); its stdout, or Fail on a non-zero exit."""
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=timeout,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None, text=True)
    if check and r.returncode != 0:
        raise Fail("%s: exit %d: %s" % (" ".join(argv), r.returncode, (r.stderr or "").strip()))
    return r.stdout if capture else ""


def stop_proc(p, grace=5.0):
    """SIGTERM, then SIGKILL, our own child by PID; bounded."""
    if p.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if p.poll() is not None:
            return
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            pass


def wait_line(pipe, timeout, what):
    """First line of a child's pipe, bounded (a thread reads it)."""
    box = []
    t = threading.Thread(target=lambda: box.append(pipe.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise Fail("timed out after %ss waiting for %s" % (timeout, what))
    return box[0].decode() if isinstance(box[0], bytes) else box[0]


def cpu_ticks(pid):
    """utime+stime of a process (all its threads), seconds, from /proc/PID/stat."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK        # fields 14 and 15
    except (OSError, IndexError, ValueError):
        return None


def reap_with_cpu(p, timeout):
    """Wait (bounded) for our child to exit; read its CPU time from /proc/PID/stat
    while it is a zombie, then reap it with wait4. Returns (exit code, stat CPU s,
    rusage CPU s) or None on timeout."""
    end = time.monotonic() + timeout
    while True:
        try:
            r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:
            return (p.returncode, None, None)
        if r is not None:
            break
        if time.monotonic() > end:
            return None
        time.sleep(0.05)
    stat_cpu = cpu_ticks(p.pid)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, stat_cpu, round(ru.ru_utime + ru.ru_stime, 3)


def renice(pids, value):
    """Set the nice value of every thread of our own processes `pids` (nice is
    per thread on Linux; threads created later inherit their creator's)."""
    for pid in pids:
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), value)
            except OSError:
                pass
