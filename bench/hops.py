"""Per-hop overhead: one SDXL-size tensor through the codec and gRPC, vs raw bytes of the same size.

A grpc.aio echo server runs in its own process (spawned). For each payload it offers two methods:

  /diffmesh.bench.Echo/<payload>  deserialises the real message (request_deserializer=FromString)
                                  and decodes the tensor with diffmesh.runtime.codec, then acks
  /diffmesh.bench.Echo/Raw        receives the bytes as they are (no deserializer), then acks

The ack is two bytes, so only the request direction carries the payload. The client (grpc.aio,
like the orchestrator) times: codec.from_* into the real message + serialise + send + server
deserialise + decode + ack back, against sending a prebuilt bytes object of exactly the serialised
message's size over the same channel to the same server process. Calls are interleaved (codec,
raw, raw, codec, ...) so drift hits both. A separate in-process breakdown times each CPU step of
the codec path on its own (no network) to attribute the difference.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from bench.stats import summarize_ms

SERVICE = "diffmesh.bench.Echo"
ACK = b"ok"
MAX_MESSAGE_MB = 256


@dataclass(frozen=True)
class Payload:
    name: str            # method name and JSON key
    shape: tuple[int, ...]
    dtype: str           # "float16" (torch source, codec.from_torch) or "uint8" (numpy, from_numpy)
    message: str         # "<module>.<Message>" in diffmesh.proto.v1
    field: str           # the Tensor field of the message carrying it
    p50_target_ms: float | None

    def message_cls(self) -> Any:
        import importlib
        module, cls = self.message.split(".")
        return getattr(importlib.import_module(f"diffmesh.proto.v1.{module}"), cls)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (2 if self.dtype == "float16" else 1)


PAYLOADS = (
    # prompt + negative embeddings as the denoiser receives them (text_encoder -> denoiser hop)
    Payload("embeddings", (2, 77, 2048), "float16", "denoiser_pb2.DenoiseRequest", "prompt_embeds", 3.0),
    # CFG-batch latents of a 1024x1024 SDXL image (denoiser -> vae hop)
    Payload("latents", (2, 4, 128, 128), "float16", "denoiser_pb2.DenoiseResult", "latents", 3.0),
    # a decoded 1024x1024 image as raw pixels (vae -> caller when return_tensor)
    Payload("image", (1, 1024, 1024, 3), "uint8", "vae_pb2.DecodeResponse", "pixels", None),
)
RATIO_TARGET = 1.15


# --------------------------------------------------------------------------- the echo server
def _serve(conn: Any) -> None:
    """Child process entry: serves until terminated; sends its port through conn."""
    asyncio.run(_serve_async(conn))


async def _serve_async(conn: Any) -> None:
    import grpc

    from diffmesh.runtime import codec
    from diffmesh.runtime.channels import channel_options

    async def raw(request: bytes, context: Any) -> bytes:
        assert isinstance(request, bytes)
        return ACK

    def decoder(p: Payload) -> Callable:
        to = codec.to_torch if p.dtype == "float16" else codec.to_numpy

        async def decode(request: Any, context: Any) -> bytes:
            to(getattr(request, p.field), p.field, rank=len(p.shape))
            return ACK
        return decode

    handlers = {"Raw": grpc.unary_unary_rpc_method_handler(raw)}
    for p in PAYLOADS:
        handlers[p.name] = grpc.unary_unary_rpc_method_handler(
            decoder(p), request_deserializer=p.message_cls().FromString)
    server = grpc.aio.server(options=channel_options(MAX_MESSAGE_MB))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    conn.close()
    await server.wait_for_termination()


# --------------------------------------------------------------------------- the client side
def _source(p: Payload) -> torch.Tensor | np.ndarray:
    g = torch.Generator().manual_seed(0)
    if p.dtype == "float16":
        return torch.randn(p.shape, generator=g).to(torch.float16)
    return torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8).numpy()


def _build(p: Payload, cls: Any, src: torch.Tensor | np.ndarray) -> Any:
    """What a servicer does: codec.from_* straight into the real message."""
    from diffmesh.runtime import codec
    tensor = codec.from_torch(src) if isinstance(src, torch.Tensor) else codec.from_numpy(src)
    return cls(**{p.field: tensor})


async def _measure_transport(port: int, iters: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    import grpc

    from diffmesh.runtime.channels import channel_options

    samples: dict[str, dict[str, list[float]]] = {p.name: {"codec": [], "raw": []} for p in PAYLOADS}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=channel_options(MAX_MESSAGE_MB)) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        raw_call = channel.unary_unary(f"/{SERVICE}/Raw")  # no serializers: bytes in, bytes out
        plans = []
        for p in PAYLOADS:
            cls = p.message_cls()
            src = _source(p)
            size = len(_build(p, cls, src).SerializeToString())
            codec_call = channel.unary_unary(f"/{SERVICE}/{p.name}", request_serializer=cls.SerializeToString)
            raw_bytes = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
            plans.append((p, cls, src, codec_call, raw_bytes))

        async def codec_once(p: Payload, cls: Any, src: Any, call: Any) -> float:
            start = time.perf_counter()
            reply = await call(_build(p, cls, src))
            elapsed = (time.perf_counter() - start) * 1000.0
            assert reply == ACK
            return elapsed

        async def raw_once(payload: bytes) -> float:
            start = time.perf_counter()
            reply = await raw_call(payload)
            elapsed = (time.perf_counter() - start) * 1000.0
            assert reply == ACK
            return elapsed

        for i in range(warmup + iters):
            for p, cls, src, codec_call, raw_bytes in plans:
                if i % 2 == 0:
                    c = await codec_once(p, cls, src, codec_call)
                    r = await raw_once(raw_bytes)
                else:
                    r = await raw_once(raw_bytes)
                    c = await codec_once(p, cls, src, codec_call)
                if i >= warmup:
                    samples[p.name]["codec"].append(c)
                    samples[p.name]["raw"].append(r)
    return samples


def _time_ms(fn: Callable[[], Any], iters: int) -> dict[str, float | int]:
    for _ in range(3):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000.0)
    return summarize_ms(out)


def breakdown(iters: int = 50) -> dict[str, dict[str, Any]]:
    """Each CPU step of the codec path on its own, in this process (no network)."""
    from diffmesh.runtime import codec

    result: dict[str, dict[str, Any]] = {}
    for p in PAYLOADS:
        cls = p.message_cls()
        src = _source(p)
        to_wire = codec.from_torch if isinstance(src, torch.Tensor) else codec.from_numpy
        decode = codec.to_torch if p.dtype == "float16" else codec.to_numpy
        tensor = to_wire(src)
        message = cls(**{p.field: tensor})
        wire = message.SerializeToString()
        received = cls.FromString(wire)
        decoded = decode(getattr(received, p.field), p.field)
        same = (torch.equal(decoded, src) if isinstance(src, torch.Tensor)
                else bool(np.array_equal(decoded, src)))
        src_np = src.numpy() if isinstance(src, torch.Tensor) else src
        result[p.name] = {
            "round_trip_equal": same,
            "steps": {
                "codec.from_*(src) -> Tensor": _time_ms(lambda: to_wire(src), iters),
                "Message(field=Tensor) (sub-message copy)": _time_ms(lambda: cls(**{p.field: tensor}), iters),
                "Message.SerializeToString": _time_ms(message.SerializeToString, iters),
                "Message.FromString (receiver)": _time_ms(lambda: cls.FromString(wire), iters),
                "codec.to_* (receiver, zero-copy view)": _time_ms(
                    lambda: decode(getattr(received, p.field), p.field), iters),
                "reference: one memcpy of the payload (ndarray.tobytes)": _time_ms(src_np.tobytes, iters),
            },
        }
    return result


def run_hops(iters: int = 200, warmup: int = 20, breakdown_iters: int = 50) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    server = ctx.Process(target=_serve, args=(child,), name="bench-echo-server", daemon=True)
    server.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("echo server did not start within 60s")
        port = parent.recv()
        samples = asyncio.run(_measure_transport(port, iters, warmup))
    finally:
        server.terminate()
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join()

    payloads: dict[str, Any] = {}
    for p in PAYLOADS:
        codec_stats = summarize_ms(samples[p.name]["codec"])
        raw_stats = summarize_ms(samples[p.name]["raw"])
        size_mb = p.nbytes / 1e6
        ratio = codec_stats["p50_ms"] / raw_stats["p50_ms"]
        payloads[p.name] = {
            "shape": list(p.shape),
            "dtype": p.dtype,
            "message": f"diffmesh.v1.{p.message.split('.')[1]}.{p.field}",
            "tensor_bytes": p.nbytes,
            "codec": {**codec_stats, "MB_per_s_at_p50": size_mb / (codec_stats["p50_ms"] / 1000.0)},
            "raw_bytes_floor": {**raw_stats, "MB_per_s_at_p50": size_mb / (raw_stats["p50_ms"] / 1000.0)},
            "ratio_p50": ratio,
            "ratio_p95": codec_stats["p95_ms"] / raw_stats["p95_ms"],
            "overhead_p50_ms": codec_stats["p50_ms"] - raw_stats["p50_ms"],
            "targets": {"ratio_p50_max": RATIO_TARGET, "p50_ms_max": p.p50_target_ms},
            "pass_ratio": ratio <= RATIO_TARGET,
            "pass_p50": None if p.p50_target_ms is None else codec_stats["p50_ms"] <= p.p50_target_ms,
        }
    return {
        "method": ("grpc.aio client -> grpc.aio echo server in a spawned process on 127.0.0.1; codec path: "
                   "codec.from_* into the real message + serialise + send + FromString + codec.to_* on the "
                   "server; floor: prebuilt bytes of the serialised message's size, identity serializers; "
                   "both ack with 2 bytes; same channel, same server process, channel_options(256); "
                   "interleaved (codec/raw order alternates every iteration)"),
        "iterations": iters,
        "warmup": warmup,
        "payloads": payloads,
        "breakdown_in_process": breakdown(breakdown_iters),
    }
