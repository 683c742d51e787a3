"""Per-stage canaries (weights, stickiness, fallback), shadow diffing, and replicas that fail over:
real stage processes beside the session mesh, each told apart by the variant and instance it
reports in the response's timings."""
from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from diffmesh.client import MeshClient, build_request, wait_for_serving
from diffmesh.mesh import free_port

FAST = dict(model="tiny-sd15", width=64, height=64, steps=1, guidance_scale=1.0, seed=3)


class Procs:
    def __init__(self, registry, log_dir):
        self.registry, self.log_dir = registry, log_dir
        self.procs: dict[str, tuple[subprocess.Popen, str, int]] = {}

    def start(self, name: str, stage: str, *args: str, variant: str = "stable") -> str:
        port, metrics_port = free_port(), free_port()
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", f"services.{stage}", "--port", str(port), "--registry",
                                 str(self.registry), "--variant", variant, "--metrics-port", str(metrics_port),
                                 *args], stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = (proc, f"127.0.0.1:{port}", metrics_port)
        return f"127.0.0.1:{port}"

    def address(self, name: str) -> str:
        return self.procs[name][1]

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.procs[name][2]}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def wait(self, *names: str) -> None:
        for name in names:
            wait_for_serving(self.address(name), 120)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, _ in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def orchestrator_args(mesh, **routes: str) -> list[str]:
    args = []
    for stage in ("text_encoder", "denoiser", "vae"):
        args += [f"--{stage.replace('_', '-')}-address", routes.pop(f"{stage}_address", mesh.address(stage))]
    for key, value in routes.items():
        args += ["--" + key.replace("_", "-"), value]
    return args


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


@pytest.fixture(scope="module")
def procs(mesh, registry, tmp_path_factory):
    started = Procs(registry, tmp_path_factory.mktemp("routing"))
    started.start("te-canary", "text_encoder", "--models", "tiny-sd15", variant="canary")
    started.start("den-canary", "denoiser", "--models", "tiny-sd15", variant="canary")
    started.start("den-ddim", "denoiser", "--models", "tiny-sd15", "--scheduler-override", "ddim", variant="canary")
    started.start("vae-canary", "vae", "--models", "tiny-sd15", variant="canary")
    started.wait("te-canary", "den-canary", "den-ddim", "vae-canary")
    # A: text_encoder canary 20 %, denoiser canary 0 % with every stable call shadowed, vae canary 100 %.
    started.start("orch-a", "orchestrator", *orchestrator_args(
        mesh, text_encoder_canary_address=started.address("te-canary"), text_encoder_canary_weight="20",
        denoiser_canary_address=started.address("den-canary"), denoiser_canary_weight="0",
        denoiser_shadow_percent="100", vae_canary_address=started.address("vae-canary"), vae_canary_weight="100"))
    # C: a text_encoder canary that is down (weight 100), a denoiser canary running another scheduler, shadowed.
    started.start("orch-c", "orchestrator", *orchestrator_args(
        mesh, text_encoder_canary_address=f"127.0.0.1:{free_port()}", text_encoder_canary_weight="100",
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
                   for o in ("equal", "diverged", "error"))
        if done >= minimum:
            return text
        time.sleep(0.2)
    raise AssertionError("shadow comparisons never arrived")


def test_shadow_of_an_identical_canary_shows_zero_divergence(procs, canary_run):
    text = wait_for_comparisons(procs, "orch-a", 10)
    assert metric(text, "diffmesh_shadow_comparisons_total", stage="denoiser", outcome="equal") >= 10
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
    procs.start("orch-r", "orchestrator", *orchestrator_args(
        mesh, denoiser_address=",".join(procs.address(n) for n in names)))
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
        procs.procs["den-r1"][0].kill()
        load.wait_for(len(load.responses) + 12)
    finally:
        load.stop()
    assert load.errors == []


def test_sigterm_of_a_replica_under_load_fails_no_request(procs, replicas):
    load = Load(procs.address("orch-r"))
    victim = procs.procs["den-r2"][0]
    try:
        load.wait_for(4)
        victim.send_signal(signal.SIGTERM)
        load.wait_for(len(load.responses) + 12)
    finally:
        load.stop()
    assert victim.wait(30) == 0
    assert load.errors == []
