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


# --------------------------------------------------------------------------- glibc malloc what-if
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep freed multi-MB buffers in the heap (no munmap + page faults on every message).

    glibc serves allocations above M_MMAP_THRESHOLD with a fresh mmap and returns them with
    munmap, and trims the heap top above M_TRIM_THRESHOLD; every new payload-size buffer then
    page-faults all its pages again (expensive in a VM). Fixed thresholds keep them resident.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 256 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------- proposed codec (what-if)
def _wire_kind(p: Payload) -> tuple[int, Any]:
    from diffmesh.proto.v1 import tensor_pb2
    return (tensor_pb2.FLOAT16, np.dtype("<f2")) if p.dtype == "float16" else (tensor_pb2.UINT8, np.dtype("u1"))


def build_proposed(p: Payload, cls: Any, src: torch.Tensor | np.ndarray) -> Any:
    """Fills the message's Tensor field in place: no Tensor(...) then sub-message deep copy."""
    message = cls()
    target = getattr(message, p.field)
    array = src.detach().cpu().contiguous().numpy() if isinstance(src, torch.Tensor) else np.ascontiguousarray(src)
    target.dtype = _wire_kind(p)[0]
    target.shape.extend(array.shape)
    target.data = array.tobytes()
    return message


def decode_proposed(p: Payload, t: Any) -> torch.Tensor | np.ndarray:
    """Reads t.data once: with the upb backend every `t.data` access copies the whole payload out
    of the message, and codec.to_* reads it twice (len() in the header check, then frombuffer)."""
    wire, dtype = _wire_kind(p)
    data = t.data
    shape = tuple(t.shape)
    if t.dtype != wire or len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError("bad tensor")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return torch.from_numpy(array) if p.dtype == "float16" else array


def encode_zero_copy(p: Payload, cls: Any, src: torch.Tensor | np.ndarray) -> bytes:
    """The whole message as wire bytes with one copy of the payload (see bench.wire)."""
    from bench import wire
    array = src.detach().cpu().contiguous().numpy() if isinstance(src, torch.Tensor) else src
    return wire.encode(cls(), p.field, array, _wire_kind(p)[0])


def decode_zero_copy(p: Payload, data: bytes) -> torch.Tensor | np.ndarray:
    from bench import wire
    _, dtype_wire, shape, payload = wire.decode(data, p.message_cls(), p.field)
    wire_dtype, dtype = _wire_kind(p)
    if dtype_wire != wire_dtype or payload.nbytes != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError("bad tensor")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return torch.from_numpy(array) if p.dtype == "float16" else array


# --------------------------------------------------------------------------- the echo server
def _serve(conn: Any, malloc_tuned: bool) -> None:
    """Child process entry: serves until terminated; sends its port through conn."""
    if malloc_tuned:
        tune_malloc()
    asyncio.run(_serve_async(conn))


async def _serve_async(conn: Any) -> None:
    import json

    import grpc

    from diffmesh.runtime import codec
    from diffmesh.runtime.channels import channel_options

    # In-situ step timings (ms) per method: the deserialiser and the decode, as they run here.
    steps: dict[str, dict[str, list[float]]] = {}

    def record(method: str, step: str, start: float) -> None:
        steps.setdefault(method, {}).setdefault(step, []).append((time.perf_counter() - start) * 1000.0)

    async def raw(request: bytes, context: Any) -> bytes:
        assert isinstance(request, bytes)
        return ACK

    async def stats(request: bytes, context: Any) -> bytes:
        reply = {m: {k: v for k, v in s.items()} for m, s in steps.items()}
        steps.clear()  # also the reset after warm-up
        return json.dumps(reply).encode()

    def parser(method: str, cls: Any) -> Callable:
        def parse(data: bytes) -> Any:
            start = time.perf_counter()
            message = cls.FromString(data)
            record(method, "receiver FromString", start)
            return message
        return parse

    def decoder(p: Payload, method: str, proposed: bool) -> Callable:
        to = codec.to_torch if p.dtype == "float16" else codec.to_numpy

        async def decode(request: Any, context: Any) -> bytes:
            start = time.perf_counter()
            if proposed:
                decode_proposed(p, getattr(request, p.field))
            else:
                to(getattr(request, p.field), p.field, rank=len(p.shape))
            record(method, "receiver decode", start)
            return ACK
        return decode

    def decoder_zero_copy(p: Payload, method: str) -> Callable:
        async def decode(request: bytes, context: Any) -> bytes:
            start = time.perf_counter()
            decode_zero_copy(p, request)
            record(method, "receiver parse + decode (zero-copy)", start)
            return ACK
        return decode

    handlers = {"Raw": grpc.unary_unary_rpc_method_handler(raw),
                "Stats": grpc.unary_unary_rpc_method_handler(stats)}
    for p in PAYLOADS:
        for method, proposed in ((p.name, False), (p.name + "Proposed", True)):
            handlers[method] = grpc.unary_unary_rpc_method_handler(
                decoder(p, method, proposed), request_deserializer=parser(method, p.message_cls()))
        handlers[p.name + "ZeroCopy"] = grpc.unary_unary_rpc_method_handler(
            decoder_zero_copy(p, p.name + "ZeroCopy"))
    server = grpc.aio.server(options=channel_options(MAX_MESSAGE_MB))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    conn.close()
    await server.wait_for_termination()


# --------------------------------------------------------------------------- the client side
VARIANTS = ("codec", "raw", "proposed", "zero_copy")
CANDIDATES = ("codec", "proposed", "zero_copy")


def _source(p: Payload) -> torch.Tensor | np.ndarray:
    g = torch.Generator().manual_seed(0)
    if p.dtype == "float16":
        return torch.randn(p.shape, generator=g).to(torch.float16)
    return torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8).numpy()


def _build(p: Payload, cls: Any, src: torch.Tensor | np.ndarray) -> Any:
    """What a servicer does today: codec.from_* into a Tensor, handed to the real message."""
    from diffmesh.runtime import codec
    tensor = codec.from_torch(src) if isinstance(src, torch.Tensor) else codec.from_numpy(src)
    return cls(**{p.field: tensor})


async def _measure_transport(port: int, iters: int,
                             warmup: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    import json
    import random

    import grpc

    from diffmesh.runtime.channels import channel_options

    samples: dict[str, dict[str, list[float]]] = {p.name: {v: [] for v in VARIANTS} for p in PAYLOADS}
    # in-situ client steps, per payload and variant: building the message, serialising it
    client_steps: dict[str, dict[str, dict[str, list[float]]]] = {
        p.name: {"codec": {"sender build": [], "sender SerializeToString": []},
                 "proposed": {"sender build": [], "sender SerializeToString": []},
                 "zero_copy": {"sender build + serialise (one copy)": []}}
        for p in PAYLOADS}
    recording = [False]

    def serializer(acc: list[float]) -> Callable:
        def serialize(message: Any) -> bytes:
            start = time.perf_counter()
            data = message.SerializeToString()
            if recording[0]:
                acc.append((time.perf_counter() - start) * 1000.0)
            return data
        return serialize

    order_rng = random.Random(0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=channel_options(MAX_MESSAGE_MB)) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        raw_call = channel.unary_unary(f"/{SERVICE}/Raw")  # no serializers: bytes in, bytes out
        stats_call = channel.unary_unary(f"/{SERVICE}/Stats")
        plans = []
        for p in PAYLOADS:
            cls = p.message_cls()
            src = _source(p)
            size = len(_build(p, cls, src).SerializeToString())
            assert size == len(build_proposed(p, cls, src).SerializeToString())
            raw_bytes = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
            steps = client_steps[p.name]
            calls = {
                "codec": (channel.unary_unary(f"/{SERVICE}/{p.name}",
                                              request_serializer=serializer(steps["codec"]["sender SerializeToString"])),
                          lambda p=p, cls=cls, src=src: _build(p, cls, src)),
                "proposed": (channel.unary_unary(f"/{SERVICE}/{p.name}Proposed",
                                                 request_serializer=serializer(
                                                     steps["proposed"]["sender SerializeToString"])),
                             lambda p=p, cls=cls, src=src: build_proposed(p, cls, src)),
                "zero_copy": (channel.unary_unary(f"/{SERVICE}/{p.name}ZeroCopy"),
                              lambda p=p, cls=cls, src=src: encode_zero_copy(p, cls, src)),
                "raw": (raw_call, lambda raw_bytes=raw_bytes: raw_bytes),
            }
            assert 0 <= len(encode_zero_copy(p, cls, src)) - size <= 16  # a second field header
            plans.append((p, calls))

        for i in range(warmup + iters):
            if i == warmup:
                await stats_call(b"")  # drop the server's warm-up timings
                recording[0] = True
            for p, calls in plans:
                order = list(VARIANTS)
                order_rng.shuffle(order)  # interleaved, in a different order every iteration
                for variant in order:
                    call, make = calls[variant]
                    start = time.perf_counter()
                    request = make()  # building the message is part of the hop
                    built = time.perf_counter()
                    reply = await call(request)
                    elapsed = (time.perf_counter() - start) * 1000.0
                    assert reply == ACK
                    if recording[0]:
                        samples[p.name][variant].append(elapsed)
                        if variant in ("codec", "proposed"):
                            client_steps[p.name][variant]["sender build"].append((built - start) * 1000.0)
                        elif variant == "zero_copy":
                            client_steps[p.name][variant]["sender build + serialise (one copy)"].append(
                                (built - start) * 1000.0)
        server_steps = json.loads(await stats_call(b""))

    in_situ: dict[str, Any] = {}
    for p in PAYLOADS:
        in_situ[p.name] = {}
        for variant, method in (("codec", p.name), ("proposed", p.name + "Proposed"),
                                ("zero_copy", p.name + "ZeroCopy")):
            merged = {**client_steps[p.name][variant], **server_steps.get(method, {})}
            in_situ[p.name][variant] = {k: float(np.median(v)) for k, v in merged.items() if v}
    return samples, in_situ


def measure(iters: int, warmup: int, malloc_tuned: bool) -> dict[str, Any]:
    """Echo server in a spawned process, client here; returns per payload and variant stats."""
    if malloc_tuned:
        tune_malloc()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    server = ctx.Process(target=_serve, args=(child, malloc_tuned), name="bench-echo-server", daemon=True)
    server.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("echo server did not start within 60s")
        port = parent.recv()
        samples, in_situ = asyncio.run(_measure_transport(port, iters, warmup))
    finally:
        server.terminate()
        server.join(10)
        if server.is_alive():
            server.kill()
            server.join()

    payloads: dict[str, Any] = {}
    for p in PAYLOADS:
        size_mb = p.nbytes / 1e6
        stats = {}
        for variant in VARIANTS:
            s = summarize_ms(samples[p.name][variant])
            stats[variant] = {**s, "MB_per_s_at_p50": size_mb / (s["p50_ms"] / 1000.0)}
        raw = stats["raw"]
        for variant in CANDIDATES:
            stats[variant]["ratio_p50"] = stats[variant]["p50_ms"] / raw["p50_ms"]
            stats[variant]["ratio_p95"] = stats[variant]["p95_ms"] / raw["p95_ms"]
            stats[variant]["overhead_p50_ms"] = stats[variant]["p50_ms"] - raw["p50_ms"]
            cpu = in_situ[p.name][variant]
            stats[variant]["in_situ_steps_ms_p50"] = {
                **cpu,
                "sum of the codec steps": sum(cpu.values()),
                "transport (p50 minus the codec steps)": stats[variant]["p50_ms"] - sum(cpu.values()),
                "raw transport (raw p50)": raw["p50_ms"],
            }
        payloads[p.name] = stats
    return {"malloc_tuned": malloc_tuned, "iterations": iters, "warmup": warmup, "payloads": payloads}


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
    """Each CPU step of today's codec path on its own, in this process (no network, warm caches:
    the allocator reuses the same buffers here, so these are lower bounds)."""
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
        proposed = decode_proposed(p, getattr(cls.FromString(build_proposed(p, cls, src).SerializeToString()),
                                              p.field))
        same_proposed = (torch.equal(proposed, src) if isinstance(src, torch.Tensor)
                         else bool(np.array_equal(proposed, src)))
        # the zero-copy bytes are ordinary protobuf: the generated parser + today's codec read them
        compat = decode(getattr(cls.FromString(encode_zero_copy(p, cls, src)), p.field), p.field)
        zero = decode_zero_copy(p, encode_zero_copy(p, cls, src))
        same_zero_copy = all(torch.equal(x, src) if isinstance(src, torch.Tensor) else bool(np.array_equal(x, src))
                             for x in (compat, zero))
        src_np = src.numpy() if isinstance(src, torch.Tensor) else src
        sub = getattr(received, p.field)
        zc_bytes = encode_zero_copy(p, cls, src)
        result[p.name] = {
            "round_trip_equal": same,
            "proposed_round_trip_equal": same_proposed,
            "zero_copy_round_trip_equal_and_wire_compatible": same_zero_copy,
            "steps_ms": {
                "sender: codec.from_* (tobytes + Tensor(data=) copy)": _time_ms(lambda: to_wire(src), iters),
                "sender: Message(field=Tensor) (deep copy of the sub-message)":
                    _time_ms(lambda: cls(**{p.field: tensor}), iters),
                "sender: SerializeToString": _time_ms(message.SerializeToString, iters),
                "receiver: FromString": _time_ms(lambda: cls.FromString(wire), iters),
                "receiver: codec.to_*": _time_ms(lambda: decode(sub, p.field), iters),
                "receiver: one `tensor.data` access (upb copies the bytes out)": _time_ms(lambda: sub.data, iters),
                "proposed sender: fill the field in place": _time_ms(lambda: build_proposed(p, cls, src), iters),
                "proposed receiver: read .data once": _time_ms(lambda: decode_proposed(p, sub), iters),
                "zero-copy sender: encode (one copy)": _time_ms(lambda: encode_zero_copy(p, cls, src), iters),
                "zero-copy receiver: parse + view": _time_ms(lambda: decode_zero_copy(p, zc_bytes), iters),
                "reference: one memcpy of the payload (ndarray.tobytes)": _time_ms(src_np.tobytes, iters),
            },
        }
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description="one hop measurement; JSON on stdout")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--malloc-tuned", action="store_true")
    args = parser.parse_args(argv)
    json.dump(measure(args.iters, args.warmup, args.malloc_tuned), sys.stdout)
    return 0


def run_hops(iters: int = 200, warmup: int = 20, breakdown_iters: int = 50,
             what_if: bool = True) -> dict[str, Any]:
    """Each configuration in a fresh client process (python -m bench.hops), so the allocator
    setting of one never leaks into the other or into the end-to-end runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    configs = {"default": False, **({"malloc_tuned": True} if what_if else {})}
    measured = {}
    for name, tuned in configs.items():
        cmd = [sys.executable, "-m", "bench.hops", "--iters", str(iters), "--warmup", str(warmup)]
        if tuned:
            cmd.append("--malloc-tuned")
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
        measured[name] = json.loads(out.stdout)

    default = measured["default"]["payloads"]
    payloads: dict[str, Any] = {}
    for p in PAYLOADS:
        d = default[p.name]
        payloads[p.name] = {
            "shape": list(p.shape),
            "dtype": p.dtype,
            "carried_in": f"diffmesh.v1.{p.message.split('.')[1]}.{p.field}",
            "tensor_bytes": p.nbytes,
            "codec": d["codec"],
            "raw_bytes_floor": d["raw"],
            "ratio_p50": d["codec"]["ratio_p50"],
            "ratio_p95": d["codec"]["ratio_p95"],
            "overhead_p50_ms": d["codec"]["overhead_p50_ms"],
            "targets": {"ratio_p50_max": RATIO_TARGET, "p50_ms_max": p.p50_target_ms},
            "pass_ratio": d["codec"]["ratio_p50"] <= RATIO_TARGET,
            "pass_p50": None if p.p50_target_ms is None else d["codec"]["p50_ms"] <= p.p50_target_ms,
        }
    return {
        "method": ("grpc.aio client -> grpc.aio echo server in a spawned process on 127.0.0.1. codec: "
                   "codec.from_* into the real message (as the servicers do) + serialise + send + FromString + "
                   "codec.to_* on the server; raw_bytes_floor: a prebuilt bytes object of the serialised "
                   "message's size, identity serializers on both sides. Both reply with a 2-byte ack. Same "
                   "channel, same server process, channel_options(256); variants interleaved in a shuffled order "
                   "every iteration. Targets judge the `default` configuration."),
        "iterations": iters,
        "warmup": warmup,
        "payloads": payloads,
        "what_if": {
            "proposed_codec": ("fill the message's Tensor field in place on the sender, read `.data` once on "
                               "the receiver (see bench.hops.build_proposed / decode_proposed)"),
            "malloc_tuned": ("mallopt(M_MMAP_THRESHOLD=256MiB, M_TRIM_THRESHOLD=1GiB) in client and server "
                             "(see bench.hops.tune_malloc)"),
            "configurations": measured,
        },
        "breakdown_in_process": breakdown(breakdown_iters),
    }


if __name__ == "__main__":
    raise SystemExit(main())
