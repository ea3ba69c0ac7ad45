"""The /metrics endpoint: a small asyncio HTTP/1.1 server that slow or many clients cannot block.

Why not prometheus_client's `start_http_server`: it serves each connection on a thread with no
timeout and a listen backlog of 5, so 70 idle connections (or one client sending a byte a second)
made every scrape fail. Here one event-loop thread serves every connection:

* a connection has `timeout` seconds in all to send its request (a deadline, not a per-read
  timeout, so trickling bytes does not keep it open) and to take the response;
* at most `max_connections` are open; past that a new one is closed at once and counted
  (`egress_agent_http_connections_rejected_total`), so the agent's thread and fd budget is bounded;
* the listen backlog is 1024; requests and headers are bounded (16 KiB);
* with many clients at once, the exposition text is rendered at most once per `cache_seconds`
  (a lone scrape always gets a fresh rendering);
* TLS and basic auth come from an exporter-toolkit web-config file (`agent.sinks.webconfig`),
  with the TLS handshake under the same deadline;
* password checks run on a pool of their own (AUTH_THREADS, at most AUTH_PENDING waiting), a
  header that checked out before skips bcrypt, and a client whose attempts fail is refused for a
  backoff that doubles per failure; refusals are counted by reason
  (`egress_agent_http_auth_refused_total{reason=failed|backoff|busy}`). So 200 clients sending
  wrong passwords cannot make an authenticated scrape wait.

Contract: `MetricsServer(registry, host, port, web).start()` binds synchronously (an OSError there
is the caller's start-up error) and serves on a daemon thread until `stop()`. `GET /metrics`
(and `/`), HEAD too; anything else 404/405. `set_web_config` swaps the web config at run time.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.sinks.webconfig import WebConfig
from agent.threadname import named

MAX_HEAD = 16384
AUTH_THREADS = 2  # bcrypt checks at once: the rest of the agent keeps its cores
AUTH_PENDING = 16  # checks waiting for a thread; more are refused (401) at once
BACKOFF_AFTER = 3  # failures in a row before a client is made to wait (a typo or two is not an attack)
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 30.0  # seconds a client is then refused, doubling per failure
BACKOFF_CLIENTS = 4096  # clients remembered for their backoff (the oldest forgotten first)


class MetricsServer:
    def __init__(self, registry, host: str, port: int, web: WebConfig | None = None, *, timeout: float = 10.0,
                 max_connections: int = 256, cache_seconds: float = 0.5, rejected=None, auth_refused=None):
        self.registry, self.host, self.port = registry, host, port
        self.web = web or WebConfig()
        self.timeout, self.max_connections, self.cache_seconds = timeout, max_connections, cache_seconds
        self.rejected = rejected  # a prometheus Counter (or None)
        self.auth_refused = auth_refused  # a prometheus Counter with a `reason` label (or None)
        self._auth_pool = ThreadPoolExecutor(AUTH_THREADS, thread_name_prefix="ea-auth")
        self._auth_pending = 0
        self._backoff: OrderedDict[str, tuple[float, int]] = OrderedDict()  # peer -> (refused until, failures)
        self.active = 0
        self._cache: tuple[float, bytes] = (0.0, b"")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> MetricsServer:
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.create_server((self.host, self.port), family=fam, backlog=1024, reuse_port=False)
        self.port = self._sock.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(target=named(self._run, "ea-metrics-http"), args=(ready,),
                                        name="metrics-http", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def set_web_config(self, web: WebConfig):
        """Take a new web config; connections accepted from now on use it. The listening socket
        stays; the asyncio server on it (which holds the TLS context) is replaced."""
        if self._loop is None:
            self.web = web
            return
        asyncio.run_coroutine_threadsafe(self._swap(web), self._loop).result(10)

    async def _swap(self, web: WebConfig):
        old = self._server
        self.web = web
        self._server = await self._serve(web)
        old.close()  # closes only its duplicate of the listening socket

    def stop(self):
        self._auth_pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if self._thread is not None:
            self._thread.join(5)

    # -- loop thread --------------------------------------------------------------------------
    def _run(self, ready: threading.Event):
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(self._serve(self.web))
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self):
        self._server.close()
        self._sock.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    async def _serve(self, web: WebConfig):
        return await asyncio.start_server(self._client, sock=self._sock.dup(), limit=MAX_HEAD, backlog=1024,
                                          ssl=web.ssl_context,
                                          ssl_handshake_timeout=self.timeout if web.ssl_context else None)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if self.active >= self.max_connections:
            if self.rejected is not None:
                self.rejected.inc()
            writer.transport.abort()
            return
        self.active += 1
        try:
            await asyncio.wait_for(self._exchange(reader, writer), self.timeout)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
            pass
        finally:
            self.active -= 1
            writer.transport.abort()  # Connection: close; nothing is left to flush after _send's drain

    async def _authorized(self, web, authorization: str | None, writer) -> bool:
        """Basic auth without letting failed attempts starve scrapes: a header that checked out
        before is answered at once (no bcrypt); other checks run on a pool of their own, at most
        AUTH_PENDING waiting (more are refused at once); a client whose attempts failed waits out
        a backoff that doubles per failure (refused, not queued, meanwhile)."""
        if web.cached(authorization):
            return True
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        now = time.monotonic()
        until = self._backoff.get(peer)
        if until is not None and now < until[0]:
            self._count_auth("backoff")
            return False
        if self._auth_pending >= AUTH_PENDING:
            self._count_auth("busy")
            return False
        self._auth_pending += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(self._auth_pool, web.check, authorization)
        finally:
            self._auth_pending -= 1
        if ok:
            self._backoff.pop(peer, None)
            return True
        if not authorization:
            return False  # no credentials yet (a browser's first request): not an attempt
        fails = (until[1] if until is not None else 0) + 1
        wait = 0.0 if fails < BACKOFF_AFTER else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (fails - BACKOFF_AFTER))
        self._backoff[peer] = (time.monotonic() + wait, fails)
        self._backoff.move_to_end(peer)
        while len(self._backoff) > BACKOFF_CLIENTS:
            self._backoff.popitem(last=False)
        self._count_auth("failed")
        return False

    def _count_auth(self, reason: str):
        if self.auth_refused is not None:
            self.auth_refused.labels(reason).inc()

    async def _exchange(self, reader, writer):
        web = self.web  # one config for the whole exchange, even if a reload swaps it meanwhile
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return await self._send(writer, 400, b"bad request\n")
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        if web.users and not await self._authorized(web, headers.get("authorization"), writer):
            return await self._send(writer, 401, b"Unauthorized\n",
                                    {"WWW-Authenticate": 'Basic realm="egress-agent"'})
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/"):
            return await self._send(writer, 404, b"not found; metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return await self._send(writer, 405, b"method not allowed\n", {"Allow": "GET, HEAD"})
        body = self._render()
        extra = {"Content-Type": CONTENT_TYPE_LATEST}
        if "gzip" in headers.get("accept-encoding", ""):
            body = gzip.compress(body, 1)
            extra["Content-Encoding"] = "gzip"
        await self._send(writer, 200, body, extra, head_only=method == "HEAD")

    def _render(self) -> bytes:
        at, body = self._cache
        now = time.monotonic()
        # a lone scrape always gets fresh numbers; only a crowd shares one rendering
        if self.active <= 1 or now - at >= self.cache_seconds or not body:
            body = generate_latest(self.registry)
            self._cache = (now, body)
        return body

    async def _send(self, writer, status: int, body: bytes, extra: dict | None = None, head_only: bool = False):
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                  405: "Method Not Allowed"}[status]
        hdrs = {**self.web.headers, **(extra or {}), "Content-Length": str(len(body)), "Connection": "close"}
        out = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        writer.write(out.encode("latin-1") + (b"" if head_only else body))
        await writer.drain()
