"""The migrate subcommand: a live migration through the dedup proxies, with an
optional fault and retry; see harness/README.md."""
import os
import shlex
import subprocess

from .capture import base_meta
from .checks import check_arrival, check_minimums, report_failed
from .common import Fail, log
from .endpoints import start_destination, start_source
from .migration import effective_params, migrate, summary
from .options import kv_list, parse_caps, parse_params
from .pki import Pki
from .proxy import Proxy
from .relay import Relay


def proxy_result(proxy, n, timeout, checks, key):
    """The proxy's n-th JSON report, or None (and checks[key] False) if it never came."""
    try:
        return proxy.wait_results(n, timeout)
    except Fail as e:
        log(str(e))
        checks[key] = False
        return None


def guest_not_running(vm, timeout):
    """After a failed incoming migration QEMU normally exits; if it stays, its
    guest must not be running."""
    try:
        vm.proc.wait(timeout)
        log("%s: QEMU exited with %s" % (vm.name, vm.proc.returncode))
        return True
    except subprocess.TimeoutExpired:
        pass
    try:
        st = vm.status()
    except Fail:
        return True
    log("%s: still up, status %s" % (vm.name, st))
    return st != "running"


def channel_checks(sres, dres, want, checks):
    """The proxies' per-channel reports (JSON `channels`) against the migration:
    `want` multifd channels (0 without multifd), ids 0..want-1 at both ends, each
    having carried QEMU bytes, their sums within the totals (which add the main
    channel), and both ends agreeing channel by channel, byte for byte."""
    ends = {"src": sres.get("channels") or [], "dst": dres.get("channels") or []}
    ids = {end: sorted(c.get("channel") for c in chans) for end, chans in ends.items()}
    checks["proxy_channels_as_asked"] = ids["src"] == ids["dst"] == list(range(want or 0))
    if not want:
        return
    every = ends["src"] + ends["dst"]
    checks["proxy_channels_carried_bytes"] = all((c.get("qemu_bytes") or 0) > 0 and (c.get("wire_bytes") or 0) > 0
                                                 for c in every)
    checks["proxy_channels_within_totals"] = all(
        sum(c.get(k) or 0 for c in ends[end]) <= (res.get(k) or 0)
        for end, res in (("src", sres), ("dst", dres)) for k in ("qemu_bytes", "wire_bytes"))
    bytes_of = lambda end: {c["channel"]: (c.get("qemu_bytes"), c.get("wire_bytes")) for c in ends[end]}  # noqa: E731
    checks["proxies_agree_channels"] = bytes_of("src") == bytes_of("dst")


def migrate_through_proxies(a, rundir, vms):
    """Source QEMU -> source proxy -> [fault relay] -> destination proxy ->
    destination QEMU; see harness/README.md."""
    binary = os.path.abspath(a.proxy)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise Fail("--proxy %s: no such executable (cargo build --release --example proxy)" % binary)
    src_args = [x for v in a.src_proxy_arg for x in shlex.split(v)]
    dst_args = [x for v in a.dst_proxy_arg for x in shlex.split(v)]
    caps, params = parse_caps(a), parse_params(a)
    a.qemu = a.src_qemu or a.qemu
    dst_ver = a.dst_qemu or a.qemu
    fault = a.fault
    checks, attempts, relay = {}, [], None
    pki = None if a.plaintext else Pki(os.path.join(rundir, "pki"))
    # template-store: the destination proxy lives on through the failure and serves
    # QEMU's retry (its cool-down is the point), into a new destination QEMU at the
    # same address
    dst_once = fault != "template-store"

    def qemu_side(name):
        """The destination QEMU's -incoming address for its VM `name`."""
        return "unix:%s/%s.sock" % (rundir, name) if a.qemu_unix else "tcp:127.0.0.1:0"

    def start_dst(name, uri):
        """A destination QEMU at uri; (vm, its address as the proxy's --to)."""
        vm, port = start_destination(a, rundir, vms, name, dst_ver, caps, params, uri)
        return vm, "127.0.0.1:%d" % port if port else uri

    def start_dst_proxy(name, listen, to):
        px = Proxy(name, binary, "destination", listen, to, dst_args, dst_once, rundir, pki)
        vms.append(px)
        px.start().wait_listening()
        return px

    dst, dst_to = start_dst("dst", qemu_side("dst"))
    dproxy = start_dst_proxy("dst-proxy", "127.0.0.1:0", dst_to)
    to = dproxy.port
    if fault == "corrupt":
        relay = Relay(dproxy.port, None, corrupt_at=a.corrupt_offset, abort_on_error=True,
                      corrupt_conn=a.fault_connection)
        vms.append(relay)
        to = relay.port
        log("corrupting relay 127.0.0.1:%d -> dst-proxy 127.0.0.1:%d, flips byte %d of link connection %d"
            % (relay.port, dproxy.port, a.corrupt_offset, a.fault_connection))
    # with a fault the source proxy stays up (no --once) and carries the retry too
    src_listen = "unix:%s/src.sock" % rundir if a.qemu_unix else "127.0.0.1:0"
    sproxy = Proxy("src-proxy", binary, "source", src_listen, "127.0.0.1:%d" % to, src_args, fault == "none",
                   rundir, pki)
    vms.append(sproxy)
    sproxy.start().wait_listening()
    checks["link_mode_as_asked"] = all(px.plaintext is bool(a.plaintext) for px in (sproxy, dproxy))
    src, ready = start_source(a, rundir, vms, caps, params)
    eff = {"src": effective_params(src), "dst": effective_params(dst)}
    uri = sproxy.addr if a.qemu_unix else "tcp:127.0.0.1:%d" % sproxy.port
    info = after = sres = dres = None
    retry_from = 0          # the relay's first connection of the retry
    COOLDOWN = r"no catalog offered until the cool-down ends"

    if fault != "none":
        # The fault must hit while the source QEMU is still sending: without a
        # return path (precopy), QEMU's only way to learn of a failure is a write
        # error on its connection. Once it has written its last byte it declares
        # the migration completed and leaves the VM paused (postmigrate), whatever
        # happens to those bytes later: a destination failure then cannot be
        # reported back, and the guest would be stranded on a stopped source. So
        # the first attempt is throttled (--fault-bandwidth) and the fault comes
        # early (--kill-after / --corrupt-offset, a fraction of a `fill` guest's
        # stream; template-store: wherever the damaged template is in the stream);
        # the check first_migration_failed catches a fault that came too late.
        src.configure({}, {"max-bandwidth": a.fault_bandwidth})
        fault_at = {}

        def on_poll(info):
            # the source's state at the poll that injects (kill) or first sees (corrupt,
            # template-store) the fault
            sent = info.get("ram", {}).get("transferred", 0)
            if fault == "kill-dst-proxy":
                if dproxy.killed or sent < a.kill_after:
                    return
                dproxy.kill()
            elif fault == "corrupt":
                if relay.corrupted is None:
                    return
            elif not dproxy.saw(COOLDOWN):
                return
            if "src_status" not in fault_at:
                fault_at.update(src_status=info.get("status"), src_ram_transferred=sent)

        info = migrate(src, uri, a.timeout, on_poll, 0.05)
        f = {}
        if fault == "kill-dst-proxy":
            f["fault_injected"] = dproxy.killed
        elif fault == "corrupt":
            f["fault_injected"] = relay.corrupted is not None
            fault_at.update(relay.corrupted or {})
        # (fault_at.src_status: the source's state at the first 50 ms poll after
        # the fault, if the migration had not failed before it)
        f["migration_failed"] = info.get("status") == "failed"
        log("src: first migration %s %s" % (info.get("status"), info.get("error-desc", "")))
        s1 = d1 = None
        if f["migration_failed"]:
            try:
                src.wait_status("running", 30)
                f["src_running"] = True
                f["src_sum_intact"] = src.check()[0] == ready
            except Fail as e:
                log(str(e))
                f["src_running"] = False
            f["dst_guest_not_running"] = guest_not_running(dst, 30)
            s1 = proxy_result(sproxy, 1, 60, f, "src_proxy_reported")
            f["src_proxy_reported_failure"] = bool(s1) and s1.get("ok") is False
            if fault in ("corrupt", "template-store"):
                d1 = proxy_result(dproxy, 1, 60, f, "dst_proxy_reported")
                f["dst_proxy_reported_failure"] = bool(d1) and d1.get("ok") is False
            if fault == "corrupt":
                f["dst_proxy_exit_nonzero"] = dproxy.wait_exit(30) not in (0, None)
            if fault == "template-store":
                # the destination's store failed on a template (the damaged one), said
                # so, and went on serving, without templates for its cool-down
                f["fault_injected"] = f["dst_proxy_cooldown_logged"] = dproxy.saw(COOLDOWN)
                f["dst_proxy_unresolved"] = bool(d1) and "cannot restore page" in str(d1.get("error"))
                f["dst_proxy_still_up"] = dproxy.proc.poll() is None
        else:
            log("the fault did not fail the migration (it came too late, or went unnoticed): no retry")
        attempts.append({"fault": fault, "fault_at": fault_at, "migration": summary(info), "checks": f,
                         "proxies": {"src": s1, "dst": d1}})
        checks.update({"first_" + k: v for k, v in f.items()})

        if f["migration_failed"]:
            # the retry: a new destination QEMU; the source proxy still sends to the
            # same address. kill: a new destination proxy binds the dead one's port;
            # corrupt: a new one, the relay now forwards untouched; template-store:
            # the same proxy, and the new QEMU listens where the old one did
            dst.stop()
            if fault == "template-store":
                dst, _ = start_dst("dst2", "tcp:" + dst_to if not a.qemu_unix else dst_to)
            else:
                dproxy.stop()
                dst, dst_to = start_dst("dst2", qemu_side("dst2"))
                listen = "127.0.0.1:%d" % (dproxy.port if fault == "kill-dst-proxy" else 0)
                dproxy = start_dst_proxy("dst2-proxy", listen, dst_to)
            if relay:
                relay.dst_port = dproxy.port
                retry_from = len(relay.conns)
            src.configure({}, {"max-bandwidth": params["max-bandwidth"]})
            info = None

    if info is None:        # the migration (or, after a fault, the retry)
        info = migrate(src, uri, a.timeout)
        after = check_arrival(a, src, dst, info, ready, checks)
        check_minimums(a, info, checks)
        n = 1 if fault == "none" else 2
        sres = proxy_result(sproxy, n, 60, checks, "src_proxy_reported")
        dres = proxy_result(dproxy, 2 if fault == "template-store" else 1, 60, checks, "dst_proxy_reported")
        checks["src_proxy_ok"] = bool(sres) and sres.get("ok") is True
        checks["dst_proxy_ok"] = bool(dres) and dres.get("ok") is True
        if dst_once:
            checks["dst_proxy_exit_0"] = dproxy.wait_exit(30) == 0
        if fault == "none":
            checks["src_proxy_exit_0"] = sproxy.wait_exit(30) == 0
        if fault == "template-store":
            # the retry went through because the destination offered no catalog
            checks["retry_without_templates"] = bool(sres and dres) and sres.get("templates") is False \
                and dres.get("templates") is False and (sres.get("pages") or {}).get("template", 0) == 0
        if sres and dres:
            # byte-exact: the destination proxy delivered as many bytes as the source proxy took in
            checks["proxies_agree_qemu_bytes"] = sres.get("qemu_bytes") == dres.get("qemu_bytes") > 0
            checks["proxies_agree_wire_bytes"] = sres.get("wire_bytes") == dres.get("wire_bytes") > 0
        for kind, want in kv_list(a.min_proxy_pages, "--min-proxy-pages").items():
            got = ((sres or {}).get("pages") or {}).get(kind, 0)
            checks["min_proxy_pages_" + kind] = got >= int(want)
        if sres and dres:
            channel_checks(sres, dres, (eff["src"] or {}).get("multifd-channels") if caps.get("multifd") else 0,
                           checks)
        if relay:
            # the first attempt's connections failed (the corrupted one, and the others
            # its migration's proxies closed); the retry's must not
            checks["relay_retry_clean"] = not relay.errors_from(retry_from)

    meta = base_meta(a, src, "", "migrate", caps, params, ready)
    del meta["file"]
    res = sres or {}
    meta.update(src_qemu=a.qemu, dst_qemu=dst_ver, dst_qemu_version=dst.version, fault=fault,
                link="plaintext" if a.plaintext else "mutual TLS", tls=pki.meta() if pki else None,
                qemu_side="unix" if a.qemu_unix else "tcp", qemu_uri=uri,
                proxy=binary, src_proxy_args=src_args, dst_proxy_args=dst_args,
                src_proxy_argv=sproxy.argv, dst_proxy_argv=dproxy.argv,
                qemu_bytes=res.get("qemu_bytes"), wire_bytes=res.get("wire_bytes"), ratio=res.get("ratio"),
                seconds=res.get("seconds"), pages=res.get("pages"), templates=res.get("templates"),
                opaque_bytes=res.get("opaque_bytes"), channels=res.get("channels"),
                proxies={"src": sres, "dst": dres},
                proxy_stderr={"src": sproxy.stderr[-3:], "dst": dproxy.stderr[-3:]},
                check_sum=after, dirty_sync_count=info.get("ram", {}).get("dirty-sync-count"),
                migration=summary(info), checks=checks, attempts=attempts, effective_params=eff)
    if relay:
        meta["relay"] = {"connections": relay.conns, "errors": relay.errors, "corrupted": relay.corrupted,
                         "corrupt_connection": relay.corrupt_conn, "retry_from": retry_from}
    ok = report_failed(a, checks, info.get("error-desc", ""))
    return (os.path.abspath(a.out) if a.out else None), meta, ok
