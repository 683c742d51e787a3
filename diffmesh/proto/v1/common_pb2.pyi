from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    PNG: _ClassVar[ImageFormat]
    JPEG: _ClassVar[ImageFormat]
    WEBP: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
PNG: ImageFormat
JPEG: ImageFormat
WEBP: ImageFormat

class EncodedImage(_message.Message):
    __slots__ = ("data", "mime_type", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class StageUsage(_message.Message):
    __slots__ = ("compute_ms", "queue_ms", "device", "variant", "instance_id", "batch_wait_ms")
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    compute_ms: float
    queue_ms: float
    device: str
    variant: str
    instance_id: str
    batch_wait_ms: float
    def __init__(self, compute_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., device: _Optional[str] = ..., variant: _Optional[str] = ..., instance_id: _Optional[str] = ..., batch_wait_ms: _Optional[float] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "wall_ms", "compute_ms", "variant", "queue_ms", "bytes_sent", "bytes_received", "device", "instance_id", "phase", "batch_wait_ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    wall_ms: float
    compute_ms: float
    variant: str
    queue_ms: float
    bytes_sent: int
    bytes_received: int
    device: str
    instance_id: str
    phase: str
    batch_wait_ms: float
    def __init__(self, stage: _Optional[str] = ..., wall_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., variant: _Optional[str] = ..., queue_ms: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., device: _Optional[str] = ..., instance_id: _Optional[str] = ..., phase: _Optional[str] = ..., batch_wait_ms: _Optional[float] = ...) -> None: ...

class RequestCost(_message.Message):
    __slots__ = ("device_seconds", "queue_seconds", "bytes_moved")
    DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    device_seconds: float
    queue_seconds: float
    bytes_moved: int
    def __init__(self, device_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., bytes_moved: _Optional[int] = ...) -> None: ...
