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

import ssl
from dataclasses import dataclass, field

from agent import yamlio
from agent.errors import UserError

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
            bcrypt.checkpw(b"x", _DUMMY)  # same cost for unknown users: no user enumeration by timing
            return False
        return bcrypt.checkpw(password.encode(), hashed)


_DUMMY = b"$2b$10$C6UzMDM.H6dfI/f/IKxGhu7HWRM3r/9Vj0D9QxO6pAbvm7HiMGvA6"


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
    raw_users = data.get("basic_auth_users")
    if raw_users is not None:
        if not isinstance(raw_users, dict):
            problems.append(f"{where('basic_auth_users')}: must map user names to bcrypt hashes")
        else:
            for user, h in raw_users.items():
                if not isinstance(h, str) or not h.startswith(("$2a$", "$2b$", "$2y$")) or len(h) != 60:
                    problems.append(f"{where('basic_auth_users', str(user))}: not a bcrypt hash "
                                    "(htpasswd -nBC 10 \"\" | tr -d ':\\n')")
                else:
                    users[str(user)] = ("$2b$" + h[4:]).encode()  # $2y$ (PHP/htpasswd) is $2b$
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
    return WebConfig(path, ctx, users, headers)


def _context(tls: dict, where) -> ssl.SSLContext:
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
