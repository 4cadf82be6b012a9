"""The lab directory that harness/setup.sh fills: QEMU builds, the guest's kernel
and initramfs, and the run dirs (logs, sockets) of every command."""
import os
import tempfile

from .common import Fail

HARNESS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(HARNESS)
LAB = os.environ.get("MIGSTREAM_LAB_DIR") or os.path.join(REPO, "target", "qemu-lab")
KERNEL = os.path.join(LAB, "kernel", "vmlinuz")
INITRAMFS = os.path.join(LAB, "guest", "initramfs.cpio.gz")


def qemu_binary(ver):
    b = os.path.join(LAB, "qemu" + ver, "bin", "qemu-system-x86_64")
    if not os.access(b, os.X_OK):
        raise Fail("%s missing: run harness/setup.sh" % b)
    return b


def require(versions):
    """Fail unless setup.sh has built these QEMU versions and the guest."""
    for v in versions:
        qemu_binary(v)
    for f in (KERNEL, INITRAMFS):
        if not os.path.exists(f):
            raise Fail("%s missing: run harness/setup.sh" % f)


def make_rundir(kind):
    os.makedirs(os.path.join(LAB, "runs"), exist_ok=True)
    rd = tempfile.mkdtemp(prefix=kind + "-", dir=os.path.join(LAB, "runs"))
    if len(rd) > 90:        # unix socket paths are limited to 108 bytes
        rd = tempfile.mkdtemp(prefix="mig-" + kind + "-")
    return rd
