"""Shadow diffing: a stage's canary gets a copy of some stable-served calls; its answer is never
returned, only compared with stable's. Stages are seeded, so a faithful canary matches: bit for
bit when both ran the call alone, and within float rounding when either ran it inside a shared
batch (the denoiser's step-level batching sums a UNet call in another order at another batch
size). So a comparison is "equal" (bit for bit), "close" (every output within `tolerance` of the
stable one's largest magnitude) or "diverged"; the max absolute difference goes to a histogram,
and each divergence above the threshold is logged once. Mirrors run as background tasks after the stable
answer is in hand, bounded in number, so they never add latency to the caller's request."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import numpy as np
from prometheus_client import Counter, Histogram

from diffmesh.imaging import decode_image
from diffmesh.proto.v1 import tensor_pb2
from diffmesh.runtime import codec
from diffmesh.runtime.logs import log_event

log = logging.getLogger("diffmesh.shadow")
# Batch rounding measured on the tiny models: latents within 1e-3 of their magnitude, images
# within one level of 255 (tests/unit/test_continuous_batching.py); a canary that is wrong
# differs by far more.
DEFAULT_TOLERANCE = 0.005

SHADOW_CALLS = Counter("diffmesh_shadow_comparisons", "shadow (canary mirror) comparisons by outcome",
                       ["stage", "outcome"])
SHADOW_DIFF = Histogram("diffmesh_shadow_max_abs_diff", "max absolute difference canary vs stable",
                        ["stage"], buckets=(0, 1e-6, 1e-4, 1e-2, 0.1, 1, 2, 5, 10, 50, 255, float("inf")))


def outputs(message: Any) -> list[np.ndarray]:
    """Every tensor and image in a stage reply, in field order, as arrays to compare."""
    arrays: list[np.ndarray] = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if isinstance(item, tensor_pb2.Tensor):
                array = codec.to_numpy(item, field.name)
                arrays.append(array.astype(np.float64) if item.dtype != tensor_pb2.BFLOAT16 else array)
            elif hasattr(item, "mime_type") and hasattr(item, "data"):
                arrays.append(decode_image(item.data, field.name).astype(np.float64))
            elif hasattr(item, "ListFields") and field.message_type.name not in ("StageUsage",):
                arrays.extend(outputs(item))
    return arrays


def compare(stable: list[np.ndarray], canary: list[np.ndarray]) -> float:
    """Max absolute difference over all outputs (inf when their number or shapes differ)."""
    if len(stable) != len(canary) or any(a.shape != b.shape for a, b in zip(stable, canary)):
        return float("inf")
    return max((float(np.abs(a - b).max()) if a.size else 0.0 for a, b in zip(stable, canary)), default=0.0)


def relative_difference(stable: list[np.ndarray], canary: list[np.ndarray]) -> float:
    """The largest of each output's max absolute difference over its stable magnitude (inf when
    their number or shapes differ; a difference on an all-zero output is infinitely large)."""
    if len(stable) != len(canary) or any(a.shape != b.shape for a, b in zip(stable, canary)):
        return float("inf")
    worst = 0.0
    for a, b in zip(stable, canary):
        if not a.size:
            continue
        difference, scale = float(np.abs(a - b).max()), float(np.abs(a).max())
        worst = max(worst, difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf")))
    return worst


def outcome(stable: list[np.ndarray], canary: list[np.ndarray], tolerance: float) -> tuple[str, float]:
    """("equal" | "close" | "diverged", the max absolute difference)."""
    difference = compare(stable, canary)
    if difference == 0:
        return "equal", difference
    return ("close" if relative_difference(stable, canary) <= tolerance else "diverged"), difference


class ShadowDiffer:
    def __init__(self, threshold: float = 0.0, max_in_flight: int = 8, tolerance: float = DEFAULT_TOLERANCE) -> None:
        self.threshold = threshold
        self.tolerance = tolerance
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task] = set()

    def mirror(self, stage: str, request_id: str, call: Callable[[], Awaitable[Any]], stable: Any) -> None:
        if len(self._tasks) >= self.max_in_flight:
            SHADOW_CALLS.labels(stage, "dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._run(stage, request_id, call, stable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, stage: str, request_id: str, call: Callable[[], Awaitable[Any]], stable: Any) -> None:
        try:
            canary = await call()
            verdict, difference = outcome(outputs(stable), outputs(canary), self.tolerance)
        except Exception as exc:  # a failing canary is a finding, not the caller's problem
            SHADOW_CALLS.labels(stage, "error").inc()
            log_event(log, "shadow call failed", logging.WARNING, stage=stage, request_id=request_id, error=str(exc))
            return
        SHADOW_DIFF.labels(stage).observe(difference)
        SHADOW_CALLS.labels(stage, verdict).inc()
        if verdict == "diverged" and difference > self.threshold:
            log_event(log, "shadow divergence", logging.WARNING, stage=stage, request_id=request_id,
                      max_abs_diff=difference, threshold=self.threshold)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
