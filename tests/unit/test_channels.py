"""Stage channels: balanced per call, and no retry layer under the orchestrator's own."""
from __future__ import annotations

import json

from diffmesh.runtime.channels import stage_channel_options


def test_stage_channels_balance_per_call_and_never_retry_themselves():
    # Retries live in one place, the orchestrator's stage clients (services/orchestrator/clients.py):
    # a gRPC retry policy on the channel under them multiplied the attempts per call (3 x 3 = 9).
    options = dict(stage_channel_options(64))
    assert options["grpc.enable_retries"] == 0
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "retryPolicy" not in json.dumps(config)
    assert options["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert options["grpc.max_reconnect_backoff_ms"] <= 5_000  # a returning replica is seen within seconds
