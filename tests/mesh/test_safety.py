"""Safety and provenance through the session mesh, end to end.

- every returned image carries a decodable watermark and a signed C2PA manifest that c2pa's
  reader validates (Trusted against the mesh's development root); small images say they carry no
  watermark;
- a blocked prompt is a normal reply with the decision and no images, and no GPU stage saw it;
- decisions are in the reply, the trailing metadata, the metrics and the spans (category and
  outcome only);
- a second safety stage with a test policy (faces as a review label, a test prompt category and a
  gallery holding one face of t1.jpg) shows REVIEW (case queued, image withheld, approved with
  `diffmesh review`, fetched marked), a gallery BLOCK, and a prompt REVIEW holding its images;
- a safety stage that cannot be reached fails the request UNAVAILABLE: nothing unchecked leaves.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from diffmesh.client import MeshClient, build_request
from diffmesh.mesh import free_port
from diffmesh.proto.v1 import safety_pb2
from services.safety.policy import DEFAULT_POLICY_PATH
from services.safety.provenance import read_manifest
from services.safety.watermark import Watermarker

MODEL = "tiny-sdxl"
PHOTOS = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
GROUP = (PHOTOS / "t1.jpg").read_bytes()
def _upscaled(path: Path, side: int) -> bytes:
    """The 112x112 portrait at a size that carries a watermark (at least 256x256)."""
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").resize((side, side), Image.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


PORTRAIT = _upscaled(PHOTOS / "Tom_Hanks_54745.png", 320)
BLOCKED_PROMPT = "a graphic photo of a dismembered corpse covered in gore"
ALLOW, REVIEW, BLOCK = safety_pb2.SAFETY_OUTCOME_ALLOW, safety_pb2.SAFETY_OUTCOME_REVIEW, safety_pb2.SAFETY_OUTCOME_BLOCK


def root_pem(workdir: Path) -> bytes:
    return (workdir / "c2pa" / "c2pa-dev-root.pem").read_bytes()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def marked(client):
    request = build_request("a photo of a lighthouse", model=MODEL, width=256, height=256, steps=4, seed=11,
                            count=2)
    return client.generate(request, timeout=120)


def test_every_returned_image_is_watermarked_and_signed(mesh, marked):
    assert len(marked.images) == 2
    report = marked.info.safety
    assert report.prompt.outcome == ALLOW and report.policy_version
    assert [(i.index, i.returned) for i in report.images] == [(0, True), (1, True)]
    anchors = root_pem(mesh.workdir / "safety")
    for image in marked.images:
        marking = image.marking
        assert marking.watermarked and marking.manifest and marking.watermark_method == "dwtDctSvd"
        manifest = read_manifest(image.image.data, "image/png", anchors)
        assert manifest.state == "Trusted", manifest.errors
        facts = manifest.facts
        assert (facts.model_id, facts.request_id, facts.width, facts.height) == (MODEL, marked.info.request_id, 256, 256)
        assert facts.policy_version == report.policy_version and facts.watermark_payload == marking.watermark_payload
        assert "lighthouse" not in json.dumps(manifest.active_manifest)  # no prompt text
        pixels = np.asarray(Image.open(io.BytesIO(image.image.data)).convert("RGB"))
        check = Watermarker().verify(pixels, bytes.fromhex(marking.watermark_payload))
        assert check.present, check
    # A flipped byte in the image data breaks the signature.
    data = bytearray(marked.images[0].image.data)
    data[len(data) // 2] ^= 0xFF
    assert read_manifest(bytes(data), "image/png", anchors).state == "Invalid"


def test_the_provenance_command_reads_both_marks_of_a_resized_jpeg(mesh, client, tmp_path):
    # A real photograph (the face flow at strength 0 returns its base): the tiny random weights
    # make noise, and noise loses dwtDctSvd's bits to JPEG, where photographs keep them.
    request = build_request("a group photo", model=MODEL, seed=3, base_image=GROUP, detail_faces=True,
                            face_detailing={"strength": 0.0}, output_format="jpeg", quality=90)
    image = client.generate(request, timeout=120).images[0]
    assert image.image.mime_type == "image/jpeg" and image.marking.manifest
    path = tmp_path / "harbour.jpg"
    path.write_bytes(image.image.data)
    anchors = mesh.workdir / "safety" / "c2pa" / "c2pa-dev-root.pem"
    out = subprocess.run([sys.executable, "-m", "diffmesh.cli.main", "provenance", str(path), "--trust-anchors",
                          str(anchors), "--compact"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["manifest"]["state"] == "Trusted"
    assert report["watermark"]["decoded_payload"] == image.marking.watermark_payload
    assert report["watermark"]["present"] is True
    # A 0.75x copy re-encoded at quality 80: the manifest is gone, the mark is found once the copy
    # is scaled back to the generated size.
    copy = tmp_path / "copy.jpg"
    width, height = image.image.width, image.image.height
    Image.open(path).resize((width * 3 // 4, height * 3 // 4), Image.LANCZOS).save(copy, quality=80)
    out = subprocess.run([sys.executable, "-m", "diffmesh.cli.main", "provenance", str(copy), "--original-size",
                          f"{width}x{height}", "--payload", image.marking.watermark_payload, "--compact"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["manifest"]["state"] == "NoManifest"
    assert report["watermark"]["scaled_back_from"] == [width * 3 // 4, height * 3 // 4]
    assert report["watermark"]["present"] is True


def test_a_small_image_says_it_carries_no_watermark_but_is_signed(client):
    image = client.generate(build_request("a cat", model=MODEL, width=128, height=128, steps=2, seed=1),
                            timeout=120).images[0]
    assert not image.marking.watermarked and "256x256" in image.marking.watermark_skipped_reason
    assert image.marking.manifest


def test_a_clean_image_costs_no_face_analysis(mesh, client):
    # The default policy uses faces only for the minor rule: ages are asked for on demand, for
    # images with a sexual label at its review threshold, and a lighthouse has none.
    def analyses() -> float:
        return metric(mesh.metrics_text("face"), "diffmesh_grpc_requests_total",
                      method="/diffmesh.v1.FaceService/Analyze")
    before = analyses()
    reply = client.generate(build_request("a photo of a lighthouse", model=MODEL, steps=2, seed=4), timeout=120)
    assert len(reply.images) == 1 and reply.info.safety.images[0].decision.outcome == ALLOW
    assert analyses() == before


def test_a_blocked_prompt_returns_the_decision_and_no_gpu_stage_sees_it(mesh, client):
    def gpu_calls() -> float:
        return sum(metric(mesh.metrics_text(stage), "diffmesh_grpc_requests_total", stage=stage)
                   for stage in ("text_encoder", "denoiser", "vae", "face"))
    before = gpu_calls()
    decisions_before = metric(mesh.metrics_text("orchestrator"), "diffmesh_safety_decisions_total", check="prompt",
                              category="graphic_violence", outcome="BLOCK")
    reply, call = client.stub.Generate.with_call(build_request(BLOCKED_PROMPT, model=MODEL, seed=1), timeout=60)
    assert list(reply.images) == []
    decision = reply.info.safety.prompt
    assert decision.outcome == BLOCK and decision.category == "graphic_violence"
    assert decision.score >= decision.threshold and decision.policy_version
    assert "corpse" not in decision.reason and "gore" not in decision.reason
    assert gpu_calls() == before
    trailer = dict(call.trailing_metadata())["diffmesh-safety"]
    assert trailer.startswith("BLOCK graphic_violence ")
    after = metric(mesh.metrics_text("orchestrator"), "diffmesh_safety_decisions_total", check="prompt",
                   category="graphic_violence", outcome="BLOCK")
    assert after == decisions_before + 1
    # The same through the stream: no image events, the decision in the result.
    events = list(client.generate_stream(build_request(BLOCKED_PROMPT, model=MODEL, seed=2), timeout=60))
    assert [e.WhichOneof("event") for e in events] == ["result"]
    assert events[0].result.info.safety.prompt.outcome == BLOCK


def test_spans_carry_the_decision_and_category_never_the_prompt(client, otlp_receiver):
    reply = client.generate(build_request(BLOCKED_PROMPT, model=MODEL, seed=4), timeout=60)
    spans = otlp_receiver.collector.wait_for(reply.info.trace_id, {"diffmesh-orchestrator", "diffmesh-safety"})
    attributes = {key: value for span in spans for key, value in span.attributes.items()}
    assert attributes["diffmesh.safety.prompt.outcome"] == "BLOCK"
    assert attributes["diffmesh.safety.prompt.category"] == "graphic_violence"
    assert not any("corpse" in str(value) for span in spans for value in span.attributes.values())


# --- a safety stage with a test policy ------------------------------------------------------
def write_test_policy(tmp_path: Path, gallery: Path) -> Path:
    policy = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    policy["version"] = "test-review-1"
    policy["image"]["labels"] += [
        {"label": "FACE_FEMALE", "category": "test_faces", "sexual": False, "review": 0.3, "block": 0.999},
        {"label": "FACE_MALE", "category": "test_faces", "sexual": False, "review": 0.3, "block": 0.999}]
    policy["prompt"]["categories"].append({
        "name": "test_bicycles", "description": "a category only tests use", "semantic": {"review": 0.6, "block": 0.99},
        "lexical": {"review": 1.0, "block": None}, "terms": [], "examples": ["a red bicycle"]})
    # The default policy's per-model thresholds (dlib: the same face >= 0.98, strangers 0.81-0.91).
    policy["gallery"]["path"] = str(gallery)
    path = tmp_path / "test-policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def review_mesh(mesh, entries, tmp_path_factory):
    """A safety stage with the test policy and an orchestrator routed to it."""
    from services.face.analysis import load_face_pack
    from services.safety.gallery import GalleryEntry, save_gallery

    folder = tmp_path_factory.mktemp("review-safety")
    pack = load_face_pack(entries["faces"])
    first = pack.analyze(np.asarray(Image.open(io.BytesIO(GROUP)).convert("RGB")))[0]
    gallery = folder / "gallery.npz"
    save_gallery(gallery, [GalleryEntry("t1-face-0", first.embedding_model, np.asarray(first.normed_embedding))])
    policy = write_test_policy(folder, gallery)
    state = folder / "state"
    safety = mesh.spawn("safety-review", "safety", "--policy-file", str(policy), "--state-dir", str(state))
    orchestrator = mesh.spawn("orchestrator-review", "orchestrator", "--safety-address", safety)
    mesh.wait_ready(timeout=180, names=["safety-review", "orchestrator-review"])
    with MeshClient(orchestrator) as review_client:
        yield review_client, safety, state
    mesh.stop(names=["orchestrator-review", "safety-review"])


def photo(client, data: bytes, **options):
    request = build_request("a portrait", model=MODEL, seed=5, base_image=data, detail_faces=True,
                            face_detailing={"strength": 0.0, **options})
    return client.generate(request, timeout=120)


def review_cli(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffmesh.cli.main", "review", "--address", address, *args],
                          capture_output=True, text=True, timeout=60)


def test_review_withholds_the_image_queues_it_and_an_approval_releases_it_marked(review_mesh):
    client, safety, state = review_mesh
    reply = photo(client, PORTRAIT)
    assert list(reply.images) == []
    [verdict] = reply.info.safety.images
    assert verdict.decision.outcome == REVIEW and verdict.decision.category == "test_faces"
    assert not verdict.returned and re.fullmatch(r"[0-9a-f]{32}", verdict.case_id)
    assert verdict.decision.policy_version == "test-review-1"

    listed = review_cli(safety, "list")
    assert listed.returncode == 0, listed.stderr
    cases = [json.loads(line) for line in listed.stdout.splitlines()]
    case = next(c for c in cases if c["case_id"] == verdict.case_id)
    assert case["status"] == "REVIEW_STATUS_PENDING" and case["request_id"] == reply.info.request_id
    assert re.fullmatch(r"[0-9a-f]{64}", case["prompt_hash"])
    # Pending: nothing to fetch yet.
    with pytest.raises(grpc.RpcError) as pending:
        client.fetch_reviewed(verdict.case_id, timeout=30)
    assert pending.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    approved = review_cli(safety, "approve", verdict.case_id, "--reviewer", "alice", "--note", "a film still")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["status"] == "REVIEW_STATUS_APPROVED"
    fetched = client.fetch_reviewed(verdict.case_id, timeout=60)
    [image] = fetched.images
    assert image.marking.watermarked and image.marking.manifest
    manifest = read_manifest(image.image.data, "image/png", root_pem(state))
    assert manifest.state == "Trusted" and manifest.facts.request_id == reply.info.request_id
    pixels = np.asarray(Image.open(io.BytesIO(image.image.data)).convert("RGB"))
    assert pixels.shape == np.asarray(Image.open(io.BytesIO(PORTRAIT)).convert("RGB")).shape
    again = review_cli(safety, "reject", verdict.case_id, "--reviewer", "bob")
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr  # decided once


def test_a_rejected_or_unknown_case_is_never_released(review_mesh):
    client, safety, _ = review_mesh
    reply = photo(client, PORTRAIT)
    case_id = reply.info.safety.images[0].case_id
    assert review_cli(safety, "reject", case_id, "--reviewer", "alice").returncode == 0
    with pytest.raises(grpc.RpcError) as rejected:
        client.fetch_reviewed(case_id, timeout=30)
    assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as unknown:
        client.fetch_reviewed("0" * 32, timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_face_in_the_protected_gallery_is_blocked(review_mesh):
    client, _, _ = review_mesh
    reply = photo(client, GROUP)
    assert list(reply.images) == []
    verdict = reply.info.safety.images[0]
    assert verdict.decision.outcome == BLOCK and verdict.decision.category == "protected_identity"
    assert verdict.decision.source == safety_pb2.DECISION_SOURCE_GALLERY and not verdict.case_id
    assert verdict.decision.score >= 0.95


def test_a_prompt_sent_to_review_holds_every_image_for_review(review_mesh):
    client, _, _ = review_mesh
    reply = client.generate(build_request("a red bicycle leaning on a wall", model=MODEL, steps=2, seed=1, count=2),
                            timeout=120)
    assert reply.info.safety.prompt.outcome == REVIEW and reply.info.safety.prompt.category == "test_bicycles"
    assert list(reply.images) == []
    assert [i.decision.outcome for i in reply.info.safety.images] == [REVIEW, REVIEW]
    assert all(i.case_id for i in reply.info.safety.images)


def test_an_unreachable_safety_stage_fails_the_request_closed(mesh):
    dead = f"127.0.0.1:{free_port()}"
    address = mesh.spawn("orchestrator-no-safety", "orchestrator", "--safety-address", dead)
    try:
        mesh.wait_ready(timeout=120, names=["orchestrator-no-safety"])
        with MeshClient(address) as client:
            with pytest.raises(grpc.RpcError) as error:
                client.generate(build_request("a cat", model=MODEL, steps=2, seed=1), timeout=60)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "safety" in error.value.details()
    finally:
        mesh.stop(names=["orchestrator-no-safety"])


def test_malformed_safety_calls_name_the_field(mesh):
    from diffmesh.client import field_violations
    from diffmesh.proto.v1 import safety_pb2_grpc
    from diffmesh.runtime import codec

    with grpc.insecure_channel(mesh.address("safety")) as channel:
        stub = safety_pb2_grpc.SafetyServiceStub(channel)
        bad = safety_pb2.MarkImagesRequest(images=[codec.from_numpy(np.zeros((4, 4), np.uint8))], request_id="r")
        with pytest.raises(grpc.RpcError) as error:
            stub.MarkImages(bad, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in field_violations(error.value)] == ["images[0].shape"]
        with pytest.raises(grpc.RpcError) as error:
            stub.DecideCase(safety_pb2.DecideCaseRequest(case_id="x", decision=safety_pb2.REVIEW_STATUS_APPROVED),
                            timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reviewer" in error.value.details()
        assert stub.CheckPrompt(safety_pb2.CheckPromptRequest(texts=[safety_pb2.PromptText(field="prompt", text="")]),
                                timeout=30).decision.outcome == ALLOW
