"""The checks of a finished live migration, and the report of those that failed."""
import re
import time

from .common import Fail, log


def check_arrival(a, src, dst, info, ready, checks):
    """The checks of a completed live migration, added to `checks`: source
    postmigrate, destination running, the destination guest's checksum of its
    data equal to the source's READY sum, its kernel clean, for `dirty` the
    dirtying loop still running. Returns the destination's sum (or None)."""
    checks["completed"] = info.get("status") == "completed"
    after = None
    if checks["completed"]:
        checks["src_postmigrate"] = src.status() == "postmigrate"
        try:
            dst.wait_status("running", 30)
            after, passes = dst.check()
            checks["sum_matches"] = after == ready
            log("%s: CHECK sum=%s passes=%d" % (dst.name, after, passes))
            if a.workload == "dirty":       # the dirtying loop survived and still runs
                time.sleep(1)
                checks["dirty_loop_alive"] = dst.check()[1] > passes
            checks["dst_guest_answers"] = True
        except Fail as e:                   # e.g. the guest panicked and QEMU quit
            log(str(e))
            checks["dst_guest_answers"] = False
        # lost pages often show up as a guest kernel oops rather than a bad sum
        checks["dst_kernel_clean"] = not any(re.search(r"Oops|BUG:|Kernel panic|general protection", x)
                                             for x in dst.console.lines)
    return after


def check_minimums(a, info, checks):
    """--min-dirty-syncs / --min-xbzrle-pages against the source's query-migrate."""
    syncs = info.get("ram", {}).get("dirty-sync-count")
    if a.min_dirty_syncs:
        checks["min_dirty_syncs"] = (syncs or 0) >= a.min_dirty_syncs
    if a.min_xbzrle_pages:
        checks["min_xbzrle_pages"] = info.get("xbzrle-cache", {}).get("pages", 0) >= a.min_xbzrle_pages
    return syncs


def report_failed(a, checks, detail):
    """Log the failed checks (with a hint for QEMU 7.2's known bug); whether all passed."""
    failed = [k for k, v in checks.items() if not v]
    if failed:
        log("FAILED checks: %s %s" % (", ".join(failed), detail or ""))
        if a.qemu == "7.2" and not a.ram_tail_kib:
            log("hint: QEMU 7.2 under TCG loses guest writes during live migration; "
                "--ram-tail-kib 8 avoids it (see harness/README.md)")
    return not failed
