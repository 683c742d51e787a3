import datetime

from diffmesh.proto.v1 import common_pb2 as _common_pb2
from diffmesh.proto.v1 import face_pb2 as _face_pb2
from diffmesh.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SafetyOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAFETY_OUTCOME_UNSPECIFIED: _ClassVar[SafetyOutcome]
    SAFETY_OUTCOME_ALLOW: _ClassVar[SafetyOutcome]
    SAFETY_OUTCOME_REVIEW: _ClassVar[SafetyOutcome]
    SAFETY_OUTCOME_BLOCK: _ClassVar[SafetyOutcome]

class DecisionSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_SOURCE_UNSPECIFIED: _ClassVar[DecisionSource]
    DECISION_SOURCE_PROMPT: _ClassVar[DecisionSource]
    DECISION_SOURCE_IMAGE: _ClassVar[DecisionSource]
    DECISION_SOURCE_GALLERY: _ClassVar[DecisionSource]
    DECISION_SOURCE_MINOR: _ClassVar[DecisionSource]

class ReviewStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_STATUS_UNSPECIFIED: _ClassVar[ReviewStatus]
    REVIEW_STATUS_PENDING: _ClassVar[ReviewStatus]
    REVIEW_STATUS_APPROVED: _ClassVar[ReviewStatus]
    REVIEW_STATUS_REJECTED: _ClassVar[ReviewStatus]
SAFETY_OUTCOME_UNSPECIFIED: SafetyOutcome
SAFETY_OUTCOME_ALLOW: SafetyOutcome
SAFETY_OUTCOME_REVIEW: SafetyOutcome
SAFETY_OUTCOME_BLOCK: SafetyOutcome
DECISION_SOURCE_UNSPECIFIED: DecisionSource
DECISION_SOURCE_PROMPT: DecisionSource
DECISION_SOURCE_IMAGE: DecisionSource
DECISION_SOURCE_GALLERY: DecisionSource
DECISION_SOURCE_MINOR: DecisionSource
REVIEW_STATUS_UNSPECIFIED: ReviewStatus
REVIEW_STATUS_PENDING: ReviewStatus
REVIEW_STATUS_APPROVED: ReviewStatus
REVIEW_STATUS_REJECTED: ReviewStatus

class SafetyDecision(_message.Message):
    __slots__ = ("outcome", "category", "score", "threshold", "policy_version", "source", "reason", "field")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    outcome: SafetyOutcome
    category: str
    score: float
    threshold: float
    policy_version: str
    source: DecisionSource
    reason: str
    field: str
    def __init__(self, outcome: _Optional[_Union[SafetyOutcome, str]] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., policy_version: _Optional[str] = ..., source: _Optional[_Union[DecisionSource, str]] = ..., reason: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class PromptText(_message.Message):
    __slots__ = ("field", "text")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    field: str
    text: str
    def __init__(self, field: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class CheckPromptRequest(_message.Message):
    __slots__ = ("texts", "request_id")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedCompositeFieldContainer[PromptText]
    request_id: str
    def __init__(self, texts: _Optional[_Iterable[_Union[PromptText, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckPromptResponse(_message.Message):
    __slots__ = ("decision", "decisions", "prompt_hash", "usage")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    decision: SafetyDecision
    decisions: _containers.RepeatedCompositeFieldContainer[SafetyDecision]
    prompt_hash: str
    usage: _common_pb2.StageUsage
    def __init__(self, decision: _Optional[_Union[SafetyDecision, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[SafetyDecision, _Mapping]]] = ..., prompt_hash: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...

class FaceSignal(_message.Message):
    __slots__ = ("normed_embedding", "embedding_model", "age", "box")
    NORMED_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    normed_embedding: _tensor_pb2.Tensor
    embedding_model: str
    age: float
    box: _face_pb2.FaceBox
    def __init__(self, normed_embedding: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., embedding_model: _Optional[str] = ..., age: _Optional[float] = ..., box: _Optional[_Union[_face_pb2.FaceBox, _Mapping]] = ...) -> None: ...

class ImageToCheck(_message.Message):
    __slots__ = ("image", "faces", "faces_analyzed")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    FACES_ANALYZED_FIELD_NUMBER: _ClassVar[int]
    image: _tensor_pb2.Tensor
    faces: _containers.RepeatedCompositeFieldContainer[FaceSignal]
    faces_analyzed: bool
    def __init__(self, image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., faces: _Optional[_Iterable[_Union[FaceSignal, _Mapping]]] = ..., faces_analyzed: _Optional[bool] = ...) -> None: ...

class CheckImagesRequest(_message.Message):
    __slots__ = ("images", "request_id", "model_id", "prompt_hash", "prompt_decision", "faces_on_demand")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_DECISION_FIELD_NUMBER: _ClassVar[int]
    FACES_ON_DEMAND_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageToCheck]
    request_id: str
    model_id: str
    prompt_hash: str
    prompt_decision: SafetyDecision
    faces_on_demand: bool
    def __init__(self, images: _Optional[_Iterable[_Union[ImageToCheck, _Mapping]]] = ..., request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., prompt_hash: _Optional[str] = ..., prompt_decision: _Optional[_Union[SafetyDecision, _Mapping]] = ..., faces_on_demand: _Optional[bool] = ...) -> None: ...

class ImageSafetyVerdict(_message.Message):
    __slots__ = ("decision", "decisions", "case_id", "needs_faces")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FACES_FIELD_NUMBER: _ClassVar[int]
    decision: SafetyDecision
    decisions: _containers.RepeatedCompositeFieldContainer[SafetyDecision]
    case_id: str
    needs_faces: bool
    def __init__(self, decision: _Optional[_Union[SafetyDecision, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[SafetyDecision, _Mapping]]] = ..., case_id: _Optional[str] = ..., needs_faces: _Optional[bool] = ...) -> None: ...

class CheckImagesResponse(_message.Message):
    __slots__ = ("images", "policy_version", "usage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageSafetyVerdict]
    policy_version: str
    usage: _common_pb2.StageUsage
    def __init__(self, images: _Optional[_Iterable[_Union[ImageSafetyVerdict, _Mapping]]] = ..., policy_version: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...

class MarkImagesRequest(_message.Message):
    __slots__ = ("images", "format", "quality", "request_id", "model_id", "watermark_key")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_KEY_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    format: _common_pb2.ImageFormat
    quality: int
    request_id: str
    model_id: str
    watermark_key: str
    def __init__(self, images: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., watermark_key: _Optional[str] = ...) -> None: ...

class Marking(_message.Message):
    __slots__ = ("watermarked", "watermark_method", "watermark_bits", "watermark_payload", "watermark_skipped_reason", "manifest", "manifest_skipped_reason", "policy_version")
    WATERMARKED_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_METHOD_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_BITS_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_SKIPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SKIPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    watermarked: bool
    watermark_method: str
    watermark_bits: int
    watermark_payload: str
    watermark_skipped_reason: str
    manifest: bool
    manifest_skipped_reason: str
    policy_version: str
    def __init__(self, watermarked: _Optional[bool] = ..., watermark_method: _Optional[str] = ..., watermark_bits: _Optional[int] = ..., watermark_payload: _Optional[str] = ..., watermark_skipped_reason: _Optional[str] = ..., manifest: _Optional[bool] = ..., manifest_skipped_reason: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class MarkedImage(_message.Message):
    __slots__ = ("image", "marking")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MARKING_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.EncodedImage
    marking: Marking
    def __init__(self, image: _Optional[_Union[_common_pb2.EncodedImage, _Mapping]] = ..., marking: _Optional[_Union[Marking, _Mapping]] = ...) -> None: ...

class MarkImagesResponse(_message.Message):
    __slots__ = ("images", "usage")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[MarkedImage]
    usage: _common_pb2.StageUsage
    def __init__(self, images: _Optional[_Iterable[_Union[MarkedImage, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...

class DescribePolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribePolicyResponse(_message.Message):
    __slots__ = ("policy_version", "prompt_categories", "image_labels", "needs_faces", "gallery_size", "watermark_method", "uses_ages")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LABELS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FACES_FIELD_NUMBER: _ClassVar[int]
    GALLERY_SIZE_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_METHOD_FIELD_NUMBER: _ClassVar[int]
    USES_AGES_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    prompt_categories: _containers.RepeatedScalarFieldContainer[str]
    image_labels: _containers.RepeatedScalarFieldContainer[str]
    needs_faces: bool
    gallery_size: int
    watermark_method: str
    uses_ages: bool
    def __init__(self, policy_version: _Optional[str] = ..., prompt_categories: _Optional[_Iterable[str]] = ..., image_labels: _Optional[_Iterable[str]] = ..., needs_faces: _Optional[bool] = ..., gallery_size: _Optional[int] = ..., watermark_method: _Optional[str] = ..., uses_ages: _Optional[bool] = ...) -> None: ...

class ReviewCase(_message.Message):
    __slots__ = ("case_id", "status", "created_at", "updated_at", "retention_deadline", "request_id", "model_id", "prompt_hash", "decisions", "width", "height", "reviewer", "review_note", "image")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RETENTION_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    REVIEW_NOTE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    status: ReviewStatus
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    retention_deadline: _timestamp_pb2.Timestamp
    request_id: str
    model_id: str
    prompt_hash: str
    decisions: _containers.RepeatedCompositeFieldContainer[SafetyDecision]
    width: int
    height: int
    reviewer: str
    review_note: str
    image: _common_pb2.EncodedImage
    def __init__(self, case_id: _Optional[str] = ..., status: _Optional[_Union[ReviewStatus, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retention_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., model_id: _Optional[str] = ..., prompt_hash: _Optional[str] = ..., decisions: _Optional[_Iterable[_Union[SafetyDecision, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., reviewer: _Optional[str] = ..., review_note: _Optional[str] = ..., image: _Optional[_Union[_common_pb2.EncodedImage, _Mapping]] = ...) -> None: ...

class ListCasesRequest(_message.Message):
    __slots__ = ("status", "limit", "before")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    status: ReviewStatus
    limit: int
    before: _timestamp_pb2.Timestamp
    def __init__(self, status: _Optional[_Union[ReviewStatus, str]] = ..., limit: _Optional[int] = ..., before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListCasesResponse(_message.Message):
    __slots__ = ("cases",)
    CASES_FIELD_NUMBER: _ClassVar[int]
    cases: _containers.RepeatedCompositeFieldContainer[ReviewCase]
    def __init__(self, cases: _Optional[_Iterable[_Union[ReviewCase, _Mapping]]] = ...) -> None: ...

class GetCaseRequest(_message.Message):
    __slots__ = ("case_id", "include_image")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    include_image: bool
    def __init__(self, case_id: _Optional[str] = ..., include_image: _Optional[bool] = ...) -> None: ...

class GetCaseResponse(_message.Message):
    __slots__ = ("case",)
    CASE_FIELD_NUMBER: _ClassVar[int]
    case: ReviewCase
    def __init__(self, case: _Optional[_Union[ReviewCase, _Mapping]] = ...) -> None: ...

class DecideCaseRequest(_message.Message):
    __slots__ = ("case_id", "decision", "reviewer", "note")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    decision: ReviewStatus
    reviewer: str
    note: str
    def __init__(self, case_id: _Optional[str] = ..., decision: _Optional[_Union[ReviewStatus, str]] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class DecideCaseResponse(_message.Message):
    __slots__ = ("case",)
    CASE_FIELD_NUMBER: _ClassVar[int]
    case: ReviewCase
    def __init__(self, case: _Optional[_Union[ReviewCase, _Mapping]] = ...) -> None: ...

class PurgeExpiredCasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PurgeExpiredCasesResponse(_message.Message):
    __slots__ = ("purged",)
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

class ReleaseCaseRequest(_message.Message):
    __slots__ = ("case_id", "format", "quality")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    format: _common_pb2.ImageFormat
    quality: int
    def __init__(self, case_id: _Optional[str] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class ReleaseCaseResponse(_message.Message):
    __slots__ = ("image", "case", "usage")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CASE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    image: MarkedImage
    case: ReviewCase
    usage: _common_pb2.StageUsage
    def __init__(self, image: _Optional[_Union[MarkedImage, _Mapping]] = ..., case: _Optional[_Union[ReviewCase, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.StageUsage, _Mapping]] = ...) -> None: ...
