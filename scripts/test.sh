#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run) and as the README tells a user to.
#
# On a fresh Debian 12 machine, as root: installs QEMU 7.2 and redis-server, unpacks
# QEMU 10.0 from bookworm-backports beside it, fetches a kernel and builds a busybox
# guest (harness/setup.sh); captures real migration streams
# (harness/capture-matrix.sh); builds the proxies; then runs formatting, lints and
# every test: the real-QEMU ones (captured streams, and live migrations through the
# proxies) and the ones with real Redis servers included. A test that cannot run
# fails this script: nothing is skipped.
#
#   MIGSTREAM_STREAMS=DIR   where captures go (default target/qemu-streams); an
#                           existing DIR/manifest.tsv is reused unless
#   MIGSTREAM_RECAPTURE=1   is set.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "harness setup (QEMU 7.2 + 10.0, kernel, guest)"
harness/setup.sh

streams=${MIGSTREAM_STREAMS:-target/qemu-streams}
if [ -n "${MIGSTREAM_RECAPTURE:-}" ] || [ ! -s "$streams/manifest.tsv" ]; then
  step "capturing real QEMU streams into $streams"
  rm -rf "$streams"
  harness/capture-matrix.sh "$streams"
else
  step "reusing the captures in $streams (MIGSTREAM_RECAPTURE=1 to capture anew)"
fi

step "rustfmt"
cargo fmt --all -- --check

step "clippy (also the MSRV check of our own code: clippy::incompatible_msrv against rust-version)"
cargo clippy --all-targets --all-features -- -D warnings

step "features: without the default ones, no redis, TLS or runtime networking in the tree, lints clean"
cargo clippy --no-default-features --all-targets -- -D warnings
if cargo tree -e normal --no-default-features | grep -E "redis|rustls|socket2|mio"; then
  echo "the codec-only build pulls the crates above" >&2
  exit 1
fi

step "MSRV of the dependencies (rust-version of every crate we build, dev tools included, <= ours)"
cargo metadata --format-version 1 --all-features | python3 -c '
import json, sys
meta = json.load(sys.stdin)
ours = next(p for p in meta["packages"] if p["name"] == "migstream")["rust_version"]
key = lambda v: (tuple(int(x) for x in v.split(".")) + (0, 0))[:3]
normal = {d["pkg"] for n in meta["resolve"]["nodes"] for d in n["deps"]
          if any(k["kind"] is None for k in d["dep_kinds"])}
late = [(p["name"], p["rust_version"]) for p in meta["packages"]
        if p["id"] in normal and p["rust_version"] and key(p["rust_version"]) > key(ours)]
print("rust-version", ours, "- dependencies needing a newer Rust:", late or "none")
sys.exit(1 if late else 0)'

step "docs as docs.rs builds them (nightly, --cfg docsrs, warnings denied)"
RUSTDOCFLAGS="--cfg docsrs -D warnings" cargo +nightly doc --no-deps --all-features

step "proxies for the live-migration tests (release build)"
cargo build --release --all-features --example proxy

step "tests (real QEMU and real Redis included)"
MIGSTREAM_STREAMS=$(realpath "$streams") \
MIGSTREAM_PROXY=$(realpath target/release/examples/proxy) \
MIGSTREAM_REQUIRE_REDIS=1 \
  cargo test --all-features -- --include-ignored
