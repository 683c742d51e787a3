"""Each stage's traffic, split between its stable and canary replica sets.

A stage has a stable target and optionally a canary target with a weight in [0, 1]. The choice is
sticky per request key (a hash, not a coin flip), so one request's retries and one caller's
repeated key land on the same variant; rollback is setting the weight to 0.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from diffmesh.runtime.channels import open_channel

STABLE = "stable"
CANARY = "canary"


@dataclass(frozen=True)
class StageRoute:
    stage: str
    stable: str
    canary: str = ""
    canary_weight: float = 0.0


def canary_bucket(stage: str, request_key: str) -> float:
    """A stable pseudo-random number in [0, 1) for this key and stage."""
    digest = hashlib.blake2b(f"{stage}\0{request_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class StageRouter:
    def __init__(self, routes: list[StageRoute], max_message_mb: int) -> None:
        self._routes = {route.stage: route for route in routes}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        for route in routes:
            self._channels[(route.stage, STABLE)] = open_channel(route.stable, max_message_mb)
            if route.canary:
                self._channels[(route.stage, CANARY)] = open_channel(route.canary, max_message_mb)

    def pick(self, stage: str, request_key: str) -> tuple[str, grpc.aio.Channel]:
        route = self._routes[stage]
        if route.canary and canary_bucket(stage, request_key) < route.canary_weight:
            return CANARY, self._channels[(stage, CANARY)]
        return STABLE, self._channels[(stage, STABLE)]

    def stub(self, stage: str, request_key: str, stub_cls: Callable[[grpc.aio.Channel], Any]) -> tuple[str, Any]:
        """The stage's client stub for this request's variant (stubs are built once per channel)."""
        variant, channel = self.pick(stage, request_key)
        stub = self._stubs.get((stage, variant))
        if stub is None:
            stub = self._stubs[(stage, variant)] = stub_cls(channel)
        return variant, stub

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
