"""Caller admission without a server: the token bucket, the priority gate (interactive overtakes
batch, batch is not starved, the queue is bounded with a retry hint, positions), the caller
quota, the callers file (strict schema, identification, hot reload keeping the old configuration
when the new file is broken), and the client and CLI pieces. Every clock is injected: nothing
sleeps."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import pytest

from diffmesh import errors
from diffmesh.runtime.admission import BATCH, INTERACTIVE, ConcurrencyQuota, PriorityGate, TokenBucket, seconds_to_ms
from services.orchestrator.callers import (ANONYMOUS, CallerAdmission, CallerRegistry, CallersFileError, Credentials,
                                           credentials_of, hash_key, load_callers_text, parse_subject)

KEY = "k-search-backend-0123456789"
OTHER_KEY = "k-reporting-9876543210"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro):
    return asyncio.run(coro)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- token bucket -----------------------------------------------------------------------------

def test_token_bucket_spends_its_burst_then_refills_at_its_rate():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=4, clock=clock)
    assert [bucket.take() for _ in range(4)] == [0.0] * 4
    assert bucket.take() == pytest.approx(0.5)        # one token every 0.5 s
    clock.advance(0.25)
    assert bucket.take() == pytest.approx(0.25)       # refused requests take nothing
    clock.advance(0.25)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)
    clock.advance(100)                                # never more than the burst saved up
    assert bucket.tokens == pytest.approx(4)


def test_token_bucket_reconfigured_keeps_tokens_up_to_the_new_burst():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=10, clock=clock)
    bucket.reconfigure(rate=1.0, burst=2)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_retry_hints_round_up_to_whole_milliseconds():
    assert seconds_to_ms(0.0001) == 1 and seconds_to_ms(0.25) == 250 and seconds_to_ms(0) == 0


# -- the priority gate ----------------------------------------------------------------------------

def test_an_interactive_request_overtakes_every_waiting_batch_request():
    async def scenario():
        gate = PriorityGate("orchestrator", capacity=1, max_waiting=16, clock=Clock())
        running = gate.enter(BATCH, "nightly")
        assert running.granted and not running.had_to_wait
        flood = [gate.enter(BATCH, "nightly") for _ in range(8)]
        interactive = gate.enter(INTERACTIVE, "search")
        assert interactive.had_to_wait and interactive.position == 1
        assert [t.position for t in flood] == list(range(2, 10))
        running.release()
        assert interactive.granted and not any(t.granted for t in flood)
        interactive.release()
        assert flood[0].granted                       # then batch, in arrival order
        for ticket in flood:
            ticket.release()
    run(scenario())


def test_batch_is_not_starved_one_grant_in_batch_every_plus_one_goes_to_batch():
    async def scenario():
        gate = PriorityGate("orchestrator", capacity=1, max_waiting=32, batch_every=2, clock=Clock())
        running = gate.enter(INTERACTIVE, "a")
        waiting = [gate.enter(BATCH, f"b{i}") for i in range(2)] + [gate.enter(INTERACTIVE, f"i{i}") for i in range(5)]
        predicted = [t.caller for t in gate.order()]
        assert predicted == ["i0", "i1", "b0", "i2", "i3", "b1", "i4"]
        assert [t.position for t in waiting] == [3, 6, 1, 2, 4, 5, 7]
        served = []
        current = running
        for _ in waiting:
            current.release()
            (current,) = [t for t in waiting if t.granted and not t.released]
            served.append(current.caller)
        assert served == predicted
        current.release()
        assert gate.running == 0 and gate.waiting == 0
    run(scenario())


def test_without_interactive_waiters_batch_runs_at_full_capacity():
    async def scenario():
        gate = PriorityGate("orchestrator", capacity=3, max_waiting=0, clock=Clock())
        tickets = [gate.enter(BATCH) for _ in range(3)]
        assert all(t.granted for t in tickets)
        with pytest.raises(errors.ResourceExhausted):
            gate.enter(INTERACTIVE)  # no queue at all: full is full, whatever the class
    run(scenario())


def test_a_full_queue_refuses_with_resource_exhausted_and_a_retry_hint_from_observed_hold_times():
    async def scenario():
        clock = Clock()
        gate = PriorityGate("orchestrator", capacity=1, max_waiting=2, clock=clock)
        first = gate.enter(INTERACTIVE)
        queued = [gate.enter(BATCH), gate.enter(INTERACTIVE)]
        with pytest.raises(errors.ResourceExhausted) as info:
            gate.enter(INTERACTIVE)
        assert "max_queue" in str(info.value) and info.value.retry_after_ms == 1000  # nothing finished yet: 1 s
        clock.advance(3.0)
        first.release()                                   # one slot held 3 s
        (running,) = [t for t in queued if t.granted]
        third = gate.enter(BATCH)
        with pytest.raises(errors.ResourceExhausted) as info:
            gate.enter(BATCH)
        # 2 waiting + this one, one slot, 3 s each
        assert info.value.retry_after_ms == 9000
        for ticket in (running, *queued, third):
            ticket.release()
    run(scenario())


def test_positions_are_reported_as_they_change_until_the_slot_is_granted():
    async def scenario():
        gate = PriorityGate("orchestrator", capacity=1, max_waiting=8, clock=Clock())
        running = gate.enter(INTERACTIVE)
        batch = gate.enter(BATCH, "nightly")
        seen = []

        async def watch():
            async for place in batch.positions():
                seen.append((place.position, place.waiting, place.priority))

        watcher = asyncio.ensure_future(watch())
        await settle()
        overtaking = gate.enter(INTERACTIVE)     # batch moves back to 2
        await settle()
        running.release()                        # the interactive one runs: batch is next
        await settle()
        overtaking.release()                     # batch runs: the stream ends
        await asyncio.wait_for(watcher, 1)
        assert seen == [(1, 1, BATCH), (2, 2, BATCH), (1, 1, BATCH)]
        assert batch.granted and batch.position == 0
        batch.release()
    run(scenario())


def test_a_waiter_that_goes_away_leaves_the_queue_and_the_others_move_up():
    async def scenario():
        gate = PriorityGate("orchestrator", capacity=1, max_waiting=8, clock=Clock())
        running = gate.enter(INTERACTIVE)
        leaving, staying = gate.enter(INTERACTIVE), gate.enter(INTERACTIVE)
        task = asyncio.ensure_future(leaving.wait())
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.waiting == 1 and staying.position == 1
        running.release()
        assert staying.granted and not leaving.granted
        staying.release()
        leaving.release()                        # idempotent, frees nothing
        assert gate.running == 0
    run(scenario())


def test_slot_context_manager_releases_on_error_and_reports_queue_depth_and_waits():
    depths, waits = [], []

    async def scenario():
        clock = Clock()
        gate = PriorityGate("orchestrator", capacity=1, max_waiting=4, clock=clock,
                            on_depth=depths.append, on_grant=lambda p, s: waits.append((p, s)))
        with pytest.raises(RuntimeError):
            async with gate.slot(INTERACTIVE):
                raise RuntimeError("boom")
        holder = gate.enter(INTERACTIVE)
        waiter = gate.enter(BATCH)
        clock.advance(2.0)
        holder.release()
        waiter.release()
        assert gate.running == 0
    run(scenario())
    assert depths[0] == {INTERACTIVE: 0, BATCH: 1} and depths[-1] == {INTERACTIVE: 0, BATCH: 0}
    assert waits == [(INTERACTIVE, 0.0), (INTERACTIVE, 0.0), (BATCH, 2.0)]


def test_concurrency_quota_counts_per_caller():
    quota = ConcurrencyQuota()
    assert quota.acquire("a", 2) and quota.acquire("a", 2) and not quota.acquire("a", 2)
    assert quota.acquire("b", 2) and quota.acquire("c", None)
    quota.release("a")
    assert quota.held("a") == 1 and quota.acquire("a", 2)


# -- the callers file -----------------------------------------------------------------------------

GOOD = f"""
callers:
  - name: search-backend
    api_key_sha256: "{hash_key(KEY)}"
    models: [tiny-sdxl]
    rate: {{per_second: 2, burst: 4}}
    max_concurrency: 2
    priority: interactive
  - name: nightly-batch
    mtls_subject: "CN=nightly,O=acme"
    priority: batch
  - name: spiffe-worker
    mtls_san: ["spiffe://acme/worker", "worker.acme.internal"]
    models: ["*"]
"""


def test_a_good_callers_file_parses_into_policies():
    config = load_callers_text(GOOD)
    search, nightly, worker = config.callers
    assert (search.name, search.models, search.rate.per_second, search.rate.burst, search.max_concurrency) == \
        ("search-backend", frozenset({"tiny-sdxl"}), 2.0, 4.0, 2)
    assert nightly.priority == BATCH and nightly.models is None and nightly.rate is None
    assert worker.models is None and worker.mtls_sans == ("spiffe://acme/worker", "worker.acme.internal")
    assert config.anonymous is None and not config.open
    assert load_callers_text("callers:\n  - {name: x, api_key_sha256: '%s', rate: {per_second: 0.5}}\n"
                             % hash_key("x")).callers[0].rate.burst == 1


@pytest.mark.parametrize("text, where", [
    ("", "empty"),
    ("- a\n", "expected a mapping"),
    ("callerz: []\n", "callerz: unknown key"),
    ("anonymous: {}\n", "callers: required"),
    ("callers: [{api_key_sha256: '%s'}]\n" % ("a" * 64), "callers[0].name: required"),
    ("callers: [{name: 'bad name', api_key_sha256: '%s'}]\n" % ("a" * 64), "callers[0].name"),
    ("callers: [{name: anonymous, api_key_sha256: '%s'}]\n" % ("a" * 64), "is reserved"),
    ("callers: [{name: a}]\n", "callers[0]: caller 'a' has no credential"),
    ("callers: [{name: a, api_key_sha256: xyz}]\n", "callers[0].api_key_sha256: must be a SHA-256"),
    ("callers: [{name: a, api_key: '%s'}]\n" % ("a" * 64), "callers[0].api_key: unknown key"),
    ("callers: [{name: a, api_key_sha256: '%s', rate: {per_second: -1}}]\n" % ("a" * 64),
     "callers[0].rate.per_second: must be a number > 0"),
    ("callers: [{name: a, api_key_sha256: '%s', rate: {burst: 3}}]\n" % ("a" * 64), "callers[0].rate.per_second"),
    ("callers: [{name: a, api_key_sha256: '%s', rate: {per_second: 1, brust: 3}}]\n" % ("a" * 64),
     "callers[0].rate.brust: unknown key"),
    ("callers: [{name: a, api_key_sha256: '%s', max_concurrency: 0}]\n" % ("a" * 64), "callers[0].max_concurrency"),
    ("callers: [{name: a, api_key_sha256: '%s', max_concurrency: true}]\n" % ("a" * 64), "callers[0].max_concurrency"),
    ("callers: [{name: a, api_key_sha256: '%s', priority: urgent}]\n" % ("a" * 64), "callers[0].priority"),
    ("callers: [{name: a, api_key_sha256: '%s', models: []}]\n" % ("a" * 64), "callers[0].models"),
    ("callers: [{name: a, api_key_sha256: '%s', models: ['*', x]}]\n" % ("a" * 64), "must be alone"),
    ("callers: [{name: a, mtls_subject: 'not a dn'}]\n", "callers[0].mtls_subject: not an RFC 4514"),
    ("callers: [{name: a, api_key_sha256: '%s'}, {name: a, api_key_sha256: '%s'}]\n" % ("a" * 64, "b" * 64),
     "callers[1].name: 'a' is already the name of callers[0]"),
    ("callers: [{name: a, api_key_sha256: '%s'}, {name: b, api_key_sha256: '%s'}]\n" % ("a" * 64, "A" * 64),
     "callers[1].api_key_sha256: 'b' has the same credential as 'a'"),
    ("callers: [{name: a, mtls_subject: 'CN=x,O=y'}, {name: b, mtls_subject: 'O=y,CN=x'}]\n",
     "callers[1].mtls_subject"),
    ("callers: [{name: a, api_key_sha256: '%s'}]\nanonymous: {name: x}\n" % ("a" * 64), "anonymous.name: unknown key"),
    ("callers: [\n", "not valid YAML (line"),
])
def test_a_bad_callers_file_is_refused_naming_the_key(text, where):
    with pytest.raises(CallersFileError) as info:
        load_callers_text(text, "callers.yaml")
    assert where in str(info.value) and str(info.value).startswith("callers file callers.yaml: ")


def test_an_error_never_repeats_what_was_given_as_a_key_hash():
    with pytest.raises(CallersFileError) as info:
        load_callers_text(f"callers: [{{name: a, api_key_sha256: '{KEY}'}}]\n")
    assert KEY not in str(info.value) and f"got {len(KEY)} characters" in str(info.value)
    with pytest.raises(CallersFileError) as info:
        load_callers_text(f"callers: [{{name: a, api_key_sha256: '{KEY}'\n")  # broken YAML around a key
    assert KEY not in str(info.value)


def test_certificate_only_callers_need_a_server_that_asks_for_certificates():
    with pytest.raises(CallersFileError, match="callers\\[1\\]: 'nightly-batch' is identified by a client certificate"):
        load_callers_text(GOOD, require_client_certificates=False)


# -- identification -----------------------------------------------------------------------------

def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_identification_by_api_key_subject_in_any_order_and_san():
    config = load_callers_text(GOOD)
    assert config.identify(credentials_of(bearer(KEY), None)).name == "search-backend"
    assert config.identify(credentials_of([("authorization", f"bearer  {KEY} ")], None)).name == "search-backend"
    # grpc reports the subject as RFC 2253 (last RDN first, escapes): the attributes decide, not the order
    subject = {"x509_subject": [b"O=acme,CN=nightly"]}
    assert config.identify(credentials_of([], subject)).name == "nightly-batch"
    assert parse_subject("CN=a\\, b,O=acme") == parse_subject("O=acme,CN=a\\, b")
    san = {"x509_subject": [b"CN=worker"], "x509_subject_alternative_name": [b"10.0.0.1", b"spiffe://acme/worker"]}
    assert config.identify(credentials_of([], san)).name == "spiffe-worker"


@pytest.mark.parametrize("metadata, auth, message", [
    (bearer(OTHER_KEY), None, "unknown API key"),
    ([("authorization", f"Basic {KEY}")], None, "expected 'Bearer <key>'"),
    ([("authorization", "Bearer ")], None, "expected 'Bearer <key>'"),
    (bearer(KEY) * 2, None, "sent more than once"),
    ([], None, "no credentials"),
    ([], {"x509_subject": [b"CN=intruder,O=acme"]}, "client certificate (subject 'CN=intruder,O=acme') is not a known"),
])
def test_unknown_or_malformed_credentials_are_unauthenticated_without_echoing_a_key(metadata, auth, message):
    with pytest.raises(errors.Unauthenticated) as info:
        load_callers_text(GOOD).identify(credentials_of(metadata, auth))
    assert message in str(info.value) and KEY not in str(info.value) and OTHER_KEY not in str(info.value)


def test_a_key_decides_even_when_the_certificate_would_match():
    auth = {"x509_subject": [b"CN=nightly,O=acme"]}
    with pytest.raises(errors.Unauthenticated):
        load_callers_text(GOOD).identify(credentials_of(bearer(OTHER_KEY), auth))


def test_anonymous_callers_get_the_anonymous_policy_and_no_file_means_open():
    config = load_callers_text(GOOD + "anonymous: {priority: batch, models: [tiny-sd15]}\n")
    anonymous = config.identify(Credentials())
    assert (anonymous.name, anonymous.priority, anonymous.models) == (ANONYMOUS, BATCH, frozenset({"tiny-sd15"}))
    open_registry = CallerRegistry(None)
    caller = open_registry.current().identify(credentials_of(bearer("anything"), None))
    assert (caller.name, caller.priority, caller.models, caller.rate, caller.max_concurrency) == \
        (ANONYMOUS, INTERACTIVE, None, None, None)


# -- admission: model, rate, quota -------------------------------------------------------------

def admission(tmp_path: Path, text: str = GOOD, clock: Clock | None = None, capacity: int = 4,
              max_waiting: int = 4) -> CallerAdmission:
    clock = clock or Clock()
    path = tmp_path / "callers.yaml"
    path.write_text(text)
    registry = CallerRegistry(path, clock=clock, check_interval_s=1.0)
    return CallerAdmission(registry, PriorityGate("orchestrator", capacity, max_waiting, clock=clock), clock)


def test_a_model_the_caller_may_not_use_is_permission_denied_naming_the_field(tmp_path):
    gate = admission(tmp_path)
    with pytest.raises(errors.PermissionDenied) as info:
        gate.check(credentials_of(bearer(KEY), None), "tiny-sd15")
    (violation,) = info.value.violations
    assert (violation.field, violation.value) == ("model", "'tiny-sd15'") and "tiny-sdxl" in violation.reason
    assert gate.check(credentials_of(bearer(KEY), None), "tiny-sdxl").name == "search-backend"


def test_the_rate_limit_refuses_with_the_time_until_the_next_token(tmp_path):
    clock = Clock()
    gate = admission(tmp_path, clock=clock)
    credentials = credentials_of(bearer(KEY), None)
    for _ in range(4):  # the burst
        gate.check(credentials, "tiny-sdxl")
    with pytest.raises(errors.ResourceExhausted) as info:
        gate.check(credentials, "tiny-sdxl")
    assert info.value.retry_after_ms == 500 and "rate limit (2/s, burst 4)" in str(info.value)
    clock.advance(0.2)
    with pytest.raises(errors.ResourceExhausted) as info:
        gate.check(credentials, "tiny-sdxl")
    assert info.value.retry_after_ms == 300
    clock.advance(0.3)
    gate.check(credentials, "tiny-sdxl")
    # Another caller has its own bucket (none at all here).
    for _ in range(10):
        gate.check(credentials_of([], {"x509_subject": [b"CN=nightly,O=acme"]}), "tiny-sdxl")


def test_the_caller_quota_counts_waiting_and_running_requests(tmp_path):
    async def scenario():
        gate = admission(tmp_path, capacity=1)
        admitted = gate.check(credentials_of(bearer(KEY), None), "tiny-sdxl")
        async with gate.enter(admitted) as first, gate.enter(admitted) as second:
            assert first.granted and not second.granted
            with pytest.raises(errors.ResourceExhausted) as info:
                async with gate.enter(admitted):
                    pass
            assert "max_concurrency" in str(info.value) and info.value.retry_after_ms > 0
            other = gate.check(credentials_of([], {"x509_subject": [b"CN=nightly,O=acme"]}), None)
            async with gate.enter(other) as third:   # another caller is not limited by it
                assert not third.granted
        async with gate.enter(admitted) as again:    # given back
            assert again.granted
    run(scenario())


# -- hot reload ---------------------------------------------------------------------------------

def touch_later(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a new mtime even on coarse file systems


def test_the_callers_file_is_reloaded_when_it_changes_and_a_broken_one_keeps_the_old(tmp_path, caplog):
    clock = Clock()
    path = tmp_path / "callers.yaml"
    path.write_text(GOOD)
    registry = CallerRegistry(path, clock=clock, check_interval_s=2.0)
    gate = CallerAdmission(registry, PriorityGate("orchestrator", 4, 4, clock=clock), clock)
    other = credentials_of(bearer(OTHER_KEY), None)
    with pytest.raises(errors.Unauthenticated):
        gate.check(other, "tiny-sdxl")

    added = GOOD + f"""  - name: reporting
    api_key_sha256: "{hash_key(OTHER_KEY)}"
    priority: batch
"""
    touch_later(path, added)
    clock.advance(1.0)  # within the check interval: not looked at yet
    with pytest.raises(errors.Unauthenticated):
        gate.check(other, "tiny-sdxl")
    clock.advance(1.0)
    assert gate.check(other, "tiny-sdxl").name == "reporting"

    caplog.set_level(logging.INFO, logger="diffmesh.orchestrator")
    broken = added[:added.rindex("priority: batch")] + "priority: bulk\n"
    touch_later(path, broken + f"# {KEY}\n")
    clock.advance(2.0)
    assert gate.check(other, "tiny-sdxl").priority == BATCH  # the old configuration is kept
    failures = [r for r in caplog.records if r.getMessage().startswith("callers file not reloaded")]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    logged = json.dumps([r.__dict__.get("fields") for r in caplog.records])
    assert "callers[3].priority" in logged and KEY not in logged and OTHER_KEY not in logged
    clock.advance(2.0)
    gate.check(other, "tiny-sdxl")
    assert len([r for r in caplog.records if r.getMessage().startswith("callers file not reloaded")]) == 1  # once

    path.unlink()  # gone: kept as well
    clock.advance(2.0)
    assert gate.check(other, "tiny-sdxl").name == "reporting"

    path.write_text(GOOD)  # fixed (the new caller removed again)
    clock.advance(2.0)
    with pytest.raises(errors.Unauthenticated):
        gate.check(other, "tiny-sdxl")


def test_a_reload_keeps_the_callers_rate_bucket(tmp_path):
    clock = Clock()
    gate = admission(tmp_path, clock=clock)
    credentials = credentials_of(bearer(KEY), None)
    for _ in range(4):
        gate.check(credentials, "tiny-sdxl")
    touch_later(tmp_path / "callers.yaml", GOOD.replace("max_concurrency: 2", "max_concurrency: 3"))
    clock.advance(1.0)   # reloaded now; 2 tokens refilled, not a fresh burst of 4
    gate.check(credentials, "tiny-sdxl")
    gate.check(credentials, "tiny-sdxl")
    with pytest.raises(errors.ResourceExhausted):
        gate.check(credentials, "tiny-sdxl")
    assert gate.registry.config.callers[0].max_concurrency == 3


def test_a_broken_file_at_start_up_is_an_error(tmp_path):
    path = tmp_path / "callers.yaml"
    path.write_text("callers: [{name: a}]\n")
    with pytest.raises(CallersFileError, match="has no credential"):
        CallerRegistry(path)
    with pytest.raises(CallersFileError, match="cannot read"):
        CallerRegistry(tmp_path / "missing.yaml")


def test_orchestrator_settings_check_the_callers_file(tmp_path):
    from diffmesh.runtime.config import ConfigError, load_config
    from services.orchestrator.main import OrchestratorConfig

    path = tmp_path / "callers.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match="callers_file: .*identified by a client certificate"):
        load_config(OrchestratorConfig, ["--callers-file", str(path)], environ={})  # no tls_ca_file
    path.write_text(f"callers: [{{name: a, api_key_sha256: '{hash_key(KEY)}'}}]\n")
    config = load_config(OrchestratorConfig, ["--callers-file", str(path), "--batch-every", "2"], environ={})
    assert (config.callers_file, config.batch_every, config.callers_reload_s) == (str(path), 2, 2.0)


# -- client and CLI -----------------------------------------------------------------------------

def test_the_client_sends_the_key_as_bearer_metadata_and_reads_the_pushback():
    from diffmesh.client import MeshClient, retry_pushback_ms

    with MeshClient("127.0.0.1:1", api_key=KEY) as client:
        assert client._metadata == (("authorization", f"Bearer {KEY}"),)
    with MeshClient("127.0.0.1:1", api_key="") as client:
        assert client._metadata == ()
    with pytest.raises(ValueError):
        MeshClient("127.0.0.1:1", api_key="a\nb")

    class Refused:
        def trailing_metadata(self):
            return (("grpc-status-details-bin", b"x"), ("grpc-retry-pushback-ms", "750"))
    assert retry_pushback_ms(Refused()) == 750


def test_collect_stream_hands_queue_positions_to_on_queue():
    from diffmesh.client import collect_stream
    from diffmesh.proto.v1 import orchestrator_pb2

    events = [orchestrator_pb2.GenerateEvent(queue_position=orchestrator_pb2.QueuePosition(
                  position=2, waiting=3, priority="batch")),
              orchestrator_pb2.GenerateEvent(progress=orchestrator_pb2.StepProgress(step=1, total_steps=1)),
              orchestrator_pb2.GenerateEvent(result=orchestrator_pb2.GenerateResponse())]
    places, steps = [], []
    collect_stream(events, steps.append, places.append)
    assert [(p.position, p.waiting, p.priority) for p in places] == [(2, 3, "batch")] and len(steps) == 1


def test_the_cli_renders_the_queue_position():
    from diffmesh.cli.render import QueueStatus, format_queue_position
    from diffmesh.proto.v1 import orchestrator_pb2

    place = orchestrator_pb2.QueuePosition(position=3, waiting=5, priority="batch")
    assert format_queue_position(place) == "queued (batch): position 3 of 5, 2 requests ahead"
    out = io.StringIO()
    status = QueueStatus(out)
    status.update(place)
    status.update(orchestrator_pb2.QueuePosition(position=1, waiting=1, priority="interactive"))
    status.close()
    assert out.getvalue().splitlines() == ["queued (batch): position 3 of 5, 2 requests ahead",
                                           "queued (interactive): position 1 of 1, next"]


def test_cli_hash_key_and_check(tmp_path, monkeypatch, capsys):
    from diffmesh.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO(KEY + "\n"))
    assert main(["callers", "hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(KEY.encode()).hexdigest() == hash_key(KEY)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["callers", "hash-key"]) == 2

    path = tmp_path / "callers.yaml"
    path.write_text(GOOD)
    assert main(["callers", "check", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["name"] for line in lines] == ["search-backend", "nightly-batch", "spiffe-worker", "anonymous"]
    assert lines[0]["api_keys"] == 1 and hash_key(KEY) not in out
    assert main(["callers", "check", "--no-mtls", str(path)]) == 2
    assert "identified by a client certificate" in capsys.readouterr().err

    assert main(["callers", "new-key"]) == 0
    captured = capsys.readouterr()
    assert hash_key(captured.out.strip()) in captured.err
