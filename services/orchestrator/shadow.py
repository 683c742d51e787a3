"""Shadow diffing: a stage's canary gets a copy of some stable-served calls; its answer is never
returned, only compared with stable's. Stages are seeded, so a faithful canary matches bit for
bit; the max absolute difference and the share of equal outputs go to metrics, and each
divergence above the threshold is logged once. Mirrors run as background tasks after the stable
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


class ShadowDiffer:
    def __init__(self, threshold: float = 0.0, max_in_flight: int = 8) -> None:
        self.threshold = threshold
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
            difference = compare(outputs(stable), outputs(canary))
        except Exception as exc:  # a failing canary is a finding, not the caller's problem
            SHADOW_CALLS.labels(stage, "error").inc()
            log_event(log, "shadow call failed", logging.WARNING, stage=stage, request_id=request_id, error=str(exc))
            return
        SHADOW_DIFF.labels(stage).observe(difference)
        SHADOW_CALLS.labels(stage, "equal" if difference == 0 else "diverged").inc()
        if difference > self.threshold:
            log_event(log, "shadow divergence", logging.WARNING, stage=stage, request_id=request_id,
                      max_abs_diff=difference, threshold=self.threshold)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
