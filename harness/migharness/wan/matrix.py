"""What the benchmark measures: links, guests, and how each run migrates."""
from ..common import Fail

SRC_IP, DST_IP = "10.77.0.1", "10.77.0.2"

# name -> (rate in bit/s, round-trip time in ms)
LINKS = {"100m-40ms": (100_000_000, 40.0), "1g-10ms": (1_000_000_000, 10.0)}
GUESTS = ("idle", "dup", "fill", "dirty")
# name -> how it migrates. caps/params go to both QEMUs; "proxy" = source proxy
# options, "both" = options of both proxies
CONFIGS = {
    "direct":      {"label": "QEMU direct"},
    "xbzrle":      {"label": "QEMU xbzrle", "caps": {"xbzrle": True}},
    "mfd-zstd":    {"label": "QEMU multifd+zstd", "caps": {"multifd": True},
                    "params": {"multifd-compression": "zstd"}},
    "ms-fill":     {"label": "migstream fill", "proxy": ["--resolvers", "fill"]},
    "ms-seen":     {"label": "migstream fill,seen", "proxy": ["--resolvers", "fill,seen"]},
    "ms-catalog":  {"label": "migstream fill,seen+catalog", "proxy": ["--resolvers", "fill,seen"],
                    "catalog": "local"},
    # the same with a quarter of the default credit window: what the window costs in
    # downtime (QEMU bytes in flight when QEMU stops the VM) and in pace
    "ms-catalog-w4": {"label": "migstream fill,seen+catalog, 4 MiB credit",
                      "proxy": ["--resolvers", "fill,seen", "--credit-window", "4"], "catalog": "local"},
    # the same on one thread each (the caller's): what the batch threads cost or give
    # on a host whose cores the guests and QEMUs share
    "ms-catalog-t1": {"label": "migstream fill,seen+catalog, 1 thread", "proxy": ["--resolvers", "fill,seen"],
                      "both": ["--threads", "1"], "catalog": "local"},
    "ms-dht":      {"label": "migstream fill,seen+Redis ring", "proxy": ["--resolvers", "fill,seen"],
                    "catalog": "dht"},
    # multifd, 4 channels: QEMU alone (no compression, zstd), and through the proxies
    # (one link connection per QEMU connection); "main" names the same proxies on the
    # main channel alone, whose wire bytes the multifd ones are held against
    "mfd4":        {"label": "QEMU multifd×4", "caps": {"multifd": True},
                    "params": {"multifd-channels": 4, "multifd-compression": "none"}},
    "mfd4-zstd":   {"label": "QEMU multifd×4+zstd", "caps": {"multifd": True},
                    "params": {"multifd-channels": 4, "multifd-compression": "zstd"}},
    "ms-seen-mfd4": {"label": "migstream fill,seen, multifd×4", "proxy": ["--resolvers", "fill,seen"],
                     "caps": {"multifd": True}, "params": {"multifd-channels": 4, "multifd-compression": "none"},
                     "main": "ms-seen"},
    "ms-catalog-mfd4": {"label": "migstream fill,seen+catalog, multifd×4", "proxy": ["--resolvers", "fill,seen"],
                        "catalog": "local", "caps": {"multifd": True},
                        "params": {"multifd-channels": 4, "multifd-compression": "none"}, "main": "ms-catalog"},
}
REDIS_PORTS = (6390, 6391, 6392)
CONFIG_ORDER = list(CONFIGS)


def split_list(s, allowed, what):
    items = [x for x in s.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise Fail("unknown %s %s (known: %s)" % (what, ",".join(bad), ",".join(allowed)))
    return items
