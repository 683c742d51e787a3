from diffmesh.proto.v1 import common_pb2 as _common_pb2
from diffmesh.proto.v1 import face_pb2 as _face_pb2
from diffmesh.proto.v1 import safety_pb2 as _safety_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FaceMaskShape(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_MASK_SHAPE_UNSPECIFIED: _ClassVar[FaceMaskShape]
    FACE_MASK_SHAPE_ELLIPSE: _ClassVar[FaceMaskShape]
    FACE_MASK_SHAPE_LANDMARKS: _ClassVar[FaceMaskShape]
FACE_MASK_SHAPE_UNSPECIFIED: FaceMaskShape
FACE_MASK_SHAPE_ELLIPSE: FaceMaskShape
FACE_MASK_SHAPE_LANDMARKS: FaceMaskShape

class FetchReviewedRequest(_message.Message):
    __slots__ = ("case_id", "output_format", "quality")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    output_format: _common_pb2.ImageFormat
    quality: int
    def __init__(self, case_id: _Optional[str] = ..., output_format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "model", "width", "height", "steps", "scheduler", "guidance_scale", "seed", "count", "init_image", "strength", "output_format", "quality", "request_key", "prompt_2", "negative_prompt_2", "clip_skip", "literal_prompt", "timesteps", "timestep_anchors", "timestep_spacing", "sigma_schedule", "guidance_rescale", "change_map", "mask", "mask_feather", "paste_back", "preview_every", "reference_faces", "face_weight", "detail_faces", "base_image", "face_detailing")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KEY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    LITERAL_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_SPACING_FIELD_NUMBER: _ClassVar[int]
    SIGMA_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    CHANGE_MAP_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FEATHER_FIELD_NUMBER: _ClassVar[int]
    PASTE_BACK_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FACES_FIELD_NUMBER: _ClassVar[int]
    FACE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FACES_FIELD_NUMBER: _ClassVar[int]
    BASE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    FACE_DETAILING_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    scheduler: str
    guidance_scale: float
    seed: int
    count: int
    init_image: bytes
    strength: float
    output_format: _common_pb2.ImageFormat
    quality: int
    request_key: str
    prompt_2: str
    negative_prompt_2: str
    clip_skip: int
    literal_prompt: bool
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    timestep_anchors: _containers.RepeatedScalarFieldContainer[int]
    timestep_spacing: str
    sigma_schedule: str
    guidance_rescale: float
    change_map: bytes
    mask: bytes
    mask_feather: float
    paste_back: bool
    preview_every: int
    reference_faces: _containers.RepeatedScalarFieldContainer[bytes]
    face_weight: int
    detail_faces: bool
    base_image: bytes
    face_detailing: FaceDetailing
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., model: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., scheduler: _Optional[str] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., count: _Optional[int] = ..., init_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., output_format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., quality: _Optional[int] = ..., request_key: _Optional[str] = ..., prompt_2: _Optional[str] = ..., negative_prompt_2: _Optional[str] = ..., clip_skip: _Optional[int] = ..., literal_prompt: _Optional[bool] = ..., timesteps: _Optional[_Iterable[int]] = ..., timestep_anchors: _Optional[_Iterable[int]] = ..., timestep_spacing: _Optional[str] = ..., sigma_schedule: _Optional[str] = ..., guidance_rescale: _Optional[float] = ..., change_map: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., mask_feather: _Optional[float] = ..., paste_back: _Optional[bool] = ..., preview_every: _Optional[int] = ..., reference_faces: _Optional[_Iterable[bytes]] = ..., face_weight: _Optional[int] = ..., detail_faces: _Optional[bool] = ..., base_image: _Optional[bytes] = ..., face_detailing: _Optional[_Union[FaceDetailing, _Mapping]] = ...) -> None: ...

class FaceDetailing(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "confidence", "min_ratio", "max_ratio", "max_faces", "padding", "size", "max_magnification", "mask_shape", "mask_dilate", "mask_blur", "strength", "guidance_scale", "steps", "scheduler", "timestep_anchors", "start_merge_step", "style_strength", "trigger_word", "face_model", "identity_model", "color_match")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MIN_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MAGNIFICATION_FIELD_NUMBER: _ClassVar[int]
    MASK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MASK_DILATE_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    START_MERGE_STEP_FIELD_NUMBER: _ClassVar[int]
    STYLE_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_WORD_FIELD_NUMBER: _ClassVar[int]
    FACE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_MODEL_FIELD_NUMBER: _ClassVar[int]
    COLOR_MATCH_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    confidence: float
    min_ratio: float
    max_ratio: float
    max_faces: int
    padding: float
    size: int
    max_magnification: float
    mask_shape: FaceMaskShape
    mask_dilate: int
    mask_blur: float
    strength: float
    guidance_scale: float
    steps: int
    scheduler: str
    timestep_anchors: _containers.RepeatedScalarFieldContainer[int]
    start_merge_step: int
    style_strength: float
    trigger_word: str
    face_model: str
    identity_model: str
    color_match: bool
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., confidence: _Optional[float] = ..., min_ratio: _Optional[float] = ..., max_ratio: _Optional[float] = ..., max_faces: _Optional[int] = ..., padding: _Optional[float] = ..., size: _Optional[int] = ..., max_magnification: _Optional[float] = ..., mask_shape: _Optional[_Union[FaceMaskShape, str]] = ..., mask_dilate: _Optional[int] = ..., mask_blur: _Optional[float] = ..., strength: _Optional[float] = ..., guidance_scale: _Optional[float] = ..., steps: _Optional[int] = ..., scheduler: _Optional[str] = ..., timestep_anchors: _Optional[_Iterable[int]] = ..., start_merge_step: _Optional[int] = ..., style_strength: _Optional[float] = ..., trigger_word: _Optional[str] = ..., face_model: _Optional[str] = ..., identity_model: _Optional[str] = ..., color_match: _Optional[bool] = ...) -> None: ...

class DetailedFace(_message.Message):
    __slots__ = ("index", "box", "score", "skipped", "crop", "mask", "identity_similarity")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    box: _face_pb2.FaceBox
    score: float
    skipped: bool
    crop: _face_pb2.FaceBox
    mask: _common_pb2.EncodedImage
    identity_similarity: float
    def __init__(self, index: _Optional[int] = ..., box: _Optional[_Union[_face_pb2.FaceBox, _Mapping]] = ..., score: _Optional[float] = ..., skipped: _Optional[bool] = ..., crop: _Optional[_Union[_face_pb2.FaceBox, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.EncodedImage, _Mapping]] = ..., identity_similarity: _Optional[float] = ...) -> None: ...

class FaceDetailingReport(_message.Message):
    __slots__ = ("detailed", "skipped_reason", "faces_found", "faces", "embedding_model")
    DETAILED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    FACES_FOUND_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    detailed: bool
    skipped_reason: str
    faces_found: int
    faces: _containers.RepeatedCompositeFieldContainer[DetailedFace]
    embedding_model: str
    def __init__(self, detailed: _Optional[bool] = ..., skipped_reason: _Optional[str] = ..., faces_found: _Optional[int] = ..., faces: _Optional[_Iterable[_Union[DetailedFace, _Mapping]]] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("image", "seed", "index", "faces", "marking")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    MARKING_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.EncodedImage
    seed: int
    index: int
    faces: FaceDetailingReport
    marking: _safety_pb2.Marking
    def __init__(self, image: _Optional[_Union[_common_pb2.EncodedImage, _Mapping]] = ..., seed: _Optional[int] = ..., index: _Optional[int] = ..., faces: _Optional[_Union[FaceDetailingReport, _Mapping]] = ..., marking: _Optional[_Union[_safety_pb2.Marking, _Mapping]] = ...) -> None: ...

class GenerationInfo(_message.Message):
    __slots__ = ("request_id", "model", "scheduler", "steps", "guidance_scale", "strength", "width", "height", "timings", "total_ms", "cost", "trace_id", "safety")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SAFETY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    scheduler: str
    steps: int
    guidance_scale: float
    strength: float
    width: int
    height: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageTiming]
    total_ms: float
    cost: _common_pb2.RequestCost
    trace_id: str
    safety: SafetyReport
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., scheduler: _Optional[str] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., strength: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StageTiming, _Mapping]]] = ..., total_ms: _Optional[float] = ..., cost: _Optional[_Union[_common_pb2.RequestCost, _Mapping]] = ..., trace_id: _Optional[str] = ..., safety: _Optional[_Union[SafetyReport, _Mapping]] = ...) -> None: ...

class SafetyReport(_message.Message):
    __slots__ = ("policy_version", "prompt", "images")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    prompt: _safety_pb2.SafetyDecision
    images: _containers.RepeatedCompositeFieldContainer[ImageSafety]
    def __init__(self, policy_version: _Optional[str] = ..., prompt: _Optional[_Union[_safety_pb2.SafetyDecision, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageSafety, _Mapping]]] = ...) -> None: ...

class ImageSafety(_message.Message):
    __slots__ = ("index", "decision", "decisions", "returned", "case_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    decision: _safety_pb2.SafetyDecision
    decisions: _containers.RepeatedCompositeFieldContainer[_safety_pb2.SafetyDecision]
    returned: bool
    case_id: str
    def __init__(self, index: _Optional[int] = ..., decision: _Optional[_Union[_safety_pb2.SafetyDecision, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[_safety_pb2.SafetyDecision, _Mapping]]] = ..., returned: _Optional[bool] = ..., case_id: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("images", "info")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    info: GenerationInfo
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., info: _Optional[_Union[GenerationInfo, _Mapping]] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed_ms", "previews", "phase")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed_ms: float
    previews: _containers.RepeatedCompositeFieldContainer[_common_pb2.EncodedImage]
    phase: str
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_ms: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[_common_pb2.EncodedImage, _Mapping]]] = ..., phase: _Optional[str] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("index", "seed", "mime_type", "width", "height", "chunk", "offset", "data", "last", "file_size", "faces", "marking")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    MARKING_FIELD_NUMBER: _ClassVar[int]
    index: int
    seed: int
    mime_type: str
    width: int
    height: int
    chunk: int
    offset: int
    data: bytes
    last: bool
    file_size: int
    faces: FaceDetailingReport
    marking: _safety_pb2.Marking
    def __init__(self, index: _Optional[int] = ..., seed: _Optional[int] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., chunk: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., file_size: _Optional[int] = ..., faces: _Optional[_Union[FaceDetailingReport, _Mapping]] = ..., marking: _Optional[_Union[_safety_pb2.Marking, _Mapping]] = ...) -> None: ...

class QueuePosition(_message.Message):
    __slots__ = ("position", "waiting", "priority")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    position: int
    waiting: int
    priority: str
    def __init__(self, position: _Optional[int] = ..., waiting: _Optional[int] = ..., priority: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result", "image", "queue_position")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    progress: StepProgress
    result: GenerateResponse
    image: ImageChunk
    queue_position: QueuePosition
    def __init__(self, progress: _Optional[_Union[StepProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ..., image: _Optional[_Union[ImageChunk, _Mapping]] = ..., queue_position: _Optional[_Union[QueuePosition, _Mapping]] = ...) -> None: ...
