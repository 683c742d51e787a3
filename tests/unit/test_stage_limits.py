"""The request limits are declared once (diffmesh.limits) and every stage's config carries the ones
it enforces, with the orchestrator's defaults; the codec refuses non-finite and empty tensors for
every stage; the text encoder's cache is bounded by bytes; the local mesh shares the host's CPUs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmesh import limits
from diffmesh.errors import InvalidArgument
from diffmesh.mesh import Instance, LocalMesh
from diffmesh.runtime import codec
from diffmesh.runtime.config import ConfigError, load_config
from services.denoiser.main import DenoiserConfig
from services.orchestrator.main import OrchestratorConfig
from services.text_encoder.encoder import EmbeddingCache, PromptEmbeddings, embeddings_bytes
from services.text_encoder.main import TextEncoderConfig
from services.vae.main import VaeConfig

ENFORCED = {
    OrchestratorConfig: (limits.ImageSizeLimits, limits.StepLimits, limits.BatchLimits, limits.PromptLimits,
                         limits.ImageMemoryLimits),
    TextEncoderConfig: (limits.PromptLimits, limits.TokenWindowLimits),
    DenoiserConfig: (limits.ImageSizeLimits, limits.StepLimits, limits.BatchLimits, limits.TokenWindowLimits),
    VaeConfig: (limits.ImageSizeLimits, limits.BatchLimits, limits.ImageMemoryLimits),
}


@pytest.mark.parametrize("config", list(ENFORCED), ids=lambda c: c.__name__)
def test_each_config_takes_its_limits_from_the_one_declaration(config):
    fields = {f.name: f for f in dataclasses.fields(config)}
    for mixin in ENFORCED[config]:
        assert issubclass(config, mixin)
        for declared in dataclasses.fields(mixin):
            field = fields[declared.name]
            assert field.default == declared.default and field.metadata == declared.metadata, declared.name


def test_a_limit_set_once_reaches_the_stage_that_enforces_it():
    environ = {"DIFFMESH_MAX_SIZE": "1024", "DIFFMESH_MAX_PROMPT_WINDOWS": "4"}
    denoiser = load_config(DenoiserConfig, [], environ=environ)
    assert denoiser.max_size == 1024 and denoiser.max_sequence == 4 * 77
    assert load_config(OrchestratorConfig, [], environ={"DIFFMESH_MAX_SIZE": "1024"}).limits().max_size == 1024
    with pytest.raises(ConfigError, match="DIFFMESH_MAX_STEPS: unknown setting"):  # the vae has no steps
        load_config(VaeConfig, [], environ={"DIFFMESH_MAX_STEPS": "10"})


def test_the_orchestrator_never_plans_more_images_than_a_stage_takes():
    with pytest.raises(ConfigError, match="max_count: 20 exceeds max_batch 16"):
        load_config(OrchestratorConfig, ["--max-count", "20"], environ={})
    assert load_config(OrchestratorConfig, ["--max-count", "20", "--max-batch", "20"], environ={}).max_count == 20


# --- the codec: finite and non-empty, once for every stage ---------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_tensors_are_refused(dtype, bad):
    tensor = torch.ones(1, 3, 4, dtype=dtype)
    tensor[0, 1, 2] = bad
    wire = codec.from_torch(tensor)
    assert torch.equal(codec.to_torch(wire, "x").isnan(), tensor.isnan())  # not asked: passes through
    with pytest.raises(InvalidArgument) as info:
        codec.to_torch(wire, "prompt_embeds", finite=True)
    assert info.value.field == "prompt_embeds" and "1 NaN or infinite of 12" in str(info.value)


def test_finite_checks_leave_integers_and_finite_floats_alone():
    big = np.array([65504.0, -65504.0], np.float16)  # the largest finite half floats
    assert codec.to_numpy(codec.from_numpy(big), "x", finite=True).tolist() == big.tolist()
    assert codec.to_numpy(codec.from_numpy(np.arange(6, dtype=np.int64)), "x", finite=True).sum() == 15


def test_empty_tensors_are_refused_where_asked():
    wire = codec.from_numpy(np.zeros((1, 0, 32), np.float32))
    assert codec.to_torch(wire, "x").shape == (1, 0, 32)
    with pytest.raises(InvalidArgument) as info:
        codec.to_torch(wire, "prompt_embeds", nonempty=True)
    assert info.value.field == "prompt_embeds.shape" and info.value.value == [1, 0, 32]


# --- the embedding cache is bounded by bytes -------------------------------------------------------

def embeddings(tokens: int) -> PromptEmbeddings:
    return PromptEmbeddings(torch.zeros(1, tokens, 256), torch.zeros(1, tokens, 256))


def test_the_cache_evicts_least_recently_used_entries_until_its_bytes_fit():
    small, large = embeddings(77), embeddings(77 * 4)
    assert embeddings_bytes(small) == 2 * 77 * 256 * 4
    cache = EmbeddingCache(1000, max_bytes=embeddings_bytes(large) + 2 * embeddings_bytes(small))
    cache.put("a", small)
    cache.put("b", small)
    assert cache.get("a") is small  # "b" is now the least recently used
    cache.put("c", large)  # exactly the budget: nothing goes
    assert cache.get("c") is large and cache.get("a") is small and len(cache) == 3
    cache.put("d", small)  # over the budget by one small entry: the oldest ("b") goes
    assert cache.get("b") is None and [cache.get(k) is not None for k in "acd"] == [True, True, True]
    assert cache.nbytes == embeddings_bytes(large) + 2 * embeddings_bytes(small) <= cache._max_bytes


def test_an_entry_larger_than_the_cache_is_not_kept_and_evicts_nothing():
    small = embeddings(77)
    cache = EmbeddingCache(1000, max_bytes=3 * embeddings_bytes(small))
    cache.put("a", small)
    cache.put("huge", embeddings(77 * 40))
    assert cache.get("huge") is None and cache.get("a") is small and cache.nbytes == embeddings_bytes(small)


def test_replacing_an_entry_counts_its_bytes_once():
    cache = EmbeddingCache(10, max_bytes=10 * embeddings_bytes(embeddings(77)))
    for _ in range(5):
        cache.put("a", embeddings(77))
    assert len(cache) == 1 and cache.nbytes == embeddings_bytes(embeddings(77))


# --- the local mesh's thread counts --------------------------------------------------------------

def test_compute_processes_share_the_hosts_cpus(monkeypatch):
    monkeypatch.setattr("diffmesh.mesh.host_cpus", lambda: 8)
    mesh = LocalMesh(Path("registry.yaml"), Path("work"), replicas={"denoiser": 2}, canaries={"denoiser": 10})
    threads = {i.name: mesh.torch_threads(i) for i in mesh.instances()}
    # The table's overrides (one thread for the light stages), the orchestrator runs no model, and
    # three denoiser processes share 8 CPUs.
    assert threads == {"text_encoder": 1, "vae": 1, "face": 1, "safety": 1, "orchestrator": 1, "denoiser": 2, "denoiser-1": 2,
                       "denoiser-canary": 2}
    command = mesh.command(Instance("denoiser", "denoiser", "stable"), ["--torch-threads", "5"])
    flags = [command[i + 1] for i, arg in enumerate(command) if arg == "--torch-threads"]
    assert flags == ["2", "5"]  # a flag given for the process comes last and wins


def test_one_denoiser_keeps_torchs_default_and_shared_ones_never_get_zero(monkeypatch):
    mesh = LocalMesh(Path("registry.yaml"), Path("work"))
    denoiser = Instance("denoiser", "denoiser", "stable")
    assert mesh.torch_threads(denoiser) == 0  # alone: torch's default, faster than setting the same count
    monkeypatch.setattr("diffmesh.mesh.host_cpus", lambda: 1)
    assert LocalMesh(Path("r"), Path("w"), replicas={"denoiser": 3}).torch_threads(denoiser) == 1
