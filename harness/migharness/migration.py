"""An outgoing migration, run to its end, and what QEMU says of it."""
import time

from .common import Fail, deadline_loop, log

UNTHROTTLED = 1 << 40           # QEMU's default max-bandwidth (128 MiB/s) only slows captures


def migrate(vm, uri, timeout, on_poll=None, poll=0.1):
    """Run an outgoing migration to completion; return the final query-migrate.
    on_poll(info), if given, sees every query-migrate while it is under way."""
    log("%s: migrate to %s" % (vm.name, uri))
    vm.qmp.cmd("migrate", uri=uri)
    last = 0.0
    t = time.monotonic()
    try:
        for _ in deadline_loop(timeout, "the migration to finish", poll):
            info = vm.qmp.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if on_poll:
                on_poll(info)
            if time.monotonic() - last >= 2:
                last = time.monotonic()
                r = info.get("ram", {})
                log("  %s %.0fs: %.1f MiB sent, %.1f MiB remaining, dirty-sync-count %s"
                    % (info.get("status"), last - t, r.get("transferred", 0) / 2**20,
                       r.get("remaining", 0) / 2**20, r.get("dirty-sync-count")))
    except Fail:
        try:
            vm.qmp.cmd("migrate_cancel")
        except Fail:
            pass
        raise


def summary(info):
    """The figures of a final query-migrate that the reports keep."""
    r = info.get("ram", {})
    s = {k: info.get(k) for k in ("status", "total-time", "downtime", "setup-time") if k in info}
    s.update({"ram-" + k: r[k] for k in ("transferred", "total", "normal", "duplicate", "dirty-sync-count",
                                       "precopy-bytes", "downtime-bytes", "multifd-bytes") if k in r})
    for k in ("xbzrle-cache", "error-desc"):
        if k in info:
            s[k] = info[k]
    return s


def effective_params(vm):
    """query-migrate-parameters (the values in force, defaults included: e.g. the
    multifd-zstd-level actually used); None if the QEMU cannot answer any more."""
    try:
        return vm.qmp.cmd("query-migrate-parameters")
    except Fail:
        return None
