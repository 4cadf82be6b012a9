"""A command's run dir and what it started, cleaned up on every exit path."""
import os
import shutil
import sys

from .assets import make_rundir
from .common import Fail


def run_in_rundir(kind, body, keep_run, unverified=(), what="stream"):
    """Call body(rundir, owned) in a fresh run dir (logs, sockets); it returns
    whether everything passed, and appends what it starts to `owned` (each with
    a stop()), which is stopped, newest first, however body ends. On failure the
    files `unverified` move into the run dir, so that no unverified `what` is
    left where a good one is expected, and the run dir stays (its path on
    stderr); on success it goes unless `keep_run`. Returns the exit code."""
    rundir = make_rundir(kind)
    owned, ok = [], False
    try:
        ok = body(rundir, owned)
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
    finally:
        for x in reversed(owned):
            x.stop()
        if not ok:
            for f in unverified:
                if os.path.exists(f):
                    shutil.move(f, os.path.join(rundir, os.path.basename(f)))
        if ok and not keep_run:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            print("run dir (logs%s): %s" % ("" if ok else ", failed " + what, rundir), file=sys.stderr)
    return 0 if ok else 1
