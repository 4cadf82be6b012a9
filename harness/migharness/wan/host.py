"""Facts of the host that each record keeps."""
from ..assets import REPO
from ..common import Fail
from ..proc import sh


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def git_head():
    try:
        return sh("git", "-C", REPO, "rev-parse", "--short", "HEAD").strip()
    except (Fail, OSError):
        return None
