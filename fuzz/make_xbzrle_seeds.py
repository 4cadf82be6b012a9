#!/usr/bin/env python3
"""Write the seed corpus of the `xbzrle` fuzz target (fuzz/corpus/xbzrle/).

Each seed is one byte choosing the page size (64 << (b % 7)) followed by an XBZRLE
delta: valid deltas of random page pairs, the format's edge cases, and broken ones.
Python standard library only; deterministic.
"""
import os
import random

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "xbzrle")


def uleb(v):
    return bytes([v]) if v < 0x80 else bytes([(v & 0x7F) | 0x80, v >> 7])


def delta(old, new):
    out, i = bytearray(), 0
    while i < len(new):
        z = i
        while z < len(new) and old[z] == new[z]:
            z += 1
        if z == len(new):
            break
        n = z
        while n < len(new) and old[n] != new[n]:
            n += 1
        out += uleb(z - i) + uleb(n - z) + new[z:n]
        i = n
    return bytes(out)


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(7)
    seeds = {}
    for k, size_byte in enumerate([0, 1, 3, 6, 6, 6, 6, 6]):
        size = 64 << (size_byte % 7)
        old = bytes(rng.randrange(256) for _ in range(size))
        new = bytearray(old)
        for _ in range(rng.randrange(1, 40)):
            at = rng.randrange(size)
            for j in range(at, min(size, at + rng.randrange(1, 200))):
                new[j] ^= rng.randrange(1, 256)
        seeds[f"valid-{k}"] = bytes([size_byte]) + delta(old, bytes(new))
    seeds["empty-delta"] = bytes([6])
    seeds["last-byte"] = bytes([6]) + uleb(4095) + uleb(1) + b"\x09"
    seeds["whole-page"] = bytes([6]) + b"\x00" + uleb(4096) + bytes(range(256)) * 16
    seeds["bad-uleb"] = bytes([6, 0x80, 0x80, 0x01, 0x01])
    seeds["empty-changed-run"] = bytes([6, 0, 0, 0])
    seeds["second-empty-unchanged-run"] = bytes([6, 0, 1, 0xAA, 0, 1, 0xBB])
    seeds["beyond-page"] = bytes([0]) + uleb(100) + uleb(1) + b"x"
    seeds["beyond-data"] = bytes([6, 0, 5, 0xAA])
    seeds["one-byte-left"] = bytes([6, 0, 1, 0xAA, 0x05])
    seeds["non-canonical-uleb"] = bytes([6, 0, 0x81, 0x00, 0xAA])
    for name, data in seeds.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {OUT}")


if __name__ == "__main__":
    main()
