"""A local S3-compatible server for the storage benchmark and the tests: moto's server mode on a free loopback port,
and a loopback HTTP proxy in front of it that counts what each object sends and can fail requests on purpose.

moto has no fault injection, so the proxy provides it: `fail(key, times, status)` answers the next `times`
requests for `key` with an S3 error (503 SlowDown, 500 InternalError, 403 AccessDenied) or, with status 0, by closing
the connection without an answer (a network failure); every other request goes to the server untouched. It listens
on 127.0.0.1 only and forwards only to the server it was given. Needs `moto[server]` (the `dev` extra).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """`moto_server` on 127.0.0.1 at a free port, in its own process; `stop()` ends that process only."""

    def __init__(self, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        executable = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
        if executable is None:
            raise RuntimeError("moto_server not found: pip install 'moto[server]' (the dev extra)")
        output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            [executable, "-H", "127.0.0.1", "-p", str(self.port)], stdout=output, stderr=subprocess.STDOUT
        )
        self._wait_until_up(timeout=60)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout} s")

    def enforce_auth(self, enforced: bool) -> None:
        """Have the server check every request's signature and the IAM policies of its key (moto's reset-auth), or
        stop checking. IAM users and keys must be created while it is not enforced."""
        body = b"0" if enforced else b"inf"
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=body), timeout=10).close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class _Rule:
    key: str  # "bucket/key" as the request path names it
    times: int
    status: int  # an HTTP error status, or 0 to close the connection without answering


@dataclass
class Traffic:
    """What went through the proxy, per "bucket/key": response body bytes and requests (GET, HEAD, PUT, ...)."""

    bytes_sent: Counter = field(default_factory=Counter)
    requests: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 server (path-style requests) that counts and can fail requests."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy forwards to a loopback server only, not {upstream}")
        self.upstream = (parts.hostname, parts.port)
        self.traffic = Traffic()
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    def fail(self, key: str, times: int, status: int = 503) -> None:
        """Fail the next `times` requests for `key` ("bucket/key") with `status` (0: drop the connection)."""
        if status and status not in ERRORS:
            raise ValueError(f"status {status} is not one of {sorted(ERRORS)} (or 0)")
        with self._lock:
            self._rules.append(_Rule(key.lstrip("/"), times, status))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
        self.traffic = Traffic()

    def _take_failure(self, key: str) -> int | None:
        with self._lock:
            for rule in self._rules:
                if rule.key == key and rule.times > 0:
                    rule.times -= 1
                    self.traffic.failed[key] += 1
                    return rule.status
        return None

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: tests read the counters instead
            pass

        def _forward(self) -> None:
            key = unquote(urlsplit(self.path).path).lstrip("/")
            body = self._request_body()
            proxy.traffic.requests[key] += 1
            failure = proxy._take_failure(key)
            if failure == 0:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if failure is not None:
                self._error(failure, key)
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                payload = answer.read()
            finally:
                upstream.close()
            proxy.traffic.bytes_sent[key] += len(payload)
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(name, value)  # a HEAD answer's length is the object's, not its empty body's
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _request_body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else (b"" if self.command in ("PUT", "POST") else None)

        def _error(self, status: int, key: str) -> None:
            code, message = ERRORS[status]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>/{key}</Resource><RequestId>fault-proxy</RequestId></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler
