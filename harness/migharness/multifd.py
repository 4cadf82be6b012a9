"""Every connection of a real multifd live migration captured, one file each
(capture-multifd.py)."""
import glob
import os

from .capture import base_meta
from .checks import check_arrival, report_failed
from .common import Fail, log
from .endpoints import start_destination, start_source
from .migration import effective_params, migrate, summary
from .options import parse_caps, parse_params
from .relay import SplitRelay


def name_files(relay, prefix, checks):
    """Renames each connection's file after what it carries; returns the file list."""
    files, ids = [], []
    for c in relay.conns:
        part = relay.conn_file(c["index"])
        if not os.path.exists(part):    # it failed before its first bytes
            open(part, "wb").close()
        size = os.path.getsize(part)
        with open(part, "rb") as f:
            head = f.read(25)
        entry = {"connection": c["index"], "kind": c["kind"], "bytes": size,
                 "complete": bool(c["eof"]) and size == c["src_to_dst"]}
        if c["kind"] == "main":
            path = prefix + ".main.mig"
        elif c["kind"] == "multifd" and len(head) == 25:
            entry["channel_id"] = head[24]
            ids.append(head[24])
            path = "%s.ch%d.mfd" % (prefix, head[24])
        else:
            path = "%s.other%d.bin" % (prefix, c["index"])
        if os.path.exists(path):
            checks["channel_ids_distinct"] = False
            path += ".dup%d" % c["index"]
        os.rename(part, path)
        entry["file"] = os.path.basename(path)
        files.append(entry)
    return files, sorted(ids)


def capture_multifd(a, rundir, vms):
    """Migrate with `a.channels` multifd channels through a SplitRelay; the
    connections' files move next to `a.out` only if every check passed.
    Returns (report, ok)."""
    prefix = os.path.abspath(a.out)
    for pattern in (".json", ".main.mig", ".ch*.mfd"):
        for old in glob.glob(glob.escape(prefix) + pattern):
            raise Fail("%s exists: remove the old capture first" % old)
    caps, params = parse_caps(a), parse_params(a)
    caps["multifd"] = True
    params["multifd-channels"] = a.channels
    a.qemu = a.src_qemu or a.qemu
    dst_ver = a.dst_qemu or a.qemu
    dst, port = start_destination(a, rundir, vms, "dst", dst_ver, caps, params)
    src, ready = start_source(a, rundir, vms, caps, params)
    eff = {"src": effective_params(src), "dst": effective_params(dst)}
    relay = SplitRelay(port, os.path.join(rundir, "capture"))
    vms.append(relay)
    log("relay 127.0.0.1:%d -> destination 127.0.0.1:%d, every connection saved" % (relay.port, port))
    info = migrate(src, "tcp:127.0.0.1:%d" % relay.port, a.timeout)
    drained = relay.finish(60)

    checks = {"relay_drained": drained, "relay_no_errors": not relay.errors}
    files, ids = name_files(relay, os.path.join(rundir, os.path.basename(prefix)), checks)
    checks["one_main_channel"] = sum(1 for f in files if f["kind"] == "main") == 1
    checks["no_other_connections"] = all(f["kind"] in ("main", "multifd") for f in files)
    checks["multifd_channel_ids"] = ids == list(range(a.channels))
    checks["captures_complete"] = all(f["complete"] and f["bytes"] > 0 for f in files)
    after = check_arrival(a, src, dst, info, ready, checks)
    checks.setdefault("channel_ids_distinct", True)
    meta = base_meta(a, src, prefix, "multifd-live", caps, params, ready)
    del meta["file"]
    meta.update(name=os.path.basename(prefix), channels=a.channels, files=files, src_qemu=a.qemu,
                dst_qemu=dst_ver, dst_qemu_version=dst.version, check_sum=after,
                migration=summary(info), connections=relay.conns, relay_errors=relay.errors,
                checks=checks, wire=relay.totals(), effective_params=eff)
    ok = report_failed(a, checks, relay.errors or info.get("error-desc", ""))
    if ok:
        for f in files:
            os.rename(os.path.join(rundir, f["file"]), os.path.join(os.path.dirname(prefix), f["file"]))
    else:
        meta["run_dir"] = rundir
    return meta, ok
