"""Replies the transport failed to send: counted as such, never as OK.

grpc-python sends a unary reply after the handler has returned (the message and the status in one
batch), and each stream message after the handler yielded it. When that batch fails while the
peer is still connected (the reply is over the server's send limit, the transport broke), nothing
reaches the handler: grpc logs "ExecuteBatchError raised in core by servicer method [...]" at
ERROR on its own logger, with a traceback, from the call's task, and carries on. That log record
is the only signal there is, so a filter on that logger turns it into the call's fact:

- the call the runtime is handling in that task (a context variable set per call) is marked
  undelivered, and the runtime counts it with UNDELIVERED_CODE instead of the code its handler
  ended with (a unary call is counted when grpc reports the call done, after the last batch);
- the record becomes one structured WARNING line (the method and the code; no traceback): the
  service is fine, one reply was lost.

What the server cannot see stays as its handler ended: grpc drops a failed batch without a log
line when the peer had already closed the call (a client that went away between the handler's
return and the last write; the client then has no reply either, and its own metrics say
CANCELLED), and a reply the client refuses after receiving it (over its receive limit) went out
as far as the server can tell. The unary reply-size check and the stream's chunking keep replies
within stock clients' 4 MiB limit, so that refusal needs a client that lowered its limit.
"""
from __future__ import annotations

import contextvars
import logging
import re
from typing import Protocol

GRPC_LOGGER = "grpc._cython.cygrpc"
# The status the client sees is not known here (the send limit gives it RESOURCE_EXHAUSTED, a
# broken transport UNAVAILABLE or nothing): UNKNOWN says so, and is an error code to the alerts.
UNDELIVERED_CODE = "UNKNOWN"
_METHOD = re.compile(r"servicer method \[([^\]]*)\]")


class Tracked(Protocol):
    undelivered: bool


_current: contextvars.ContextVar[Tracked | None] = contextvars.ContextVar("diffmesh_call", default=None)


def watch(call: Tracked) -> None:
    """Make `call` the one a failed send in this task is charged to (each RPC has its own task)."""
    _current.set(call)


def _is_batch_failure(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and type(exc).__name__ == "ExecuteBatchError"


class UndeliveredReplies(logging.Filter):
    """On grpc's logger: marks the current call undelivered and rewrites grpc's ERROR traceback
    about the failed batch into one structured WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_batch_failure(record):
            return True
        call = _current.get()
        if call is not None:
            call.undelivered = True
        match = _METHOD.search(record.getMessage())
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "reply not delivered: the transport failed to send it", None
        record.exc_info, record.exc_text = None, None
        record.fields = {"method": match.group(1) if match else "", "code": UNDELIVERED_CODE,
                         "counted": call is not None}
        return True


_installed = UndeliveredReplies()


def install() -> None:
    """Idempotent: one filter on grpc's logger for the process."""
    logger = logging.getLogger(GRPC_LOGGER)
    if _installed not in logger.filters:
        logger.addFilter(_installed)
