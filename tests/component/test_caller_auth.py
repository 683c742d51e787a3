"""Caller admission on a real orchestrator: served in-process on a real port over mTLS with real
certificates (built here with `cryptography`: a CA, the server's, and client certificates with
a subject and SANs), and a callers file with API key hashes, certificate subjects and SANs.

The stages behind it are one fake gRPC server (TLS, client certificates required, like the real
ones) whose safety CheckPrompt blocks the prompt ("BLOCK" decision) once the test lets it go: a
request is then complete without any GPU stage, and holding a prompt holds the request's
orchestrator slot, which is how the queue, the positions and the fairness are driven without
timing. Rate limits are not waited out: the bucket is small enough that no token comes back
during the test.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import REGISTRY

from diffmesh.client import MeshClient, build_request, field_violations, retry_pushback_ms, wait_for_serving
from diffmesh.proto.v1 import safety_pb2
from diffmesh.runtime.config import load_config
from services.orchestrator.callers import hash_key
from services.orchestrator.main import OrchestratorConfig, OrchestratorStage

from tests.component.test_runtime import Running

SEARCH_KEY = "search-backend-key-5f0c1a"   # interactive, tiny-sdxl only
BULK_KEY = "bulk-key-77aa"                 # batch
LIMITED_KEY = "limited-key-0b9e"           # one request per 100 s


# -- certificates -------------------------------------------------------------------------------

def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: x509.Name, issuer: x509.Name, public_key, signing_key, *, ca: bool = False,
                 sans: list[x509.GeneralName] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = (builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


class Pki:
    """A test CA issuing certificates into a folder: NAME.pem and NAME.key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diffmesh-test-ca")])
        cert = _certificate(self.name, self.name, self.key.public_key(), self.key, ca=True)
        self.ca = cert.public_bytes(serialization.Encoding.PEM)
        (folder / "ca.pem").write_bytes(self.ca)

    def issue(self, name: str, attributes: list[tuple], sans: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
        cert = _certificate(subject, self.name, key.public_key(), self.key, sans=sans)
        (self.folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.folder / f"{name}.key").write_bytes(_pem_key(key))

    def credentials(self, name: str | None) -> grpc.ChannelCredentials:
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca)
        return grpc.ssl_channel_credentials(root_certificates=self.ca,
                                            private_key=(self.folder / f"{name}.key").read_bytes(),
                                            certificate_chain=(self.folder / f"{name}.pem").read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    pki.issue("server", [(NameOID.COMMON_NAME, "orchestrator")], loopback)
    # Issued O first then CN (openssl's /O=acme/CN=nightly); grpc reports it as "CN=nightly,O=acme".
    pki.issue("nightly", [(NameOID.ORGANIZATION_NAME, "acme"), (NameOID.COMMON_NAME, "nightly")],
              [x509.DNSName("nightly.acme.internal")])
    pki.issue("worker", [(NameOID.COMMON_NAME, "worker-7")],
              [x509.UniformResourceIdentifier("spiffe://acme/ns/render/sa/worker")])
    pki.issue("intruder", [(NameOID.ORGANIZATION_NAME, "acme"), (NameOID.COMMON_NAME, "intruder")],
              [x509.DNSName("intruder.acme.internal")])
    pki.issue("service", [(NameOID.COMMON_NAME, "search-frontend")], [x509.DNSName("search.acme.internal")])
    return pki


# -- the stages: one fake server ------------------------------------------------------------------

class FakeStages:
    """Serves every backend stage's port over mTLS; only safety's CheckPrompt is implemented: it
    answers BLOCK (the request then completes, no GPU stage), for prompts starting "hold:" only
    once the test releases them. Records each prompt's arrival and its diffmesh-priority."""

    def __init__(self, pki: Pki) -> None:
        self.arrivals: list[tuple[str, str]] = []   # (prompt, diffmesh-priority)
        self._lock = threading.Lock()
        self._released: dict[str, threading.Event] = {}
        self.server = grpc.server(ThreadPoolExecutor(max_workers=32))
        handler = grpc.method_handlers_generic_handler("diffmesh.v1.SafetyService", {
            "CheckPrompt": grpc.unary_unary_rpc_method_handler(
                self._check_prompt, request_deserializer=safety_pb2.CheckPromptRequest.FromString,
                response_serializer=safety_pb2.CheckPromptResponse.SerializeToString)})
        self.server.add_generic_rpc_handlers((handler,))
        credentials = grpc.ssl_server_credentials(
            [((pki.folder / "server.key").read_bytes(), (pki.folder / "server.pem").read_bytes())],
            root_certificates=pki.ca, require_client_auth=True)
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def gate(self, prompt: str) -> threading.Event:
        with self._lock:
            return self._released.setdefault(prompt, threading.Event())

    def release(self, *prompts: str) -> None:
        for prompt in prompts:
            self.gate(prompt).set()

    def prompts(self) -> list[str]:
        with self._lock:
            return [prompt for prompt, _ in self.arrivals]

    def _check_prompt(self, request: safety_pb2.CheckPromptRequest, context) -> safety_pb2.CheckPromptResponse:
        prompt = request.texts[0].text
        priority = dict(context.invocation_metadata()).get("diffmesh-priority", "")
        with self._lock:
            self.arrivals.append((prompt, priority))
        if prompt.startswith("hold:"):
            self.gate(prompt).wait(60)
        decision = safety_pb2.SafetyDecision(outcome=safety_pb2.SAFETY_OUTCOME_BLOCK, category="test",
                                             policy_version="fake-1", field="prompt")
        return safety_pb2.CheckPromptResponse(decision=decision, decisions=[decision], prompt_hash="0" * 64)


@pytest.fixture(scope="module")
def stages(pki):
    fake = FakeStages(pki)
    yield fake
    for event in list(fake._released.values()):
        event.set()
    fake.server.stop(0)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    """A registry of two pipelines with only what the orchestrator reads (family, default size)."""
    root = tmp_path_factory.mktemp("catalog")
    for model_id, pipeline in (("tiny-sd15", "StableDiffusionPipeline"), ("tiny-sdxl", "StableDiffusionXLPipeline")):
        for component, config in (("unet", {"sample_size": 8}), ("vae", {"block_out_channels": [4, 4]})):
            (root / model_id / component).mkdir(parents=True)
            (root / model_id / component / "config.json").write_text(json.dumps(config))
        (root / model_id / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (root / "registry.yaml").write_text("models:\n  tiny-sd15: {path: tiny-sd15}\n  tiny-sdxl: {path: tiny-sdxl}\n")
    return root / "registry.yaml"


CALLERS = f"""
callers:
  - name: search-backend
    api_key_sha256: "{hash_key(SEARCH_KEY)}"
    models: [tiny-sdxl]
  - name: bulk
    api_key_sha256: "{hash_key(BULK_KEY)}"
    priority: batch
  - name: limited
    api_key_sha256: "{hash_key(LIMITED_KEY)}"
    rate: {{per_second: 0.01, burst: 1}}
  - name: nightly-batch
    mtls_subject: "CN=nightly,O=acme"
    priority: batch
  - name: render-worker
    mtls_san: "spiffe://acme/ns/render/sa/worker"
    max_concurrency: 1
"""
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def orchestrator(pki, stages, catalog, tmp_path_factory):
    callers = tmp_path_factory.mktemp("callers") / "callers.yaml"
    callers.write_text(CALLERS)
    target = f"127.0.0.1:{stages.port}"
    config = load_config(OrchestratorConfig, [
        "--registry", str(catalog), "--callers-file", str(callers),
        "--tls-cert-file", str(pki.folder / "server.pem"), "--tls-key-file", str(pki.folder / "server.key"),
        "--tls-ca-file", str(pki.folder / "ca.pem"), "--max-concurrency", "1", "--max-queue", str(MAX_QUEUE),
        *[arg for stage in ("text_encoder", "denoiser", "vae", "safety") for arg in (f"--{stage.replace('_', '-')}-address", target)],
    ], environ={})
    running = Running(OrchestratorStage(config), config)
    try:
        wait_for_serving(running.address, 30, credentials=pki.credentials("worker"))
        yield running
    finally:
        assert running.stop() == 0


def client(pki: Pki, orchestrator, cert: str | None = "service", api_key: str | None = None) -> MeshClient:
    return MeshClient(orchestrator.address, credentials=pki.credentials(cert), api_key=api_key)


def request(prompt: str, model: str = "tiny-sdxl"):
    return build_request(prompt, model=model, width=64, height=64, steps=1, seed=1)


def queue_depth() -> float:
    return REGISTRY.get_sample_value("diffmesh_queue_depth", {"stage": "orchestrator"}) or 0.0


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- identity --------------------------------------------------------------------------------------

def test_a_known_certificate_subject_or_san_is_admitted_and_an_unknown_one_is_unauthenticated(pki, stages, orchestrator):
    with client(pki, orchestrator, "nightly") as nightly:
        reply = nightly.generate(request("by subject"), timeout=30)
        assert reply.info.safety.prompt.outcome == safety_pb2.SAFETY_OUTCOME_BLOCK  # it reached the (fake) stage
    with client(pki, orchestrator, "worker") as worker:
        worker.generate(request("by san"), timeout=30)
    # The caller's priority class reached the stage as metadata.
    assert ("by subject", "batch") in stages.arrivals and ("by san", "interactive") in stages.arrivals

    with client(pki, orchestrator, "intruder") as intruder:
        error = refused(lambda: intruder.generate(request("intruder"), timeout=30))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "CN=intruder,O=acme" in error.details() and "not a known caller" in error.details()
    assert "intruder" not in stages.prompts()  # refused before any stage


def test_api_keys_right_wrong_and_missing(pki, stages, orchestrator):
    with client(pki, orchestrator, api_key=SEARCH_KEY) as right:
        right.generate(request("right key"), timeout=30)
    assert ("right key", "interactive") in stages.arrivals
    for key, expected in ((SEARCH_KEY[:-1] + "x", "unknown API key"), (None, "is not a known caller")):
        with client(pki, orchestrator, api_key=key) as caller:
            error = refused(lambda: caller.generate(request("refused"), timeout=30))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and expected in error.details()
        assert SEARCH_KEY[:-1] not in error.details()
    # A wrong key is refused even with a certificate that would be admitted on its own.
    with client(pki, orchestrator, "worker", api_key="not-a-key") as caller:
        assert refused(lambda: caller.generate(request("refused"), timeout=30)).code() == grpc.StatusCode.UNAUTHENTICATED
    # Through the stream too, before any event.
    with client(pki, orchestrator, api_key="not-a-key") as caller:
        assert refused(lambda: list(caller.generate_stream(request("refused"), timeout=30))).code() == \
            grpc.StatusCode.UNAUTHENTICATED
    assert "refused" not in stages.prompts()


def test_a_model_the_caller_may_not_use_is_permission_denied_naming_the_field(pki, stages, orchestrator):
    with client(pki, orchestrator, api_key=SEARCH_KEY) as caller:
        for model in ("tiny-sd15", ""):  # named, or the default model (the registry's first: tiny-sd15)
            error = refused(lambda: caller.generate(request("other model", model=model), timeout=30))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            (violation,) = field_violations(error)
            assert (violation.field, violation.value) == ("model", "'tiny-sd15'")
            assert "tiny-sdxl" in violation.reason
    assert "other model" not in stages.prompts()


# -- limits -----------------------------------------------------------------------------------------

def test_over_the_rate_limit_is_resource_exhausted_with_a_retry_pushback(pki, stages, orchestrator):
    with client(pki, orchestrator, api_key=LIMITED_KEY) as caller:
        caller.generate(request("first of the burst"), timeout=30)
        error = refused(lambda: caller.generate(request("over the rate"), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in error.details()
    pushback = retry_pushback_ms(error)
    assert pushback is not None and 90_000 <= pushback <= 100_000  # a token every 100 s
    assert dict(error.trailing_metadata())["grpc-retry-pushback-ms"] == str(pushback)
    assert "over the rate" not in stages.prompts()


def test_a_full_queue_and_a_callers_quota_are_resource_exhausted_with_a_pushback(pki, stages, orchestrator):
    held = [f"hold:queue {i}" for i in range(MAX_QUEUE + 1)]
    with client(pki, orchestrator, api_key=BULK_KEY) as bulk, ThreadPoolExecutor(len(held)) as pool:
        try:
            calls = [pool.submit(bulk.generate, request(prompt), timeout=60) for prompt in held]
            wait_for(lambda: sum(p.startswith("hold:queue") for p in stages.prompts()) == 1
                     and queue_depth() == MAX_QUEUE)
            error = refused(lambda: bulk.generate(request("queue full"), timeout=30))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue" in error.details()
            assert retry_pushback_ms(error) > 0
        finally:
            stages.release(*held)
        assert all(call.result().info.safety.prompt.outcome == safety_pb2.SAFETY_OUTCOME_BLOCK for call in calls)
    wait_for(lambda: queue_depth() == 0)
    assert "queue full" not in stages.prompts()

    # render-worker may have one request in the orchestrator (waiting or running): a second is refused.
    with client(pki, orchestrator, api_key=BULK_KEY) as bulk, client(pki, orchestrator, "worker") as worker, \
            ThreadPoolExecutor(2) as pool:
        try:
            holder = pool.submit(bulk.generate, request("hold:slot"), timeout=60)
            wait_for(lambda: "hold:slot" in stages.prompts())
            waiting = pool.submit(worker.generate, request("hold:worker"), timeout=60)
            wait_for(lambda: queue_depth() == 1)
            error = refused(lambda: worker.generate(request("second of the worker"), timeout=30))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrency" in error.details()
            assert retry_pushback_ms(error) > 0
        finally:
            stages.release("hold:slot", "hold:worker")
        holder.result(), waiting.result()


# -- the queue ----------------------------------------------------------------------------------------

def test_a_waiting_stream_gets_its_queue_position_first_and_one_admitted_at_once_none(pki, stages, orchestrator):
    with client(pki, orchestrator, api_key=BULK_KEY) as bulk, client(pki, orchestrator, "nightly") as nightly, \
            ThreadPoolExecutor(2) as pool:
        events = [e.WhichOneof("event") for e in nightly.generate_stream(request("at once"), timeout=30)]
        assert events == ["result"]
        try:
            holder = pool.submit(bulk.generate, request("hold:stream slot"), timeout=60)
            wait_for(lambda: "hold:stream slot" in stages.prompts())
            stream = nightly.generate_stream(request("streamed"), timeout=60)
            first = next(stream)
            assert first.WhichOneof("event") == "queue_position"
            assert (first.queue_position.position, first.queue_position.waiting, first.queue_position.priority) == \
                (1, 1, "batch")
            assert "streamed" not in stages.prompts()
        finally:
            stages.release("hold:stream slot")
        rest = [e.WhichOneof("event") for e in stream]
        assert rest == ["result"] and holder.result()


def test_a_flood_of_batch_requests_does_not_delay_an_interactive_one_it_is_served_next(pki, stages, orchestrator):
    flood = [f"hold:batch {i}" for i in range(MAX_QUEUE - 1)]
    with client(pki, orchestrator, api_key=BULK_KEY) as bulk, client(pki, orchestrator, api_key=SEARCH_KEY) as search, \
            ThreadPoolExecutor(len(flood) + 2) as pool:
        try:
            holder = pool.submit(bulk.generate, request("hold:fair slot"), timeout=60)
            wait_for(lambda: "hold:fair slot" in stages.prompts())
            batch = []
            for prompt in flood:  # one by one: their order in the queue is known
                batch.append(pool.submit(bulk.generate, request(prompt), timeout=60))
                wait_for(lambda: queue_depth() == len(batch))
            interactive = pool.submit(search.generate, request("hold:interactive"), timeout=60)
            wait_for(lambda: queue_depth() == len(flood) + 1)
            before = len(stages.prompts())
            stages.release("hold:fair slot")
            wait_for(lambda: len(stages.prompts()) > before)
            assert stages.prompts()[before] == "hold:interactive"  # ahead of every batch request
            stages.release("hold:interactive")
            interactive.result(timeout=30)
        finally:
            stages.release("hold:fair slot", "hold:interactive", *flood)
        holder.result()
        assert all(call.result(timeout=30) for call in batch)
        assert stages.prompts()[before + 1:before + 1 + len(flood)] == flood  # then batch, in arrival order
