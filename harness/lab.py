#!/usr/bin/env python3
"""Capture real QEMU live-migration streams (x86, TCG) for migstream's tests.

  lab.py capture-file -o FILE [vm options] [--cap N=on] [--param N=V]
      boot a guest, wait for READY, migrate it to "exec:cat > FILE".
  lab.py capture-live -o FILE [vm options] [--src-qemu V --dst-qemu V]
      live-migrate source -> relay on 127.0.0.1 -> destination (-incoming tcp:),
      save the main channel (the connection starting with "QEVM") to FILE, and
      verify: completed, destination running, guest checksum unchanged.
  lab.py migrate --proxy BIN [-o REPORT.json] [vm options] [--fault kill-dst-proxy|corrupt]
      the same live migration through `BIN source` and `BIN destination` (the
      dedup proxies, examples/proxy.rs), the same checks plus the proxies' own
      reports; with a fault, a first migration must fail cleanly and a retry
      to a new destination must succeed.

The capture commands write FILE.json (versions, machine, workload, caps, params, READY sum,
size, query-migrate summary). Needs harness/setup.sh to have run. Python 3
standard library only. Only processes started here are ever signalled, by PID.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LAB = os.environ.get("MIGSTREAM_LAB_DIR") or os.path.join(os.path.dirname(HERE), "target", "qemu-lab")
QEVM = b"QEVM"                  # be32 0x5145564D, first bytes of a migration stream
UNTHROTTLED = 1 << 40           # QEMU's default max-bandwidth (128 MiB/s) only slows captures
T0 = time.monotonic()


class Fail(Exception):
    pass


def log(msg):
    print("[lab %6.1fs] %s" % (time.monotonic() - T0, msg), file=sys.stderr, flush=True)


def deadline_loop(timeout, what, poll=0.1):
    """Yield until the caller breaks out; raise Fail once `timeout` seconds have passed."""
    end = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > end:
            raise Fail("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(poll)


# --------------------------------------------------------------------------- QMP + console
def connect_unix(path, proc, timeout, what):
    for _ in deadline_loop(timeout, what, 0.05):
        if proc.poll() is not None:
            raise Fail("%s: QEMU exited with %s before its socket appeared" % (what, proc.returncode))
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()


class QMP:
    def __init__(self, path, proc, name):
        self.name = name
        self.sock = connect_unix(path, proc, 60, name + " QMP socket")
        self.buf = b""
        self.id = 0
        if "QMP" not in self._read(30):
            raise Fail("%s: no QMP greeting" % name)
        self.cmd("qmp_capabilities")

    def _read(self, timeout):
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise Fail("%s: QMP reply timed out" % self.name)
            self.sock.settimeout(left)
            try:
                d = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not d:
                raise Fail("%s: QMP connection closed (QEMU died?)" % self.name)
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, timeout=30, **args):
        self.id += 1
        msg = {"execute": name, "id": self.id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read(timeout)
            if r.get("id") != self.id:      # events and stale replies
                continue
            if "error" in r:
                raise Fail("%s: %s: %s" % (self.name, name, r["error"].get("desc", r["error"])))
            return r.get("return")


class Console:
    """Guest serial console on a unix socket: logs everything, finds lines by regex."""

    def __init__(self, path, proc, name, logpath):
        self.name = name
        self.sock = connect_unix(path, proc, 60, name + " serial socket")
        self.logf = open(logpath, "ab")
        self.lines = []
        self.cv = threading.Condition()
        self.eof = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        part = b""
        while True:
            try:
                d = self.sock.recv(65536)
            except OSError:
                d = b""
            with self.cv:
                if not d:
                    self.eof = True
                    self.cv.notify_all()
                    return
                self.logf.write(d)
                self.logf.flush()
                part += d
                *full, part = part.split(b"\n")
                self.lines += [x.decode("utf-8", "replace").strip("\r") for x in full]
                self.cv.notify_all()

    def wait(self, regex, timeout, since=0):
        """Return (match, index) of the first line >= since matching regex."""
        rx, end = re.compile(regex), time.monotonic() + timeout
        with self.cv:
            while True:
                for i in range(since, len(self.lines)):
                    m = rx.search(self.lines[i])
                    if m:
                        return m, i
                since = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or self.eof:
                    raise Fail("%s: %s waiting for /%s/ on the guest console"
                               % (self.name, "timed out" if left <= 0 else "console closed", regex))
                self.cv.wait(min(left, 1.0))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.cv:
            self.logf.close()


# --------------------------------------------------------------------------- QEMU
def qemu_binary(ver):
    b = os.path.join(LAB, "qemu" + ver, "bin", "qemu-system-x86_64")
    if not os.access(b, os.X_OK):
        raise Fail("%s missing: run harness/setup.sh" % b)
    return b


def kernel_cmdline(a):
    mb = a.data_mb
    if mb is None:
        mb = {"fill": a.mem // 2, "dup": a.mem // 2, "dirty": a.mem // 4}.get(a.workload, 0)
    return ("console=ttyS0 panic=-1 quiet mig.wl=%s mig.mb=%d mig.dirty_mb=%d mig.chunk=%d"
            % (a.workload, mb, a.dirty_mb, a.dirty_chunk))


def ram_size(a):
    # QEMU 7.2's TCG loses guest writes during live migration when the RAM block
    # is a multiple of 256 KiB (dirty-bitmap fast path forgets to re-arm the TCG
    # TLB; fixed upstream in 9.0 by "physmem: Fix migration dirty bitmap coherency
    # with TCG memory access"). A few KiB more RAM takes the correct slow path.
    return "%dK" % (a.mem * 1024 + a.ram_tail_kib)


class VM:
    def __init__(self, name, ver, a, rundir, incoming=None):
        self.name, self.ver, self.a, self.rundir = name, ver, a, rundir
        self.incoming = incoming
        self.proc = self.qmp = self.console = None

    def start(self):
        a, rd, n = self.a, self.rundir, self.name
        argv = [qemu_binary(self.ver), "-name", n, "-machine", a.machine, "-accel", a.accel,
                "-m", ram_size(a), "-smp", "1", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot",
                "-kernel", os.path.join(LAB, "kernel", "vmlinuz"),
                "-initrd", os.path.join(LAB, "guest", "initramfs.cpio.gz"),
                "-append", kernel_cmdline(a),
                # wait=on: QEMU does not start the guest before we are connected,
                # so no console output (READY) can be lost
                "-chardev", "socket,id=ser0,path=%s/%s.ser,server=on,wait=on" % (rd, n),
                "-serial", "chardev:ser0",
                "-qmp", "unix:%s/%s.qmp,server=on,wait=off" % (rd, n)]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        logpath = os.path.join(rd, n + ".qemu.log")
        with open(logpath, "wb") as f:
            f.write(("# %s\n" % " ".join(map(shlex.quote, argv))).encode())
            f.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        log("%s: QEMU %s started, pid %d" % (n, self.ver, self.proc.pid))
        self.console = Console("%s/%s.ser" % (rd, n), self.proc, n, os.path.join(rd, n + ".serial.log"))
        self.qmp = QMP("%s/%s.qmp" % (rd, n), self.proc, n)
        v = self.qmp.cmd("query-version")
        q = v["qemu"]
        self.version = "%d.%d.%d (%s)" % (q["major"], q["minor"], q["micro"], v.get("package", "").strip())
        return self

    def wait_ready(self):
        m, _ = self.console.wait(r"^READY sum=([0-9a-f]{32})", self.a.boot_timeout)
        return m.group(1)

    def check(self):
        since = len(self.console.lines)
        self.console.sock.sendall(b"check\n")
        m, _ = self.console.wait(r"^CHECK sum=([0-9a-f]{32}) passes=(\d+)", self.a.check_timeout, since)
        return m.group(1), int(m.group(2))

    def status(self):
        return self.qmp.cmd("query-status")["status"]

    def wait_status(self, wanted, timeout):
        for _ in deadline_loop(timeout, "%s to be %s" % (self.name, wanted)):
            if self.proc.poll() is not None:
                raise Fail("%s: QEMU exited with %s" % (self.name, self.proc.returncode))
            if self.status() == wanted:
                return

    def machine_type(self):
        """Resolve an alias such as 'pc' to the versioned type the stream names."""
        for m in self.qmp.cmd("query-machines"):
            if self.a.machine in (m["name"], m.get("alias")):
                return m["name"]
        return self.a.machine

    def configure(self, caps, params):
        if caps:
            self.qmp.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
        if params:
            self.qmp.cmd("migrate-set-parameters", **params)

    def stop(self):
        """Quit via QMP, then SIGTERM/SIGKILL our own child by PID if it lingers."""
        if self.proc and self.proc.poll() is None:
            try:
                if self.qmp:
                    self.qmp.cmd("quit", timeout=5)
                self.proc.wait(10)
            except (Fail, OSError, subprocess.TimeoutExpired):
                pass
            for sig in (self.proc.terminate, self.proc.kill):
                if self.proc.poll() is not None:
                    break
                sig()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        if self.console:
            self.console.close()
        if self.qmp:
            self.qmp.sock.close()


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
    r = info.get("ram", {})
    s = {k: info.get(k) for k in ("status", "total-time", "downtime", "setup-time") if k in info}
    s.update({"ram-" + k: r[k] for k in ("transferred", "total", "normal", "duplicate", "dirty-sync-count",
                                       "precopy-bytes", "downtime-bytes", "multifd-bytes") if k in r})
    for k in ("xbzrle-cache", "error-desc"):
        if k in info:
            s[k] = info[k]
    return s


# --------------------------------------------------------------------------- relay
class Relay:
    """TCP relay 127.0.0.1:<free port> -> 127.0.0.1:dst_port. Forwards every
    connection both ways (multifd opens several); the one whose first 4 bytes
    are QEVM is the main channel, and its source->destination bytes go to a file
    (`capture`, if not None).

    For `migrate --fault corrupt` (between the two proxies): `corrupt_at` flips
    the byte at that source->destination offset of connection number
    `corrupt_conn` only (0: the first accepted; a multifd migration's proxies open
    one link connection per QEMU connection, the main channel's first; later
    connections, the retry's included, pass untouched), and `abort_on_error`
    resets both sides of a connection when either direction fails, as a dying TCP
    peer would, instead of only half-closing. `dst_port` may be changed between
    connections (the retry goes to a new destination). `errors` are strings;
    `error_conns` names the connection of each (for a failed connect, the index
    the connection would have had)."""

    def __init__(self, dst_port, capture, corrupt_at=None, abort_on_error=False, corrupt_conn=0):
        self.dst_port, self.capture = dst_port, capture
        self.corrupt_at, self.abort_on_error = corrupt_at, abort_on_error
        self.corrupt_conn = corrupt_conn
        self.corrupted = None           # {"offset", "connection", "byte", "at_s"} once flipped
        self.conns = []                 # one dict per accepted connection
        self.threads = []
        self.socks = []
        self.errors = []
        self.error_conns = []           # the connection index of each error, in order
        self.lock = threading.Lock()
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.t0 = time.monotonic()      # opened_s / closed_s are relative to this
        self.stopping = False
        self._start(self._accept)

    def _start(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self):
        self.ls.settimeout(0.5)
        while not self.stopping:
            try:
                c, _ = self.ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                d = socket.create_connection(("127.0.0.1", self.dst_port), timeout=10)
            except OSError as e:
                with self.lock:
                    self._error(len(self.conns), "connect to destination: %s" % e)
                c.close()
                continue
            c.settimeout(None)
            d.settimeout(None)
            info = {"index": len(self.conns), "dst_port": self.dst_port, "kind": None,
                    "src_to_dst": 0, "dst_to_src": 0, "eof": False,
                    "opened_s": round(time.monotonic() - self.t0, 3), "closed_s": None}
            with self.lock:
                self.conns.append(info)
                self.socks += [c, d]
            self._start(self._pump, c, d, info, True)
            self._start(self._pump, d, c, info, False)

    def _pump(self, a, b, info, forward):
        out, head = None, b""
        try:
            while True:
                data = a.recv(1 << 20)
                if not data:
                    break
                if forward and info["kind"] is None:
                    head += data        # classify on the first 4 bytes, however they arrive
                    if len(head) < 4:
                        continue
                    data, head = head, b""
                    with self.lock:
                        info["kind"] = "main" if data[:4] == QEVM else "other"
                        if info["kind"] == "main" and self.capture:
                            if any(c["kind"] == "main" for c in self.conns if c is not info):
                                self.errors.append("more than one connection starts with QEVM")
                            else:
                                out = open(self.capture, "wb")
                if out:
                    out.write(data)
                if forward and self.corrupt_at is not None and info["index"] == self.corrupt_conn:
                    k = self.corrupt_at - info["src_to_dst"]
                    if 0 <= k < len(data):
                        data = bytearray(data)
                        data[k] ^= 0xFF
                        self.corrupted = {"offset": self.corrupt_at, "connection": info["index"],
                                          "byte": data[k] ^ 0xFF, "at_s": round(time.monotonic() - self.t0, 3)}
                b.sendall(data)
                info["src_to_dst" if forward else "dst_to_src"] += len(data)
            if head:                    # a connection that closed within 4 bytes
                b.sendall(head)
                info["src_to_dst"] += len(head)
            if forward:
                info["eof"] = True
                info["closed_s"] = round(time.monotonic() - self.t0, 3)
        except OSError as e:
            if not self.stopping:
                with self.lock:
                    self._error(info["index"], "connection %d %s: %s" % (
                        info["index"], "src->dst" if forward else "dst->src", e))
            if self.abort_on_error:
                info["aborted"] = True
                for s in (a, b):
                    self._reset(s)
        finally:
            if out:
                out.close()
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _error(self, index, msg):
        """Records an error of connection `index` (the caller holds the lock)."""
        self.errors.append(msg)
        self.error_conns.append(index)

    def errors_from(self, first):
        """The errors of the connections numbered `first` and later."""
        with self.lock:
            return [e for e, i in zip(self.errors, self.error_conns) if i >= first]

    @staticmethod
    def _reset(s):
        """Close with an RST (SO_LINGER 0), as the kernel does for a process that
        dies with unread data: the peer's next read or write fails. A FIN alone
        would let a writer that never reads go on writing into a full buffer."""
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RDWR)    # wakes the other direction's recv
        except OSError:
            pass
        s.close()

    def totals(self):
        """Bytes over ALL connections (main + multifd channels), each direction
        separately: what the migration really put on the wire (TCP payload)."""
        c = self.conns
        opened = [x["opened_s"] for x in c]
        closed = [x["closed_s"] for x in c if x["closed_s"] is not None]
        return {"connections": len(c),
                "main_connections": sum(1 for x in c if x["kind"] == "main"),
                "src_to_dst": sum(x["src_to_dst"] for x in c),
                "dst_to_src": sum(x["dst_to_src"] for x in c),
                "total": sum(x["src_to_dst"] + x["dst_to_src"] for x in c),
                "main_src_to_dst": sum(x["src_to_dst"] for x in c if x["kind"] == "main"),
                "other_src_to_dst": sum(x["src_to_dst"] for x in c if x["kind"] != "main"),
                # first connection opened -> last source->destination EOF, seconds
                "elapsed_s": round(max(closed) - min(opened), 3) if opened and closed else None}

    def finish(self, timeout):
        """Wait until every connection has drained (QEMU closes them after
        completion), then stop. Returns False if something still hangs."""
        end = time.monotonic() + timeout
        self.stopping = True
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        hung = any(t.is_alive() for t in self.threads)
        self.stop()
        return not hung

    def stop(self):
        self.stopping = True
        for s in self.socks + [self.ls]:
            s.close()


# --------------------------------------------------------------------------- link TLS
class Pki:
    """Credentials for the proxies' mutually authenticated TLS link, made afresh in
    `dir` with the openssl CLI: a throwaway CA, the destination proxy's server
    certificate (DNS:dest.test, IP:127.0.0.1 and `server_ips`) and the source
    proxy's client certificate (DNS:source.test). EC P-256 keys; every certificate
    valid from an hour ago for a day. The CA's key stays in `dir`: nothing else
    trusts this CA, and the whole directory goes with the run dir."""

    SERVER_NAME, CLIENT_NAME = "dest.test", "source.test"
    CONF = """[ca]
default_ca = lab
[lab]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[any]
commonName = supplied
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = %(server_san)s
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:%(client)s
"""

    def __init__(self, dir, server_ips=()):
        self.dir = os.path.abspath(dir)
        self.server_ips = ["127.0.0.1"] + [ip for ip in server_ips if ip != "127.0.0.1"]
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir, mode=0o700)
        f = lambda name: os.path.join(self.dir, name)     # noqa: E731
        self.ca = f("ca.pem")
        self.server_cert, self.server_key = f("dest.pem"), f("dest.key")
        self.client_cert, self.client_key = f("source.pem"), f("source.key")
        with open(f("ca.cnf"), "w") as c:
            c.write(self.CONF % {"client": self.CLIENT_NAME, "server_san": ",".join(
                ["DNS:" + self.SERVER_NAME] + ["IP:" + ip for ip in self.server_ips])})
        open(f("index.txt"), "w").close()
        with open(f("serial"), "w") as c:
            c.write("01\n")
        now = time.time()
        # openssl 3.0's req/x509 know only -days; `ca` takes both ends of the validity
        when = [time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t)) for t in (now - 3600, now + 86400)]
        for name, cn, ext in (("ca", "migstream lab CA", "ca_ext"), ("dest", self.SERVER_NAME, "server_ext"),
                              ("source", self.CLIENT_NAME, "client_ext")):
            self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                          "-out", name + ".key")
            self._openssl("req", "-new", "-key", name + ".key", "-subj", "/CN=" + cn, "-out", name + ".csr")
            issuer = ["-selfsign"] if name == "ca" else ["-cert", "ca.pem"]
            self._openssl("ca", "-batch", "-notext", "-config", "ca.cnf", *issuer, "-keyfile", "ca.key",
                          "-in", name + ".csr", "-out", name + ".pem", "-startdate", when[0],
                          "-enddate", when[1], "-extensions", ext)
        log("link TLS: CA, destination %s (%s) and source %s certificates in %s" % (
            self.SERVER_NAME, ", ".join(self.server_ips), self.CLIENT_NAME, self.dir))

    def _openssl(self, *args):
        try:
            r = subprocess.run(["openssl"] + list(args), cwd=self.dir, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise Fail("openssl: %s (apt-get install openssl, or --plaintext)" % e)
        except subprocess.TimeoutExpired:
            raise Fail("openssl %s: timed out" % args[0])
        if r.returncode != 0:
            raise Fail("openssl %s: exit %d: %s" % (args[0], r.returncode, r.stderr.strip()[-500:]))

    def args(self, role):
        """The proxy's --tls-* options for `role` (source or destination)."""
        if role == "source":
            return ["--tls-cert", self.client_cert, "--tls-key", self.client_key, "--tls-ca", self.ca]
        return ["--tls-cert", self.server_cert, "--tls-key", self.server_key, "--tls-ca", self.ca,
                "--tls-allow", self.CLIENT_NAME]

    def meta(self):
        return {"ca": self.ca, "server_name": self.SERVER_NAME, "server_ips": self.server_ips,
                "client_name": self.CLIENT_NAME}


# --------------------------------------------------------------------------- proxies
class Proxy:
    """One `proxy source|destination` process (examples/proxy.rs) with --json,
    over mutual TLS with `tls`'s credentials (a Pki), or --plaintext if None.
    `listen` and `to` are addresses as the proxy takes them (HOST:PORT or
    unix:PATH); `prefix` runs it through another program (wan-bench.py: `ip netns
    exec NS`). Its stderr goes to NAME.stderr.log (the `listening on ADDR` line is
    picked out of it), its stdout to NAME.stdout.log, one JSON object a migration."""

    LISTENING = re.compile(r"^listening on (\S+)")
    # the line a migration ends with, at either end
    FINAL = re.compile(r"^(wire \d+ bytes qemu \d+ bytes|migration failed: )")

    def __init__(self, name, binary, role, listen, to, extra, once, rundir, tls=None, prefix=()):
        self.name, self.role = name, role
        self.argv = list(prefix) + [binary, role, "--listen", listen, "--to", to, "--json"]
        self.argv += tls.args(role) if tls else ["--plaintext"]
        if once:
            self.argv.append("--once")
        self.argv += extra
        self.rundir = rundir
        self.proc = None
        self.addr = self.port = None    # as its `listening on` line names it; port for HOST:PORT
        self.plaintext = None           # whether that line says the link is plaintext
        self.results = []               # the JSON objects from stdout, in order
        self.result_times = []          # time.time() at which each came
        self.final_times = []           # time.time() of each final stderr line (FINAL)
        self.stderr = []                # stderr lines (progress lines split at \r too)
        self.garbage = []               # stdout lines that are not JSON objects
        self.cv = threading.Condition()
        self.open_streams = 0
        self.killed = False

    def start(self):
        with open(os.path.join(self.rundir, self.name + ".argv"), "w") as f:
            f.write(" ".join(map(shlex.quote, self.argv)) + "\n")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise Fail("%s: cannot run %s: %s" % (self.name, self.argv[0], e))
        log("%s: %s started, pid %d" % (self.name, " ".join(self.argv), self.proc.pid))
        self.open_streams = 2
        for stream, fn in ((self.proc.stdout, self._on_stdout), (self.proc.stderr, self._on_stderr)):
            threading.Thread(target=self._reader, args=(stream, fn), daemon=True).start()
        return self

    def _reader(self, stream, fn):
        suffix = ".stdout.log" if fn == self._on_stdout else ".stderr.log"
        with open(os.path.join(self.rundir, self.name + suffix), "wb") as logf:
            part = b""
            while True:
                d = stream.read1(65536)
                logf.write(d)
                logf.flush()
                part += d
                if d:
                    *full, part = re.split(rb"[\r\n]", part)
                else:
                    full, part = [part], b""
                with self.cv:
                    for x in full:
                        if x.strip():
                            fn(x.decode("utf-8", "replace").strip())
                    if not d:
                        self.open_streams -= 1
                    self.cv.notify_all()
                if not d:
                    return

    def _on_stdout(self, line):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            self.results.append(obj)
            self.result_times.append(time.time())
        else:
            self.garbage.append(line)

    def _on_stderr(self, line):
        self.stderr.append(line)
        m = self.LISTENING.match(line)
        if m and self.addr is None:
            self.addr = m.group(1)
            self.plaintext = "plaintext" in line[m.end():]
            if not self.addr.startswith("unix:"):
                self.port = int(self.addr.rsplit(":", 1)[1])
        if self.FINAL.match(line):
            self.final_times.append(time.time())

    def saw(self, regex):
        """Whether a stderr line so far matches regex."""
        with self.cv:
            return any(re.search(regex, x) for x in self.stderr)

    def _wait(self, pred, timeout, what):
        end = time.monotonic() + timeout
        with self.cv:
            while not pred():
                left = end - time.monotonic()
                if self.open_streams == 0 or left <= 0:
                    tail = " | ".join(self.stderr[-5:])
                    raise Fail("%s: %s waiting for %s (stderr: %s)" % (
                        self.name, "exited with %s" % self.proc.poll() if self.open_streams == 0 else
                        "timed out after %.0fs" % timeout, what, tail or "-"))
                self.cv.wait(min(left, 1.0))

    def wait_listening(self, timeout=30):
        """Wait for the `listening on ADDR` line; the port (None for unix:PATH)."""
        self._wait(lambda: self.addr is not None, timeout, "its 'listening on ADDR' line")
        log("%s: listening on %s (%s link)" % (self.name, self.addr, "plaintext" if self.plaintext else "TLS"))
        return self.port

    def wait_streams(self, timeout):
        """Wait (bounded) until its stdout and stderr are read to their end."""
        end = time.monotonic() + timeout
        with self.cv:
            while self.open_streams and time.monotonic() < end:
                self.cv.wait(1.0)

    def wait_results(self, n, timeout):
        """Wait for the n-th JSON line (a proxy reports each migration once it ends)."""
        self._wait(lambda: len(self.results) >= n, timeout, "its JSON line for migration %d" % n)
        return self.results[n - 1]

    def wait_exit(self, timeout):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.wait_streams(10)           # its last lines may still be in the pipes
        return rc

    def kill(self):
        """SIGKILL our own child by PID: the fault injection of --fault kill-dst-proxy."""
        log("%s: SIGKILL pid %d" % (self.name, self.proc.pid))
        self.killed = True
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            for sig in (self.proc.terminate, self.proc.kill):
                sig()
                try:
                    self.proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    pass


# --------------------------------------------------------------------------- subcommands
def kv_list(items, what):
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep:
            raise Fail("%s %r: expected NAME=VALUE" % (what, it))
        out[k] = v
    return out


def parse_caps(a):
    caps = {}
    for k, v in kv_list(a.cap, "--cap").items():
        if v.lower() not in ("on", "off", "true", "false"):
            raise Fail("--cap %s=%s: value must be on or off" % (k, v))
        caps[k] = v.lower() in ("on", "true")
    return caps


def parse_params(a):
    params = {}
    for k, v in kv_list(a.param, "--param").items():
        try:
            params[k] = int(v, 0)
        except ValueError:
            params[k] = {"on": True, "off": False}.get(v.lower(), v)
    if a.bandwidth is not None:
        params["max-bandwidth"] = a.bandwidth
    params.setdefault("max-bandwidth", UNTHROTTLED)
    return params


def make_rundir(kind):
    os.makedirs(os.path.join(LAB, "runs"), exist_ok=True)
    rd = tempfile.mkdtemp(prefix=kind + "-", dir=os.path.join(LAB, "runs"))
    if len(rd) > 90:        # unix socket paths are limited to 108 bytes
        rd = tempfile.mkdtemp(prefix="mig-" + kind + "-")
    return rd


def effective_params(vm):
    """query-migrate-parameters (the values in force, defaults included: e.g. the
    multifd-zstd-level actually used); None if the QEMU cannot answer any more."""
    try:
        return vm.qmp.cmd("query-migrate-parameters")
    except Fail:
        return None


def base_meta(a, vm, out, kind, caps, params, ready):
    return {"file": os.path.basename(out), "kind": kind, "qemu": a.qemu,
            "qemu_version": vm.version, "machine": a.machine, "machine_type": vm.machine_type(),
            "workload": a.workload, "mem_mib": a.mem, "ram_bytes": (a.mem * 1024 + a.ram_tail_kib) * 1024,
            "kernel_cmdline": kernel_cmdline(a),
            "caps": caps, "params": params, "ready_sum": ready}


def capture_file(a, rundir, vms):
    out = os.path.abspath(a.out)
    part = out + ".part"
    for p in (out, part):
        if os.path.exists(p):
            os.unlink(p)
    caps, params = parse_caps(a), parse_params(a)
    vm = VM("src", a.qemu, a, rundir)
    vms.append(vm)
    vm.start()
    ready = vm.wait_ready()
    log("src: READY sum=%s" % ready)
    vm.configure(caps, params)
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


def check_arrival(a, src, dst, info, ready, checks):
    """The checks of a completed live migration, added to `checks`: source
    postmigrate, destination running, the destination guest's checksum of its
    data equal to the source's READY sum, its kernel clean, for `dirty` the
    dirtying loop still running. Returns the destination's sum (or None)."""
    checks["completed"] = info.get("status") == "completed"
    after = None
    if checks["completed"]:
        checks["src_postmigrate"] = src.status() == "postmigrate"
        try:
            dst.wait_status("running", 30)
            after, passes = dst.check()
            checks["sum_matches"] = after == ready
            log("%s: CHECK sum=%s passes=%d" % (dst.name, after, passes))
            if a.workload == "dirty":       # the dirtying loop survived and still runs
                time.sleep(1)
                checks["dirty_loop_alive"] = dst.check()[1] > passes
            checks["dst_guest_answers"] = True
        except Fail as e:                   # e.g. the guest panicked and QEMU quit
            log(str(e))
            checks["dst_guest_answers"] = False
        # lost pages often show up as a guest kernel oops rather than a bad sum
        checks["dst_kernel_clean"] = not any(re.search(r"Oops|BUG:|Kernel panic|general protection", x)
                                             for x in dst.console.lines)
    return after


def check_minimums(a, info, checks):
    """--min-dirty-syncs / --min-xbzrle-pages against the source's query-migrate."""
    syncs = info.get("ram", {}).get("dirty-sync-count")
    if a.min_dirty_syncs:
        checks["min_dirty_syncs"] = (syncs or 0) >= a.min_dirty_syncs
    if a.min_xbzrle_pages:
        checks["min_xbzrle_pages"] = info.get("xbzrle-cache", {}).get("pages", 0) >= a.min_xbzrle_pages
    return syncs


def report_failed(a, checks, detail):
    failed = [k for k, v in checks.items() if not v]
    if failed:
        log("FAILED checks: %s %s" % (", ".join(failed), detail or ""))
        if a.qemu == "7.2" and not a.ram_tail_kib:
            log("hint: QEMU 7.2 under TCG loses guest writes during live migration; "
                "--ram-tail-kib 8 avoids it (see harness/README.md)")
    return not failed


def capture_live(a, rundir, vms):
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


def migrate_cmd(a, rundir, vms):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("capture-file", capture_file), ("capture-live", capture_live), ("migrate", migrate_cmd)):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        if name == "migrate":
            p.add_argument("-o", "--out", help="write the report (JSON) to this file")
        else:
            p.add_argument("-o", "--out", required=True, help="stream file to write (plus FILE.json)")
        p.add_argument("--qemu", choices=("7.2", "10"), default="7.2")
        p.add_argument("--machine", default="pc", help="pc, q35, pc-i440fx-7.2, pc-q35-7.2, ...")
        p.add_argument("-m", "--mem", type=int, default=128, help="guest RAM in MiB (default 128)")
        p.add_argument("-w", "--workload", choices=("idle", "fill", "dup", "dirty"), default="idle")
        p.add_argument("--data-mb", type=int, help="MiB of guest data (default mem/2; dirty mem/4; idle 0)")
        p.add_argument("--dirty-mb", type=int, default=8, help="dirty: MiB rewritten forever (default 8)")
        p.add_argument("--dirty-chunk", type=int, default=256,
                       help="dirty: bytes changed per 4 KiB page and pass (default 256; 4096 = whole page)")
        p.add_argument("--cap", action="append", metavar="NAME=on", help="migration capability (repeatable)")
        p.add_argument("--param", action="append", metavar="NAME=VALUE", help="migration parameter (repeatable)")
        p.add_argument("--bandwidth", type=int, metavar="BYTES_PER_S",
                       help="max-bandwidth (default: unthrottled, 1 TiB/s)")
        p.add_argument("--timeout", type=float, default=300, help="migration time limit in s (default 300)")
        p.add_argument("--boot-timeout", type=float, default=120)
        p.add_argument("--check-timeout", type=float, default=60)
        p.add_argument("--ram-tail-kib", type=int, default=0,
                       help="add K KiB to the RAM (8 avoids a QEMU 7.2 TCG dirty-tracking bug; see README)")
        p.add_argument("--accel", default="tcg", help="-accel value (default tcg)")
        p.add_argument("--keep-run", action="store_true", help="keep the run dir (logs) even on success")
        if name in ("capture-live", "migrate"):
            p.add_argument("--src-qemu", choices=("7.2", "10"), help="source QEMU (default --qemu)")
            p.add_argument("--dst-qemu", choices=("7.2", "10"), help="destination QEMU (default --qemu)")
            p.add_argument("--min-dirty-syncs", type=int, default=0,
                           help="fail unless query-migrate's dirty-sync-count reaches N")
            p.add_argument("--min-xbzrle-pages", type=int, default=0,
                           help="fail unless at least N pages were sent xbzrle-encoded")
        if name == "migrate":
            p.add_argument("--proxy", required=True, help="the proxy binary (target/release/examples/proxy)")
            p.add_argument("--src-proxy-arg", action="append", default=[], metavar="ARG",
                           help="extra argument(s) for the source proxy, split like a shell "
                                "(repeatable; write --src-proxy-arg='--catalog FILE' or --src-proxy-arg=--once)")
            p.add_argument("--dst-proxy-arg", action="append", default=[], metavar="ARG",
                           help="the same for the destination proxy")
            p.add_argument("--plaintext", action="store_true",
                           help="run the proxies' link without TLS (default: mutual TLS with a throwaway "
                                "CA made in the run dir)")
            p.add_argument("--qemu-unix", action="store_true",
                           help="Unix sockets between each QEMU and its proxy: migrate unix:RUNDIR/src.sock, "
                                "-incoming unix:RUNDIR/dst.sock")
            p.add_argument("--fault", choices=("none", "kill-dst-proxy", "corrupt", "template-store"),
                           default="none",
                           help="fail a first migration, then retry with a new destination QEMU (see README); "
                                "template-store: the caller damaged a template in the destination's store")
            p.add_argument("--kill-after", type=int, default=8 << 20, metavar="BYTES",
                           help="kill-dst-proxy: once the source QEMU has sent this much RAM (default 8 MiB)")
            p.add_argument("--corrupt-offset", type=int, default=1 << 20, metavar="BYTES",
                           help="corrupt: flip the byte at this offset of the dedup stream (default 1 MiB)")
            p.add_argument("--fault-connection", type=int, default=0, metavar="N",
                           help="corrupt: the link connection to corrupt, in the order the proxies open them "
                                "(default 0, the first: the main channel's; with multifd 1.. are the channels')")
            p.add_argument("--fault-bandwidth", type=int, default=32 << 20, metavar="BYTES_PER_S",
                           help="max-bandwidth of the faulty first attempt (default 32 MiB/s)")
            p.add_argument("--min-proxy-pages", action="append", metavar="KIND=N",
                           help="fail unless the source proxy reports at least N pages of KIND (raw, fill, "
                                "seen, template, xbzrle; repeatable)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # still runs the finally below
    try:
        for v in {a.qemu, getattr(a, "src_qemu", None) or a.qemu, getattr(a, "dst_qemu", None) or a.qemu}:
            qemu_binary(v)
        for f in ("kernel/vmlinuz", "guest/initramfs.cpio.gz"):
            if not os.path.exists(os.path.join(LAB, f)):
                raise Fail("%s missing: run harness/setup.sh" % os.path.join(LAB, f))
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
        return 1
    rundir = make_rundir(a.cmd)
    vms, ok = [], False
    try:
        out, meta, ok = a.fn(a, rundir, vms)
        meta["ok"] = ok
        m = meta["migration"]
        if a.cmd == "migrate":
            meta["run_dir"] = None if ok and not a.keep_run else rundir
            if out:
                with open(out, "w") as f:
                    json.dump(meta, f, indent=1)
            print("%s migrate qemu=%s machine=%s workload=%s caps=%s link=%s qemu-side=%s fault=%s sum=%s/%s "
                  "qemu_bytes=%s wire_bytes=%s ratio=%s pages=%s xbzrle-pages=%s total-time=%sms" % (
                      "OK" if ok else "FAILED", meta["src_qemu"] + "->" + meta["dst_qemu"], meta["machine_type"],
                      a.workload, ",".join(k for k, v in meta["caps"].items() if v) or "-",
                      "plaintext" if a.plaintext else "tls", meta["qemu_side"], a.fault,
                      meta["ready_sum"], meta["check_sum"], meta["qemu_bytes"], meta["wire_bytes"], meta["ratio"],
                      json.dumps(meta["pages"], separators=(",", ":")), m.get("xbzrle-cache", {}).get("pages", "-"),
                      m.get("total-time")))
            return 0 if ok else 1
        with open(out + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        print("%s %s %d bytes qemu=%s machine=%s workload=%s caps=%s sum=%s dirty-sync-count=%s "
              "xbzrle-pages=%s total-time=%sms" % ("OK" if ok else "FAILED", out, meta["size"],
              meta.get("src_qemu", a.qemu) + ("->" + meta["dst_qemu"] if meta.get("dst_qemu", a.qemu) != a.qemu else ""),
              meta["machine_type"], a.workload, ",".join(k for k, v in meta["caps"].items() if v) or "-",
              meta["ready_sum"], m.get("ram-dirty-sync-count"), m.get("xbzrle-cache", {}).get("pages", "-"),
              m.get("total-time")))
    except Fail as e:
        print("ERROR: %s" % e, file=sys.stderr)
    except KeyboardInterrupt:
        print("ERROR: interrupted", file=sys.stderr)
    finally:
        for vm in reversed(vms):
            vm.stop()
        if not ok and a.cmd != "migrate":   # never leave a partial or unverified stream where a good one is expected
            for f in (a.out, a.out + ".json", a.out + ".part"):
                if os.path.exists(f):
                    shutil.move(f, os.path.join(rundir, os.path.basename(f)))
        if ok and not a.keep_run:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            print("run dir (logs%s): %s" % ("" if ok else ", failed stream", rundir), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
