"""The server's gate, as ASGI middleware: Host and Origin checks, the API key, and the body-size limit.

- Host: the request must name this server: a loopback name, the host it was bound to, a name given with
  --allow-host, or (bound to every interface) an IP address. A web page on another site that rebinds its
  DNS name to 127.0.0.1 still sends its own name, and is refused.
- Origin: a browser sends it with cross-site requests; an origin other than the Host the request names
  (same scheme-less host and port) is refused, so no other page can make a visitor's browser generate.
  There are no CORS headers at all.
- API key: when set, every request but the page and its static files needs `Authorization: Bearer KEY`, or
  HTTP Basic auth with the key as the password and any user name (AUTOMATIC1111's --api-auth).
- Body: at most `max_body` bytes, whether or not a Content-Length was sent.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import time
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
OPEN_PATHS = (
    "/",
    "/static/",
    "/config",
    "/health",
    "/docs",
    "/openapi.json",
)  # the page loads without the key, then asks for it


# No other site may frame the page (clickjacking); browsers must not guess content types.
SAFETY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
]
access = logging.getLogger("unnoise.server.access")


LOG_NOTES = "unnoise.log"  # the scope key of a request's additions to its access line


class BodyTooLargeError(Exception):
    pass


def note_job(scope: dict, job_id: str) -> None:
    """Name the job a request made or touched on its access line."""
    scope.setdefault(LOG_NOTES, {})["job"] = job_id


def note_planned_stop(scope: dict) -> None:
    """The request's 503 is the server's planned stop, not a fault: its access line is a WARNING."""
    scope.setdefault(LOG_NOTES, {})["stopping"] = True


def log_request(scope: dict, status: int, milliseconds: float, job_id: str | None) -> None:
    """One line a request: method, path (never the query or the headers, so never a key or a job's token),
    status, duration and the job; WARNING for a 4xx, ERROR for a 5xx but the 503s of a planned stop."""
    fault = status >= 500 and not scope.get(LOG_NOTES, {}).get("stopping")
    level = logging.ERROR if fault else logging.WARNING if status >= 400 else logging.INFO
    job = f" job {job_id}" if job_id else ""
    access.log(level, "%s %s %s %.0f ms%s", scope["method"], scope["path"], status, milliseconds, job)


class Guard:
    def __init__(self, app, *, host: str, port: int, api_key: str | None, max_body: int, allowed_hosts=()):
        self.app, self.port, self.api_key, self.max_body = app, port, api_key, max_body
        self.hosts = LOOPBACK | {host.lower()} | {h.lower() for h in allowed_hosts}
        self.any_address = host in ("0.0.0.0", "::", "")  # every interface: any IP literal names us

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        scope[LOG_NOTES] = notes = {}  # what the routes add to the line (note_job)
        status = 500  # what the client gets if the application raises
        try:
            status = await self.answer(scope, receive, send)
        finally:
            log_request(scope, status, (time.perf_counter() - began) * 1000, notes.get("job"))

    async def answer(self, scope, receive, send) -> int:
        """Refuse or pass the request on; returns the status answered."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await _reply(send, *refusal)
            return refusal[0]
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _reply(send, 413, f"the request body is larger than {self.max_body} bytes")
            return 413
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLargeError
            return message

        started, status = False, 0

        async def tracking_send(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SAFETY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                status = 413
                await _reply(send, 413, f"the request body is larger than {self.max_body} bytes")
        return status

    def refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host_header = headers.get("host", "")
        if not self.names_us(urlsplit(f"//{host_header}").hostname or ""):
            return 403, f"host {host_header!r} is not this server"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host_header.lower():
            return 403, f"requests from {origin} are not allowed"
        path = scope["path"]
        open_path = path == "/" or any(path.startswith(p) for p in OPEN_PATHS[1:])
        if self.api_key and not open_path and not self.holds_key(headers.get("authorization", "")):
            return 401, (
                "a valid API key is needed: Authorization: Bearer KEY, or HTTP Basic auth with the key as the"
                " password"
            )
        return None

    def holds_key(self, authorization: str) -> bool:
        """`Bearer KEY` (OpenAI's clients), or HTTP Basic auth whose password is the key, any user name
        (AUTOMATIC1111's --api-auth, which webuiapi's set_auth sends)."""
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = credentials
        elif scheme.lower() == "basic":
            try:
                user_and_password = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            _, colon, given = user_and_password.partition(":")
            if not colon:
                return False
        else:
            return False
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def names_us(self, hostname: str) -> bool:
        hostname = hostname.lower()
        return (
            hostname in self.hosts or f"[{hostname}]" in self.hosts or (self.any_address and _is_ip(hostname))
        )


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += SAFETY_HEADERS
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
