"""The error log: one line per event (what does not print escaped), nginx's levels, no secrets.

`2026/11/27 20:44:50 [warn] 4242#0: edgeproxy.mirror: message`: the time, the level as
nginx's error_log names it, the process id (nginx's pid#tid), the logger, the message.

On the mirror's listener, one of them per request (`RequestLog`), as registry:2 writes one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeproxy.edge.accesslog import escape
from edgeproxy.edge.forward import header
from edgeproxy.mirror.cache_status import cache_state

# nginx's error_log levels for Python's.
_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warn",
    "ERROR": "error",
    "CRITICAL": "crit",
}
# Credentials that may reach a message through a URL, a header or an exception's text.
_CREDENTIALS = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer)?\s*|\b(?:bearer|basic)\s+(?![a-z_]+=)"
    r"|[?&](?:access_token|token|refresh_token|password)=)[^\s\"'&,;]+"
    r"|(?<=//)[^/:@\s]+:[^/@\s]+(?=@)"  # user:password@ in a URL
)
# A line holds none of the above unless it holds one of these: the pattern runs only then
# (10 us a line, and the mirror logs every request as registry:2 does).
_CREDENTIAL_HINTS = ("authorization", "bearer", "basic", "token", "password", "@")
REDACTED = "[redacted]"


class ErrorLogFormatter(logging.Formatter):
    """nginx's error_log line, with credentials replaced by `[redacted]`."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s [%(nginx_level)s] %(process)d#0: %(name)s: %(message)s",
            datefmt="%Y/%m/%d %H:%M:%S",
        )
        self.secrets: tuple[str, ...] = ()
        self._stamped = (-1, "")  # the second formatted last, and its text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The time to the second, formatted once a second."""
        second = int(record.created)
        if self._stamped[0] != second:
            self._stamped = (second, super().formatTime(record, datefmt))
        return self._stamped[1]

    def format(self, record: logging.LogRecord) -> str:
        record.process = _pid
        record.nginx_level = _LEVELS.get(record.levelname, record.levelname.lower())
        return printable(redact(super().format(record), self.secrets))


def printable(text: str) -> str:
    """One event, one line (a traceback too), as it was: the journal and grep see it whole,
    and what a client sent (a path is logged decoded: %0d, %1b) neither starts a forged line
    (a carriage return, U+2028) nor reaches a terminal as an escape sequence. Every character
    that does not print is written as its escape: \\n, \\r, \\x1b, \\u2028."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the configured `secrets` nor anything that looks like a credential."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    lowered = text.lower()
    if not any(hint in lowered for hint in _CREDENTIAL_HINTS):
        return text
    return _CREDENTIALS.sub(lambda m: (m.group(1) or "") + REDACTED, text)


class CutAtShutdown(logging.Filter):
    """Drops the traceback uvicorn logs for each request its drain cancels: its own line
    "Cancel N running task(s), timeout graceful shutdown exceeded" has said it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(error, asyncio.CancelledError)
            and "timeout graceful shutdown exceeded" in str(error)
        )


_formatter = ErrorLogFormatter()
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def configure_logging(level: str = "info") -> None:
    """Every logger (uvicorn's too) writes one redacted line per event to stderr.

    The mirror logs every request, as registry:2 does. What a record gathers that the line
    does not show (the caller's frame, its thread and process names; Python's logging HOWTO,
    "Optimization"), and the pid, asked of the kernel for each record, were half its cost:
    the pid is kept once per process instead."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup, as the HOWTO says
    handler = logging.StreamHandler()
    handler.setFormatter(_formatter)
    handler.addFilter(CutAtShutdown())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("httpx", "httpcore", "hpack"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_secrets(secrets: Iterable[str]) -> None:
    """The configured passwords: never written, even where no pattern would catch them."""
    _formatter.secrets = tuple(s for s in secrets if s)


def request_line(scope: Scope) -> bytes:
    """A request's line from its parts, the target as the client sent it."""
    target = scope["raw_path"]
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    return b"%s %s HTTP/%s" % (scope["method"].encode(), target, scope["http_version"].encode())


class RequestLog:
    """A line for each request `app` answers, once answered: the client, the request line as
    it came and the User-Agent (both escaped as nginx escapes them), the status, the body bytes
    sent, the seconds taken and what the cache did (registry:2 logs those too). uvicorn's own
    line had neither bytes nor time, and quoted the decoded path again (`%3A` for a digest's
    colon): a twentieth of the CPU a manifest by digest costs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.monotonic()
        answer = Answer(send)
        try:
            await self.app(scope, receive, answer.send)
        except asyncio.CancelledError:
            answer.status = answer.status or 499  # nginx's: its client did not wait for it
            raise
        except Exception:
            answer.status = answer.status or 500  # what uvicorn answers for an app that failed
            raise
        finally:
            client = scope.get("client") or ("-", 0)
            agent = header(scope["headers"], b"user-agent")
            request_log.info(
                '%s:%s "%s" %d %d %.3f %s "%s"',
                *client,
                escape(request_line(scope)),
                answer.status,
                answer.sent,
                time.monotonic() - began,
                cache_state(answer.cache_status) or "-",
                escape(agent or b""),
            )


class Answer:
    """What an app sent of its answer through `send`: the status (0 until it started), the
    mirror's `Cache-Status`, the body bytes."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        self.cache_status: bytes | None = None
        self.sent = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.cache_status = header(message.get("headers", ()), b"cache-status")
        elif message["type"] == "http.response.body":
            self.sent += len(message.get("body", b""))
        await self._send(message)


request_log = logging.getLogger("edgeproxy.requests")
