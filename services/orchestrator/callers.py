"""Caller admission in the orchestrator, before any stage works: who is calling, may it use this
model, is it within its rate and its concurrency quota, and its place in the priority queue.

    identify (UNAUTHENTICATED) -> model allowed (PERMISSION_DENIED, field `model`)
      -> rate limit (RESOURCE_EXHAUSTED + grpc-retry-pushback-ms)
      -> caller concurrency quota (RESOURCE_EXHAUSTED + pushback)
      -> priority queue (RESOURCE_EXHAUSTED + pushback when full) -> run

Callers are named in a YAML callers file (`callers_file`; docs/admission.md is the operator's
reference):

    callers:
      - name: search-backend
        api_key_sha256: "<64 hex>"        # or a list (key rotation); only hashes are stored
        models: [tiny-sdxl]               # absent or ["*"]: every model
        rate: {per_second: 2, burst: 4}   # token bucket; absent: no rate limit
        max_concurrency: 4                # requests in the orchestrator at once (waiting or running)
        priority: interactive             # or batch
      - name: nightly-batch
        mtls_subject: "CN=nightly,O=acme" # RFC 4514; or mtls_san: "spiffe://..." / a DNS name
        priority: batch
    anonymous: {priority: batch, rate: {per_second: 1}}   # optional: callers without credentials

A caller is identified by an API key (`authorization: Bearer <key>` metadata, compared by its
SHA-256 with hmac.compare_digest) or by its verified mTLS client certificate: the subject (the
same attributes and values, in any order) or any subject alternative name. A key, when sent,
decides: a wrong key is UNAUTHENTICATED even if the certificate would match. Without a callers
file everything is open: every caller is "anonymous", interactive, without limits.

Hot reload: the file is looked at, on a request, at most every `check_interval_s`; a new mtime,
size or inode with new content is parsed and replaces the configuration; a file that does not
parse, or has gone, keeps the configuration in force and logs an error (never a key). Rate
buckets and quota counts belong to the caller's name, so they survive a reload.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence

import yaml
from cryptography import x509

from diffmesh import errors
from diffmesh.runtime import metrics
from diffmesh.runtime.admission import (BATCH, INTERACTIVE, PRIORITIES, ConcurrencyQuota, PriorityGate, Ticket,
                                        TokenBucket, seconds_to_ms)
from diffmesh.runtime.logs import log_event

log = logging.getLogger("diffmesh.orchestrator")

ANONYMOUS = "anonymous"            # the name of the caller without credentials
UNAUTHENTICATED = "unauthenticated"  # the caller label of requests nobody could be identified for
RESERVED_NAMES = (ANONYMOUS, UNAUTHENTICATED)
ALL_MODELS = "*"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_POLICY_KEYS = ("models", "rate", "max_concurrency", "priority")
_CREDENTIAL_KEYS = ("api_key_sha256", "mtls_subject", "mtls_san")
_CALLER_KEYS = ("name", *_CREDENTIAL_KEYS, *_POLICY_KEYS)
_TOP_KEYS = ("callers", "anonymous")
# Admission outcomes (the `outcome` label of diffmesh_caller_requests).
OUTCOMES = ("admitted", "unauthenticated", "permission_denied", "rate_limited", "over_quota", "queue_full")

Subject = tuple[tuple[str, str], ...]  # (attribute OID, value) pairs, sorted


class CallersFileError(ValueError):
    """The callers file is not valid; the message names the file and the key."""


def hash_key(key: str) -> str:
    """What the callers file stores for an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_subject(text: str) -> Subject:
    """An X.509 distinguished name (RFC 4514: "CN=nightly,O=acme") as comparable pairs: the same
    attributes and values match whatever their order (RFC 4514 writes the last RDN first,
    openssl's "/O=acme/CN=nightly" the first), escaping undone. ValueError if it is not a DN."""
    name = x509.Name.from_rfc4514_string(text)
    pairs = tuple(sorted((attribute.oid.dotted_string, str(attribute.value)) for attribute in name))
    if not pairs:
        raise ValueError("empty distinguished name")
    return pairs


@dataclass(frozen=True)
class RateLimit:
    per_second: float
    burst: float

    def describe(self) -> str:
        return f"{self.per_second:g}/s, burst {self.burst:g}"


@dataclass(frozen=True)
class CallerPolicy:
    """One caller of the callers file (or the anonymous one): what identifies it and its limits."""

    name: str
    priority: str = INTERACTIVE
    models: frozenset[str] | None = None     # None: every model
    rate: RateLimit | None = None
    max_concurrency: int | None = None
    api_key_hashes: tuple[bytes, ...] = ()   # SHA-256 digests
    mtls_subjects: tuple[Subject, ...] = ()
    mtls_sans: tuple[str, ...] = ()

    def allows(self, model_id: str | None) -> bool:
        return self.models is None or model_id is None or model_id in self.models

    def summary(self) -> dict[str, Any]:
        """For logs and `diffmesh callers check`: everything but the credentials' values."""
        return {"name": self.name, "priority": self.priority,
                "models": sorted(self.models) if self.models is not None else [ALL_MODELS],
                "rate": self.rate.describe() if self.rate else "unlimited",
                "max_concurrency": self.max_concurrency or "unlimited",
                "api_keys": len(self.api_key_hashes), "mtls_subjects": len(self.mtls_subjects),
                "mtls_sans": len(self.mtls_sans)}


OPEN_CALLER = CallerPolicy(ANONYMOUS)


@dataclass(frozen=True)
class CallersConfig:
    callers: tuple[CallerPolicy, ...] = ()
    anonymous: CallerPolicy | None = OPEN_CALLER
    open: bool = True        # no callers file: credentials are not looked at
    source: str = ""
    digest: str = ""         # of the file's content

    def names(self) -> list[str]:
        return [caller.name for caller in self.callers] + ([self.anonymous.name] if self.anonymous else [])

    def uses_client_certificates(self) -> bool:
        return any(caller.mtls_subjects or caller.mtls_sans for caller in self.callers)

    def identify(self, credentials: "Credentials") -> CallerPolicy:
        """The caller these credentials belong to; Unauthenticated when none (the message never
        repeats a key)."""
        if self.open:
            return self.anonymous or OPEN_CALLER
        if credentials.bad_authorization:
            raise errors.Unauthenticated(f"authorization metadata: {credentials.bad_authorization}")
        if credentials.api_key is not None:
            digest = hashlib.sha256(credentials.api_key.encode("utf-8")).digest()
            found = None
            for caller in self.callers:  # every hash compared, in constant time each
                for known in caller.api_key_hashes:
                    if hmac.compare_digest(known, digest) and found is None:
                        found = caller
            if found is None:
                raise errors.Unauthenticated("unknown API key (authorization: Bearer <key>); ask the operator for "
                                             "a key listed in the orchestrator's callers file")
            return found
        if credentials.subject is not None:  # the subject first, then the SANs (in the file's order)
            for caller in self.callers:
                if credentials.subject in caller.mtls_subjects:
                    return caller
        for caller in self.callers:
            if any(san in caller.mtls_sans for san in credentials.sans):
                return caller
        if self.anonymous is not None:
            return self.anonymous
        if credentials.subject is not None or credentials.sans:
            raise errors.Unauthenticated(f"client certificate {credentials.describe_certificate()} is not a known "
                                         f"caller (not in the orchestrator's callers file)")
        raise errors.Unauthenticated("no credentials: send an API key (authorization: Bearer <key>) or a client "
                                     "certificate the orchestrator's callers file names")


OPEN = CallersConfig()


@dataclass(frozen=True)
class Credentials:
    """What a call presents: the API key of its authorization metadata, and its verified client
    certificate's subject and subject alternative names."""

    api_key: str | None = None
    subject: Subject | None = None
    subject_text: str = ""
    sans: tuple[str, ...] = ()
    bad_authorization: str = ""  # why the authorization metadata is not "Bearer <key>"

    def describe_certificate(self) -> str:
        parts = [f"subject {self.subject_text!r}"] if self.subject_text else []
        if self.sans:
            parts.append("SAN " + ", ".join(self.sans))
        return "(" + "; ".join(parts) + ")" if parts else "(no subject)"


def _first(values: Sequence[bytes] | None) -> str:
    return values[0].decode("utf-8", "replace") if values else ""


def credentials_of(metadata: Iterable[tuple[str, Any]] | None, auth: Mapping[str, Sequence[bytes]] | None) -> Credentials:
    """Credentials from a call's invocation metadata and grpc's auth context (x509_subject,
    x509_subject_alternative_name: present only for a client certificate the server verified)."""
    keys = [value for key, value in metadata or () if key.lower() == "authorization"]
    api_key, bad = None, ""
    if len(keys) > 1:
        bad = "sent more than once"
    elif keys:
        value = keys[0].decode("latin-1") if isinstance(keys[0], bytes) else str(keys[0])
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            bad = "expected 'Bearer <key>'"
        else:
            api_key = token.strip()
    auth = auth or {}
    subject_text = _first(auth.get("x509_subject"))
    subject = None
    if subject_text:
        try:
            subject = parse_subject(subject_text)
        except ValueError:
            subject = None
    sans = tuple(value.decode("utf-8", "replace") for value in auth.get("x509_subject_alternative_name", ()))
    return Credentials(api_key=api_key, subject=subject, subject_text=subject_text, sans=sans, bad_authorization=bad)


def credentials_from_context(context: Any) -> Credentials:
    """Credentials of a grpc.aio call (its ServicerContext)."""
    return credentials_of(context.invocation_metadata(), context.auth_context())


# -- the file ----------------------------------------------------------------------------------

class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> CallersFileError:
        return CallersFileError(f"callers file {self.source}: {where}: {message}")

    def keys(self, where: str, value: Any, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.fail(f"{where}.{key}" if where else str(key),
                                f"unknown key (expected one of {', '.join(allowed)})")
        return value

    def strings(self, where: str, value: Any) -> list[str]:
        """A string or a non-empty list of strings."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(item, str) and item.strip()
                                                               for item in items):
            raise self.fail(where, "expected a non-empty string or a non-empty list of non-empty strings")
        return [item.strip() for item in items]

    def number(self, where: str, value: Any, minimum: float, strict: bool) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and (value > minimum if strict else value >= minimum)
        if not ok:
            raise self.fail(where, f"must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
        return float(value)

    def policy(self, where: str, entry: Mapping[str, Any], name: str) -> CallerPolicy:
        models = None
        if "models" in entry:
            listed = self.strings(f"{where}.models", entry["models"])
            if ALL_MODELS in listed:
                if len(listed) > 1:
                    raise self.fail(f"{where}.models", f"'{ALL_MODELS}' (every model) must be alone")
            else:
                models = frozenset(listed)
        rate = None
        if "rate" in entry:
            raw = self.keys(f"{where}.rate", entry["rate"], ("per_second", "burst"))
            if "per_second" not in raw:
                raise self.fail(f"{where}.rate.per_second", "required (requests per second; may be fractional)")
            per_second = self.number(f"{where}.rate.per_second", raw["per_second"], 0, strict=True)
            burst = self.number(f"{where}.rate.burst", raw["burst"], 1, strict=False) if "burst" in raw \
                else max(1.0, math.ceil(per_second))
            rate = RateLimit(per_second, burst)
        max_concurrency = None
        if "max_concurrency" in entry:
            value = entry["max_concurrency"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise self.fail(f"{where}.max_concurrency", f"must be an integer >= 1, got {value!r}")
            max_concurrency = value
        priority = entry.get("priority", INTERACTIVE)
        if priority not in PRIORITIES:
            raise self.fail(f"{where}.priority", f"must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        return CallerPolicy(name=name, priority=priority, models=models, rate=rate, max_concurrency=max_concurrency)

    def caller(self, where: str, entry: Any) -> CallerPolicy:
        entry = self.keys(where, entry, _CALLER_KEYS)
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise self.fail(f"{where}.name", f"required: letters, digits, '.', '_', '-' (at most 64, starting with "
                                             f"a letter or digit), got {name!r}")
        if name in RESERVED_NAMES:
            raise self.fail(f"{where}.name", f"{name!r} is reserved (use the top-level 'anonymous:' key for "
                                             f"callers without credentials)")
        hashes: list[bytes] = []
        if "api_key_sha256" in entry:
            for i, value in enumerate(self.strings(f"{where}.api_key_sha256", entry["api_key_sha256"])):
                if not _HEX64.match(value):
                    # Never echo the value: it may be a key pasted instead of its hash.
                    raise self.fail(f"{where}.api_key_sha256" + (f"[{i}]" if isinstance(entry["api_key_sha256"], list)
                                                                   else ""),
                                    f"must be a SHA-256 as 64 hex characters, got {len(value)} characters (store "
                                    f"the output of `diffmesh callers hash-key`, never the key)")
                hashes.append(bytes.fromhex(value))
        subjects = []
        if "mtls_subject" in entry:
            for value in self.strings(f"{where}.mtls_subject", entry["mtls_subject"]):
                try:
                    subjects.append(parse_subject(value))
                except ValueError as exc:
                    raise self.fail(f"{where}.mtls_subject", f"not an RFC 4514 distinguished name like "
                                                             f"'CN=name,O=org' ({exc}), got {value!r}") from None
        sans = tuple(self.strings(f"{where}.mtls_san", entry["mtls_san"])) if "mtls_san" in entry else ()
        if not (hashes or subjects or sans):
            raise self.fail(where, f"caller {name!r} has no credential: set api_key_sha256, mtls_subject or mtls_san")
        policy = self.policy(where, entry, name)
        return CallerPolicy(name=policy.name, priority=policy.priority, models=policy.models, rate=policy.rate,
                            max_concurrency=policy.max_concurrency, api_key_hashes=tuple(hashes),
                            mtls_subjects=tuple(subjects), mtls_sans=sans)


def parse_callers(data: Any, source: str = "<callers>", digest: str = "",
                  require_client_certificates: bool = True) -> CallersConfig:
    """A CallersConfig from the file's parsed YAML; CallersFileError naming the key otherwise.
    require_client_certificates=False (a server that asks for no client certificate): a caller
    identified only by certificate could never match, which is an error too."""
    check = _Checker(source)
    if data is None:
        raise CallersFileError(f"callers file {source}: empty (expected a mapping with 'callers:'; an empty file "
                               f"is refused rather than locking every caller out)")
    top = check.keys("", data, _TOP_KEYS)
    if "callers" not in top:
        raise check.fail("callers", "required: a list of callers (may be empty with 'anonymous:')")
    entries = top["callers"]
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise check.fail("callers", f"expected a list, got {type(entries).__name__}")
    callers = [check.caller(f"callers[{i}]", entry) for i, entry in enumerate(entries)]
    names: dict[str, int] = {}
    owners: dict[tuple[str, Any], str] = {}
    for i, caller in enumerate(callers):
        if caller.name in names:
            raise check.fail(f"callers[{i}].name", f"{caller.name!r} is already the name of callers[{names[caller.name]}]")
        names[caller.name] = i
        credentials = [("api_key_sha256", h) for h in caller.api_key_hashes] \
            + [("mtls_subject", s) for s in caller.mtls_subjects] + [("mtls_san", s) for s in caller.mtls_sans]
        for kind, value in credentials:
            owner = owners.setdefault((kind, value), caller.name)
            if owner != caller.name:
                raise check.fail(f"callers[{i}].{kind}", f"{caller.name!r} has the same credential as {owner!r} "
                                                         f"(a credential identifies one caller)")
        if not require_client_certificates and (caller.mtls_subjects or caller.mtls_sans) \
                and not caller.api_key_hashes:
            raise check.fail(f"callers[{i}]", f"{caller.name!r} is identified by a client certificate, but this "
                                              f"orchestrator asks for none (set tls_ca_file to require mTLS)")
    anonymous = None
    if top.get("anonymous") is not None:
        entry = check.keys("anonymous", top["anonymous"], _POLICY_KEYS)
        anonymous = check.policy("anonymous", entry, ANONYMOUS)
    return CallersConfig(callers=tuple(callers), anonymous=anonymous, open=False, source=source, digest=digest)


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Line and problem only: yaml's own message quotes the line, which could hold a key.
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise CallersFileError(f"callers file {source}: not valid YAML ({where}{problem})") from None


def load_callers_text(text: str, source: str = "<callers>", require_client_certificates: bool = True) -> CallersConfig:
    return parse_callers(_yaml(text, source), source, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                         require_client_certificates)


def load_callers_file(path: str | Path, require_client_certificates: bool = True) -> CallersConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise CallersFileError(f"callers file {path}: cannot read ({reason})") from None
    return load_callers_text(text, str(path), require_client_certificates)


class CallerRegistry:
    """The callers configuration in force: OPEN without a file; with one, re-read when it
    changes (checked on request, at most every check_interval_s of the injected clock)."""

    def __init__(self, path: str | Path | None = None, *, check_interval_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, require_client_certificates: bool = True,
                 known_models: Sequence[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._require_certs = require_client_certificates
        self._known_models = set(known_models) if known_models is not None else None
        self._signature: tuple[int, int, int] | None = None
        self._failed_digest = ""
        self._config = OPEN
        if self.path is not None:
            self._signature = self._stat()
            self._config = load_callers_file(self.path, require_client_certificates)  # start-up: errors propagate
            self._loaded("loaded")
        self._checked = clock()

    @property
    def config(self) -> CallersConfig:
        return self._config

    def current(self) -> CallersConfig:
        """The configuration in force, after a reload when the file changed."""
        if self.path is not None:
            now = self._clock()
            if now - self._checked >= self.check_interval_s:
                self._checked = now
                self.reload_if_changed()
        return self._config

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def reload_if_changed(self) -> bool:
        """Re-reads the file when its mtime, size or inode changed; True when a new
        configuration took effect. A broken or missing file keeps the old one (logged once per
        broken content)."""
        assert self.path is not None
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        digest = ""
        try:
            if signature is None:
                raise CallersFileError(f"callers file {self.path}: cannot read (it has gone)")
            text = self.path.read_text(encoding="utf-8")
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            if digest == self._config.digest or digest == self._failed_digest:
                return False  # touched with the same content, or the same broken content (logged already)
            config = load_callers_text(text, str(self.path), self._require_certs)
        except (CallersFileError, OSError, UnicodeDecodeError) as exc:
            self._failed_digest = digest
            metrics.CALLERS_RELOADS.labels("error").inc()
            message = str(exc) if isinstance(exc, CallersFileError) else f"callers file {self.path}: cannot read"
            log_event(log, "callers file not reloaded: keeping the configuration in force", logging.ERROR,
                      error=message, callers=self._config.names())
            return False
        self._config = config
        self._failed_digest = ""
        self._loaded("reloaded")
        return True

    def _loaded(self, how: str) -> None:
        config = self._config
        metrics.CALLERS_RELOADS.labels("ok").inc()
        fields: dict[str, Any] = {"file": str(self.path), "callers": config.names()}
        log_event(log, f"callers file {how}", **fields)
        if self._known_models is not None:
            unknown = sorted({model for caller in (*config.callers, *([config.anonymous] if config.anonymous else ()))
                              for model in (caller.models or ()) if model not in self._known_models})
            if unknown:
                log_event(log, "callers file names models the registry does not have", logging.WARNING,
                          file=str(self.path), models=unknown)


# -- admission -----------------------------------------------------------------------------------

@dataclass
class Admitted:
    """A caller past identification, the model check and its rate limit."""

    caller: CallerPolicy

    @property
    def name(self) -> str:
        return self.caller.name

    @property
    def priority(self) -> str:
        return self.caller.priority


class CallerAdmission:
    """The orchestrator's admission: the callers registry, rate buckets, quotas and the gate."""

    def __init__(self, registry: CallerRegistry, gate: PriorityGate, clock: Callable[[], float] = time.monotonic,
                 stage: str = "orchestrator") -> None:
        self.registry = registry
        self.gate = gate
        self.clock = clock
        self.stage = stage
        self._buckets: dict[str, TokenBucket] = {}
        self._quota = ConcurrencyQuota()
        self._config: CallersConfig | None = None
        self._preinitialize(registry.config)

    def _preinitialize(self, config: CallersConfig) -> None:
        for name in [*config.names(), UNAUTHENTICATED]:
            for outcome in OUTCOMES:
                metrics.CALLER_REQUESTS.labels(name, outcome)
        for name in config.names():
            metrics.CALLER_ACTIVE.labels(name).set(self._quota.held(name))
        self._config = config

    def _reject(self, caller: str, outcome: str, error: errors.MeshError) -> errors.MeshError:
        metrics.CALLER_REQUESTS.labels(caller, outcome).inc()
        return error

    def check(self, credentials: Credentials, model_id: str | None) -> Admitted:
        """Identify, model, rate: raises Unauthenticated, PermissionDenied or ResourceExhausted."""
        config = self.registry.current()
        if config is not self._config:
            self._preinitialize(config)
            self._buckets = {name: bucket for name, bucket in self._buckets.items() if name in config.names()}
        try:
            caller = config.identify(credentials)
        except errors.Unauthenticated as exc:
            raise self._reject(UNAUTHENTICATED, "unauthenticated", exc) from None
        if not caller.allows(model_id):
            raise self._reject(caller.name, "permission_denied", errors.PermissionDenied(
                "model", model_id, f"caller {caller.name!r} may not use this model; allowed: "
                                   f"{', '.join(sorted(caller.models or ()))}"))
        if caller.rate is not None:
            bucket = self._buckets.get(caller.name)
            if bucket is None:
                bucket = self._buckets[caller.name] = TokenBucket(caller.rate.per_second, caller.rate.burst, self.clock)
            elif (bucket.rate, bucket.burst) != (caller.rate.per_second, caller.rate.burst):
                bucket.reconfigure(caller.rate.per_second, caller.rate.burst)
            wait_s = bucket.take()
            if wait_s > 0:
                retry_ms = seconds_to_ms(wait_s)
                raise self._reject(caller.name, "rate_limited", errors.ResourceExhausted(
                    f"caller {caller.name!r} is over its rate limit ({caller.rate.describe()}): retry in {retry_ms} ms",
                    retry_after_ms=retry_ms))
        return Admitted(caller)

    @asynccontextmanager
    async def enter(self, admitted: Admitted) -> AsyncIterator[Ticket]:
        """The caller's quota, then a ticket at the gate (waiting, or holding a slot at once),
        released after the block. Wait for it with ticket.wait() or ticket.positions()."""
        caller = admitted.caller
        if not self._quota.acquire(caller.name, caller.max_concurrency):
            retry_ms = seconds_to_ms(self.gate.retry_after_s())
            raise self._reject(caller.name, "over_quota", errors.ResourceExhausted(
                f"caller {caller.name!r} already has {caller.max_concurrency} requests in the orchestrator (its "
                f"max_concurrency): retry in {retry_ms} ms", retry_after_ms=retry_ms))
        active = metrics.CALLER_ACTIVE.labels(caller.name)
        active.inc()
        try:
            try:
                ticket = self.gate.enter(caller.priority, caller.name)
            except errors.ResourceExhausted as exc:
                raise self._reject(caller.name, "queue_full", exc) from None
            metrics.CALLER_REQUESTS.labels(caller.name, "admitted").inc()
            try:
                yield ticket
            finally:
                ticket.release()
        finally:
            active.dec()
            self._quota.release(caller.name)


def gate_metrics(stage: str) -> dict[str, Callable]:
    """The PriorityGate hooks that keep the queue series: diffmesh_queue_depth / _wait_seconds of
    the stage (every class together, as every admission gate) and the per-class ones."""
    for priority in PRIORITIES:
        metrics.ADMISSION_WAITING.labels(priority).set(0)
        metrics.ADMISSION_QUEUE_WAIT.labels(priority)

    def on_depth(depth: dict[str, int]) -> None:
        metrics.QUEUE_DEPTH.labels(stage).set(sum(depth.values()))
        for priority, waiting in depth.items():
            metrics.ADMISSION_WAITING.labels(priority).set(waiting)

    def on_grant(priority: str, waited_s: float) -> None:
        metrics.QUEUE_WAIT.labels(stage).observe(waited_s)
        metrics.ADMISSION_QUEUE_WAIT.labels(priority).observe(waited_s)

    return {"on_depth": on_depth, "on_grant": on_grant}


def caller_admission(stage: str, max_concurrency: int, max_queue: int, *, callers_file: str = "",
                     check_interval_s: float = 2.0, batch_every: int = 4, require_client_certificates: bool = True,
                     known_models: Sequence[str] | None = None,
                     clock: Callable[[], float] = time.monotonic) -> CallerAdmission:
    """The orchestrator's admission as configured (open without a callers file)."""
    metrics.preinitialize_admission(stage, max_concurrency, max_queue)
    gate = PriorityGate(stage, max_concurrency, max_queue, batch_every=batch_every, clock=clock, **gate_metrics(stage))
    registry = CallerRegistry(callers_file or None, check_interval_s=check_interval_s, clock=clock,
                              require_client_certificates=require_client_certificates, known_models=known_models)
    return CallerAdmission(registry, gate, clock, stage)


__all__ = ["ANONYMOUS", "BATCH", "INTERACTIVE", "Admitted", "CallerAdmission", "CallerPolicy", "CallerRegistry",
           "CallersConfig", "CallersFileError", "Credentials", "OPEN", "caller_admission", "credentials_from_context",
           "credentials_of", "hash_key", "load_callers_file", "load_callers_text", "parse_callers", "parse_subject"]
