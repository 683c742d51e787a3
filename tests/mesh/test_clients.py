"""Clients nobody on the project wrote, against the session mesh: server reflection in both
versions on every service, the README's grpcurl calls with a real grpcurl binary, and the Node
and Go examples (examples/), each run when its toolchain can be had (else skipped, with why)."""
from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from diffmesh.client import build_request
from diffmesh.runtime import reflection
from diffmesh.stages import STAGES
from tests import tools

REFLECTION = {reflection.V1_SERVICE_NAME, reflection.SERVICE_NAME}
STREAM_SIZE = 1152  # its PNG is over the orchestrator's 3 MiB stream chunks: the image comes in pieces


def _v1_reflection(address: str, *requests: dict) -> list:
    """ServerReflectionInfo on grpc.reflection.v1: one response per request."""
    file = reflection.v1_file_descriptor()
    request_type = message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionRequest"])
    response_type = message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionResponse"])
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(f"/{reflection.V1_SERVICE_NAME}/ServerReflectionInfo",
                                     request_serializer=request_type.SerializeToString,
                                     response_deserializer=response_type.FromString)
        return list(call(iter([request_type(**r) for r in requests]), timeout=10))


@pytest.mark.parametrize("stage", STAGES.names())
def test_reflection_v1_and_v1alpha_describe_every_service(mesh, stage):
    service = STAGES[stage].service
    expected = {service, "grpc.health.v1.Health", *REFLECTION}

    listed, described, itself = _v1_reflection(mesh.address(stage), {"list_services": ""},
                                               {"file_containing_symbol": service},
                                               {"file_containing_symbol": reflection.V1_SERVICE_NAME})
    assert {s.name for s in listed.list_services_response.service} == expected
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    short = service.rsplit(".", 1)[1]
    (owner,) = [f for f in files if any(s.name == short for s in f.service)]
    assert owner.name.startswith("diffmesh/v1/") and owner.package == "diffmesh.v1"
    (v1_file,) = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                  for raw in itself.file_descriptor_response.file_descriptor_proto]
    assert (v1_file.name, v1_file.package) == (reflection.V1_FILE, "grpc.reflection.v1")

    with grpc.insecure_channel(mesh.address(stage)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)  # grpc.reflection.v1alpha
        assert set(database.get_services()) == expected
        assert database.FindFileContainingSymbol(service).name == owner.name


def _readme_grpcurl_commands() -> list[str]:
    """The grpcurl command lines in the README's shell blocks (continuations joined)."""
    blocks = re.findall(r"```sh\n(.*?)```", (tools.REPO / "README.md").read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("grpcurl ")]


def _json_messages(text: str) -> list[dict]:
    """grpcurl prints each reply message as an indented JSON object (proto field names), one after
    another."""
    decoder, messages, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        message, at = decoder.raw_decode(text, at)
        messages.append(message)
    return messages


def test_readme_grpcurl_calls_work_as_written(mesh):
    binary = tools.grpcurl()
    commands = _readme_grpcurl_commands()
    assert len(commands) >= 6
    seen = set()
    for command in commands:
        args = [str(binary) if arg == "grpcurl" else arg.replace("127.0.0.1:50051", mesh.address("orchestrator"))
                for arg in shlex.split(command)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        out = done.stdout
        if args[-1] == "list":
            assert set(out.split()) == {"diffmesh.v1.Orchestrator", "grpc.health.v1.Health", *REFLECTION}
        elif args[-2:] == ["describe", "diffmesh.v1.Orchestrator"]:
            assert "rpc Generate ( .diffmesh.v1.GenerateRequest ) returns ( .diffmesh.v1.GenerateResponse )" in out
            assert "returns ( stream .diffmesh.v1.GenerateEvent )" in out
        elif args[-2:] == ["describe", "diffmesh.v1.GenerateRequest"]:
            assert "string prompt = 1;" in out and "optional int64 seed = 9;" in out
        elif args[-1] == "grpc.health.v1.Health/Check":
            assert _json_messages(out) == [{"status": "SERVING"}]
        elif args[-1] == "diffmesh.v1.Orchestrator/Generate":
            (reply,) = _json_messages(out)
            assert [(image["seed"], image["image"]["mime_type"]) for image in reply["images"]] == [("7", "image/png")]
        elif args[-1] == "diffmesh.v1.Orchestrator/GenerateStream":
            events = _json_messages(out)
            assert [e["progress"]["step"] for e in events if "progress" in e] == [1, 2, 3]
            assert [e["image"].get("last", False) for e in events if "image" in e] == [True]
            assert "result" in events[-1]
        else:
            pytest.fail(f"README command without a check here: {command}")
        seen.add(args[-1])
    assert {"diffmesh.v1.Orchestrator/Generate", "diffmesh.v1.Orchestrator/GenerateStream", "list"} <= seen


def _python_pixels(client, **fields) -> np.ndarray:
    response = client.generate(build_request(**fields), timeout=60)
    return np.asarray(Image.open(io.BytesIO(response.images[0].image.data)))


def _check_report(report: dict, out: Path, client) -> None:
    """What both examples print, checked against the mesh's behaviour and the Python client."""
    generate = report["generate"]
    assert [(image["index"], int(image["seed"])) for image in generate["images"]] == [(0, 7), (1, 8)]
    assert all((i["mime_type"], i["width"], i["height"]) == ("image/png", 64, 64) for i in generate["images"])
    assert (generate["model"], generate["steps"]) == ("tiny-sd15", 2)
    # The prompt gate first; the image check and the marking last (no face analysis: the default
    # policy asks for faces only where a sexual label makes ages matter).
    assert generate["stages"] == ["safety.check_prompt", "text_encoder", "denoiser", "vae.decode",
                                  "safety.check_images", "safety.mark_images"]
    # The example's request means what the Python client's does: the same image, pixel for pixel.
    theirs = np.asarray(Image.open(out / "generate-0.png"))
    assert np.array_equal(theirs, _python_pixels(client, prompt="a lighthouse at dusk", model="tiny-sd15", width=64,
                                                 height=64, steps=2, seed=7, scheduler="euler"))

    stream = report["stream"]
    assert [(p["step"], p["total_steps"], p["phase"]) for p in stream["progress"]] == [(1, 3, "base"), (2, 3, "base"),
                                                                                       (3, 3, "base")]
    (image,) = stream["images"]
    assert (int(image["seed"]), image["width"], image["height"]) == (11, STREAM_SIZE, STREAM_SIZE)
    assert stream["chunks"] >= 2  # reassembled from several image events
    file = out / "stream-0.png"
    assert file.stat().st_size == image["bytes"]
    assert Image.open(file).size == (STREAM_SIZE, STREAM_SIZE)

    bad = report["bad_request"]
    assert bad["code"] == "INVALID_ARGUMENT" and "width" in bad["message"]
    assert [v["field"] for v in bad["violations"]] == ["width"]
    assert [(e["domain"], e["metadata"]["field"], e["metadata"]["value"]) for e in bad["error_info"]] == [
        ("diffmesh.v1", "width", "100")]

    assert report["deadline"]["code"] == "DEADLINE_EXCEEDED"


def _run_example(args: list[str], cwd: Path | None = None) -> dict:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr}"
    return json.loads(done.stdout)


def test_node_example(mesh, client, tmp_path):
    example = tools.node_example()
    report = _run_example(["node", "client.js", "--address", mesh.address("orchestrator"), "--model", "tiny-sd15",
                           "--out", str(tmp_path), "--stream-size", str(STREAM_SIZE)], cwd=example)
    _check_report(report, tmp_path, client)
    assert [v["reason"] for v in report["bad_request"]["violations"]] == ["FIELD_REJECTED"]


def test_go_example(mesh, client, tmp_path):
    binary = tools.go_example(tmp_path / "bin")
    report = _run_example([str(binary), "-address", mesh.address("orchestrator"), "-model", "tiny-sd15",
                           "-out", str(tmp_path / "out"), "-stream-size", str(STREAM_SIZE)])
    _check_report(report, tmp_path / "out", client)
