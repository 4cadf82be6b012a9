#!/usr/bin/env python3
"""The dedup codec against `zstd -1`, side by side: same stream, same machine, one run.

  versus-zstd.py [CAPTURES_DIR...] [--runs N] [--threshold T] [--encode-arg ARG]...
                 [--only SUBSTRING]... [--work DIR] [--examples DIR]

CAPTURES_DIR (default target/qemu-streams of the repository) holds main-channel
QEMU streams (.mig) listed in its manifest.tsv (harness/capture-matrix.sh's
format: file, qemu, machine, workload, ..., ram_bytes, bytes). For each stream:

- catalog: `catalog build --threshold T` (default 2: a page kept if it is in at
  least 2 input streams) over the OTHER workloads' streams of the same
  CAPTURES_DIR. Leave-one-out by workload: a stream's catalog never saw a stream
  of its own workload (an idle guest's catalog comes from the fill, dup and dirty
  guests of both QEMUs, never from another idle boot). One catalog per workload
  and directory, shared by that workload's streams.
- `dedup encode --catalog CAT` with default settings (plus any --encode-arg,
  to measure a lever), and `zstd -1 -T1 -c` (one thread, the whole stream),
  alternately, N times each (default 3); the best (least) CPU of each is kept.
  CPU = user + system time of the child process (os.wait4's rusage). Both write
  their output to a new file in the work directory (the last run's is removed
  first, so neither pays for truncating it), by default on /dev/shm: `dedup`
  fsyncs its output and `zstd -c` does not, and a disk's flush is not the codec's
  work. Bytes = that file's size.
- `dedup decode --catalog CAT` of the encoded file must give back the stream,
  byte for byte.

Prints the load average before and after, and a markdown table: bytes ratio =
dedup bytes / zstd bytes (target <= 0.9), CPU ratio = dedup CPU / zstd CPU
(target <= 0.7). Exits non-zero if a round trip fails (not if a target is missed).
The examples are the repository's `target/release/examples` unless --examples:
`cargo build --release --all-features --examples` first; `zstd` must be on PATH
(harness/setup.sh installs it).
"""
import argparse
import csv
import filecmp
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_TARGET, CPU_TARGET = 0.9, 0.7


def cpu_of(argv, stdout_path):
    """Runs argv with stdout to stdout_path; returns its user + system CPU seconds."""
    with open(stdout_path, "wb") as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        # reaped here: tell Popen, which would otherwise wait for it again
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)}: exit {child.returncode}\n{err.read().decode()}")
    return usage.ru_utime + usage.ru_stime


def verdict(ok):
    return "pass" if ok else "**FAIL**"


def read_manifest(captures):
    """The manifest's rows as dicts, each with its stream's path."""
    path = os.path.join(captures, "manifest.tsv")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    header = lines[0].lstrip("#").rstrip("\n").split("\t")
    rows = list(csv.DictReader(lines[1:], fieldnames=header, delimiter="\t"))
    for row in rows:
        row["path"] = os.path.join(captures, row["file"])
    return rows


def catalog_for(examples, work, rows, workload, threshold):
    """The catalog of every stream in `rows` not of `workload` (built once)."""
    source = os.path.abspath(os.path.dirname(rows[0]["path"])).strip("/").replace("/", "_")
    out = os.path.join(work, f"catalog-{source}-t{threshold}-without-{workload}.cat")
    if not os.path.exists(out):
        inputs = [r["path"] for r in rows if r["workload"] != workload]
        argv = [os.path.join(examples, "catalog"), "build", "--threshold", str(threshold),
                "--out", out, *inputs]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return out


def measure(examples, work, row, catalog, runs, encode_args):
    """Best-of-`runs` bytes and CPU of dedup and zstd on one stream, and its round trip."""
    dedup, zstd = os.path.join(work, "out.mz"), os.path.join(work, "out.zst")
    encode = [os.path.join(examples, "dedup"), "encode", "--catalog", catalog, *encode_args,
              row["path"], dedup]
    cpu = {"dedup": [], "zstd": []}
    for _ in range(runs):
        for out in (dedup, zstd):
            if os.path.exists(out):
                os.remove(out)
        cpu["dedup"].append(cpu_of(encode, os.devnull))
        cpu["zstd"].append(cpu_of(["zstd", "-1", "-T1", "-c", "-q", row["path"]], zstd))
    back = os.path.join(work, "back.mig")
    cpu_of([os.path.join(examples, "dedup"), "decode", "--catalog", catalog, dedup, back],
           os.devnull)
    same = filecmp.cmp(back, row["path"], shallow=False)
    os.remove(back)
    return {
        "dedup_bytes": os.path.getsize(dedup), "zstd_bytes": os.path.getsize(zstd),
        "dedup_cpu": min(cpu["dedup"]), "zstd_cpu": min(cpu["zstd"]), "round_trip": same,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("captures", nargs="*", default=[os.path.join(REPO, "target", "qemu-streams")])
    ap.add_argument("--runs", type=int, default=3, help="runs of each codec per stream (best kept)")
    ap.add_argument("--threshold", type=int, default=2, help="catalog build --threshold")
    ap.add_argument("--encode-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for dedup encode (repeatable), e.g. --encode-arg=--zstd=-1")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="only the streams whose file name contains one of these")
    ap.add_argument("--work", help="directory for catalogs and outputs, kept (default: a new one "
                    "in /dev/shm, or in the system's temporary directory without /dev/shm, "
                    "removed at the end)")
    ap.add_argument("--examples", default=os.path.join(REPO, "target", "release", "examples"))
    a = ap.parse_args()
    if a.work:
        os.makedirs(a.work, exist_ok=True)
        return compare(a, a.work)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="versus-zstd-", dir=shm) as work:
        return compare(a, work)


def compare(a, work):
    """Prints the table for every stream of a.captures; 1 if a round trip failed."""
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().strip()}", file=sys.stderr)
    print(f"dedup encode --catalog CAT {' '.join(a.encode_arg)} | zstd -1 -T1 | best of {a.runs}\n")
    print("| guest | qemu | MiB | QEMU bytes | dedup bytes | zstd bytes | bytes ratio | dedup CPU s "
          "| zstd CPU s | CPU ratio | bytes <= 0.9 | CPU <= 0.7 | round trip |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    failed = False
    for captures in a.captures:
        rows = read_manifest(captures)
        for row in rows:
            if a.only and not any(s in row["file"] for s in a.only):
                continue
            catalog = catalog_for(a.examples, work, rows, row["workload"], a.threshold)
            m = measure(a.examples, work, row, catalog, a.runs, a.encode_arg)
            bytes_ratio = m["dedup_bytes"] / m["zstd_bytes"]
            cpu_ratio = m["dedup_cpu"] / m["zstd_cpu"]
            failed |= not m["round_trip"]
            print(f"| {row['file'].removesuffix('.mig')} | {row['qemu']} "
                  f"| {int(row['ram_bytes']) >> 20} | {int(row['bytes']):,} | {m['dedup_bytes']:,} "
                  f"| {m['zstd_bytes']:,} | {bytes_ratio:.3f} | {m['dedup_cpu']:.2f} "
                  f"| {m['zstd_cpu']:.2f} | {cpu_ratio:.3f} | {verdict(bytes_ratio <= BYTES_TARGET)} "
                  f"| {verdict(cpu_ratio <= CPU_TARGET)} | {verdict(m['round_trip'])} |", flush=True)
    with open("/proc/loadavg") as f:
        print(f"load after: {f.read().strip()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
