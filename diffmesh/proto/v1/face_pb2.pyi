from diffmesh.proto.v1 import common_pb2 as _common_pb2
from diffmesh.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Gender(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENDER_UNSPECIFIED: _ClassVar[Gender]
    GENDER_FEMALE: _ClassVar[Gender]
    GENDER_MALE: _ClassVar[Gender]
GENDER_UNSPECIFIED: Gender
GENDER_FEMALE: Gender
GENDER_MALE: Gender

class AnalyzeRequest(_message.Message):
    __slots__ = ("model_id", "images", "min_score", "max_faces", "skip_embeddings")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    SKIP_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    min_score: float
    max_faces: int
    skip_embeddings: bool
    def __init__(self, model_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., min_score: _Optional[float] = ..., max_faces: _Optional[int] = ..., skip_embeddings: _Optional[bool] = ...) -> None: ...

class FaceBox(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class DetectedFace(_message.Message):
    __slots__ = ("box", "landmarks", "score", "gender", "age", "embedding", "normed_embedding", "embedding_model")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    GENDER_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    NORMED_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    box: FaceBox
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    score: float
    gender: Gender
    age: float
    embedding: _tensor_pb2.Tensor
    normed_embedding: _tensor_pb2.Tensor
    embedding_model: str
    def __init__(self, box: _Optional[_Union[FaceBox, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., score: _Optional[float] = ..., gender: _Optional[_Union[Gender, str]] = ..., age: _Optional[float] = ..., embedding: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., normed_embedding: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class ImageFaces(_message.Message):
    __slots__ = ("faces",)
    FACES_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[DetectedFace]
    def __init__(self, faces: _Optional[_Iterable[_Union[DetectedFace, _Mapping]]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("images", "model_id", "embedding_dim", "usage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageFaces]
    model_id: str
    embedding_dim: int
    usage: _common_pb2.StageUsage
    def __init__(self, images: _Optional[_Iterable[_Union[ImageFaces, _Mapping]]] = ..., model_id: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...

class EncodeIdentityRequest(_message.Message):
    __slots__ = ("model_id", "reference_images", "id_embeddings", "face_model_id", "prompt_embeds", "class_token_positions")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ID_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    FACE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_TOKEN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    reference_images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    id_embeddings: _tensor_pb2.Tensor
    face_model_id: str
    prompt_embeds: _tensor_pb2.Tensor
    class_token_positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., reference_images: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., id_embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., face_model_id: _Optional[str] = ..., prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., class_token_positions: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeIdentityResponse(_message.Message):
    __slots__ = ("prompt_embeds", "references_used", "usage")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_USED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _tensor_pb2.Tensor
    references_used: int
    usage: _common_pb2.StageUsage
    def __init__(self, prompt_embeds: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., references_used: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...
