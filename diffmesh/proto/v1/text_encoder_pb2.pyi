from diffmesh.proto.v1 import common_pb2 as _common_pb2
from diffmesh.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeTextRequest(_message.Message):
    __slots__ = ("model_id", "prompt", "negative_prompt", "with_negative", "prompt_2", "negative_prompt_2", "clip_skip", "literal_prompt", "trigger_word", "class_word_repeats")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WITH_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    LITERAL_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_WORD_FIELD_NUMBER: _ClassVar[int]
    CLASS_WORD_REPEATS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    prompt: str
    negative_prompt: str
    with_negative: bool
    prompt_2: str
    negative_prompt_2: str
    clip_skip: int
    literal_prompt: bool
    trigger_word: str
    class_word_repeats: int
    def __init__(self, model_id: _Optional[str] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., with_negative: _Optional[bool] = ..., prompt_2: _Optional[str] = ..., negative_prompt_2: _Optional[str] = ..., clip_skip: _Optional[int] = ..., literal_prompt: _Optional[bool] = ..., trigger_word: _Optional[str] = ..., class_word_repeats: _Optional[int] = ...) -> None: ...

class EncodeTextResponse(_message.Message):
    __slots__ = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "cache_hit", "usage", "class_token_positions", "text_only_prompt_embeds", "text_only_pooled_prompt_embeds")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CLASS_TOKEN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ONLY_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ONLY_POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _tensor_pb2.Tensor
    negative_prompt_embeds: _tensor_pb2.Tensor
    pooled_prompt_embeds: _tensor_pb2.Tensor
    negative_pooled_prompt_embeds: _tensor_pb2.Tensor
    cache_hit: bool
    usage: _common_pb2.StageUsage
    class_token_positions: _containers.RepeatedScalarFieldContainer[int]
    text_only_prompt_embeds: _tensor_pb2.Tensor
    text_only_pooled_prompt_embeds: _tensor_pb2.Tensor
    def __init__(self, prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., cache_hit: _Optional[bool] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ..., class_token_positions: _Optional[_Iterable[int]] = ..., text_only_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., text_only_pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
