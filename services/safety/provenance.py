"""C2PA provenance: a signed manifest embedded in each returned PNG / JPEG, and reading one back.

The manifest says the image was created by a trained algorithm (c2pa.actions.v2, action
c2pa.created, IPTC digitalSourceType trainedAlgorithmicMedia, softwareAgent diffmesh) and carries
one custom assertion, GENERATION_LABEL, with the generation facts: model id, policy version,
request id, image size and the invisible watermark's facts. It carries no prompt text and no
thumbnail (the SDK adds one by default: ~130 KB, and a copy of the pixels nobody asked for).

Signing uses c2pa-python (the C2PA Rust SDK underneath), offline: no timestamp authority, so a
manifest's signature is valid only while the signing certificate is. The chain PEM holds the
signing certificate followed by its intermediate(s); see diffmesh/devtools/dev_certs_c2pa.py for a
development chain and what the SDK requires of one.

Reading reports the SDK's validation state: "Trusted" (valid and chained to a given trust anchor),
"Valid" (well-formed, signature and hashes check, but the signer is not trusted: a dev chain shows
signingCredential.untrusted among the errors), "Invalid" (a hash or signature fails: the file was
changed after signing), plus two of ours: "NoManifest" (the file carries none, e.g. re-encoded) and
"Unreadable" (the bytes are not an image the SDK can parse).
"""
from __future__ import annotations

import copy
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from diffmesh import __version__

GENERATION_LABEL = "com.diffmesh.generation"
ACTIONS_LABEL = "c2pa.actions.v2"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
SIGNED_MIME_TYPES = ("image/png", "image/jpeg")
ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")

TRUSTED, VALID, INVALID, NO_MANIFEST, UNREADABLE = "Trusted", "Valid", "Invalid", "NoManifest", "Unreadable"

_BUILDER_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}
# A file's manifest may point at a remote one; a reader of untrusted uploads must not fetch it.
_READER_SETTINGS: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}


class ProvenanceError(RuntimeError):
    """Signing failed (the SDK's message says why)."""


@dataclass(frozen=True)
class ProvenanceFacts:
    """What the manifest records about a generation. No prompt text: only ids, versions, sizes."""

    model_id: str
    policy_version: str
    request_id: str
    width: int
    height: int
    watermark_method: str
    watermark_bits: int
    watermark_payload: str      # hex
    watermarked: bool           # False when the image was too small to carry the watermark

    def to_assertion(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "policy_version": self.policy_version,
            "request_id": self.request_id,
            "image": {"width": self.width, "height": self.height},
            "watermark": {"method": self.watermark_method, "bits": self.watermark_bits,
                          "payload": self.watermark_payload, "marked": self.watermarked},
        }

    @classmethod
    def from_assertion(cls, data: dict[str, Any]) -> ProvenanceFacts:
        """KeyError / TypeError / ValueError when `data` is not a generation assertion."""
        image, watermark = data["image"], data["watermark"]
        return cls(model_id=str(data["model_id"]), policy_version=str(data["policy_version"]),
                   request_id=str(data["request_id"]), width=int(image["width"]), height=int(image["height"]),
                   watermark_method=str(watermark["method"]), watermark_bits=int(watermark["bits"]),
                   watermark_payload=str(watermark["payload"]), watermarked=bool(watermark["marked"]))


@dataclass(frozen=True)
class ManifestReport:
    state: str                                  # TRUSTED, VALID, INVALID, NO_MANIFEST or UNREADABLE
    active_manifest: dict[str, Any] | None      # the active manifest as the SDK reports it
    errors: list[dict[str, str]] = field(default_factory=list)   # the SDK's failures: code, explanation, url
    facts: ProvenanceFacts | None = None        # only from a Valid or Trusted manifest

    @property
    def error_codes(self) -> list[str]:
        return [error.get("code", "") for error in self.errors]


class ProvenanceSigner:
    """Signs PNG / JPEG bytes with one certificate chain; safe to share between threads."""

    def __init__(self, cert_chain_pem: bytes, private_key_pem: bytes, algorithm: str = "es256",
                 claim_generator: str = f"diffmesh/{__version__}") -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"C2PA signing algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
        _check_key_is_the_certificates(cert_chain_pem, private_key_pem)
        name, _, version = claim_generator.partition("/")
        self._generator = {"name": name, "version": version} if version else {"name": name}
        try:
            self._signer = c2pa.Signer.from_info(
                c2pa.C2paSignerInfo(algorithm.encode(), cert_chain_pem, private_key_pem, None))
        except c2pa.C2paError as error:
            raise ValueError(f"C2PA signing chain or key rejected: {error}") from error
        self._context = c2pa.Context(settings=c2pa.Settings.from_dict(_BUILDER_SETTINGS))
        # One native signer serves every call; the SDK documents no concurrent use of it.
        self._lock = threading.Lock()

    def manifest_definition(self, facts: ProvenanceFacts) -> dict[str, Any]:
        """The manifest to sign: what sign() embeds, before the SDK adds hashes and signature."""
        return {
            "claim_generator_info": [self._generator],
            "assertions": [
                {"label": ACTIONS_LABEL, "data": {"actions": [{
                    "action": "c2pa.created",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": self._generator,
                }]}},
                {"label": GENERATION_LABEL, "data": facts.to_assertion()},
            ],
        }

    def sign(self, image_bytes: bytes, mime: str, facts: ProvenanceFacts) -> bytes:
        """The file with a signed manifest embedded (covering every byte outside the manifest)."""
        if mime not in SIGNED_MIME_TYPES:
            raise ValueError(f"{mime}: C2PA manifests are embedded in {', '.join(SIGNED_MIME_TYPES)} only")
        signed = io.BytesIO()
        with self._lock:
            try:
                builder = c2pa.Builder(self.manifest_definition(facts), context=self._context)
                builder.sign(self._signer, mime, io.BytesIO(image_bytes), signed)
            except c2pa.C2paError as error:
                raise ProvenanceError(f"C2PA signing failed: {error}") from error
        return signed.getvalue()


def _check_key_is_the_certificates(cert_chain_pem: bytes, private_key_pem: bytes) -> None:
    """ValueError unless the key belongs to the chain's first (signing) certificate: the SDK would
    only find out at the first signature, per request, instead of at startup."""
    try:
        signing_cert = x509.load_pem_x509_certificates(cert_chain_pem)[0]
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"C2PA signing chain or key unreadable (PEM expected): {error}") from error
    if key.public_key() != signing_cert.public_key():
        raise ValueError("C2PA signing key is not the key of the chain's first certificate "
                         "(the chain PEM must start with the signing certificate)")


def load_signer(cert_path: str | Path, key_path: str | Path, algorithm: str = "es256") -> ProvenanceSigner:
    """A signer from mounted files (a Kubernetes Secret): the chain PEM and the key PEM."""
    return ProvenanceSigner(Path(cert_path).read_bytes(), Path(key_path).read_bytes(), algorithm)


def read_manifest(data: bytes, mime: str, trust_anchors_pem: bytes | None = None) -> ManifestReport:
    """The manifest embedded in `data` and its validation. With trust_anchors_pem (root
    certificates, PEM), a manifest chaining to one of them is "Trusted"."""
    settings: dict[str, Any] = copy.deepcopy(_READER_SETTINGS)
    if trust_anchors_pem is not None:
        settings["trust"] = {"trust_anchors": trust_anchors_pem.decode("ascii")}
        settings["verify"]["verify_trust"] = True
    try:
        context = c2pa.Context(settings=c2pa.Settings.from_dict(settings))
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), context=context)
    except c2pa.C2paError as error:
        return ManifestReport(UNREADABLE, None, [{"code": type(error).__name__.lstrip("_"), "explanation": str(error)}])
    if reader is None:
        return ManifestReport(NO_MANIFEST, None)
    with reader:
        store = json.loads(reader.json())
        manifest = reader.get_active_manifest()
    state = store.get("validation_state") or INVALID
    errors = _failures(store)
    facts = _facts(manifest) if state in (VALID, TRUSTED) else None
    return ManifestReport(state, manifest, errors, facts)


def _failures(store: dict[str, Any]) -> list[dict[str, str]]:
    results = store.get("validation_results") or {}
    failures = list((results.get("activeManifest") or {}).get("failure") or [])
    for delta in results.get("ingredientDeltas") or []:
        failures.extend((delta.get("validationDeltas") or {}).get("failure") or [])
    if not results:
        failures = list(store.get("validation_status") or [])
    return [{key: str(value) for key, value in failure.items()} for failure in failures]


def _facts(manifest: dict[str, Any] | None) -> ProvenanceFacts | None:
    for assertion in (manifest or {}).get("assertions") or []:
        if assertion.get("label") == GENERATION_LABEL:
            try:
                return ProvenanceFacts.from_assertion(assertion.get("data") or {})
            except (KeyError, TypeError, ValueError):
                return None
    return None


__all__ = ["GENERATION_LABEL", "INVALID", "ManifestReport", "NO_MANIFEST", "ProvenanceError", "ProvenanceFacts",
           "ProvenanceSigner", "TRUSTED", "UNREADABLE", "VALID", "load_signer", "read_manifest"]
