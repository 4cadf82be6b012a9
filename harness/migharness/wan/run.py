"""One migration over the link, QEMU alone or through the proxies, and its record."""
import os
import shlex
import shutil
import time
import traceback
import types

from ..assets import make_rundir, qemu_binary
from ..common import Fail, log
from ..migration import UNTHROTTLED, effective_params, summary
from ..proc import reap_with_cpu, renice, stop_proc
from ..proxy import Proxy
from ..vm import VM
from .binaries import BUILT_FROM, proxy_binary
from .host import git_head, loadavg
from .matrix import CONFIGS, DST_IP, REDIS_PORTS
from .owned import OWNED_PROCS


def ns_vm(name, a, rundir, ns, workdir, incoming=None):
    """The harness's VM (QEMU 10) run inside namespace ns by a script that execs
    `ip netns exec` and QEMU (exec all the way down: the PID the VM sees is QEMU's)."""
    path = os.path.join(workdir, "qemu10-%s.sh" % ns)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n" % (shlex.quote(ns), shlex.quote(qemu_binary("10"))))
    os.chmod(path, 0o755)
    return VM(name, "10", a, rundir, incoming=incoming, binary=path)


def vm_args(guest, mem, boot_timeout):
    return types.SimpleNamespace(machine="pc", accel="tcg", mem=mem, ram_tail_kib=0, workload=guest,
                                 data_mb=None, dirty_mb=8, dirty_chunk=256,
                                 boot_timeout=boot_timeout, check_timeout=120)


def start_proxy(name, role, ns, listen, to, extra, rundir, pki):
    """The harness's Proxy (--json --once; mutual TLS with pki, --plaintext if None),
    run inside namespace ns; `ip netns exec` execs it, so its PID is the proxy's."""
    px = Proxy(name, proxy_binary(), role, listen, to, extra, True, rundir, pki,
                   prefix=["ip", "netns", "exec", ns])
    px.start()
    OWNED_PROCS.append(px.proc)
    return px


def finish_proxy(px, timeout):
    """Wait for --once to end it; its CPU time (read before it is reaped) and report."""
    r = reap_with_cpu(px.proc, timeout)
    res = {"role": px.role}
    if r is None:
        stop_proc(px.proc)
        res["error"] = "did not exit within %ss after the migration" % timeout
        res["exit"] = px.proc.returncode
    else:
        res["exit"], res["cpu_stat_s"], res["cpu_rusage_s"] = r
    px.wait_streams(5)
    if px.results:
        res["json"] = px.results[-1]
    final = [x for x in px.stderr if px.FINAL.match(x)]
    if final:
        res["final_line"] = final[-1]
    res["t_final"] = px.final_times[-1] if px.final_times else None    # when this end finished
    return res


def migrate_e2e(src, dst, uri, timeout):
    """migrate, poll both ends until the destination runs (or failure); bounded."""
    t_cmd = time.time()
    src.qmp.cmd("migrate", uri=uri)
    end = time.monotonic() + timeout
    last, info, completed_at = 0.0, {}, None
    while True:
        info = src.qmp.cmd("query-migrate")
        st = info.get("status")
        if st in ("failed", "cancelled"):
            return t_cmd, info, None
        dst_status = dst.status()       # raises Fail if the destination died
        if st == "completed":
            completed_at = completed_at or time.monotonic()
            if dst_status == "running":
                return t_cmd, info, dst_status
            if time.monotonic() - completed_at > 60:
                return t_cmd, info, dst_status
        if time.monotonic() > end:
            try:
                src.qmp.cmd("migrate_cancel")
            except Fail:
                pass
            raise Fail("migration not finished after %ss (status %s)" % (timeout, st))
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            r = info.get("ram", {})
            log("  %s: %.1f MiB sent, %.1f MiB remaining, dirty-sync-count %s" % (
                st, r.get("transferred", 0) / 2**20, r.get("remaining", 0) / 2**20, r.get("dirty-sync-count")))
        time.sleep(0.05)


def run_one(link, guest, cname, o, workdir, catalog, pki):
    cfg = CONFIGS[cname]
    caps = dict(cfg.get("caps", {}))
    caps["events"] = True       # MIGRATION status events, stamped by QEMU: the timeline below
    params = dict(cfg.get("params", {}))
    params["max-bandwidth"] = UNTHROTTLED         # the link limits, not QEMU
    rec = {"link": link.name, "rate_bit_s": link.rate, "rtt_ms": link.rtt, "guest": guest, "config": cname,
           "label": cfg["label"], "mem_mib": o.mem, "qemu": "10", "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "commit": git_head(), "proxy_built_from": BUILT_FROM["rev"], "loadavg_before": loadavg(), "ok": False, "error": None}
    rundir = make_rundir("wan")
    rec["rundir"] = rundir
    a = vm_args(guest, o.mem, o.boot_timeout)
    vms, proxies = [], []
    t0 = time.monotonic()
    try:
        dst = ns_vm("dst", a, rundir, link.ns_d, workdir, incoming="defer")
        vms.append(dst)
        dst.start()
        dst.configure(caps, params)
        use_proxy = "proxy" in cfg
        listen_ip = "127.0.0.1" if use_proxy else DST_IP
        dst.qmp.cmd("migrate-incoming", uri="tcp:%s:0" % listen_ip)
        ports = [int(x["port"]) for x in dst.qmp.cmd("query-migrate").get("socket-address") or []
                 if x.get("type") == "inet"]
        if not ports:
            raise Fail("destination did not report its listening port")
        uri = "tcp:%s:%d" % (DST_IP, ports[0])
        if use_proxy:
            # the link runs over mutual TLS (the source checks the destination's
            # certificate for DST_IP, the address it dials), or --plaintext
            rec["proxy_link"] = "mutual TLS" if pki else "plaintext"
            dextra, sextra = list(cfg.get("both", [])), list(cfg["proxy"]) + cfg.get("both", [])
            if cfg.get("catalog") == "local":
                dextra += ["--catalog", catalog]
            elif cfg.get("catalog") == "dht":
                dextra += ["--dht", ",".join("redis://127.0.0.1:%d" % p for p in REDIS_PORTS)]
            if cfg.get("catalog"):
                sextra += ["--catalog", catalog]
            pd = start_proxy("proxy-destination", "destination", link.ns_d, DST_IP + ":0",
                             "127.0.0.1:%d" % ports[0], dextra, rundir, pki)
            proxies.append(pd)
            dport = pd.wait_listening()
            ps = start_proxy("proxy-source", "source", link.ns_s, "127.0.0.1:0", "%s:%d" % (DST_IP, dport),
                             sextra, rundir, pki)
            proxies.append(ps)
            uri = "tcp:127.0.0.1:%d" % ps.wait_listening()
        src = ns_vm("src", a, rundir, link.ns_s, workdir)
        vms.append(src)
        src.start()
        ready = src.wait_ready()
        rec["boot_s"] = round(time.monotonic() - t0, 1)
        src.configure(caps, params)
        rec["effective_params"] = effective_params(src)
        link.flows()            # starts the relay's per-connection counters afresh
        c0, r0 = link.counters(), link.relay_cpu()
        rec["loadavg_at_migrate"] = loadavg()
        log("%s %s %s: migrate to %s" % (link.name, guest, cname, uri))
        ours = [vm.proc.pid for vm in vms] + [p.proc.pid for p in proxies] + ([link.relay.pid] if link.relay else [])
        if o.migrate_nice:
            renice(ours, o.migrate_nice)
        try:
            t_cmd, info, dst_status = migrate_e2e(src, dst, uri, o.timeout)
        finally:
            if o.migrate_nice:
                renice(ours, 0)
        rec["migrate_nice"] = o.migrate_nice
        rec["migration"] = summary(info)
        # the proxies exit after one migration (--once); bounded
        rec["proxies"] = {p.role: finish_proxy(p, 60) for p in proxies}
        if not proxies:
            time.sleep(1.0)     # let the last ACKs and FINs cross the link
        c1, r1 = link.counters(), link.relay_cpu()
        rec["wire"] = {"src_to_dst": c1["wbs0"]["tx_bytes"] - c0["wbs0"]["tx_bytes"],
                       "dst_to_src": c1["wbs0"]["rx_bytes"] - c0["wbs0"]["rx_bytes"],
                       "dst_rx": c1["wbd0"]["rx_bytes"] - c0["wbd0"]["rx_bytes"],
                       "dst_tx": c1["wbd0"]["tx_bytes"] - c0["wbd0"]["tx_bytes"],
                       "src_tx_packets": c1["wbs0"]["tx_packets"] - c0["wbs0"]["tx_packets"]}
        rec["wire"]["total"] = rec["wire"]["src_to_dst"] + rec["wire"]["dst_to_src"]
        fl = link.flows()
        if fl is not None:
            # the migration's TCP connections across the link, as the relay saw them
            # (src->dst bytes per connection, biggest first): one per QEMU connection,
            # QEMU's or the proxies' (nothing else crosses the link during a run)
            fwd = fl.get("wbsa->wbda", [])
            rec["wire"]["flows_src_to_dst"] = fwd
            rec["wire"]["connections"] = len(fwd)
        rec["relay_cpu_s"] = round(r1 - r0, 2) if r0 is not None and r1 is not None else None
        checks = {"completed": info.get("status") == "completed", "dst_running": dst_status == "running"}
        t_stop, t_resume = src.qmp.event_time("STOP"), dst.qmp.event_time("RESUME")
        if t_resume is None and dst_status == "running":
            dst.status()        # pick up a late event
            t_resume = dst.qmp.event_time("RESUME")
        # timeline, seconds after the migrate command (host clock; QEMU stamps its events with it)
        tl = {}
        for who, vm in (("src", src), ("dst", dst)):
            for e in vm.qmp.events:
                ts = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                name = e["event"] + ("." + e["data"]["status"] if e["event"] == "MIGRATION" else "")
                tl.setdefault("%s.%s" % (who, name), round(ts - t_cmd, 3))
        for p in rec["proxies"].values():
            if p.get("t_final"):
                tl["proxy_%s.final" % p["role"]] = round(p["t_final"] - t_cmd, 3)
        rec["timeline"] = dict(sorted(tl.items(), key=lambda kv: kv[1]))
        if t_resume is not None:
            rec["e2e_total_s"] = round(t_resume - t_cmd, 3)
            if t_stop is not None:
                rec["e2e_downtime_ms"] = round((t_resume - t_stop) * 1000, 1)
        if checks["dst_running"]:
            try:
                after, _ = dst.check()
                checks["sum_matches"] = after == ready
            except Fail as e:
                checks["sum_matches"] = False
                rec["error"] = str(e)
        for p in rec["proxies"].values():
            checks["proxy_%s_ok" % p["role"]] = p.get("exit") == 0 and (p.get("json") or {}).get("ok", True) is not False
        rec["checks"] = checks
        rec["ok"] = all(checks.values())
        if not rec["ok"] and not rec["error"]:
            rec["error"] = "failed checks: %s %s" % (",".join(k for k, v in checks.items() if not v),
                                                    info.get("error-desc", ""))
    except Fail as e:
        rec["error"] = str(e)
        log("FAILED: %s" % e)
    except Exception as e:          # a harness bug: record it, keep the matrix going
        rec["error"] = "harness: %r" % e
        log("HARNESS ERROR: %s" % traceback.format_exc())
    finally:
        for p in proxies:
            if p.proc.returncode is None and p.proc.poll() is None:
                stop_proc(p.proc)
                rec.setdefault("proxies", {}).setdefault(p.role, {"role": p.role, "error": "stopped by the harness"})
        for vm in reversed(vms):
            vm.stop()
        rec["run_s"] = round(time.monotonic() - t0, 1)
        rec["loadavg_after"] = loadavg()
    if rec["ok"] and not o.keep_runs:
        shutil.rmtree(rundir, ignore_errors=True)
        rec["rundir"] = None
    return rec


def fmt_rec(r):
    m = r.get("migration", {})
    pc = proxy_cpu(r)
    return ("%s %-9s %-6s %-10s total %6s ms (e2e %s s) downtime %5s ms (e2e %s ms) wire %s B in %s conns%s%s" % (
        "OK  " if r["ok"] else "FAIL", r["link"], r["guest"], r["config"], m.get("total-time"),
        r.get("e2e_total_s"), m.get("downtime"), r.get("e2e_downtime_ms"), (r.get("wire") or {}).get("total"),
        (r.get("wire") or {}).get("connections"),
        " proxy cpu %.2f s" % pc if pc is not None else "", "" if r["ok"] else "  ERROR " + str(r["error"])))


def proxy_cpu(r):
    ps = r.get("proxies") or {}
    vals = [p.get("cpu_stat_s") for p in ps.values()]
    if not ps or any(v is None for v in vals):
        return None
    return round(sum(vals), 2)
