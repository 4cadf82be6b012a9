#!/usr/bin/env python3
"""Capture the tiny golden streams of testdata/: a paused guest with no kernel.

  capture-paused.py QEMU MACHINE OUT [MEM_MIB]

QEMU is a qemu-system-x86_64 (e.g. $LAB/qemu7.2/bin/qemu-system-x86_64 after
harness/setup.sh). The guest is started with -S (never runs), so its RAM is zero
pages apart from the firmware ROMs: a real stream of ~350 KB for 16 MiB.
"""
import os
import subprocess
import sys
import tempfile

from migharness.common import Fail, deadline_loop
from migharness.proc import stop_proc
from migharness.qmp import QMP


def main():
    qemu, machine, out = sys.argv[1:4]
    mem = sys.argv[4] if len(sys.argv) > 4 else "16"
    run = tempfile.mkdtemp(prefix="migstream-paused-")
    qmp_path = os.path.join(run, "qmp")
    vm = subprocess.Popen([qemu, "-machine", machine, "-accel", "tcg", "-m", mem, "-S", "-nodefaults",
                           "-no-user-config", "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"])
    try:
        qmp = QMP(qmp_path, vm, "paused")
        qmp.cmd("migrate", uri=f"exec:cat > {out}")
        for _ in deadline_loop(30, "the migration to finish", 0.05):
            status = qmp.cmd("query-migrate").get("status")
            if status in ("completed", "failed"):
                break
        print(status, os.path.getsize(out))
        qmp.cmd("quit")
        vm.wait(10)
        return 0 if status == "completed" else 1
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
        return 1
    finally:
        stop_proc(vm)


if __name__ == "__main__":
    sys.exit(main())
