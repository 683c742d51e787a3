from diffmesh.proto.v1 import common_pb2 as _common_pb2
from diffmesh.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("model_id", "scheduler", "steps", "guidance_scale", "width", "height", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "seeds", "generator_states", "init_latents", "strength", "timesteps", "timestep_spacing", "sigma_schedule", "guidance_rescale", "change_map", "change_map_is_mask", "mask_feather", "preview_every", "quiet", "merged_prompt_embeds", "merged_pooled_prompt_embeds", "start_merge_step", "adapters")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATES_FIELD_NUMBER: _ClassVar[int]
    INIT_LATENTS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_SPACING_FIELD_NUMBER: _ClassVar[int]
    SIGMA_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    CHANGE_MAP_FIELD_NUMBER: _ClassVar[int]
    CHANGE_MAP_IS_MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FEATHER_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    QUIET_FIELD_NUMBER: _ClassVar[int]
    MERGED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    MERGED_POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    START_MERGE_STEP_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    scheduler: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    prompt_embeds: _tensor_pb2.Tensor
    negative_prompt_embeds: _tensor_pb2.Tensor
    pooled_prompt_embeds: _tensor_pb2.Tensor
    negative_pooled_prompt_embeds: _tensor_pb2.Tensor
    seeds: _containers.RepeatedScalarFieldContainer[int]
    generator_states: _tensor_pb2.Tensor
    init_latents: _tensor_pb2.Tensor
    strength: float
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    timestep_spacing: str
    sigma_schedule: str
    guidance_rescale: float
    change_map: _tensor_pb2.Tensor
    change_map_is_mask: bool
    mask_feather: float
    preview_every: int
    quiet: bool
    merged_prompt_embeds: _tensor_pb2.Tensor
    merged_pooled_prompt_embeds: _tensor_pb2.Tensor
    start_merge_step: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., scheduler: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., negative_pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seeds: _Optional[_Iterable[int]] = ..., generator_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., init_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., strength: _Optional[float] = ..., timesteps: _Optional[_Iterable[int]] = ..., timestep_spacing: _Optional[str] = ..., sigma_schedule: _Optional[str] = ..., guidance_rescale: _Optional[float] = ..., change_map: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., change_map_is_mask: _Optional[bool] = ..., mask_feather: _Optional[float] = ..., preview_every: _Optional[int] = ..., quiet: _Optional[bool] = ..., merged_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., merged_pooled_prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., start_merge_step: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class DenoiseProgress(_message.Message):
    __slots__ = ("step", "total_steps", "timestep", "elapsed_ms", "previews")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    timestep: float
    elapsed_ms: float
    previews: _containers.RepeatedCompositeFieldContainer[_common_pb2.EncodedImage]
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., timestep: _Optional[float] = ..., elapsed_ms: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[_common_pb2.EncodedImage, _Mapping]]] = ...) -> None: ...

class DenoiseResult(_message.Message):
    __slots__ = ("latents", "usage")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    usage: _common_pb2.StageUsage
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: DenoiseProgress
    result: DenoiseResult
    def __init__(self, progress: _Optional[_Union[DenoiseProgress, _Mapping]] = ..., result: _Optional[_Union[DenoiseResult, _Mapping]] = ...) -> None: ...
