"""Structured JSON logs: one object per line on stderr, and nothing else a service writes.

A service process's stdout and stderr carry only JSON lines, so a log pipeline never has to guess:
- its own records (`log_event`): ts, level, service, logger, msg, the active span's trace_id and
  span_id, and the event's fields;
- Python warnings (`logging.captureWarnings`) and uncaught exceptions (sys / threading hooks);
- library logs: transformers and diffusers install a plain-text stderr handler of their own and
  stop propagation, and draw tqdm progress bars while loading ("Loading weights", "Loading
  pipeline components..."); setup removes their handler, lets their records reach the JSON
  handler, and turns their progress bars (and huggingface_hub's) off through the libraries' own
  switches, now for those already imported and at import time for those imported later.
Every ERROR line carries a gRPC status `code`: the one the event names, else the one its exception
implies (see `status_code`), else UNKNOWN (no status applies, e.g. a start-up failure).

gRPC's C core logs through absl straight to file descriptor 2, below Python: it reads
GRPC_VERBOSITY once, before `import grpc`, so the process environment sets it (the chart sets
GRPC_VERBOSITY=ERROR; C-core errors are then the only non-JSON lines left).
Prompts are logged only as hashes (`prompt_hash`).
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.abc
import importlib.machinery
import json
import logging
import os
import sys
import threading
import time
from types import ModuleType, TracebackType
from typing import Any, Callable, Sequence

import grpc

from diffmesh.runtime.telemetry import current_ids

_service_name = "diffmesh"
UNKNOWN = "UNKNOWN"
_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode)


def status_code(exc: BaseException | None) -> str:
    """The gRPC status name an exception stands for: a MeshError's code, an RPC error's code,
    CANCELLED for a cancelled task, DEADLINE_EXCEEDED for a timeout, INTERNAL for anything else
    (the runtime answers unexpected exceptions with INTERNAL); UNKNOWN without an exception."""
    if exc is None:
        return UNKNOWN
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in _STATUS_NAMES:  # diffmesh.errors.MeshError
        return code
    if isinstance(exc, grpc.RpcError) and callable(code):  # code() -> grpc.StatusCode
        try:
            return code().name
        except Exception:  # an RpcError without a status (not an RPC outcome)
            return UNKNOWN
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return "INTERNAL"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service  # None: the process's (setup_logging)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "service": self.service or _service_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = current_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.levelno >= logging.ERROR and "code" not in entry:
            entry["code"] = status_code(record.exc_info[1] if record.exc_info else None)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def json_line(service: str, level: str, msg: str, **fields: Any) -> str:
    """One log line in the handler's format, for the few lines written before logging is set up
    (a configuration error decides the log level's own validity)."""
    record = logging.LogRecord("diffmesh", logging.getLevelName(level), __file__, 0, msg, None, None)
    record.fields = fields
    return JsonFormatter(service).format(record)


# --- libraries that write to stderr on their own ---------------------------------------------

def _quiet_hf_library(module: ModuleType) -> None:
    """transformers.utils.logging / diffusers.utils.logging: the same API in both."""
    module.disable_progress_bar()
    module.disable_default_handler()  # creates the library's handler if needed, then drops it
    module.enable_propagation()


def _quiet_hub(module: ModuleType) -> None:
    module.disable_progress_bars()


# The module whose import sets the library's logging up -> what silences it.
_LIBRARY_SWITCHES: dict[str, Callable[[ModuleType], None]] = {
    "transformers.utils.logging": _quiet_hf_library,
    "diffusers.utils.logging": _quiet_hf_library,
    "huggingface_hub.utils": _quiet_hub,
}


class _SwitchOnImport(importlib.abc.MetaPathFinder):
    """Applies a library's switch right after its logging module is first imported (stages may
    import model libraries lazily, after logging is set up)."""

    def __init__(self, switches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.switches = switches

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        switch = self.switches.get(name)
        if switch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader = spec.loader

        class _Switched(importlib.abc.Loader):
            def create_module(self, spec: Any) -> ModuleType | None:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                switch(module)

            def __getattr__(self, name: str) -> Any:  # resource readers etc.: the real loader's
                return getattr(loader, name)

        spec.loader = _Switched()
        return spec


def quiet_libraries() -> None:
    """Silences the model libraries' progress bars and routes their logs through our handler."""
    # Read at import by huggingface_hub and by transformers (its progress-bar default).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    pending = {}
    for name, switch in _LIBRARY_SWITCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            switch(module)
        else:
            pending[name] = switch
    if pending and not any(isinstance(finder, _SwitchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SwitchOnImport(pending))


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("diffmesh.uncaught").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("diffmesh.uncaught").critical(
        "uncaught exception in thread %s", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def setup_logging(service: str, level: str = "INFO") -> None:
    global _service_name
    _service_name = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    quiet_libraries()


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


def prompt_hash(text: str) -> str:
    """Stable short digest that lets logs correlate prompts without revealing them."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
