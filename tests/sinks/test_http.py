"""The metrics endpoint under slow, idle and many clients, with TLS and basic auth (loopback only)."""

import base64
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.errors import UserError
from agent.sinks import webconfig
from agent.sinks.http import MetricsServer
from tests.conftest import REPO


@pytest.fixture
def registry():
    r = CollectorRegistry()
    Counter("egress_agent_flows", "test", ["policy"], registry=r).labels("p").inc(3)
    return r


def serve(registry, web=None, **kw):
    rejected = Counter("rejected", "r", registry=CollectorRegistry())
    s = MetricsServer(registry, "127.0.0.1", 0, web, rejected=rejected, **kw).start()
    s.rejected_counter = rejected
    return s


def scrape(port, timeout=5, headers=None, scheme="http", context=None):
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
        return r.status, r.read().decode()


def test_scrape_and_paths(registry):
    s = serve(registry)
    try:
        status, body = scrape(s.port)
        assert status == 200 and 'egress_agent_flows_total{policy="p"} 3.0' in body
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{s.port}/other", timeout=5)
        assert e.value.code == 404
    finally:
        s.stop()


def test_idle_connections_do_not_block_a_scrape(registry):
    s = serve(registry, timeout=30)
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(150)]
    try:
        t = time.monotonic()
        for _ in range(20):
            assert scrape(s.port, timeout=2)[0] == 200
        assert time.monotonic() - t < 10
    finally:
        for c in idle:
            c.close()
        s.stop()


def test_a_trickling_client_is_cut_at_the_deadline_and_blocks_nobody(registry):
    s = serve(registry, timeout=1.0)
    c = socket.create_connection(("127.0.0.1", s.port))
    closed = threading.Event()

    def trickle():
        try:
            for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                c.send(bytes([b]))
                time.sleep(0.05)  # each byte well inside any per-read timeout
        except OSError:
            closed.set()

    th = threading.Thread(target=trickle)
    th.start()
    try:
        assert scrape(s.port, timeout=2)[0] == 200
        th.join(10)
        assert closed.is_set(), "the server should close a request that misses its deadline"
    finally:
        c.close()
        s.stop()


def test_hundreds_of_concurrent_scrapes_are_served_or_refused_fast(registry):
    s = serve(registry, timeout=5, max_connections=64)
    results = []

    def one():
        t = time.monotonic()
        try:
            results.append(("ok", scrape(s.port, timeout=10)[0], time.monotonic() - t))
        except (OSError, urllib.error.URLError) as e:
            results.append(("refused", str(e), time.monotonic() - t))

    threads = [threading.Thread(target=one) for _ in range(500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(results) == 500
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "refused"]
        assert len(ok) >= 250, f"only {len(ok)} of 500 served"
        assert all(r[2] < 8 for r in refused), "a refusal must be quick, not a time-out"
        assert len(refused) == s.rejected_counter._value.get()  # every refusal counted
        assert scrape(s.port)[0] == 200  # and the endpoint is fine afterwards
    finally:
        s.stop()


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "server.key"), "-out", str(d / "server.crt")],
                   check=True, capture_output=True)
    return d


def test_tls_from_a_web_config(registry, tls_files, tmp_path):
    cfg = write(tmp_path / "web.yml", f"tls_server_config:\n  cert_file: {tls_files}/server.crt\n"
                                      f"  key_file: {tls_files}/server.key\n  min_version: TLS12\n")
    s = serve(registry, webconfig.load(cfg))
    try:
        ctx = ssl.create_default_context(cafile=str(tls_files / "server.crt"))
        status, body = scrape(s.port, scheme="https", context=ctx)
        assert status == 200 and "egress_agent_flows_total" in body
        with pytest.raises((OSError, urllib.error.URLError)):
            scrape(s.port, timeout=3)  # plain HTTP gets no metrics
    finally:
        s.stop()


def test_basic_auth_from_a_web_config(registry, tmp_path):
    h = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    cfg = write(tmp_path / "web.yml", f"basic_auth_users:\n  prometheus: '{h}'\n"
                                      "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    s = serve(registry, webconfig.load(cfg))

    def auth(user, pw):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    try:
        for headers in ({}, auth("prometheus", "wrong"), auth("nobody", "s3cret")):
            with pytest.raises(urllib.error.HTTPError) as e:
                scrape(s.port, headers=headers)
            assert e.value.code == 401 and "Basic" in e.value.headers["WWW-Authenticate"]
        req = urllib.request.Request(f"http://127.0.0.1:{s.port}/metrics", headers=auth("prometheus", "s3cret"))
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and r.headers["X-Frame-Options"] == "deny"
    finally:
        s.stop()


@pytest.mark.parametrize("text,message", [
    ("tls_server_config:\n  cert_file: /nope.crt\n  key_file: /nope.key\n",
     ":2: tls_server_config.cert_file: cannot load"),
    ("basic_auth_users:\n  alice: plaintext\n", ":2: basic_auth_users.alice: not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [x]\n",
     ":4: tls_server_config.cipher_suites: not supported"),
    ("tls_config:\n  cert_file: a\n", ":2: tls_config: not supported here"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n",
     ":4: tls_server_config.client_auth_type: 'Maybe' is not one of"),
])
def test_web_config_errors_name_file_line_and_key(tmp_path, text, message):
    path = write(tmp_path / "web.yml", text)
    with pytest.raises(UserError) as e:
        webconfig.load(path)
    assert any(message in line for line in [str(e.value), *e.value.problems]), (str(e.value), e.value.problems)


def test_a_bad_web_config_stops_the_daemon_with_exit_2(tmp_path):
    path = write(tmp_path / "web.yml", "basic_auth_users:\n  alice: plaintext\n")
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--web-config", path, "--listen", "127.0.0.1:1"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "web.yml:2: basic_auth_users.alice: not a bcrypt hash" in r.stderr
    assert "Traceback" not in r.stderr


def test_promtool_accepts_the_same_file(tmp_path, tls_files):
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed")
    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = write(tmp_path / "web.yml", f"tls_server_config:\n  cert_file: {tls_files}/server.crt\n"
                                       f"  key_file: {tls_files}/server.key\nbasic_auth_users:\n  p: '{h}'\n")
    webconfig.load(path)
    r = subprocess.run(["promtool", "check", "web-config", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _auth(user, pw):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}


def test_wrong_passwords_from_many_clients_never_make_a_good_scrape_wait(registry, tmp_path):
    """200 clients sending wrong passwords (each check a real bcrypt at cost 10) while Prometheus,
    authenticated once, scrapes: every good scrape is answered, and fast; the attempts are
    refused and counted by reason."""
    h = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10)).decode()
    web = webconfig.load(write(tmp_path / "web.yml", f"basic_auth_users:\n  prometheus: '{h}'\n"))
    refused = Counter("auth_refused", "x", ["reason"], registry=CollectorRegistry())
    s = serve(registry, web, auth_refused=refused)
    good = _auth("prometheus", "s3cret")
    try:
        scrape(s.port, headers=good)  # authenticated once: from now on its header is known
        stop = threading.Event()

        def attacker(i):
            while not stop.is_set():
                try:
                    scrape(s.port, headers=_auth("prometheus" if i % 2 else f"user{i}", f"guess{i}"), timeout=10)
                except (urllib.error.URLError, OSError):
                    pass

        threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(200)]
        for th in threads:
            th.start()
        time.sleep(1.0)
        try:
            for _ in range(10):  # each answered within the server's own deadline, none refused
                scrape(s.port, headers=good, timeout=10)
        finally:
            stop.set()
            for th in threads:
                th.join(15)
        reasons = {smp.labels["reason"]: smp.value for m in refused.collect() for smp in m.samples
                   if smp.name.endswith("_total")}
        assert reasons.get("failed", 0) >= 1 and reasons.get("backoff", 0) + reasons.get("busy", 0) >= 1, reasons
    finally:
        s.stop()


def test_unknown_users_cost_as_much_as_the_dearest_real_user(tmp_path):
    hashes = [bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=r)).decode() for r in (5, 7)]
    web = webconfig.load(write(tmp_path / "web.yml", f"basic_auth_users:\n  a: '{hashes[0]}'\n  b: '{hashes[1]}'\n"))
    assert webconfig.cost(web.dummy) == 7 and not web.check(_auth("nobody", "a")["Authorization"])
    assert web.check(_auth("b", "a")["Authorization"]) and web.cached(_auth("b", "a")["Authorization"])
    assert not web.cached(_auth("b", "x")["Authorization"])


def test_costly_hashes_are_refused_or_warned_about(tmp_path):
    dear = "$2b$18$" + "a" * 53
    with pytest.raises(UserError) as e:
        webconfig.load(write(tmp_path / "w1.yml", f"basic_auth_users:\n  a: '{dear}'\n"))
    assert any("bcrypt cost 18 is above 14" in p for p in e.value.problems)
    h13 = bcrypt.hashpw(b"a", bcrypt.gensalt(rounds=4)).decode().replace("$04$", "$13$")
    web = webconfig.load(write(tmp_path / "w2.yml", f"basic_auth_users:\n  a: '{h13}'\n"))
    assert any("bcrypt cost 13" in w for w in web.warnings)


def test_a_certificate_that_is_a_fifo_is_refused_at_once(tmp_path):
    import os

    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    path = write(tmp_path / "web.yml", f"tls_server_config:\n  cert_file: {fifo}\n  key_file: {fifo}\n")
    with pytest.raises(UserError, match="not a regular file"):  # returns at once: it would block on open
        webconfig.load(path)
