"""Reply sizes: every message the orchestrator sends fits what a stock gRPC client accepts.

Stock clients (grpc-go, grpc-js, grpc-java, grpcurl, Python without options) refuse incoming
messages over 4 MiB, and they report it as RESOURCE_EXHAUSTED, which the contract otherwise uses
for "at capacity, retry later": a client following the contract would re-run the whole
generation again and again. So:

- GenerateStream sends each image in its own events, split into chunks of at most
  `chunk_bytes` (`image_chunks`); the final `result` carries the info only.
- Generate (unary) returns every image in one message. `check_predicted` rejects, before any
  stage works, a request whose worst-case reply exceeds the unary limit; `check_reply` rejects a
  finished reply that is larger anyway rather than sending it. Both are FAILED_PRECONDITION: the
  same request can never succeed as it is, so it must not look retryable.
"""
from __future__ import annotations

from typing import Iterator, Sequence

from diffmesh.errors import FailedPrecondition
from diffmesh.proto.v1 import common_pb2, orchestrator_pb2

MIB = 1024 * 1024
STOCK_CLIENT_LIMIT = 4 * MIB  # the default max receive message length of gRPC clients

# Worst-case encoded bytes per pixel of each output format, for the prediction before any work.
# PNG: the image file holds the raw scanlines, 3 bytes per pixel plus one filter byte per row,
#   which deflate cannot make larger than its stored-block framing allows (zlib's deflateBound:
#   under 0.1 %); PNG's chunk framing adds a little more. Measured on uniform noise (nothing
#   compresses it) at every compress level 0-9: at most 0.15 % over the raw scanlines. The bound
#   takes 1 % over them, so it holds for any image.
# JPEG and WebP are lossy and their worst case is a property of the encoder, not a format
#   guarantee, so these are measured: the least compressible content we found (uniform and
#   binary noise, the latter the worst for block DCT coders) at quality 100, the most a request
#   can ask for, gave at most 2.3 (JPEG, 4:2:0 as encoded here) and 1.3 (WebP) bytes per pixel;
#   the bounds round up with margin. Being measured rather than proven, they are backed by
#   `check_reply` after the work.
_BYTES_PER_PIXEL = {common_pb2.JPEG: 2.5, common_pb2.WEBP: 1.5}
_PNG_FRAMING = 1.01
# Per file: signature, headers, tables (a JPEG's are ~600 bytes), and the signed C2PA manifest
# the safety stage embeds (claim, assertions, signature and the certificate chain, no thumbnail:
# measured under 16 KiB with a three-certificate chain; a longer production chain has room).
FILE_OVERHEAD = 4096 + 64 * 1024
REPLY_OVERHEAD = 16384   # per reply: the info (timings, cost, ids) and message framing


def max_file_bytes(width: int, height: int, output_format: int) -> int:
    """An upper bound on one encoded image file of this size and format."""
    if output_format in _BYTES_PER_PIXEL:
        return int(width * height * _BYTES_PER_PIXEL[output_format]) + FILE_OVERHEAD
    scanlines = height * (3 * width + 1)  # PNG (the default format)
    return int(scanlines * _PNG_FRAMING) + FILE_OVERHEAD


def max_unary_reply_bytes(count: int, width: int, height: int, output_format: int) -> int:
    """An upper bound on a unary GenerateResponse with `count` images."""
    return count * max_file_bytes(width, height, output_format) + REPLY_OVERHEAD


def _advice(limit: int) -> str:
    return (f"over this server's unary reply limit of {limit / MIB:g} MiB (max_unary_reply_mb; stock gRPC "
            f"clients accept 4 MiB): use GenerateStream, which sends each image in its own messages, or ask for "
            f"fewer or smaller images, or raise both the client's receive limit and max_unary_reply_mb")


def check_predicted(count: int, width: int, height: int, output_format: int, limit: int) -> None:
    """Before any work: FAILED_PRECONDITION when the reply could exceed the unary limit."""
    predicted = max_unary_reply_bytes(count, width, height, output_format)
    if predicted > limit:
        raise FailedPrecondition(f"Generate's reply for {count} image(s) of {width}x{height} could reach "
                                 f"{predicted / MIB:.1f} MiB, {_advice(limit)}")


def check_reply(response: orchestrator_pb2.GenerateResponse, limit: int) -> None:
    """After the work: a reply over the unary limit fails instead of being sent (a client would
    drop it as RESOURCE_EXHAUSTED, and the work would look retryable)."""
    size = response.ByteSize()
    if size > limit:
        raise FailedPrecondition(f"Generate's reply is {size / MIB:.1f} MiB, {_advice(limit)}")


def image_chunks(images: Sequence[orchestrator_pb2.GeneratedImage],
                 chunk_bytes: int) -> Iterator[orchestrator_pb2.ImageChunk]:
    """Each image as consecutive chunks of at most chunk_bytes of file data, in index order; the
    last chunk of each image has last=True (an empty file is one empty, last chunk)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for image in images:
        data = image.image.data
        offsets = range(0, max(len(data), 1), chunk_bytes)
        for number, offset in enumerate(offsets):
            chunk = orchestrator_pb2.ImageChunk(
                index=image.index, seed=image.seed, mime_type=image.image.mime_type, width=image.image.width,
                height=image.image.height, chunk=number, offset=offset, data=data[offset:offset + chunk_bytes],
                last=number == len(offsets) - 1, file_size=len(data))
            if chunk.last and image.HasField("faces"):
                chunk.faces.CopyFrom(image.faces)
            if chunk.last and image.HasField("marking"):
                chunk.marking.CopyFrom(image.marking)
            yield chunk
