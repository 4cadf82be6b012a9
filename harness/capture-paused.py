#!/usr/bin/env python3
"""Capture the tiny golden streams of testdata/: a paused guest with no kernel.

  capture-paused.py QEMU MACHINE OUT [MEM_MIB]

QEMU is a qemu-system-x86_64 (e.g. $LAB/qemu7.2/bin/qemu-system-x86_64 after
harness/setup.sh). The guest is started with -S (never runs), so its RAM is zero
pages apart from the firmware ROMs: a real stream of ~350 KB for 16 MiB.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def main():
    qemu, machine, out = sys.argv[1:4]
    mem = sys.argv[4] if len(sys.argv) > 4 else "16"
    run = tempfile.mkdtemp(prefix="migstream-paused-")
    qmp_path = os.path.join(run, "qmp")
    vm = subprocess.Popen([qemu, "-machine", machine, "-accel", "tcg", "-m", mem, "-S", "-nodefaults",
                           "-no-user-config", "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"])
    try:
        for _ in range(200):
            if os.path.exists(qmp_path):
                break
            time.sleep(0.05)
        qmp = socket.socket(socket.AF_UNIX)
        qmp.settimeout(30)
        qmp.connect(qmp_path)
        io = qmp.makefile("rw")

        def command(name, **args):
            io.write(json.dumps({"execute": name, "arguments": args}) + "\n")
            io.flush()
            while True:
                reply = json.loads(io.readline())
                if "return" in reply or "error" in reply:
                    return reply

        io.readline()
        command("qmp_capabilities")
        command("migrate", uri=f"exec:cat > {out}")
        for _ in range(600):
            status = command("query-migrate")["return"].get("status")
            if status in ("completed", "failed"):
                break
            time.sleep(0.05)
        print(status, os.path.getsize(out))
        command("quit")
        vm.wait(10)
        return 0 if status == "completed" else 1
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait(10)


if __name__ == "__main__":
    sys.exit(main())
