"""The report of the results so far: results.tsv/json, table.md (runs, the
issue's targets, where the wire bytes come from) and wan-bench.png."""
import json
import os
import subprocess
import sys

from ..assets import REPO
from ..common import Fail, log
from .matrix import CONFIG_ORDER, CONFIGS, GUESTS, LINKS, split_list

PLOT_COLORS = ["#333333", "#7f7f7f", "#bdbdbd", "#c6dbef", "#6baed6", "#2171b5", "#08306b",
               "#fdae6b", "#e6550d", "#74c476", "#006d2c"]


def load_results(out):
    """Latest record per (link, guest, config)."""
    by = {}
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        raise Fail("%s: no results yet" % path)
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                by[(r["link"], r["guest"], r["config"])] = r
    return by


def mb(x):
    return "%.1f" % (x / 1e6) if isinstance(x, (int, float)) else "-"


def write_report(o):
    """The report of OUT/results.jsonl (o.out), only o.configs if given."""
    by = load_results(o.out)
    if getattr(o, "configs", None):
        keep = split_list(o.configs, CONFIGS, "config")
        by = {k: v for k, v in by.items() if k[2] in keep}
    links = [x for x in LINKS if any(k[0] == x for k in by)]
    guests = [x for x in GUESTS if any(k[1] == x for k in by)]
    cols = ["link", "guest", "config", "ok", "qemu_total_ms", "qemu_downtime_ms", "e2e_total_s", "e2e_downtime_ms",
            "wire_src_to_dst", "wire_dst_to_src", "wire_total", "ram_transferred", "proxy_ratio",
            "proxy_cpu_src_s", "proxy_cpu_dst_s", "relay_cpu_s", "link_connections", "loadavg_at_migrate", "error"]
    rows = []
    for ln in links:
        for g in guests:
            for c in CONFIG_ORDER:
                r = by.get((ln, g, c))
                if not r:
                    continue
                m, w, ps = r.get("migration", {}), r.get("wire") or {}, r.get("proxies") or {}
                sj = (ps.get("source") or {}).get("json") or {}
                rows.append({"link": ln, "guest": g, "config": c, "ok": r["ok"] if not r.get("pending") else "pending",
                             "qemu_total_ms": m.get("total-time"), "qemu_downtime_ms": m.get("downtime"),
                             "e2e_total_s": r.get("e2e_total_s"), "e2e_downtime_ms": r.get("e2e_downtime_ms"),
                             "wire_src_to_dst": w.get("src_to_dst"), "wire_dst_to_src": w.get("dst_to_src"),
                             "wire_total": w.get("total"), "ram_transferred": m.get("ram-transferred"),
                             "proxy_ratio": sj.get("ratio"),
                             "proxy_cpu_src_s": (ps.get("source") or {}).get("cpu_stat_s"),
                             "proxy_cpu_dst_s": (ps.get("destination") or {}).get("cpu_stat_s"),
                             "relay_cpu_s": r.get("relay_cpu_s"), "link_connections": w.get("connections"),
                             "loadavg_at_migrate": r.get("loadavg_at_migrate"),
                             "error": r.get("error")})
    with open(os.path.join(o.out, "results.tsv"), "w") as f:
        f.write("#" + "\t".join(cols) + "\n")
        for x in rows:
            f.write("\t".join("" if x[c] is None else str(x[c]) for c in cols) + "\n")
    with open(os.path.join(o.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = table_md(by, links, guests) + "\n" + targets_md(by, links, guests) + "\n" + wire_md(by, links, guests)
    with open(os.path.join(o.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        png = plot(by, links, guests, o.out)
        log("plot: %s" % png)
    except Fail as e:
        log("no plot: %s" % e)
    return 0


def table_md(by, links, guests):
    out = []
    for ln in links:
        rate, rtt = LINKS[ln]
        out.append("**%s** (%g Mbit/s, %g ms RTT)\n" % (ln, rate / 1e6, rtt))
        out.append("| guest | configuration | total time s (QEMU / end-to-end) | downtime ms (QEMU / end-to-end) "
                   "| wire MB src→dst / dst→src | proxy ratio | proxy CPU s (src + dst) | link conns | ok |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for g in guests:
            for c in CONFIG_ORDER:
                r = by.get((ln, g, c))
                if not r:
                    continue
                if r.get("pending"):
                    out.append("| %s | %s | pending | pending | pending | | | | pending |" % (g, CONFIGS[c]["label"]))
                    continue
                m, w, ps = r.get("migration", {}), r.get("wire") or {}, r.get("proxies") or {}
                tt = m.get("total-time")
                sj = (ps.get("source") or {}).get("json") or {}
                cpu = ["%.2f" % ps[k]["cpu_stat_s"] if ps.get(k, {}).get("cpu_stat_s") is not None else "-"
                       for k in ("source", "destination")]
                out.append("| %s | %s | %s / %s | %s / %s | %s / %s | %s | %s | %s | %s |" % (
                    g, CONFIGS[c]["label"], "%.1f" % (tt / 1000) if tt else "-",
                    "%.1f" % r["e2e_total_s"] if r.get("e2e_total_s") else "-",
                    m.get("downtime", "-"), "%.0f" % r["e2e_downtime_ms"] if r.get("e2e_downtime_ms") else "-",
                    mb(w.get("src_to_dst")), mb(w.get("dst_to_src")),
                    "%.3f" % sj["ratio"] if isinstance(sj.get("ratio"), (int, float)) else "-",
                    " + ".join(cpu) if ps else "-",
                    w.get("connections", "-"),
                    "yes" if r["ok"] else "**no**: " + str(r.get("error", ""))[:80]))
        out.append("")
    return "\n".join(out)


def targets_md(by, links, guests):
    """The issue's targets, per migstream configuration, on QEMU's own numbers
    and on the end-to-end numbers."""
    def val(r, kind):
        if r and not r.get("ok") and "not finished after" in str(r.get("error")):
            return float("inf")     # did not converge within --timeout: anything that finishes beats it
        if not r or not r.get("ok"):
            return None
        if kind == "total":
            return r["migration"].get("total-time", 0) / 1000
        if kind == "e2e_total":
            return r.get("e2e_total_s")
        if kind == "down":
            return r["migration"].get("downtime")
        if kind == "e2e_down":
            return r.get("e2e_downtime_ms")
    def wire(r):
        return r["wire"]["src_to_dst"] / 1e6 if r and r.get("ok") and r.get("wire") else None

    def proxy_wire(r):
        sj = (((r or {}).get("proxies") or {}).get("source") or {}).get("json") or {}
        return sj["wire_bytes"] / 1e6 if r and r.get("ok") and sj.get("wire_bytes") else None
    lines = ["| target | link | guest | migstream config | measure | migstream | reference | holds? |",
             "|---|---|---|---|---|---:|---:|---|"]
    ms_configs = [c for c in CONFIG_ORDER if "proxy" in CONFIGS[c]]
    for ln in links:
        for g in guests:
            for c in ms_configs:
                r = by.get((ln, g, c))
                if not r or r.get("pending"):
                    continue
                d, z = by.get((ln, g, "direct")), by.get((ln, g, "mfd-zstd"))
                checks = []
                if "main" in CONFIGS[c]:
                    # multifd through the proxies: faster than QEMU's own multifd+zstd with
                    # as many channels, at both links; wire bytes within 5 % of the same
                    # proxies carrying the main channel alone
                    z4, m = by.get((ln, g, "mfd4-zstd")), by.get((ln, g, CONFIGS[c]["main"]))
                    for kind in ("total", "e2e_total"):
                        if z4:
                            checks.append(("time ≤ QEMU multifd×4+zstd", kind, val(r, kind), val(z4, kind), 1.0))
                    if m:
                        checks.append(("wire ≤ 1.05× %s" % CONFIGS[c]["main"], "wire", wire(r), wire(m), 1.05))
                        checks.append(("wire ≤ 1.05× %s" % CONFIGS[c]["main"], "proxy_wire", proxy_wire(r),
                                       proxy_wire(m), 1.05))
                for kind in ("total", "e2e_total") if "main" not in CONFIGS[c] else ():
                    if ln.startswith("100m") and g in ("idle", "dup") and d:
                        checks.append(("time ≤ 0.5× direct", kind, val(r, kind), val(d, kind), 0.5))
                    if ln.startswith("100m") and z:
                        checks.append(("time ≤ multifd+zstd", kind, val(r, kind), val(z, kind), 1.0))
                    if ln.startswith("1g") and d:
                        checks.append(("time ≤ direct", kind, val(r, kind), val(d, kind), 1.0))
                for kind in ("down", "e2e_down"):
                    if d:
                        checks.append(("downtime ≤ direct", kind, val(r, kind), val(d, kind), 1.0))
                for what, kind, mine, ref, f in checks:
                    if mine is None or ref is None:
                        holds, ms, qs = "n/a", "-", "-"
                    else:
                        holds = "yes" if mine <= f * ref else "**no**"
                        ms, qs = ["%.1f" % x if x != float("inf") else "no convergence" for x in (mine, ref)]
                    unit = "ms" if "down" in kind else "MB" if "wire" in kind else "s"
                    where = {"e2e_total": "end-to-end", "e2e_down": "end-to-end", "wire": "SRC veth tx",
                             "proxy_wire": "source proxy's wire_bytes"}.get(kind, "QEMU")
                    lines.append("| %s | %s | %s | %s | %s (%s) | %s | %s | %s |" % (
                        what, ln, g, c, where, unit, ms, qs, holds))
    return "\n".join(lines) + "\n"


def wire_md(by, links, guests):
    """Where the bytes on the wire come from, per run: the SRC veth's tx (what the
    tables call wire, retransmissions included), the DST veth's rx (what arrived:
    the difference is what the link's queue dropped and TCP sent again), the
    payload (the source proxy's wire bytes, or QEMU's ram-transferred without
    proxies), QEMU's bytes, and the TCP connections the migration had on the link."""
    out = ["| link | guest | configuration | conns | wire tx MB (SRC veth) | rx MB (DST veth) | dropped, sent again MB "
           "| payload MB (proxy wire / QEMU ram) | tx / payload | rx / payload | QEMU MB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for ln in links:
        for g in guests:
            for c in CONFIG_ORDER:
                r = by.get((ln, g, c))
                if not r or not r.get("ok") or "dst_rx" not in (r.get("wire") or {}):
                    continue
                w, m = r["wire"], r.get("migration", {})
                sj = ((r.get("proxies") or {}).get("source") or {}).get("json") or {}
                qemu = sj.get("qemu_bytes") or m.get("ram-transferred")
                pay = sj.get("wire_bytes") or m.get("ram-transferred")
                if not pay:
                    continue
                out.append("| %s | %s | %s | %s | %.1f | %.1f | %.1f | %.1f | %.3f | %.3f | %s |" % (
                    ln, g, CONFIGS[c]["label"], w.get("connections", "-"), w["src_to_dst"] / 1e6,
                    w["dst_rx"] / 1e6, (w["src_to_dst"] - w["dst_rx"]) / 1e6, pay / 1e6,
                    w["src_to_dst"] / pay, w["dst_rx"] / pay, mb(qemu)))
    return "\n".join(out) + "\n"


def venv_python(out):
    venv = os.path.join(REPO, "target", "wan-bench", "venv")
    py = os.path.join(venv, "bin", "python")
    ok = os.access(py, os.X_OK) and subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0
    if not ok:
        log("installing matplotlib into %s" % venv)
        if subprocess.run([sys.executable, "-m", "venv", venv], timeout=300).returncode != 0 or \
           subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], timeout=900).returncode != 0:
            raise Fail("could not install matplotlib into %s" % venv)
    return py


PLOT = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = json.load(open(sys.argv[1]))
links, guests, configs, labels = d["links"], d["guests"], d["configs"], d["labels"]
rows = (("time", "total migration time, s (end to end)"),
        ("down", "downtime, ms (end to end)"),
        ("wire", "bytes on the wire, MB (src→dst)"))
fig, axes = plt.subplots(len(rows), len(links), figsize=(max(6.5, 0.9 * len(configs) + 1.5) * len(links), 11),
                         squeeze=False)
from matplotlib.patches import Patch
colors = d["colors"]
w = 0.8 / len(configs)
for j, ln in enumerate(links):
    for i, (key, ylabel) in enumerate(rows):
        ax = axes[i][j]
        for k, c in enumerate(configs):
            xs, ys = [], []
            for gi, g in enumerate(guests):
                v = d["values"].get("%s/%s/%s" % (ln, g, c), {}).get(key)
                if v is not None:
                    xs.append(gi + (k - (len(configs) - 1) / 2) * w); ys.append(v)
            ax.bar(xs, ys, w, color=colors[c])
        ax.set_xticks(range(len(guests))); ax.set_xticklabels(guests)
        ax.set_ylabel(ylabel); ax.set_title(d["titles"][ln]); ax.grid(axis="y", alpha=0.3)
fig.legend(handles=[Patch(color=colors[c], label=labels[c]) for c in configs], loc="lower center",
           ncol=min(4, len(configs)), fontsize=9)
fig.tight_layout(rect=(0, 0.05, 1, 1))
fig.savefig(sys.argv[2], dpi=80)
'''


def plot(by, links, guests, out):
    configs = [c for c in CONFIG_ORDER if any(by.get((ln, g, c), {}).get("ok") for ln in links for g in guests)]
    vals = {}
    for (ln, g, c), r in by.items():
        if r.get("ok"):
            vals["%s/%s/%s" % (ln, g, c)] = {"time": r.get("e2e_total_s"), "down": r.get("e2e_downtime_ms"),
                                             "wire": r["wire"]["src_to_dst"] / 1e6}
    data = {"links": links, "guests": guests, "configs": configs,
            "labels": {c: CONFIGS[c]["label"] for c in configs},
            "colors": {c: PLOT_COLORS[CONFIG_ORDER.index(c)] for c in configs},
            "titles": {ln: "%s: %g Mbit/s, %g ms RTT" % (ln, LINKS[ln][0] / 1e6, LINKS[ln][1]) for ln in links},
            "values": vals}
    jp = os.path.join(out, "plot-data.json")
    with open(jp, "w") as f:
        json.dump(data, f)
    png = os.path.join(out, "wan-bench.png")
    r = subprocess.run([venv_python(out), "-c", PLOT, jp, png], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise Fail("plot: %s" % r.stderr.strip()[-500:])
    return png
