"""The proxy and catalog binaries the benchmark runs, built from the work tree
or from one commit, and the catalog they use."""
import os
import shlex
import subprocess

from ..assets import REPO
from ..common import Fail, log
from ..proc import sh
from .host import git_head

BIN_DIR = os.path.join(REPO, "target", "release", "examples")
BUILT_FROM = {"rev": None}


def proxy_binary():
    return os.path.join(BIN_DIR, "proxy")


def catalog_binary():
    return os.path.join(BIN_DIR, "catalog")


def proxy_ready():
    return os.access(proxy_binary(), os.X_OK)


def dht_ready():
    """The Redis-ring mode needs `catalog push` and `proxy destination --dht`."""
    if not (proxy_ready() and os.access(catalog_binary(), os.X_OK)):
        return False
    r1 = subprocess.run([catalog_binary()], capture_output=True, text=True, timeout=10)
    r2 = subprocess.run([proxy_binary(), "destination", "--help"], capture_output=True, text=True, timeout=10)
    return "push" in (r1.stdout + r1.stderr) and "--dht" in (r2.stdout + r2.stderr)


def ensure_catalog(o, workdir):
    if o.catalog:
        return os.path.abspath(o.catalog)
    cat = os.path.join(workdir, "catalog.cat")
    if os.path.exists(cat):
        return cat
    inputs = [os.path.join(o.catalog_inputs, "catalog-%s-%d.mig" % (w, i)) for w in ("idle", "dup", "fill")
              for i in (1, 2, 3)]
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise Fail("catalog inputs missing (%s): run harness/baselines.sh %s, or pass --catalog"
                   % (", ".join(missing[:3]), o.catalog_inputs))
    log("building the catalog %s from %d other guests' streams" % (cat, len(inputs)))
    sh(catalog_binary(), "build", "--threshold", "2", "--out", cat + ".part", *inputs, timeout=1800)
    os.rename(cat + ".part", cat)
    return cat


def build(o):
    """cargo build the proxy and catalog examples: in the work tree, or (--build-rev)
    from a clean `git archive` of one commit into target/wan-bench/build, so
    that uncommitted work in the tree does not end up in the numbers."""
    global BIN_DIR
    if o.build_rev:
        rev = sh("git", "-C", REPO, "rev-parse", "--short", o.build_rev).strip()
        src = os.path.join(REPO, "target", "wan-bench", "build", "src-" + rev)
        tgt = os.path.join(REPO, "target", "wan-bench", "build", "target-" + rev)
        if not os.path.exists(os.path.join(src, "Cargo.toml")):
            os.makedirs(src, exist_ok=True)
            subprocess.run("git -C %s archive %s | tar -x -C %s" % (shlex.quote(REPO), rev, shlex.quote(src)),
                           shell=True, check=True, timeout=300)
        cwd, env = src, dict(os.environ, CARGO_TARGET_DIR=tgt)
        BIN_DIR = os.path.join(tgt, "release", "examples")
        BUILT_FROM["rev"] = rev
    else:
        cwd, env = REPO, None
        BUILT_FROM["rev"] = "work tree at %s" % git_head()
    if o.no_build:
        return
    log("cargo build --release --example proxy --example catalog (in %s)" % cwd)
    r = subprocess.run(["cargo", "build", "--release", "--example", "proxy", "--example", "catalog"], cwd=cwd,
                       env=env, timeout=3600, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        log("cargo build failed (exit %d): the proxy configurations will be skipped" % r.returncode)
