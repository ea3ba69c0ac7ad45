"""The Prometheus exporter-toolkit `web-config.yml` format: TLS and basic auth for /metrics.

    tls_server_config:
      cert_file: /etc/egress-agent/tls/server.crt
      key_file: /etc/egress-agent/tls/server.key
      client_auth_type: NoClientCert   # or RequireAndVerifyClientCert (then client_ca_file)
      client_ca_file: /etc/egress-agent/tls/ca.crt
      min_version: TLS12               # TLS10 .. TLS13
    basic_auth_users:
      prometheus: $2y$10$...           # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}

The same file Prometheus, node_exporter and every toolkit exporter read (`promtool check
web-config` validates it), so operators configure the agent the way they configure the rest.
Keys this agent does not implement (cipher_suites, curve_preferences, http2, client_allowed_sans,
prefer_server_cipher_suites) are refused with a clear error rather than silently ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from agent import yamlio
from agent.errors import UserError
from agent.fileio import open_regular

MAX_COST = 14  # a bcrypt cost above this takes seconds a check: refused (an attacker's scrapes would queue)
WARN_COST = 12  # above this, a warning: each check costs ~0.25 s or more of a core
MAX_PEM = 1 << 20  # a certificate, key or CA file larger than this is not one

CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "RequestClientCert": ssl.CERT_OPTIONAL,
               "RequireAnyClientCert": ssl.CERT_OPTIONAL, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
            "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}


@dataclass(frozen=True)
class WebConfig:
    path: str | None = None
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    dummy: bytes = b""  # a hash of the highest configured cost, checked for unknown users
    warnings: tuple[str, ...] = ()
    # Authorization headers that checked out, by their SHA-256 (never the password): a scrape from
    # an authenticated client is answered without a bcrypt check, so it never queues behind an
    # attacker's failed attempts (as exporter-toolkit caches them). Bounded; dropped on reload.
    _ok: OrderedDict = field(default_factory=OrderedDict, compare=False, repr=False)
    _ok_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def cached(self, authorization: str | None) -> bool:
        """True when this exact header checked out before (the cheap path, no bcrypt)."""
        if not self.users or not authorization:
            return not self.users
        key = hashlib.sha256(authorization.encode("utf-8", "replace")).digest()
        with self._ok_lock:
            for k in self._ok:  # a handful of entries; compare in constant time
                if hmac.compare_digest(k, key):
                    self._ok.move_to_end(k)
                    return True
        return False

    def remember(self, authorization: str):
        key = hashlib.sha256(authorization.encode("utf-8", "replace")).digest()
        with self._ok_lock:
            self._ok[key] = time.monotonic()
            while len(self._ok) > 64:
                self._ok.popitem(last=False)

    @property
    def protected(self) -> bool:
        return self.ssl_context is not None or bool(self.users)

    def check(self, authorization: str | None) -> bool:
        """True when basic auth is off, or the Authorization header names a user with the right
        password (bcrypt; the comparison is the library's, constant-time)."""
        if not self.users:
            return True
        import base64
        import binascii

        import bcrypt

        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if hashed is None:
            # as costly as the dearest real user's check: unknown and known users take as long
            bcrypt.checkpw(b"x", self.dummy or _DUMMY)
            return False
        ok = bcrypt.checkpw(password.encode(), hashed)
        if ok:
            self.remember(authorization)
        return ok


_DUMMY = b"$2b$10$C6UzMDM.H6dfI/f/IKxGhu7HWRM3r/9Vj0D9QxO6pAbvm7HiMGvA6"


def cost(h: bytes) -> int:
    """The cost of a bcrypt hash ($2b$NN$...)."""
    return int(h[4:6])


def load(path: str | None) -> WebConfig:
    """Parse and check a web-config file; UserError naming the file, line and key on any problem."""
    if not path:
        return WebConfig()
    data, lines, _ = yamlio.load_file(path, "web config")
    data = data or {}

    def where(*keys) -> str:
        return f"{path}:{yamlio.line_of(lines, list(keys)) or '?'}: {'.'.join(keys)}"

    if not isinstance(data, dict):
        raise UserError(f"{path}: a web config is a mapping (tls_server_config, basic_auth_users, ...)")
    problems = []
    for k in data:
        if k not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            problems.append(f"{where(str(k))}: not supported here (tls_server_config, basic_auth_users, "
                            "http_server_config)")
    ctx = None
    tls = data.get("tls_server_config")
    if tls is not None:
        if not isinstance(tls, dict):
            problems.append(f"{where('tls_server_config')}: must be a mapping")
        else:
            for k in tls:
                if k not in TLS_KEYS:
                    problems.append(f"{where('tls_server_config', str(k))}: not supported by egress-agent "
                                    f"(supported: {', '.join(sorted(TLS_KEYS))})")
            for k in ("cert_file", "key_file"):
                if not isinstance(tls.get(k), str):
                    problems.append(f"{where('tls_server_config', k)}: required (a file path)")
            auth = tls.get("client_auth_type", "NoClientCert")
            if auth not in CLIENT_AUTH:
                problems.append(f"{where('tls_server_config', 'client_auth_type')}: '{auth}' is not one of "
                                f"{', '.join(CLIENT_AUTH)}")
            for k in ("min_version", "max_version"):
                if k in tls and tls[k] not in VERSIONS:
                    problems.append(f"{where('tls_server_config', k)}: '{tls[k]}' is not one of {', '.join(VERSIONS)}")
            if auth in CLIENT_AUTH and CLIENT_AUTH[auth] != ssl.CERT_NONE and not tls.get("client_ca_file") \
                    and auth != "RequireAnyClientCert" and auth != "RequestClientCert":
                problems.append(f"{where('tls_server_config', 'client_ca_file')}: required with {auth}")
            if not problems:
                ctx = _context(tls, where)
    users = {}
    warnings: list[str] = []
    raw_users = data.get("basic_auth_users")
    if raw_users is not None:
        if not isinstance(raw_users, dict):
            problems.append(f"{where('basic_auth_users')}: must map user names to bcrypt hashes")
        else:
            for user, h in raw_users.items():
                if not isinstance(h, str) or not h.startswith(("$2a$", "$2b$", "$2y$")) or len(h) != 60 \
                        or not h[4:6].isdigit() or h[6] != "$":
                    problems.append(f"{where('basic_auth_users', str(user))}: not a bcrypt hash "
                                    "(htpasswd -nBC 10 \"\" | tr -d ':\\n')")
                elif int(h[4:6]) > MAX_COST:
                    problems.append(f"{where('basic_auth_users', str(user))}: bcrypt cost {int(h[4:6])} is above "
                                    f"{MAX_COST}: each check would take seconds, so a few wrong passwords would stall "
                                    "every scrape; hash it again with a lower cost (htpasswd -nBC 10)")
                else:
                    users[str(user)] = ("$2b$" + h[4:]).encode()  # $2y$ (PHP/htpasswd) is $2b$
                    if int(h[4:6]) > WARN_COST:
                        warnings.append(f"{where('basic_auth_users', str(user))}: bcrypt cost {int(h[4:6])}: each "
                                        "check costs a quarter of a second or more; 10 is the usual choice")
    headers = {}
    hsc = data.get("http_server_config")
    if hsc is not None:
        if not isinstance(hsc, dict) or not isinstance(hsc.get("headers", {}), dict):
            problems.append(f"{where('http_server_config')}: only `headers` (a mapping) is supported")
        else:
            for k in hsc:
                if k != "headers":
                    problems.append(f"{where('http_server_config', str(k))}: not supported by egress-agent")
            headers = {str(k): str(v) for k, v in (hsc.get("headers") or {}).items()
                       if "\n" not in str(k) + str(v) and "\r" not in str(k) + str(v)}
    if problems:
        raise UserError(f"{len(problems)} problem(s) in web config {path}", problems)
    dummy = b""
    if users:
        import bcrypt

        dummy = bcrypt.hashpw(b"x", bcrypt.gensalt(max(max(map(cost, users.values())), 4)))
    return WebConfig(path, ctx, users, headers, dummy, tuple(warnings))


def _pem_file(path: str, where: str):
    """A certificate, key or CA file is read like every other input: a regular file (a FIFO would
    block the loader), of a sane size."""
    try:
        fd, st = open_regular(path, "TLS file")
    except UserError as e:
        raise UserError(f"{where}: cannot load {path}: {str(e).removeprefix(f'{path}: ')}") from None
    os.close(fd)
    if st.st_size > MAX_PEM:
        raise UserError(f"{where}: {path} is {st.st_size:,} bytes, not a certificate or key "
                        f"(at most {MAX_PEM:,})")


def _context(tls: dict, where) -> ssl.SSLContext:
    for k in ("cert_file", "key_file", "client_ca_file"):
        if tls.get(k):
            _pem_file(tls[k], where("tls_server_config", k))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[tls.get("min_version", "TLS12")]
    if "max_version" in tls:
        ctx.maximum_version = VERSIONS[tls["max_version"]]
    try:
        ctx.load_cert_chain(tls["cert_file"], tls["key_file"])
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"{where('tls_server_config', 'cert_file')}: cannot load {tls['cert_file']} with "
                        f"{tls['key_file']}: {getattr(e, 'strerror', None) or e}") from None
    ctx.verify_mode = CLIENT_AUTH[tls.get("client_auth_type", "NoClientCert")]
    if tls.get("client_ca_file"):
        try:
            ctx.load_verify_locations(tls["client_ca_file"])
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"{where('tls_server_config', 'client_ca_file')}: cannot load "
                            f"{tls['client_ca_file']}: {getattr(e, 'strerror', None) or e}") from None
    return ctx
