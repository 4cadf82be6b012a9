"""Migration capabilities and parameters as the command line gives them
(--cap NAME=on, --param NAME=VALUE, --bandwidth)."""
from .common import Fail
from .migration import UNTHROTTLED


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
