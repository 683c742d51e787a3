"""Per-stage canaries (weights, stickiness, fallback), shadow diffing, and replicas that fail over:
real stage processes beside the session mesh, each told apart by the variant and instance it
reports in the response's timings."""
from __future__ import annotations

import math
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from diffmesh.client import MeshClient, build_request, field_violations
from diffmesh.mesh import free_port

FAST = dict(model="tiny-sd15", width=64, height=64, steps=1, guidance_scale=1.0, seed=3)


def orchestrator_args(**routes: str) -> list[str]:
    """Route flags that override the session mesh's own (which the launcher passes first)."""
    return [arg for key, value in routes.items() for arg in ("--" + key.replace("_", "-"), value)]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


class Spawned:
    """Processes started beside the session mesh by its launcher, stopped at the module's end."""

    def __init__(self, mesh) -> None:
        self.mesh = mesh
        self.names: list[str] = []

    def start(self, name: str, stage: str, *args: str, variant: str = "stable") -> str:
        self.names.append(name)
        return self.mesh.spawn(name, stage, *args, variant=variant)

    def address(self, name: str) -> str:
        return self.mesh.address(name)

    def metrics(self, name: str) -> str:
        return self.mesh.metrics_text(name)

    def wait(self, *names: str) -> None:
        self.mesh.wait_ready(120, names=names)

    def log(self, name: str) -> str:
        return (self.mesh.log_dir / f"{name}.log").read_text()

    def process(self, name: str):
        return self.mesh.processes[name]

    def stop_all(self) -> None:
        codes = self.mesh.stop(names=[name for name in self.names if name in self.mesh.processes])
        # Orchestrators finalize on SIGTERM (drain shadow calls, close channels) and exit 0.
        assert all(code == 0 for name, code in codes.items() if name.startswith("orch")), codes


@pytest.fixture(scope="module")
def procs(mesh):
    started = Spawned(mesh)
    started.start("te-canary", "text_encoder", "--models", "tiny-sd15", variant="canary")
    started.start("den-canary", "denoiser", "--models", "tiny-sd15", variant="canary")
    started.start("den-ddim", "denoiser", "--models", "tiny-sd15", "--scheduler-override", "ddim", variant="canary")
    started.start("vae-canary", "vae", "--models", "tiny-sd15", variant="canary")
    started.wait("te-canary", "den-canary", "den-ddim", "vae-canary")
    # A: text_encoder canary 20 %, denoiser canary 0 % with every stable call shadowed, vae canary 100 %.
    started.start("orch-a", "orchestrator", *orchestrator_args(
        text_encoder_canary_address=started.address("te-canary"), text_encoder_canary_weight="20",
        denoiser_canary_address=started.address("den-canary"), denoiser_canary_weight="0",
        denoiser_shadow_percent="100", vae_canary_address=started.address("vae-canary"), vae_canary_weight="100"))
    # C: a text_encoder canary that is down (weight 100), a denoiser canary running another scheduler, shadowed.
    started.start("orch-c", "orchestrator", *orchestrator_args(
        text_encoder_canary_address=f"127.0.0.1:{free_port()}", text_encoder_canary_weight="100",
        denoiser_canary_address=started.address("den-ddim"), denoiser_shadow_percent="100"))
    started.wait("orch-a", "orch-c")
    yield started
    started.stop_all()


def variants(response) -> dict[str, str]:
    return {t.stage: t.variant for t in response.info.timings}


@pytest.fixture(scope="module")
def canary_run(procs):
    """400 requests through orchestrator A, each with its own routing key."""
    with MeshClient(procs.address("orch-a")) as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: client.generate(build_request("a cat", request_key=f"key-{i}", **FAST),
                                                            timeout=60), range(400)))
    return [variants(r) for r in responses]


def test_canary_weight_20_gets_a_binomial_share(canary_run):
    n = len(canary_run)
    canary = sum(v["text_encoder"] == "canary" for v in canary_run)
    tolerance = 4 * math.sqrt(n * 0.2 * 0.8)  # 4 sigma: a false alarm about once in 16,000 runs
    assert abs(canary - 0.2 * n) <= tolerance, canary


def test_weights_0_and_100_are_exact(canary_run):
    assert all(v["denoiser"] == "stable" for v in canary_run)
    assert all(v["vae.decode"] == "canary" for v in canary_run)


def test_a_routing_key_is_sticky(procs):
    with MeshClient(procs.address("orch-a")) as client:
        for key in ("alice", "bob", "carol"):
            seen = {variants(client.generate(build_request("a dog", request_key=key, **FAST), timeout=60))
                    ["text_encoder"] for _ in range(5)}
            assert len(seen) == 1, key


def test_variant_is_a_metric_label(procs, canary_run):
    text = procs.metrics("orch-a")
    canary = metric(text, "diffmesh_stage_calls_total", stage="text_encoder", variant="canary", code="OK")
    stable = metric(text, "diffmesh_stage_calls_total", stage="text_encoder", variant="stable", code="OK")
    assert canary >= sum(v["text_encoder"] == "canary" for v in canary_run) and stable > canary


def test_a_canary_that_is_down_falls_back_to_stable_and_is_counted(procs):
    with MeshClient(procs.address("orch-c")) as client:
        responses = [client.generate(build_request("a bird", request_key=f"k{i}", **FAST), timeout=60)
                     for i in range(3)]
    assert all(variants(r)["text_encoder"] == "stable" for r in responses)
    assert metric(procs.metrics("orch-c"), "diffmesh_stage_fallbacks_total", stage="text_encoder") >= 3


def wait_for_comparisons(procs, name: str, minimum: int) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = procs.metrics(name)
        done = sum(metric(text, "diffmesh_shadow_comparisons_total", stage="denoiser", outcome=o)
                   for o in ("equal", "close", "diverged", "error"))
        if done >= minimum:
            return text
        time.sleep(0.2)
    raise AssertionError("shadow comparisons never arrived")


def test_shadow_of_an_identical_canary_shows_zero_divergence(procs, canary_run):
    text = wait_for_comparisons(procs, "orch-a", 10)
    # Bit for bit, or within batch rounding where the stable denoiser shared a UNet call.
    assert sum(metric(text, "diffmesh_shadow_comparisons_total", stage="denoiser", outcome=o)
               for o in ("equal", "close")) >= 10
    assert metric(text, "diffmesh_shadow_comparisons_total", stage="denoiser", outcome="diverged") == 0
    assert metric(text, "diffmesh_shadow_comparisons_total", stage="denoiser", outcome="error") == 0


def test_shadow_of_a_canary_with_another_scheduler_diverges(procs):
    with MeshClient(procs.address("orch-c")) as client:
        for i in range(3):
            response = client.generate(build_request("a fish", **{**FAST, "steps": 4, "seed": i}), timeout=60)
            assert variants(response)["denoiser"] == "stable"  # the canary's answer is never returned
    text = wait_for_comparisons(procs, "orch-c", 3)
    assert metric(text, "diffmesh_shadow_comparisons_total", stage="denoiser", outcome="diverged") >= 3
    assert metric(text, "diffmesh_shadow_max_abs_diff_count", stage="denoiser") >= 3
    deadline = time.monotonic() + 10
    while '"shadow divergence"' not in procs.log("orch-c") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(r'"msg": "shadow divergence".*"max_abs_diff": [0-9.]+', procs.log("orch-c"))


# --- replicas and failover -------------------------------------------------------------------

@pytest.fixture(scope="module")
def replicas(mesh, procs):
    names = ["den-r1", "den-r2", "den-r3"]
    for name in names:
        procs.start(name, "denoiser", "--models", "tiny-sd15", "--grace-period-s", "30")
    procs.wait(*names)
    procs.start("orch-r", "orchestrator", *orchestrator_args(denoiser_address=",".join(procs.address(n) for n in names)))
    procs.wait("orch-r")
    return names


class Load:
    """Sequential and concurrent requests until stopped: every failure is a lost request."""

    def __init__(self, address: str, concurrent: int = 3) -> None:
        self.responses, self.errors = [], []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(address, i)) for i in range(concurrent + 1)]
        for thread in self._threads:
            thread.start()

    def _worker(self, address: str, i: int) -> None:
        with MeshClient(address) as client:
            while not self._stop.is_set():
                try:
                    response = client.generate(build_request("load", **{**FAST, "steps": 12, "seed": i}), timeout=60)
                    with self._lock:
                        self.responses.append(response)
                except Exception as exc:  # noqa: BLE001 - any failure is a lost request
                    with self._lock:
                        self.errors.append(exc)

    def wait_for(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while len(self.responses) < count and not self.errors:
            assert time.monotonic() < deadline, "the load made no progress"
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


def instances(responses) -> set[str]:
    return {t.instance_id for r in responses for t in r.info.timings if t.stage == "denoiser"}


def test_every_replica_receives_traffic(procs, replicas):
    with MeshClient(procs.address("orch-r")) as client:
        responses = [client.generate(build_request("spread", **FAST), timeout=60) for _ in range(12)]
    assert len(instances(responses)) == 3


def test_sigkill_of_a_replica_under_load_loses_no_request(procs, replicas):
    load = Load(procs.address("orch-r"))
    try:
        load.wait_for(4)
        procs.process("den-r1").kill()
        load.wait_for(len(load.responses) + 12)
    finally:
        load.stop()
    assert load.errors == []


def test_sigterm_of_a_replica_under_load_fails_no_request(procs, replicas):
    load = Load(procs.address("orch-r"))
    victim = procs.process("den-r2")
    try:
        load.wait_for(4)
        victim.send_signal(signal.SIGTERM)
        load.wait_for(len(load.responses) + 12)
    finally:
        load.stop()
    assert victim.wait(30) == 0
    assert load.errors == []


# --- the one retry layer -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def killable(procs):
    names = ["den-k1", "den-k2"]
    for name in names:
        procs.start(name, "denoiser", "--models", "tiny-sd15")
    procs.wait(*names)
    procs.start("orch-k", "orchestrator", *orchestrator_args(denoiser_address=",".join(procs.address(n) for n in names)))
    procs.wait("orch-k")
    return names


def test_a_replica_killed_mid_call_is_retried_once_on_another(procs, killable):
    before = metric(procs.metrics("orch-k"), "diffmesh_stage_retries_total", stage="denoiser")
    request = build_request("retry me", model="tiny-sd15", width=128, height=128, steps=80, guidance_scale=1.0, seed=11)
    steps, images, result, victim = [], [], None, None
    with MeshClient(procs.address("orch-k")) as client:
        for event in client.generate_stream(request, timeout=120):
            if event.HasField("progress"):
                steps.append(event.progress.step)
                if victim is None:  # the replica running this call is the one with a Denoise in flight
                    busy = [n for n in killable if metric(procs.metrics(n), "diffmesh_grpc_in_flight_requests",
                                                          method="/diffmesh.v1.Denoiser/Denoise") >= 1]
                    assert len(busy) == 1, busy
                    victim = busy[0]
                    procs.process(victim).kill()
            elif event.HasField("image"):
                images.append(event.image)
            else:
                result = event.result
    assert victim is not None and result is not None and len(images) == 1 and images[0].last
    survivor = next(n for n in killable if n != victim)
    served = [t for t in result.info.timings if t.stage == "denoiser"]
    assert len(served) == 1 and procs.process(survivor).poll() is None
    # Progress resumed where it left off: every step once, in order, after the retry repeated them.
    assert steps == sorted(set(steps)) and steps[-1] == 80
    assert metric(procs.metrics("orch-k"), "diffmesh_stage_retries_total", stage="denoiser") == before + 1


# --- a stage's rejection, passed on by the orchestrator ------------------------------------------

def test_a_stage_rejection_keeps_its_code_and_names_the_stage_and_field(procs):
    procs.start("den-strict", "denoiser", "--models", "tiny-sd15", "--max-steps", "5")
    procs.wait("den-strict")
    procs.start("orch-s", "orchestrator", *orchestrator_args(denoiser_address=procs.address("den-strict")))
    procs.wait("orch-s")
    with MeshClient(procs.address("orch-s")) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.generate(build_request("too many steps for this denoiser", **{**FAST, "steps": 9}), timeout=60)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # the stage's code, not INTERNAL
    assert error.details().startswith("denoiser: steps:"), error.details()
    (violation,) = field_violations(error)
    assert (violation.stage, violation.field, violation.value) == ("denoiser", "steps", "9")
    assert "[1, 5]" in violation.reason
