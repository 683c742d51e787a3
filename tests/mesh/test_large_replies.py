"""Replies that a stock gRPC client accepts, tested with one: a channel with no options, so the
default 4 MiB receive limit that grpc-go, grpc-js, grpc-java and grpcurl apply too.

GenerateStream sends each image in its own events (chunked past 3 MiB) and the client
reassembles them; unary Generate refuses, before any stage works, a request whose reply could
not fit, with a code that is not retried."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from diffmesh.client import build_request, collect_stream
from diffmesh.proto.v1 import orchestrator_pb2_grpc
from diffmesh.stages import STAGES

STOCK_LIMIT = 4 * 1024 * 1024
# Three 768x768 PNGs: ~5.3 MB together (noise-like tiny-model images hardly compress), one ~1.8 MB.
BIG = dict(model="tiny-sd15", width=768, height=768, steps=1, guidance_scale=1.0)


@pytest.fixture(scope="module")
def stock(mesh):
    with grpc.insecure_channel(mesh.address("orchestrator")) as channel:  # no options: 4 MiB receive limit
        yield orchestrator_pb2_grpc.OrchestratorStub(channel)


def stage_requests(mesh) -> dict[str, float]:
    """Requests each backend stage has handled so far (every method, every code)."""
    counts = {}
    for spec in STAGES.backends():
        text = mesh.metrics_text(spec.name)
        counts[spec.name] = sum(float(line.split("#")[0].split()[-1]) for line in text.splitlines()
                                if line.startswith("diffmesh_grpc_requests_total{"))
    return counts


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_three_large_images_stream_to_a_stock_client_each_in_its_own_event(stock):
    events = list(stock.GenerateStream(build_request("a lighthouse", count=3, seed=21, **BIG), timeout=120))
    assert max(event.ByteSize() for event in events) < STOCK_LIMIT
    assert [e.WhichOneof("event") for e in events] == ["progress", "image", "image", "image", "result"]
    response = collect_stream(events)
    assert sum(len(image.image.data) for image in response.images) > STOCK_LIMIT  # one message could not carry it
    assert [(image.index, image.seed) for image in response.images] == [(0, 21), (1, 22), (2, 23)]
    for image in response.images:
        assert image.image.mime_type == "image/png" and pixels(image.image.data).shape == (768, 768, 3)
    assert not events[-1].result.images and events[-1].result.info.width == 768
    # (Image i of a batch equals a one-image request with seed + i: test_equivalence checks it at
    # sizes under 256x256, which carry no watermark. Here the tiny model's noise at 768x768 and the
    # mark's quantisation turn batch arithmetic's 1/255 into whole-step differences on a third of
    # the blocks, so the claim is not checked at this size.)
    for image in response.images:
        assert image.marking.watermarked and image.marking.manifest


def test_unary_generate_of_the_same_request_fails_failed_precondition_before_any_stage_works(mesh, stock):
    before = stage_requests(mesh)
    with pytest.raises(grpc.RpcError) as info:
        stock.Generate(build_request("a lighthouse", count=3, seed=21, **BIG), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "use GenerateStream" in info.value.details() and "max_unary_reply_mb" in info.value.details()
    assert stage_requests(mesh) == before  # no stage was called


def test_an_image_larger_than_a_chunk_arrives_in_chunks_equal_to_the_unary_file(stock):
    # One 1152x1152 PNG is ~3.4 MB: over the 3 MiB chunk; its worst case is under the 4 MiB unary limit.
    request = build_request("a harbour", count=1, seed=5, request_key="harbour",
                            **{**BIG, "width": 1152, "height": 1152})
    events = list(stock.GenerateStream(request, timeout=120))
    chunks = [e.image for e in events if e.HasField("image")]
    assert len(chunks) == 2 and [c.last for c in chunks] == [False, True]
    assert max(event.ByteSize() for event in events) < STOCK_LIMIT
    streamed = collect_stream(events).images[0]
    unary = stock.Generate(request, timeout=120).images[0]
    # The same image (pixels: each file's C2PA manifest has its own id and time), as one file.
    assert len(streamed.image.data) == chunks[0].file_size
    assert np.array_equal(pixels(streamed.image.data), pixels(unary.image.data))
    assert streamed.marking.manifest and streamed.marking == unary.marking
