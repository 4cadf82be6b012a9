"""The two QEMUs of a live migration on this host: a destination waiting for it
and a source whose guest is READY."""
from .common import Fail, log
from .vm import VM


def start_destination(a, rundir, vms, name, ver, caps, params, uri="tcp:127.0.0.1:0"):
    """Boot a destination QEMU waiting for an incoming migration at `uri` (by
    default a free 127.0.0.1 port); return (vm, port), port None for unix:PATH."""
    # -incoming defer + migrate-incoming: QEMU 10 refuses multifd once an
    # incoming listener exists, so capabilities go in first
    dst = VM(name, ver, a, rundir, incoming="defer")
    vms.append(dst)
    dst.start()
    # capabilities must match on both ends; params too (multifd-channels)
    dst.configure(caps, params)
    # port 0: the kernel picks a free port; the destination reports it in query-migrate
    dst.qmp.cmd("migrate-incoming", uri=uri)
    if uri.startswith("unix:"):
        return dst, None
    addrs = dst.qmp.cmd("query-migrate").get("socket-address") or []
    ports = [int(x["port"]) for x in addrs if x.get("type") == "inet"]
    if not ports:
        raise Fail("destination did not report its listening port (query-migrate socket-address)")
    return dst, ports[0]


def start_source(a, rundir, vms, caps, params):
    """Boot the source QEMU, wait for the guest's READY; return (vm, READY sum)."""
    src = VM("src", a.qemu, a, rundir)
    vms.append(src)
    src.start()
    ready = src.wait_ready()
    log("src: READY sum=%s" % ready)
    src.configure(caps, params)
    return src, ready
