"""Calls the component tests make straight to stage processes."""
from __future__ import annotations

import grpc

from diffmesh.proto.v1 import denoiser_pb2, text_encoder_pb2, text_encoder_pb2_grpc

EMBEDDINGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def denoise_request(encoder_address: str, model_id: str, **fields) -> denoiser_pb2.DenoiseRequest:
    """A DenoiseRequest for "a cat" (with negatives), its embeddings from the text_encoder at
    encoder_address; `fields` set the rest (scheduler, steps, size, seeds, ...)."""
    with grpc.insecure_channel(encoder_address) as channel:
        embeds = text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(text_encoder_pb2.EncodeTextRequest(
            model_id=model_id, prompt="a cat", with_negative=True), timeout=30)
    request = denoiser_pb2.DenoiseRequest(model_id=model_id, **fields)
    for name in EMBEDDINGS:
        if embeds.HasField(name):
            getattr(request, name).CopyFrom(getattr(embeds, name))
    return request
