"""Every line every service process writes (stdout and stderr both go to its log file) is one
JSON object, over a run with a start, a good request, a bad request, a cancelled stream, a missed
deadline, a stage stopped by SIGTERM and the failures that follow, a configuration error, a
start-up failure and the final SIGTERM; every ERROR line names its status code, and those of a
request carry its trace id. The same run checks the live metrics: pre-initialised at start-up,
so the first INVALID_ARGUMENT moves a series that already existed, and clean under promtool."""
from __future__ import annotations

import importlib
import json
import pkgutil
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor

import diffmesh.proto.v1
from diffmesh.client import build_request
from diffmesh.mesh import LocalMesh, free_ports
from diffmesh.models.registry import write_registry
from diffmesh.proto.v1 import orchestrator_pb2_grpc
from diffmesh.runtime import metrics
from diffmesh.stages import STAGES

GOOD = dict(model="tiny-sd15", width=64, height=64, steps=2, seed=1)
GENERATE = "/diffmesh.v1.Orchestrator/Generate"


@dataclass
class Run:
    mesh: LocalMesh
    trace_ids: dict[str, str]                 # what happened -> the trace id the caller sent
    codes: dict[str, grpc.StatusCode]         # what happened -> the status the caller got
    exit_codes: dict[str, int | None]         # process -> exit code
    scrapes: dict[str, dict[str, str]] = field(default_factory=dict)  # "start"/"end" -> process -> text


def traced(name: str, trace_ids: dict[str, str]) -> list[tuple[str, str]]:
    trace_ids[name] = secrets.token_hex(16)
    return [("traceparent", f"00-{trace_ids[name]}-{secrets.token_hex(8)}-01")]


def call(name: str, run_codes: dict[str, grpc.StatusCode], fn: Any) -> None:
    try:
        fn()
        run_codes[name] = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        run_codes[name] = exc.code()


@pytest.fixture(scope="module")
def run(registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    workdir = tmp_path_factory.mktemp("hygiene")
    mesh = LocalMesh(registry=registry, workdir=workdir, ports=free_ports(), metrics_ports=free_ports())
    ghost = write_registry(workdir / "ghost.yaml", {"ghost": workdir / "no-such-model"})
    trace_ids: dict[str, str] = {}
    codes: dict[str, grpc.StatusCode] = {}
    exit_codes: dict[str, int | None] = {}
    mesh.start()
    # Two processes that fail to start, beside the mesh: a bad setting (exit 2), a missing model (exit 1).
    mesh.spawn("vae-bad-setting", "vae", "--max-batch", "-3", metrics=False)
    mesh.spawn("denoiser-no-model", "denoiser", "--registry", str(ghost), metrics=False)
    result = Run(mesh, trace_ids, codes, exit_codes)
    try:
        for name in ("vae-bad-setting", "denoiser-no-model"):
            exit_codes[name] = mesh.processes.pop(name).wait(120)
        mesh.wait_ready(timeout=180, names=[instance.name for instance in mesh.instances()])
        result.scrapes["start"] = {stage: mesh.metrics_text(stage) for stage in STAGES.names()}
        with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
            call("good", codes, lambda: stub.Generate(build_request("a cat", **GOOD), timeout=60,
                                                      metadata=traced("good", trace_ids)))
            call("bad", codes, lambda: stub.Generate(build_request("a cat", **{**GOOD, "steps": 10_000}),
                                                     timeout=60, metadata=traced("bad", trace_ids)))

            def cancel_stream() -> None:
                stream = stub.GenerateStream(build_request("a cat", **{**GOOD, "steps": 60}), timeout=60,
                                             metadata=traced("cancelled", trace_ids))
                assert next(stream).HasField("progress")
                stream.cancel()
                next(stream)  # raises CANCELLED
            call("cancelled", codes, cancel_stream)
            call("deadline", codes, lambda: stub.Generate(
                build_request("a cat", **{**GOOD, "width": 256, "height": 256, "steps": 150}), timeout=0.5,
                metadata=traced("deadline", trace_ids)))
            time.sleep(1.0)  # the denoiser notices the cancels at its next step
            exit_codes["vae"] = mesh.stop(names=["vae"])["vae"]  # SIGTERM one stage mid-run
            call("vae down", codes, lambda: stub.Generate(build_request("a cat", **GOOD), timeout=30,
                                                          metadata=traced("vae down", trace_ids)))
        result.scrapes["end"] = {stage: mesh.metrics_text(stage) for stage in STAGES.names() if stage != "vae"}
    finally:
        exit_codes.update(mesh.stop())
    return result


def lines_of(run: Run) -> dict[str, list[str]]:
    return {path.stem: path.read_text(encoding="utf-8").split("\n") for path in sorted(run.mesh.log_dir.glob("*.log"))}


def entries_of(run: Run) -> dict[str, list[dict[str, Any]]]:
    return {name: [json.loads(line) for line in lines if line] for name, lines in lines_of(run).items()}


def test_the_run_took_every_path(run: Run) -> None:
    assert run.codes == {"good": grpc.StatusCode.OK, "bad": grpc.StatusCode.INVALID_ARGUMENT,
                         "cancelled": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
                         "vae down": grpc.StatusCode.UNAVAILABLE}
    assert run.exit_codes == {"vae-bad-setting": 2, "denoiser-no-model": 1,  # start-up errors
                              **{instance.name: 0 for instance in run.mesh.instances()}}  # SIGTERM: clean exits


def test_every_line_of_every_process_is_one_json_object(run: Run) -> None:
    logs = lines_of(run)
    assert set(logs) == {*STAGES.names(), "vae-bad-setting", "denoiser-no-model"}
    for name, lines in logs.items():
        assert lines[-1] == "", f"{name}: the log does not end with a newline"
        for number, line in enumerate(lines[:-1], 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"{name}.log line {number} is not JSON: {line[:200]!r}")
            assert isinstance(entry, dict) and {"ts", "level", "service", "logger", "msg"} <= entry.keys(), \
                (name, number, line[:200])


def test_no_library_progress_bars_or_plain_text_reach_the_logs(run: Run) -> None:
    text = "\n".join("\n".join(lines) for lines in lines_of(run).values())
    for marker in ("Loading weights", "Loading pipeline components", "it/s]", "\r", "Traceback (most recent"):
        assert marker not in text.replace("\\r", ""), marker


def test_every_error_line_names_its_status_code_and_request_errors_their_trace(run: Run) -> None:
    errors = [(name, entry) for name, entries in entries_of(run).items() for entry in entries
              if entry["level"] in ("ERROR", "CRITICAL")]
    assert errors, "the run logged no ERROR line at all"
    for name, entry in errors:
        assert entry.get("code") in {code.name for code in grpc.StatusCode}, (name, entry)
        if "method" in entry:  # logged about a request: its trace is in scope
            assert len(entry.get("trace_id", "")) == 32, (name, entry)
    # The start-up failures are ERROR lines with a code, in JSON like everything else.
    logs = entries_of(run)
    assert [e for e in logs["vae-bad-setting"] if e["level"] == "ERROR" and "max_batch" in e["msg"]]
    assert [e for e in logs["denoiser-no-model"] if e["level"] == "ERROR" and e["msg"] == "start-up failed"
            and "no-such-model" in e["error"]]


def test_failed_requests_are_logged_once_with_code_and_the_callers_trace_id(run: Run) -> None:
    orchestrator = entries_of(run)["orchestrator"]
    for what, code, level in (("vae down", "UNAVAILABLE", "ERROR"), ("bad", "INVALID_ARGUMENT", "WARNING")):
        failures = [e for e in orchestrator if e.get("trace_id") == run.trace_ids[what] and e["msg"] == "request failed"]
        assert len(failures) == 1, (what, failures)
        assert failures[0]["code"] == code and failures[0]["level"] == level and failures[0]["method"] == GENERATE


def service_descriptor(name: str) -> ServiceDescriptor:
    """A stage's gRPC service from the generated code (every diffmesh.v1 module imported)."""
    for module in pkgutil.iter_modules(diffmesh.proto.v1.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"diffmesh.proto.v1.{module.name}")
    return descriptor_pool.Default().FindServiceByName(name)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one series with exactly these labels (None when it is not exposed)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return item.value
    return None


def test_request_series_exist_from_start_up_so_the_first_error_is_counted(run: Run) -> None:
    start = run.scrapes["start"]
    for spec in STAGES:
        for method in metrics.service_methods(service_descriptor(spec.service)):
            for code in metrics.SERVER_CODES:
                assert sample(start[spec.name], "diffmesh_grpc_requests_total", stage=spec.name, method=method,
                              code=code) == 0, (spec.name, method, code)
            assert sample(start[spec.name], "diffmesh_grpc_request_duration_seconds_count", stage=spec.name,
                          method=method) == 0
    for spec in STAGES.backends():
        for code in metrics.STAGE_CALL_CODES:
            assert sample(start["orchestrator"], "diffmesh_stage_calls_total", stage=spec.name, variant="stable",
                          code=code) == 0, (spec.name, code)
        assert sample(start["orchestrator"], "diffmesh_stage_retries_total", stage=spec.name, variant="stable") == 0
        assert sample(start[spec.name], "diffmesh_queue_depth", stage=spec.name) == 0
        assert sample(start[spec.name], "diffmesh_queue_capacity", stage=spec.name) is not None
    # The run's one INVALID_ARGUMENT moved the series that existed at 0: increase() sees it.
    end = run.scrapes["end"]["orchestrator"]
    labels = dict(stage="orchestrator", method=GENERATE)
    assert sample(end, "diffmesh_grpc_requests_total", code="INVALID_ARGUMENT", **labels) == 1
    assert sample(end, "diffmesh_grpc_requests_total", code="UNAVAILABLE", **labels) == 1
    assert sample(end, "diffmesh_stage_calls_total", stage="vae", variant="stable", code="OK") >= 1
    assert sample(end, "diffmesh_images_generated_total", model="tiny-sd15") == 1
    assert sample(end, "diffmesh_generation_device_seconds_total", model="tiny-sd15") > 0


def test_every_scrape_passes_promtool_check_metrics(run: Run) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); metric names not linted")
    for moment, scrapes in run.scrapes.items():
        for stage, text in scrapes.items():
            result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
                (moment, stage, result.stdout, result.stderr)


# --- the JSON handler itself (no mesh) --------------------------------------------------------

def format_error(exc: BaseException | None, **fields: Any) -> dict[str, Any]:
    import logging

    from diffmesh.runtime.logs import JsonFormatter

    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord("test", logging.ERROR, __file__, 1, "failed\nacross lines", None, exc_info)
    record.fields = fields
    line = JsonFormatter("probe").format(record)
    assert "\n" not in line
    return json.loads(line)


def test_error_lines_always_name_a_status_code() -> None:
    import asyncio

    from diffmesh import errors

    assert format_error(None)["code"] == "UNKNOWN"  # no status applies (a start-up failure)
    assert format_error(None, code="UNAVAILABLE")["code"] == "UNAVAILABLE"
    assert format_error(errors.InvalidArgument("steps", 0, "must be >= 1"))["code"] == "INVALID_ARGUMENT"
    assert format_error(asyncio.CancelledError())["code"] == "CANCELLED"
    assert format_error(TimeoutError())["code"] == "DEADLINE_EXCEEDED"
    assert format_error(RuntimeError("boom"))["code"] == "INTERNAL"
    rpc = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "full")
    entry = format_error(rpc)
    assert entry["code"] == "RESOURCE_EXHAUSTED" and entry["msg"] == "failed\nacross lines" and "exc" in entry


LIBRARY_PROBE = r'''
import logging, sys, warnings
from diffmesh.runtime.logs import setup_logging
assert "transformers" not in sys.modules and "diffusers" not in sys.modules
setup_logging("probe")
import transformers.utils.logging as tlog  # imported after setup, as a stage may do lazily
import diffusers.utils.logging as dlog
for _ in tlog.tqdm(range(3), desc="Loading weights"):
    pass
for _ in dlog.tqdm(range(3), desc="Loading pipeline components..."):
    pass
tlog.get_logger("transformers.modeling_utils").warning("a transformers warning")
dlog.get_logger("diffusers.pipelines").warning("a diffusers warning")
warnings.warn("a python warning")
print("", file=sys.stderr, end="")
raise RuntimeError("an uncaught error")
'''


def test_libraries_imported_after_setup_log_json_and_draw_no_progress_bars() -> None:
    import subprocess
    import sys as _sys

    result = subprocess.run([_sys.executable, "-c", LIBRARY_PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("{") for line in lines), result.stderr[-2000:]
    entries = [json.loads(line) for line in lines]
    messages = {entry["msg"]: entry for entry in entries}
    assert messages["a transformers warning"]["logger"].startswith("transformers")
    assert messages["a diffusers warning"]["logger"].startswith("diffusers")
    assert any("a python warning" in entry["msg"] and entry["logger"] == "py.warnings" for entry in entries)
    uncaught = messages["uncaught exception"]
    assert uncaught["level"] == "CRITICAL" and uncaught["code"] == "INTERNAL" and "an uncaught error" in uncaught["exc"]
    assert "Loading" not in result.stderr
