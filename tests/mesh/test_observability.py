"""One trace spans every hop (checked on spans exported over OTLP by the separate processes),
every service's Prometheus metrics move, logs carry trace ids, responses carry their cost."""
from __future__ import annotations

import json
import re
import secrets
import urllib.request

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from diffmesh.client import build_request
from diffmesh.stages import STAGES, Need
from diffmesh.proto.v1 import orchestrator_pb2_grpc

# A txt2img request calls the stages every flow needs (the face stage is optional: face flows only).
TXT2IMG_STAGES = [spec.name for spec in STAGES if spec.need is Need.ALWAYS]
# The image check asks the face stage for nothing here: the default policy wants faces only where
# a sexual label makes ages matter (a face flow's trace: test_a_face_flow_traces_the_face_stage_too).
SERVICES = {STAGES[name].program for name in TXT2IMG_STAGES}
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
PROMPT = "a secret prompt about a purple giraffe"


@pytest.fixture(scope="module")
def traced_call(mesh, otlp_receiver):
    """One Generate call (img2img, so every stage and both vae methods are hit) carrying a
    caller-supplied traceparent; returns (trace id, caller's span id, response, spans)."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    import io

    import numpy as np
    from PIL import Image

    init = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(init, "PNG")
    request = build_request(PROMPT, negative_prompt="blurry", model="tiny-sdxl", steps=4, seed=1,
                            init_image=init.getvalue(), strength=0.75)
    with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
        response = orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(
            request, timeout=60, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")])
    spans = otlp_receiver.collector.wait_for(trace_id, SERVICES)
    return trace_id, parent_id, response, spans


def test_every_service_exports_spans_of_the_callers_trace(traced_call):
    trace_id, parent_id, response, spans = traced_call
    assert {s.service for s in spans} == SERVICES
    assert all(s.trace_id == trace_id for s in spans)
    assert response.info.trace_id == trace_id
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_span_id not in ids]
    # No orphans: the only span whose parent is not in the trace is the orchestrator's server span,
    # and its parent is the caller's span.
    assert len(roots) == 1 and roots[0].parent_span_id == parent_id
    assert roots[0].service == "diffmesh-orchestrator" and roots[0].kind == SERVER


def test_each_stage_server_span_is_the_child_of_an_orchestrator_client_span(traced_call):
    _, _, _, spans = traced_call
    by_id = {s.span_id: s for s in spans}
    stage_servers = [s for s in spans if s.kind == SERVER and s.service != "diffmesh-orchestrator"]
    # DescribePolicy is asked at most every 30 s (cached): in this trace or not.
    assert sorted(s.name for s in stage_servers if not s.name.endswith("/DescribePolicy")) == sorted([
        "/diffmesh.v1.SafetyService/CheckPrompt", "/diffmesh.v1.TextEncoder/Encode", "/diffmesh.v1.Vae/Encode",
        "/diffmesh.v1.Denoiser/Denoise", "/diffmesh.v1.Vae/Decode",
        "/diffmesh.v1.SafetyService/CheckImages", "/diffmesh.v1.SafetyService/MarkImages"])
    for server in stage_servers:
        client = by_id[server.parent_span_id]
        assert client.kind == CLIENT and client.service == "diffmesh-orchestrator" and client.name == server.name
        wrapper = by_id[client.parent_span_id]
        assert wrapper.name.startswith("stage ") and wrapper.attributes["diffmesh.variant"] == "stable"


def test_spans_carry_semantic_and_mesh_attributes(traced_call):
    _, _, _, spans = traced_call
    for span in spans:
        assert span.resource["service.version"] and span.resource["service.instance.id"]
        if span.kind in (SERVER, CLIENT):
            assert span.attributes["rpc.system"] == "grpc"
            assert span.attributes["rpc.service"].startswith("diffmesh.v1.")
            assert span.attributes["rpc.method"] and span.attributes["rpc.grpc.status_code"] == 0
    denoise = next(s for s in spans if s.name == "/diffmesh.v1.Denoiser/Denoise" and s.kind == SERVER)
    assert denoise.attributes["diffmesh.model"] == "tiny-sdxl"
    assert denoise.attributes["diffmesh.scheduler"] == "euler"
    assert denoise.attributes["diffmesh.steps"] == 4 and denoise.attributes["diffmesh.size"] == "64x64"
    assert denoise.attributes["diffmesh.batch_size"] == 1 and denoise.attributes["diffmesh.variant"] == "stable"
    assert denoise.attributes["diffmesh.payload.bytes_in"] > 1000 and denoise.attributes["diffmesh.payload.bytes_out"] > 0
    loop = next(s for s in spans if s.name == "sampling_loop")
    assert loop.parent_span_id == denoise.span_id
    assert [e["attributes"]["step"] for e in loop.events] == [1, 2, 3]  # 4 steps x strength 0.75
    assert all("timestep" in e["attributes"] for e in loop.events)
    names = {s.name for s in spans}
    assert {"safety.check_prompt", "encode_prompt", "vae.encode", "vae.decode", "safety.check_images",
            "safety.mark_images", "queue_wait"} <= names


def test_a_face_flow_traces_the_face_stage_too(mesh, otlp_receiver):
    """Face detailing on insightface's group photo: the face stage's server spans join the
    caller's trace, each the child of an orchestrator client span."""
    import importlib.util
    from pathlib import Path

    photo = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images" / "t1.jpg"
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    request = build_request(PROMPT, model="tiny-sdxl", seed=5, base_image=photo.read_bytes(), detail_faces=True,
                            face_detailing={"max_faces": 1})
    with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
        orchestrator_pb2_grpc.OrchestratorStub(channel).Generate(
            request, timeout=120, metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")])
    spans = otlp_receiver.collector.wait_for(trace_id, SERVICES | {STAGES["face"].program})
    by_id = {s.span_id: s for s in spans}
    face_servers = [s for s in spans if s.service == STAGES["face"].program and s.kind == SERVER]
    assert "/diffmesh.v1.FaceService/Analyze" in {s.name for s in face_servers}
    for server in face_servers:
        client = by_id[server.parent_span_id]
        assert client.kind == CLIENT and client.service == "diffmesh-orchestrator" and client.name == server.name
    assert "giraffe" not in json.dumps([s.__dict__ for s in spans], default=str)


def test_no_span_contains_the_prompt_text(traced_call):
    _, _, _, spans = traced_call
    text = json.dumps([s.__dict__ for s in spans], default=str)
    assert "giraffe" not in text
    root = next(s for s in spans if s.name == "/diffmesh.v1.Orchestrator/Generate")
    assert len(root.attributes["diffmesh.prompt_hash"]) == 16


def test_the_response_and_root_span_carry_the_cost(traced_call):
    _, _, response, spans = traced_call
    info = response.info
    assert [t.stage for t in info.timings if t.phase != "safety"][2:] == ["denoiser", "vae.decode"]
    for t in info.timings:
        assert t.compute_ms > 0 and t.queue_ms >= 0 and t.bytes_sent > 0 and t.bytes_received > 0
        assert t.device == "cpu" and t.variant == "stable" and t.instance_id
        assert t.wall_ms >= t.compute_ms
    assert info.cost.device_seconds == pytest.approx(sum(t.compute_ms for t in info.timings) / 1000)
    assert info.cost.bytes_moved == sum(t.bytes_sent + t.bytes_received for t in info.timings)
    root = next(s for s in spans if s.name == "/diffmesh.v1.Orchestrator/Generate")
    assert root.attributes["diffmesh.cost.device_seconds"] == pytest.approx(info.cost.device_seconds)
    assert root.attributes["diffmesh.cost.bytes_moved"] == info.cost.bytes_moved


def test_logs_are_json_with_trace_ids_and_no_prompt(mesh, traced_call):
    trace_id = traced_call[0]
    for stage in STAGES.names():
        lines = (mesh.log_dir / f"{stage}.log").read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        assert entries and all({"ts", "level", "service", "msg"} <= e.keys() for e in entries)
        assert "giraffe" not in "\n".join(lines)
    orchestrator = [json.loads(line) for line in (mesh.log_dir / "orchestrator.log").read_text().splitlines()
                    if line.startswith("{")]
    generate = [e for e in orchestrator if e["msg"] == "generate" and e.get("trace_id") == trace_id]
    assert len(generate) == 1 and len(generate[0]["span_id"]) == 16 and len(generate[0]["prompt_hash"]) == 16


def scrape(mesh, stage: str, openmetrics: bool = False) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{mesh.metrics_ports[stage]}/metrics")
    if openmetrics:
        request.add_header("Accept", "application/openmetrics-text; version=1.0.0")
    with urllib.request.urlopen(request, timeout=5) as reply:
        return reply.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.split("#")[0].split()[-1])
    return total


def test_every_service_exposes_metrics_that_move(mesh, client):
    methods = {"orchestrator": "/diffmesh.v1.Orchestrator/Generate", "text_encoder": "/diffmesh.v1.TextEncoder/Encode",
               "denoiser": "/diffmesh.v1.Denoiser/Denoise", "vae": "/diffmesh.v1.Vae/Decode",
               "safety": "/diffmesh.v1.SafetyService/CheckPrompt"}
    before = {stage: scrape(mesh, stage) for stage in TXT2IMG_STAGES}
    client.generate(build_request(f"metrics probe {secrets.token_hex(4)}", model="tiny-sd15", width=64, height=64,
                                  steps=3, seed=2), timeout=60)
    for stage in TXT2IMG_STAGES:
        after = scrape(mesh, stage)
        for name in ("diffmesh_grpc_requests_total", "diffmesh_grpc_request_duration_seconds_count"):
            moved = sample(after, name, method=methods[stage]) - sample(before[stage], name, method=methods[stage])
            assert moved >= 1, (stage, name)
        assert sample(after, "diffmesh_grpc_payload_bytes_total", method=methods[stage], direction="in") > \
            sample(before[stage], "diffmesh_grpc_payload_bytes_total", method=methods[stage], direction="in")
        assert sample(after, "diffmesh_ready", stage=stage) == 1
        assert "diffmesh_grpc_in_flight_requests" in after
    denoiser = scrape(mesh, "denoiser")
    assert sample(denoiser, "diffmesh_denoise_steps_total", model="tiny-sd15") >= 3
    assert sample(denoiser, "diffmesh_denoise_steps_per_second", model="tiny-sd15") > 0
    assert sample(denoiser, "diffmesh_batch_size_count", stage="denoiser") >= 1
    assert "diffmesh_queue_depth" in denoiser and sample(denoiser, "diffmesh_queue_wait_seconds_count") >= 1
    assert sample(denoiser, "diffmesh_model_loaded", model="tiny-sdxl") == 1
    orchestrator = scrape(mesh, "orchestrator")
    assert sample(orchestrator, "diffmesh_stage_calls_total", stage="denoiser", variant="stable", code="OK") >= 1


def test_latency_histograms_carry_trace_id_exemplars(mesh, traced_call):
    text = scrape(mesh, "denoiser", openmetrics=True)
    exemplars = [line for line in text.splitlines()
                 if line.startswith("diffmesh_grpc_request_duration_seconds_bucket") and "trace_id=" in line]
    assert exemplars, "no exemplar on the latency histogram"
    # An exemplar keeps the latest observation of its bucket: a real 128-bit trace id.
    assert all(re.search(r'trace_id="[0-9a-f]{32}"', line) for line in exemplars)
