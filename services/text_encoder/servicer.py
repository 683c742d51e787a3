"""TextEncoder gRPC servicer: request -> ClipPromptEncoder.encode (through the cache) -> tensors."""
from __future__ import annotations

from functools import partial
from typing import Any

import grpc

from diffmesh.errors import InvalidArgument
from diffmesh.models.pool import ModelPool
from diffmesh.proto.v1 import text_encoder_pb2, text_encoder_pb2_grpc
from diffmesh.runtime import codec
from diffmesh.runtime.logs import prompt_hash
from diffmesh.runtime.server import Admission, Usage
from diffmesh.runtime.telemetry import annotate, traced
from services.text_encoder.encoder import ClipPromptEncoder, EmbeddingCache, check_identity


def _optional(request: text_encoder_pb2.EncodeTextRequest, name: str) -> Any:
    return getattr(request, name) if request.HasField(name) else None


class TextEncoderServicer(text_encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, models: ModelPool[ClipPromptEncoder], admission: Admission, cache: EmbeddingCache,
                 max_prompt_chars: int | None = None, max_prompt_windows: int | None = None) -> None:
        self._models = models
        self._admission = admission
        self._cache = cache
        self._max_chars = max_prompt_chars      # diffmesh.limits: the orchestrator's bounds
        self._max_windows = max_prompt_windows

    async def Encode(self, request: text_encoder_pb2.EncodeTextRequest,
                     context: grpc.aio.ServicerContext) -> text_encoder_pb2.EncodeTextResponse:
        model = self._models.get(request.model_id)
        negative = _optional(request, "negative_prompt")
        # identity prompts (PhotoMaker's trigger word): checked here too, before any hashing or
        # tokenizing; the encoder checks the prompt itself (one trigger, after its class word)
        check_identity(request.trigger_word, request.class_word_repeats)
        options = dict(prompt_2=_optional(request, "prompt_2"), negative_prompt_2=_optional(request, "negative_prompt_2"),
                       clip_skip=_optional(request, "clip_skip"), weighting=not request.literal_prompt,
                       trigger_word=request.trigger_word or None,
                       class_word_repeats=request.class_word_repeats if request.trigger_word else None)
        texts = (request.prompt, negative, options["prompt_2"], options["negative_prompt_2"])
        if self._max_chars is not None:  # before hashing or tokenizing anything
            for name, text in zip(("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"), texts):
                if text is not None and len(text) > self._max_chars:
                    raise InvalidArgument(name, text, f"longer than {self._max_chars} characters")
        key = (request.model_id, *(None if t is None else prompt_hash(t) for t in texts), request.with_negative,
               options["clip_skip"], options["weighting"], request.trigger_word, request.class_word_repeats)
        embeddings = self._cache.get(key)
        hit = embeddings is not None
        annotate(**{"diffmesh.model": request.model_id, "diffmesh.prompt_hash": key[1], "diffmesh.cache_hit": hit})
        usage = Usage()
        if embeddings is None:
            async with self._admission.slot() as usage:
                embeddings = await self._admission.submit(
                    usage, traced("encode_prompt", partial(model.encode, **options, max_windows=self._max_windows),
                                  **{"diffmesh.model": request.model_id}),
                    request.prompt, negative, request.with_negative)
            self._cache.put(key, embeddings)
        response = text_encoder_pb2.EncodeTextResponse(cache_hit=hit)
        for name in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds", "text_only_prompt_embeds", "text_only_pooled_prompt_embeds"):
            value = getattr(embeddings, name)
            if value is not None:
                getattr(response, name).CopyFrom(codec.from_torch(value))
        response.class_token_positions.extend(embeddings.class_token_positions)
        response.usage.CopyFrom(self._admission.report(usage))
        return response
