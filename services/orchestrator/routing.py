"""Each stage's traffic, split between its stable and canary replica sets.

A stage has a stable target and optionally a canary target with a weight in percent (0-100). The
choice is sticky per request key (a hash, not a coin flip): one caller's routing key always lands
on the same variant, weight 0 sends nothing to the canary and 100 sends everything. A fraction
of the requests served by stable can also be mirrored to the canary for comparison (shadow
traffic). Rollback is a configuration change: weight 0.
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
    canary_weight: float = 0.0   # percent of requests served by the canary
    shadow_percent: float = 0.0  # percent of stable-served requests mirrored to the canary


def bucket(stage: str, request_key: str, purpose: str = "route") -> float:
    """A stable pseudo-random number in [0, 100) for this key, stage and purpose."""
    digest = hashlib.blake2b(f"{purpose}\0{stage}\0{request_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100.0


class StageRouter:
    def __init__(self, routes: list[StageRoute], max_message_mb: int,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._routes = {route.stage: route for route in routes}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str, Any], Any] = {}
        for route in routes:
            self._channels[(route.stage, STABLE)] = open_channel(route.stable, max_message_mb, credentials)
            if route.canary:
                self._channels[(route.stage, CANARY)] = open_channel(route.canary, max_message_mb, credentials)

    def choose(self, stage: str, request_key: str) -> str:
        route = self._routes[stage]
        if route.canary and bucket(stage, request_key) < route.canary_weight:
            return CANARY
        return STABLE

    def should_shadow(self, stage: str, request_key: str) -> bool:
        route = self._routes[stage]
        return bool(route.canary) and bucket(stage, request_key, "shadow") < route.shadow_percent

    def channel(self, stage: str, variant: str) -> grpc.aio.Channel | None:
        """The stage's channel for a variant; None when the stage has no such variant."""
        return self._channels.get((stage, variant))

    def stub(self, stage: str, variant: str, stub_cls: Callable[[grpc.aio.Channel], Any]) -> Any:
        """The stage's client stub for a variant (built once per channel)."""
        key = (stage, variant, stub_cls)
        stub = self._stubs.get(key)
        if stub is None:
            stub = self._stubs[key] = stub_cls(self._channels[(stage, variant)])
        return stub

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
