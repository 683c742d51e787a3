"""The latent space every stage agrees on: per-image random streams and the VAE's spatial factor.

Seeds become CPU generators everywhere (text-free stages, vae.Encode, the denoiser), so that an
image's noise does not depend on the device that draws it, and one seed gives one stream across
the mesh exactly as one torch.Generator does in a diffusers pipeline. The spatial factor (image
pixels per latent pixel, 8 for SD 1.x / XL) is read from the VAE's config the way diffusers'
pipelines compute it.

torch is imported inside the generator helpers only: the orchestrator reads the scale factor
without loading torch.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from diffmesh.models.registry import ModelEntry

if TYPE_CHECKING:
    import torch


def seeded_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per seed, each `torch.Generator("cpu").manual_seed(int(seed))`."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def generators_from_states(states: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per row of uint8 `states` [n, L] (what `Generator.get_state()` gives),
    continuing each stream where the stage that sampled with it stopped. RuntimeError where a row
    is not a CPU generator state."""
    import torch

    generators = []
    for row in states:
        generator = torch.Generator("cpu")
        generator.set_state(row.contiguous().clone())  # set_state needs its own contiguous bytes
        generators.append(generator)
    return generators


def vae_scale_factor(config_or_block_out_channels: Mapping[str, Any] | Sequence[int]) -> int:
    """Image pixels per latent pixel: 2 ** (len(block_out_channels) - 1), as diffusers' pipelines.
    Takes a VAE config (a dict or diffusers' FrozenDict) or its block_out_channels."""
    if isinstance(config_or_block_out_channels, Mapping):
        channels = config_or_block_out_channels["block_out_channels"]
    else:
        channels = config_or_block_out_channels
    levels = len(list(channels))
    if levels < 1:
        raise ValueError("block_out_channels must not be empty")
    return 2 ** (levels - 1)


def read_vae_scale_factor(entry: ModelEntry) -> int:
    """The scale factor of an entry's VAE, from its config.json (no weights loaded)."""
    config = json.loads((entry.component_dir("vae") / "config.json").read_text())
    return vae_scale_factor(config)
