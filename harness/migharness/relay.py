"""A TCP relay on 127.0.0.1 between a source and a destination: it forwards
every connection both ways, names each by its first bytes, counts what each
carried, and can save or corrupt what it forwards."""
import socket
import struct
import threading
import time

QEVM = b"QEVM"                          # be32 0x5145564D, first bytes of a migration stream
MULTIFD_MAGIC = bytes.fromhex("11223344")   # first bytes of a multifd channel


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

    KINDS = {QEVM: "main"}      # a connection's first 4 bytes -> its kind; any others: "other"

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

    def _sink(self, info):
        """The file that keeps connection `info`'s source->destination bytes, or
        None; asked (the lock held) once its kind is known, or at its end if it
        closed within 4 bytes (kind None). Here: the main channel's, to `capture`."""
        if info["kind"] != "main" or not self.capture:
            return None
        if any(c["kind"] == "main" for c in self.conns if c is not info):
            self._error(info["index"], "more than one connection starts with QEVM")
            return None
        return open(self.capture, "wb")

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
                        info["kind"] = self.KINDS.get(data[:4], "other")
                        out = self._sink(info)
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
            if forward and info["kind"] is None:    # a connection that closed within 4 bytes
                with self.lock:
                    out = self._sink(info)
                if out:
                    out.write(head)
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


class SplitRelay(Relay):
    """A Relay whose source->destination bytes of EVERY connection go to a file
    of their own, `<prefix>.conn<index>` (capture-multifd.py); the kinds are
    main, multifd or other."""

    KINDS = {QEVM: "main", MULTIFD_MAGIC: "multifd"}

    def __init__(self, dst_port, prefix):
        self.prefix = prefix
        super().__init__(dst_port, None)

    def conn_file(self, index):
        return "%s.conn%d" % (self.prefix, index)

    def _sink(self, info):
        return open(self.conn_file(info["index"]), "wb")
