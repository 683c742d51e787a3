"""Structured JSON logs on stderr, one object per line. Prompts are logged only as hashes."""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any

from diffmesh.runtime.telemetry import current_ids

_service_name = "diffmesh"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "service": _service_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    global _service_name
    _service_name = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


def prompt_hash(text: str) -> str:
    """Stable short digest that lets logs correlate prompts without revealing them."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
