"""What every module of the harness needs: its error, its log, its bounded wait."""
import sys
import time

T0 = time.monotonic()


class Fail(Exception):
    """A check or a step of the lab failed; the message says which and why."""


def log(msg):
    print("[lab %6.1fs] %s" % (time.monotonic() - T0, msg), file=sys.stderr, flush=True)


def deadline_loop(timeout, what, poll=0.1):
    """Yield until the caller breaks out; raise Fail once `timeout` seconds have passed."""
    end = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > end:
            raise Fail("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(poll)
