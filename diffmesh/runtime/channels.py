"""Client channels to stages: per-request balancing across replicas, message limits (no retries:
see services/orchestrator/clients.py)."""
from __future__ import annotations

import ipaddress
import json

import grpc

from diffmesh.runtime import telemetry

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")


def channel_target(address: str) -> str:
    """host:port becomes dns:///host:port, so every address a DNS name resolves to (a headless
    Service's pods) gets its own subchannel; a comma-separated list of IP:port replicas becomes an
    ipv4:/ipv6: target over all of them; explicit resolver targets pass through."""
    if address.startswith(_SCHEMES):
        return address
    replicas = [part.strip() for part in address.split(",") if part.strip()]
    if len(replicas) == 1:
        return f"dns:///{replicas[0]}"
    hosts = [replica.rsplit(":", 1)[0].strip("[]") for replica in replicas]
    try:
        families = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(f"{address!r}: several replicas must be IP:port each (give one DNS name that "
                         "resolves to every replica instead)") from None
    if len(families) != 1:
        raise ValueError(f"{address!r}: replicas mix IPv4 and IPv6")
    return ("ipv4:" if families == {4} else "ipv6:") + ",".join(replicas)


def _service_config() -> str:
    # round_robin balances each call across all resolved replicas (pick_first, the default,
    # pins every call to one). No retryPolicy: the orchestrator's stage clients are the one retry
    # layer (services/orchestrator/clients.py), which also covers streams that already started.
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_options(max_message_mb: int) -> list[tuple[str, object]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
    ]


def stage_channel_options(max_message_mb: int) -> list[tuple[str, object]]:
    """Options of a channel to a stage: balanced per call, no transport retries of its own."""
    return channel_options(max_message_mb) + [
        ("grpc.service_config", _service_config()),
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 30_000),
        # A replica that comes back is reached within seconds, not after grpc's default reconnect
        # backoff of up to 120 s (the orchestrator's readiness pre-check reads the channel state).
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


def open_channel(address: str, max_message_mb: int = 256,
                 credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    options = stage_channel_options(max_message_mb)
    if credentials is not None:
        return grpc.aio.secure_channel(channel_target(address), credentials, options=options,
                                       interceptors=telemetry.client_interceptors())
    return grpc.aio.insecure_channel(channel_target(address), options=options,
                                     interceptors=telemetry.client_interceptors())
