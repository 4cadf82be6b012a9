"""One QEMU running the lab's guest (harness/guest-init.sh), driven over QMP and
its serial console."""
import os
import shlex
import subprocess

from .assets import INITRAMFS, KERNEL, qemu_binary
from .common import Fail, deadline_loop, log
from .console import Console
from .proc import stop_proc
from .qmp import QMP


def kernel_cmdline(a):
    mb = a.data_mb
    if mb is None:
        mb = {"fill": a.mem // 2, "dup": a.mem // 2, "dirty": a.mem // 4}.get(a.workload, 0)
    return ("console=ttyS0 panic=-1 quiet mig.wl=%s mig.mb=%d mig.dirty_mb=%d mig.chunk=%d"
            % (a.workload, mb, a.dirty_mb, a.dirty_chunk))


def ram_size(a):
    # QEMU 7.2's TCG loses guest writes during live migration when the RAM block
    # is a multiple of 256 KiB (dirty-bitmap fast path forgets to re-arm the TCG
    # TLB; fixed upstream in 9.0 by "physmem: Fix migration dirty bitmap coherency
    # with TCG memory access"). A few KiB more RAM takes the correct slow path.
    return "%dK" % (a.mem * 1024 + a.ram_tail_kib)


class VM:
    """QEMU `ver` with the guest `a` describes (machine, accel, mem, workload, timeouts),
    its sockets and logs in `rundir`. `binary` runs instead of the lab's QEMU `ver`
    (wan-bench.py: a script that execs it inside a network namespace)."""

    def __init__(self, name, ver, a, rundir, incoming=None, binary=None):
        self.name, self.ver, self.a, self.rundir = name, ver, a, rundir
        self.incoming = incoming
        self.binary = binary
        self.proc = self.qmp = self.console = None

    def start(self):
        a, rd, n = self.a, self.rundir, self.name
        argv = [self.binary or qemu_binary(self.ver), "-name", n, "-machine", a.machine, "-accel", a.accel,
                "-m", ram_size(a), "-smp", "1", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-kernel", KERNEL,
                "-initrd", INITRAMFS,
                "-append", kernel_cmdline(a),
                # wait=on: QEMU does not start the guest before we are connected,
                # so no console output (READY) can be lost
                "-chardev", "socket,id=ser0,path=%s/%s.ser,server=on,wait=on" % (rd, n),
                "-serial", "chardev:ser0",
                "-qmp", "unix:%s/%s.qmp,server=on,wait=off" % (rd, n)]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        logpath = os.path.join(rd, n + ".qemu.log")
        with open(logpath, "wb") as f:
            f.write(("# %s\n" % " ".join(map(shlex.quote, argv))).encode())
            f.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        log("%s: QEMU %s started, pid %d" % (n, self.ver, self.proc.pid))
        self.console = Console("%s/%s.ser" % (rd, n), self.proc, n, os.path.join(rd, n + ".serial.log"))
        self.qmp = QMP("%s/%s.qmp" % (rd, n), self.proc, n)
        v = self.qmp.cmd("query-version")
        q = v["qemu"]
        self.version = "%d.%d.%d (%s)" % (q["major"], q["minor"], q["micro"], v.get("package", "").strip())
        return self

    def wait_ready(self):
        m, _ = self.console.wait(r"^READY sum=([0-9a-f]{32})", self.a.boot_timeout)
        return m.group(1)

    def check(self):
        since = len(self.console.lines)
        self.console.sock.sendall(b"check\n")
        m, _ = self.console.wait(r"^CHECK sum=([0-9a-f]{32}) passes=(\d+)", self.a.check_timeout, since)
        return m.group(1), int(m.group(2))

    def status(self):
        return self.qmp.cmd("query-status")["status"]

    def wait_status(self, wanted, timeout):
        for _ in deadline_loop(timeout, "%s to be %s" % (self.name, wanted)):
            if self.proc.poll() is not None:
                raise Fail("%s: QEMU exited with %s" % (self.name, self.proc.returncode))
            if self.status() == wanted:
                return

    def machine_type(self):
        """Resolve an alias such as 'pc' to the versioned type the stream names."""
        for m in self.qmp.cmd("query-machines"):
            if self.a.machine in (m["name"], m.get("alias")):
                return m["name"]
        return self.a.machine

    def configure(self, caps, params):
        if caps:
            self.qmp.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        if params:
            self.qmp.cmd("migrate-set-parameters", **params)

    def stop(self):
        """Quit via QMP, then SIGTERM/SIGKILL our own child by PID if it lingers."""
        if self.proc and self.proc.poll() is None:
            try:
                if self.qmp:
                    self.qmp.cmd("quit", timeout=5)
                self.proc.wait(10)
            except (Fail, OSError, subprocess.TimeoutExpired):
                pass
            stop_proc(self.proc, 10)
        if self.console:
            self.console.close()
        if self.qmp:
            self.qmp.sock.close()
