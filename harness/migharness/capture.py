"""The capture-file and capture-live subcommands: one migration's stream saved
to a file, with its report (FILE.json)."""
import os
import shlex

from .checks import check_arrival, check_minimums, report_failed
from .common import Fail, deadline_loop, log
from .endpoints import start_destination, start_source
from .migration import effective_params, migrate, summary
from .options import parse_caps, parse_params
from .relay import Relay
from .vm import kernel_cmdline


def base_meta(a, vm, out, kind, caps, params, ready):
    """The report fields every kind of migration shares."""
    return {"file": os.path.basename(out), "kind": kind, "qemu": a.qemu,
            "qemu_version": vm.version, "machine": a.machine, "machine_type": vm.machine_type(),
            "workload": a.workload, "mem_mib": a.mem, "ram_bytes": (a.mem * 1024 + a.ram_tail_kib) * 1024,
            "kernel_cmdline": kernel_cmdline(a),
            "caps": caps, "params": params, "ready_sum": ready}


def capture_file(a, rundir, vms):
    """Boot a source and migrate it into a.out through `exec:cat`; returns
    (file, report, ok)."""
    out = os.path.abspath(a.out)
    part = out + ".part"
    for p in (out, part):
        if os.path.exists(p):
            os.unlink(p)
    caps, params = parse_caps(a), parse_params(a)
    vm, ready = start_source(a, rundir, vms, caps, params)
    eff = effective_params(vm)
    # cat writes a .part file and renames it when done: the file exists only complete
    uri = "exec:cat > %s && mv %s %s" % (shlex.quote(part), shlex.quote(part), shlex.quote(out))
    info = migrate(vm, uri, a.timeout)
    if info.get("status") != "completed":
        raise Fail("migration %s: %s" % (info.get("status"), info.get("error-desc", "")))
    for _ in deadline_loop(60, "the exec: writer to finish %s" % out):
        if os.path.exists(out):
            break
    meta = base_meta(a, vm, out, "file", caps, params, ready)
    meta.update(size=os.path.getsize(out), migration=summary(info), effective_params=eff)
    return out, meta, True


def capture_live(a, rundir, vms):
    """Live-migrate source -> Relay -> destination, the main channel saved to
    a.out, and check the arrival; returns (file, report, ok)."""
    out = os.path.abspath(a.out)
    if os.path.exists(out):
        os.unlink(out)
    caps, params = parse_caps(a), parse_params(a)
    a.qemu = a.src_qemu or a.qemu
    dst_ver = a.dst_qemu or a.qemu
    dst, port = start_destination(a, rundir, vms, "dst", dst_ver, caps, params)
    src, ready = start_source(a, rundir, vms, caps, params)
    eff = {"src": effective_params(src), "dst": effective_params(dst)}
    relay = Relay(port, out)
    log("relay 127.0.0.1:%d -> destination 127.0.0.1:%d" % (relay.port, port))
    info = migrate(src, "tcp:127.0.0.1:%d" % relay.port, a.timeout)
    drained = relay.finish(60)

    checks = {"relay_drained": drained, "relay_no_errors": not relay.errors}
    mains = [c for c in relay.conns if c["kind"] == "main"]
    checks["one_main_channel"] = len(mains) == 1
    if caps.get("multifd"):
        checks["multifd_channels_seen"] = len(relay.conns) > 1
    size = os.path.getsize(out) if os.path.exists(out) else 0
    checks["capture_complete"] = bool(mains) and mains[0]["eof"] and size == mains[0]["src_to_dst"] > 0
    after = check_arrival(a, src, dst, info, ready, checks)
    syncs = check_minimums(a, info, checks)
    meta = base_meta(a, src, out, "live", caps, params, ready)
    meta.update(size=size, src_qemu=a.qemu, dst_qemu=dst_ver, dst_qemu_version=dst.version,
                check_sum=after, dirty_sync_count=syncs, migration=summary(info),
                connections=relay.conns, relay_errors=relay.errors, checks=checks,
                wire=relay.totals(), effective_params=eff)
    ok = report_failed(a, checks, relay.errors or info.get("error-desc", ""))
    return out, meta, ok
