"""Logging rules: a client error is one line, a server error one traceback, each with its request id.

Serve logs every exception a replica method raises with its traceback ("Request failed.").
For a :class:`lib.errors.SealserveError` with a 4xx status that is a client's mistake (a bad
image, an unknown model), not ours: :class:`ClientErrorFilter`, on Serve's logger, turns such a
record into one line (status, code, message) without the traceback. Everything else keeps it.

:class:`ForwardTo` sends the project's loggers through Serve's logger, so their lines get Serve's
request context (request id, route, replica) and its format (``logging_config.encoding``: TEXT or
JSON). The ingress's error handlers log each answered error in one line with the request id and
key id (:func:`client_error_line`).
"""

from __future__ import annotations

import logging

from lib.errors import SealserveError


def client_error_line(status: int, code: str, request_id: str, key_id: str | None) -> str:
    """The one log line of an error answer: no message text (it may quote the request)."""
    return f"answered {status} {code} (request {request_id}, key {key_id or '-'})"


class ClientErrorFilter(logging.Filter):
    """Drops the traceback of a record about a client error, keeping one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SealserveError) and exc.status_code < 500:
            original = record.getMessage()
            record.msg = "%s client error %d %s: %s"
            record.args = (original, exc.status_code, exc.code, exc.message)
            record.exc_info = None
            record.exc_text = None
        return True


class ForwardTo(logging.Handler):
    """Hands each record to ``target`` (its handlers and filters), keeping the record's name."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)
