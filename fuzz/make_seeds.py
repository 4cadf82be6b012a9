#!/usr/bin/env python3
"""Writes the seed corpus of the `qemu_decode` fuzz target (stdlib only).

    python3 fuzz/make_seeds.py                      # synthetic seeds only
    python3 fuzz/make_seeds.py --real a.mig b.mig   # plus seeds cut from real streams

Every seed is one byte of read-size seed (0 = the whole input at once, n = reads of
n bytes; `n % 7` also sets the opaque chunk size, see src/fuzzing.rs) followed by a
stream in QEMU's main-channel format. Seeds are valid streams, prefixes of them, or
streams with one deliberate defect (`bad-*`), each well under 64 KiB.

Real streams (`--real`, or any *.mig under target/qemu-lab/ and testdata/) give the
`real-*` seeds: the start of each stream, its device-state tail spliced after its
own RAM setup, and (if it has XBZRLE pages) a few of its XBZRLE records. Without
real streams the `real-*` seeds already in the directory are left as they are.
"""

import argparse
import glob
import json
import mmap
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "corpus", "qemu_decode")
MAX_SEED = 64 * 1024 - 1

# record types (migration/savevm.c)
EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E)
# RAM flags (migration/ram.c)
R_FULL, R_ZERO, R_MEM_SIZE, R_PAGE, R_EOS, R_CONTINUE = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
R_XBZRLE, R_HOOK, R_COMPRESS, R_MULTIFD_FLUSH = 0x40, 0x80, 0x100, 0x200
PAGE = 4096


def be16(v): return struct.pack(">H", v)
def be32(v): return struct.pack(">I", v)
def be64(v): return struct.pack(">Q", v)
def cstr8(s): return bytes([len(s)]) + s


# ---------------------------------------------------------------- stream builders

def header(version=3, magic=b"QEVM"):
    return magic + be32(version)


def config(machine=b"pc-i440fx-10.0", subs=()):
    out = bytes([CONFIG]) + be32(len(machine)) + machine
    for s in subs:
        out += s
    return out


def sub(name, body, version=1):
    return bytes([SUBSECTION]) + cstr8(b"configuration/" + name) + be32(version) + body


def sub_page_bits(bits): return sub(b"target-page-bits", be32(bits))
def sub_caps(*names): return sub(b"capabilities", be32(len(names)) + b"".join(cstr8(n) for n in names))
def sub_uuid(u=bytes(range(0x10, 0x20))): return sub(b"uuid", u)


def full_header(kind, sid, idstr, inst, ver):
    return bytes([kind]) + be32(sid) + cstr8(idstr) + be32(inst) + be32(ver)


def ram_start(sid=2): return full_header(START, sid, b"ram", 0, 4)
def part(sid=2): return bytes([PART]) + be32(sid)
def end(sid=2): return bytes([END]) + be32(sid)
def footer(sid=2): return bytes([FOOTER]) + be32(sid)
def word(offset, flags): return be64(offset | flags)


def mem_size(blocks, mr_addrs=None, total=None):
    if total is None:
        total = sum(n for _, n in blocks)
    out = word(total, R_MEM_SIZE)
    for i, (name, length) in enumerate(blocks):
        out += cstr8(name) + be64(length)
        if mr_addrs is not None:
            out += be64(mr_addrs[i])
    return out


def addr(offset, flag, block):
    """Record word and, unless `block` is None (CONTINUE), the block name."""
    if block is None:
        return word(offset, flag | R_CONTINUE)
    return word(offset, flag) + cstr8(block)


def page(offset, block, fill=0xAB, size=PAGE):
    data = bytes((fill + i * 7) & 0xFF for i in range(size)) if fill != 0 else bytes(size)
    return addr(offset, R_PAGE, block) + data


def zero(offset, block, fill=0): return addr(offset, R_ZERO, block) + bytes([fill])


def xbzrle(offset, block, data, encoding=1, length=None):
    n = len(data) if length is None else length
    return addr(offset, R_XBZRLE, block) + bytes([encoding]) + be16(n) + data


def compressed(offset, block, data, length=None):
    n = len(data) if length is None else length
    return addr(offset, R_COMPRESS, block) + be32(n) + data


def flush(): return word(0, R_MULTIFD_FLUSH)
def eos(): return word(0, R_EOS)
def command(cmd, payload=b""): return bytes([COMMAND]) + be16(cmd) + be16(len(payload)) + payload
def packaged(inner): return command(7, be32(len(inner))) + inner
def device(sid, idstr, state, inst=0, ver=1, with_footer=True):
    return full_header(FULL, sid, idstr, inst, ver) + state + (footer(sid) if with_footer else b"")
def eof(): return bytes([EOF])
def vmdesc(doc): return bytes([VMDESC]) + be32(len(doc)) + doc


def uleb128(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def xbzrle_encode(runs):
    """QEMU's XBZRLE body: (zero-run uleb128, data-run uleb128, data bytes)*."""
    out = b""
    for zrun, data in runs:
        out += uleb128(zrun) + uleb128(len(data)) + data
    return out


# ---------------------------------------------------------------- common pieces

BLOCKS = [(b"pc.ram", 16 * PAGE), (b"pc.bios", 4 * PAGE), (b"/rom@etc/acpi/tables", 2 * PAGE)]
SETUP = ram_start() + mem_size(BLOCKS) + flush() + eos() + footer()
XBZ = xbzrle_encode([(0, b"\xaa\xbb"), (100, b"\x01\x02\x03\x04"), (3000, b"\xff")])
JSON = b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]}'
TIMER = b"\x00\x00\x00\x08\x19\xb2\x3a\xc8" + bytes(8) + b"\x00\x00\x00\x03\x4f\xfc\xd7\xbc"
DEVICES = (device(0, b"timer", TIMER, ver=2)
           + device(4, b"cpu_common", b"\x00\x00\x00\x00", ver=1)
           + device(5, b"apic", b"\xfe\xe0\x00\x00" + bytes(12) + b"\x00\x06\x00\x00", ver=3))
TAIL = DEVICES + eof() + vmdesc(JSON)


def sample():
    """A small stream shaped like QEMU 10.0's, with every kind of RAM record."""
    return (header() + config(subs=[sub_caps(b"validate-uuid")]) + SETUP
            + part() + page(0, b"pc.ram") + zero(PAGE, None) + page(PAGE, b"pc.bios", 0x11)
            + page(0, None, 0x22) + eos() + footer()
            + part() + xbzrle(PAGE, b"pc.bios", XBZ) + page(15 * PAGE, b"pc.ram", 0x33)
            + compressed(2 * PAGE, None, zlib.compress(bytes(PAGE)))
            + zero(0, b"/rom@etc/acpi/tables", 0x5A) + flush() + eos() + footer()
            + command(11) + end() + zero(2 * PAGE, b"pc.ram") + eos() + footer()
            + TAIL)


def seeds():
    """(name, read-size seed, stream) of every synthetic seed."""
    s = sample()
    yield "sample-whole", 0, s
    yield "sample-reads-1", 1, s
    yield "sample-reads-7", 7, s
    yield "sample-reads-100", 100, s
    yield "sample-reads-255", 255, s
    yield "header-eof", 0, header() + eof()
    yield "header-eof-vmdesc", 3, header() + eof() + vmdesc(JSON)
    yield "header-config-eof-vmdesc", 0, header() + config() + eof() + vmdesc(JSON)

    # one RAM record kind at a time (and the CONTINUE form of each page kind)
    pre = header() + config() + SETUP + part()
    post = eos() + footer() + device(0, b"timer", TIMER) + eof()
    yield "ram-page", 0, pre + page(3 * PAGE, b"pc.ram") + page(4 * PAGE, None, 0x44) + post
    yield "ram-zero", 2, pre + zero(0, b"pc.ram") + zero(PAGE, None, 0x01) + post
    yield "ram-xbzrle", 0, (pre + xbzrle(0, b"pc.bios", XBZ) + xbzrle(PAGE, None, b"")
                            + xbzrle(2 * PAGE, None, xbzrle_encode([(0, bytes(range(250)) * 16)]))
                            + post)
    yield "ram-compress", 9, (pre + compressed(0, b"pc.ram", zlib.compress(bytes(PAGE)))
                              + compressed(PAGE, None, zlib.compress(bytes(range(256)) * 16, 9))
                              + post)
    yield "ram-multifd-flush", 5, pre + flush() + flush() + zero(0, b"pc.ram") + flush() + post
    yield "ram-eos-no-footer", 0, (header() + config() + ram_start() + mem_size(BLOCKS) + eos()
                                   + part() + zero(0, b"pc.ram") + eos() + end() + eos()
                                   + device(0, b"timer", TIMER, with_footer=False) + eof())

    # configurations
    yield "config-page-bits-10", 0, (
        header() + config(b"virt-7.2", [sub_page_bits(10)]) + ram_start()
        + mem_size([(b"mach-virt.ram", 8 * 1024)]) + eos() + footer()
        + part() + page(1024, b"mach-virt.ram", 0x21, 1024) + zero(0, None)
        + xbzrle(2048, None, xbzrle_encode([(10, b"\x42")])) + eos() + footer() + TAIL)
    yield "config-page-bits-14", 0, (
        header() + config(b"pseries-7.2", [sub_page_bits(14)]) + ram_start()
        + mem_size([(b"ppc_spapr.ram", 4 * 16384)]) + eos() + footer()
        + part() + page(16384, b"ppc_spapr.ram", 0x31, 16384) + zero(0, None) + eos() + footer()
        + TAIL)
    yield "config-caps-uuid-pagebits", 4, (
        header() + config(b"pc-q35-10.0", [sub_page_bits(12), sub_caps(b"validate-uuid", b"zero-blocks"),
                                           sub_uuid()])
        + SETUP + part() + zero(0, b"pc.ram") + eos() + footer() + TAIL)
    ignore = [(b"pc.ram", 8 * PAGE), (b"pc.bios", 2 * PAGE)]
    yield "config-x-ignore-shared", 0, (
        header() + config(b"pc-i440fx-10.0", [sub_caps(b"x-ignore-shared")]) + ram_start()
        + mem_size(ignore, [0, 0xFFFE0000]) + eos() + footer()
        + part() + page(PAGE, b"pc.ram", 0x61) + zero(PAGE, b"pc.bios") + eos() + footer() + TAIL)
    yield "config-x-ignore-shared-reads-3", 3, (
        header() + config(b"pc-q35-7.2", [sub_caps(b"x-ignore-shared", b"validate-uuid"), sub_uuid()])
        + ram_start() + mem_size(ignore, [0x100000000, 0xFFFE0000]) + eos() + footer() + TAIL)
    yield "config-mapped-ram", 0, (
        header() + config(b"pc-q35-10.0", [sub_caps(b"mapped-ram")]) + SETUP + TAIL)

    # commands
    yield "commands-all", 0, (
        header() + config() + command(1) + command(2, be32(1)) + command(3)
        + command(3, be64(PAGE) + be64(PAGE)) + ram_start() + mem_size(BLOCKS) + eos() + footer()
        + command(4) + command(6, b"\x00" + cstr8(b"pc.ram") + be64(0) + be64(PAGE))
        + command(8) + command(9) + command(10, cstr8(b"pc.ram")) + command(11)
        + command(5) + TAIL)
    inner = DEVICES + eof()
    yield "command-packaged", 0, (
        header() + config() + command(3) + SETUP + command(1) + command(4)
        + packaged(command(4) + command(5) + inner) + command(2, be32(2)) + eof())
    yield "command-packaged-reads-2", 2, header() + packaged(inner) + eof() + vmdesc(JSON)
    yield "command-postcopy-huge-pages", 0, (
        header() + config() + command(3, be64(2 * 1024 * 1024) + be64(PAGE)) + SETUP + TAIL)

    # device state the decoder cannot delimit, with look-alikes of the EOF tail inside
    fake_tail = b"\x00\x06\x00\x00\x00\x10{not the end}" + b"\x00\x06\x00\x00\x00\x02{}\x01"
    yield "device-fake-tails", 0, (
        header() + config() + SETUP + device(0, b"timer", fake_tail) + device(1, b"x", b"\x00\x00\x06")
        + eof() + vmdesc(JSON))
    yield "device-fake-tails-reads-13", 13, (
        header() + device(0, b"timer", fake_tail + b"\x00") + eof() + vmdesc(b"{}"))
    yield "device-bare-eof", 6, header() + config() + SETUP + DEVICES + eof()
    yield "device-live-non-ram", 0, (
        header() + config() + SETUP + full_header(START, 3, b"dirty-bitmap", 0, 1)
        + b"\x00\x00\x00\x04" + eos() + footer(3) + end() + eos() + footer() + TAIL)
    yield "device-vmdesc-over-limit", 6, header() + DEVICES + eof() + vmdesc(b"{" + b" " * 5000 + b"}")

    # truncated: prefixes of the sample stream
    setup = s.index(SETUP)
    cuts = {"in-header": 5, "in-config": 20, "in-mem-size": setup + 40, "in-page": 300,
            "before-footer": s.index(footer(), setup), "in-vmdesc": len(s) - 10,
            "before-vmdesc": len(s) - len(vmdesc(JSON))}
    for name, at in cuts.items():
        yield f"trunc-{name}", 0, s[:at]
    yield "trunc-in-page-reads-64", 64, s[:5000]

    # malformed: one defect each
    ok_pages = header() + config() + SETUP + part()
    yield "bad-magic", 0, header(magic=b"QEMU") + eof()
    yield "bad-version-2", 0, header(version=2) + eof()
    yield "bad-version-4", 0, header(version=4) + eof()
    yield "bad-continue-without-block", 0, ok_pages + zero(0, None) + eos() + footer() + eof()
    yield "bad-continue-on-eos", 0, ok_pages + word(0, R_EOS | R_CONTINUE) + footer() + eof()
    yield "bad-flag-combo", 0, ok_pages + word(0, R_ZERO | R_PAGE) + b"\x06pc.ram\x00" + eof()
    yield "bad-flag-full", 0, ok_pages + word(0, R_FULL) + eof()
    yield "bad-flag-hook", 0, ok_pages + word(0, R_HOOK) + eof()
    yield "bad-eos-offset", 0, ok_pages + word(PAGE, R_EOS) + footer() + eof()
    yield "bad-footer-id", 0, ok_pages + zero(0, b"pc.ram") + eos() + footer(3) + eof()
    yield "bad-xbzrle-length", 0, ok_pages + xbzrle(0, b"pc.ram", bytes(PAGE + 1)) + eos() + eof()
    yield "bad-xbzrle-encoding", 0, ok_pages + xbzrle(0, b"pc.ram", XBZ, encoding=2) + eos() + eof()
    yield "bad-compress-length", 0, ok_pages + compressed(0, b"pc.ram", b"", length=PAGE + 100) + eof()
    yield "bad-block-name", 0, ok_pages + zero(0, b"pc.rom") + eos() + footer() + eof()
    yield "bad-offset-beyond-block", 0, ok_pages + zero(4 * PAGE, b"pc.bios") + eos() + eof()
    yield "bad-blocks-exceed-total", 0, (header() + ram_start()
                                         + mem_size(BLOCKS, total=17 * PAGE) + eos() + eof())
    yield "bad-block-twice", 0, header() + ram_start() + mem_size([(b"a", PAGE), (b"a", PAGE)]) + eof()
    yield "bad-block-empty-name", 0, header() + ram_start() + mem_size([(b"", PAGE)]) + eof()
    yield "bad-second-mem-size", 0, header() + SETUP + part() + mem_size(BLOCKS) + eos() + eof()
    yield "bad-second-ram-start", 0, header() + SETUP + ram_start(7) + eos() + eof()
    yield "bad-ram-version", 0, header() + full_header(START, 2, b"ram", 0, 3) + eos() + eof()
    yield "bad-part-unknown-id", 0, header() + SETUP + part(9) + eos() + eof()
    yield "bad-config-twice", 0, header() + config() + config() + eof()
    yield "bad-config-subsection", 0, header() + config(subs=[sub(b"vcpus", be32(1))]) + eof()
    yield "bad-config-sub-version", 0, header() + config(subs=[sub(b"uuid", bytes(16), 2)]) + eof()
    yield "bad-page-bits-20", 0, header() + config(subs=[sub_page_bits(20)]) + eof() + vmdesc(JSON)
    yield "bad-footer-outside", 0, header() + footer() + eof()
    yield "bad-vmdesc-before-eof", 0, header() + vmdesc(JSON) + eof()
    yield "bad-record-type", 0, header() + b"\x09\x00" + eof()
    yield "bad-command-0", 0, header() + command(0) + eof()
    yield "bad-command-unknown", 0, header() + command(12) + eof()
    yield "bad-command-length", 0, header() + command(2, b"\x00\x01") + eof()
    yield "bad-after-vmdesc", 0, header() + eof() + vmdesc(JSON) + b"\x00"
    yield "bad-after-eof", 0, header() + eof() + b"\x04"


# ---------------------------------------------------------------- real streams

class Real:
    """The parts of a real QEMU stream that the seeds are cut from."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.m = m
        p = 8
        if m[p] == CONFIG:
            p += 5 + struct.unpack_from(">I", m, p + 1)[0]
            while m[p] == SUBSECTION and m[p + 2:p + 2 + 13] == b"configuration":
                name = bytes(m[p + 2:p + 2 + m[p + 1]])
                p += 2 + len(name) + 4
                if name.endswith(b"/target-page-bits"):
                    raise SystemExit(f"{path}: only 4 KiB target pages are handled")
                if name.endswith(b"/uuid"):
                    p += 16
                elif name.endswith(b"/capabilities"):
                    count = struct.unpack_from(">I", m, p)[0]
                    p += 4
                    for _ in range(count):
                        if m[p + 1:p + 1 + m[p]] == b"x-ignore-shared":
                            raise SystemExit(f"{path}: x-ignore-shared streams are not handled")
                        p += 1 + m[p]
                else:
                    raise SystemExit(f"{path}: unknown configuration subsection {name}")
        self.config_end = p
        self.setup_end = None      # end of START ram + setup payload + footer
        self.block = None          # the block of the last page record, for CONTINUE
        self.xbzrle = b""          # records from the first XBZRLE one on, first one named
        self.device = None         # offset of the first device section
        while True:
            t = m[p]
            if t == COMMAND:
                p += 5 + struct.unpack_from(">H", m, p + 3)[0]
                continue
            if t in (START, FULL):
                n = m[p + 5]
                if t == FULL or m[p + 6:p + 6 + n] != b"ram":
                    self.device = p
                    break
                p += 6 + n + 8
            elif t in (PART, END):
                p += 5
            else:
                raise SystemExit(f"{path}: unexpected record type {t} at {p}")
            p = self._ram_payload(p)
            if self.setup_end is None:
                self.setup_end = p

    def _ram_payload(self, p):
        m = self.m
        while True:
            w = struct.unpack_from(">Q", m, p)[0]
            flags, offset = w & 0xFFF, w & ~0xFFF
            kind = flags & ~R_CONTINUE
            start = p
            p += 8
            if kind == R_MEM_SIZE:
                total = 0
                while total < offset:
                    n = m[p]
                    total += struct.unpack_from(">Q", m, p + 1 + n)[0]
                    p += 1 + n + 8
                continue
            if kind == R_MULTIFD_FLUSH:
                continue
            if kind == R_EOS:
                return p + 5 if m[p] == FOOTER else p
            if not flags & R_CONTINUE:
                self.block = bytes(m[p + 1:p + 1 + m[p]])
                p += 1 + m[p]
            body = p
            if kind == R_PAGE:
                p += PAGE
            elif kind == R_ZERO:
                p += 1
            elif kind == R_XBZRLE:
                p += 3 + struct.unpack_from(">H", m, p + 1)[0]
            elif kind == R_COMPRESS:
                p += 4 + struct.unpack_from(">I", m, p)[0]
            else:
                raise SystemExit(f"{self.path}: RAM flags {flags:#x} at {start}")
            # keep up to ~24 KiB of records from the first XBZRLE record on, naming the
            # block in the first one so that CONTINUE in the next ones stays valid
            if kind == R_XBZRLE and not self.xbzrle:
                self.xbzrle = word(offset, kind) + cstr8(self.block) + bytes(m[body:p])
            elif self.xbzrle and len(self.xbzrle) + (p - start) < 24 * 1024:
                self.xbzrle += bytes(m[start:p])

    def start(self, n):
        return bytes(self.m[:n])

    def setup(self):
        """Header, configuration and the RAM setup section, as the stream has them."""
        return bytes(self.m[:self.setup_end])

    def ram_section_id(self):
        return struct.unpack_from(">I", self.m, self.config_end + 1)[0]

    def device_tail(self, json_budget=3000):
        """The device sections, EOF and a shortened (still valid) device description."""
        m = self.m
        size = len(m)
        for i in range(self.device, size - 6):
            if m[i] == EOF and m[i + 1] == VMDESC:
                n = struct.unpack_from(">I", m, i + 2)[0]
                if i + 6 + n == size:
                    break
        else:
            raise SystemExit(f"{self.path}: no EOF + device description at the end")
        doc = json.loads(bytes(m[i + 6:]))
        devices = doc["devices"]
        while len(json.dumps(doc).encode()) > json_budget and len(devices) > 1:
            devices.pop()
        return bytes(m[self.device:i + 1]) + vmdesc(json.dumps(doc).encode())


def real_seeds(paths):
    for path in paths:
        r = Real(path)
        tag = os.path.splitext(os.path.basename(path))[0]
        machine = bytes(r.m[13:13 + struct.unpack_from(">I", r.m, 9)[0]]).decode()
        tag = f"{machine}-{tag}"
        sid = r.ram_section_id()
        yield f"real-start-{tag}", 0, r.start(20 * 1024)
        tail = (r.setup() + end(sid) + eos() + footer(sid) + r.device_tail())
        # reads of 216 bytes and 601-byte opaque chunks: with seed 0 (1-byte chunks)
        # the device-state scan makes this input slow (quadratic in its length)
        yield f"real-device-tail-{tag}", 216, tail[:MAX_SEED - 1]
        if r.xbzrle:
            yield f"real-xbzrle-{tag}", 0, r.setup() + part(sid) + r.xbzrle + eos() + footer(sid) + eof()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", nargs="*", default=None, help="real QEMU streams to cut seeds from")
    args = ap.parse_args()
    real = args.real
    if real is None:
        real = sorted(glob.glob(os.path.join(ROOT, "testdata", "*.mig"))
                      + glob.glob(os.path.join(ROOT, "target", "qemu-lab", "**", "*.mig"), recursive=True))
    os.makedirs(OUT, exist_ok=True)
    names = set()
    all_seeds = list(seeds()) + list(real_seeds(real))
    for name, read, stream in all_seeds:
        data = bytes([read]) + stream
        assert len(data) <= MAX_SEED, f"{name}: {len(data)} bytes"
        assert name not in names, name
        names.add(name)
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    # drop synthetic seeds this script no longer makes; keep real-* and crash-* files
    for old in os.listdir(OUT):
        if old not in names and not old.startswith(("real-", "crash-")):
            os.remove(os.path.join(OUT, old))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(all_seeds)} seeds written ({len(real)} real streams); "
          f"{len(os.listdir(OUT))} files, {total} bytes in {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
