"""Throwaway credentials for the proxies' mutually authenticated TLS link."""
import os
import shutil
import subprocess
import time

from .common import Fail, log


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
