from diffmesh.proto.v1 import common_pb2 as _common_pb2
from diffmesh.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LatentSampling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATENT_SAMPLING_UNSPECIFIED: _ClassVar[LatentSampling]
    SAMPLE: _ClassVar[LatentSampling]
    MODE: _ClassVar[LatentSampling]
LATENT_SAMPLING_UNSPECIFIED: LatentSampling
SAMPLE: LatentSampling
MODE: LatentSampling

class DecodeRequest(_message.Message):
    __slots__ = ("model_id", "latents", "format", "quality", "return_tensor", "skip_files", "paste_pixels", "keep_mask")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    RETURN_TENSOR_FIELD_NUMBER: _ClassVar[int]
    SKIP_FILES_FIELD_NUMBER: _ClassVar[int]
    PASTE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    KEEP_MASK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    latents: _tensor_pb2.Tensor
    format: _common_pb2.ImageFormat
    quality: int
    return_tensor: bool
    skip_files: bool
    paste_pixels: _tensor_pb2.Tensor
    keep_mask: _tensor_pb2.Tensor
    def __init__(self, model_id: _Optional[str] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., return_tensor: _Optional[bool] = ..., skip_files: _Optional[bool] = ..., paste_pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., keep_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("images", "pixels", "usage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.EncodedImage]
    pixels: _tensor_pb2.Tensor
    usage: _common_pb2.StageUsage
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.EncodedImage, _Mapping]]] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...

class EncodeImageRequest(_message.Message):
    __slots__ = ("model_id", "pixels", "width", "height", "sampling", "seeds")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    pixels: _tensor_pb2.Tensor
    width: int
    height: int
    sampling: LatentSampling
    seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., pixels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., sampling: _Optional[_Union[LatentSampling, str]] = ..., seeds: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("latents", "generator_states", "usage")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    latents: _tensor_pb2.Tensor
    generator_states: _tensor_pb2.Tensor
    usage: _common_pb2.StageUsage
    def __init__(self, latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., generator_states: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...
