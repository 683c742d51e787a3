"""Tensor <-> protobuf codec.

Decoding maps the payload without copying it (numpy.frombuffer, then torch.from_numpy) after
checking dtype x shape x byte length, so a malformed payload is an InvalidArgument naming the
field, never a crash. Decoded arrays are read-only views of the payload's bytes object (upb
makes that object, one copy, when the field is read; the codec reads it once).

What a stage needs of its inputs beyond the header is checked here too, once for every stage:
`finite=True` refuses NaN and infinities in a float tensor (a NaN prompt embedding denoises to
an all-NaN image that would otherwise come back as success), `nonempty=True` refuses a tensor
with a zero dimension ([1, 0, D] embeddings).
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from diffmesh.proto.v1 import tensor_pb2
from diffmesh.errors import InvalidArgument

DType = tensor_pb2.DType
Tensor = tensor_pb2.Tensor

MAX_RANK = 8
_MAX_BYTES = np.iinfo(np.intp).max

# torch warns whenever it wraps a read-only buffer; read-only is exactly what we want here (the
# bytes belong to the protobuf message) and stage code never writes into decoded inputs.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class _Kind:
    wire: int
    numpy: np.dtype  # for bfloat16: the uint16 carrier of the bit patterns
    torch: torch.dtype


_KINDS = [
    _Kind(DType.FLOAT16, np.dtype("<f2"), torch.float16),
    _Kind(DType.BFLOAT16, np.dtype("<u2"), torch.bfloat16),
    _Kind(DType.FLOAT32, np.dtype("<f4"), torch.float32),
    _Kind(DType.FLOAT64, np.dtype("<f8"), torch.float64),
    _Kind(DType.UINT8, np.dtype("u1"), torch.uint8),
    _Kind(DType.INT32, np.dtype("<i4"), torch.int32),
    _Kind(DType.INT64, np.dtype("<i8"), torch.int64),
    _Kind(DType.BOOL, np.dtype("?"), torch.bool),
]
_BY_WIRE = {k.wire: k for k in _KINDS}
_BY_TORCH = {k.torch: k for k in _KINDS}
_BY_NUMPY = {k.numpy.newbyteorder("="): k for k in _KINDS if k.wire != DType.BFLOAT16}

WIRE_DTYPES: tuple[int, ...] = tuple(_BY_WIRE)
FLOAT_DTYPES: tuple[int, ...] = (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16)
_BFLOAT16_EXPONENT = 0x7F80  # all ones: inf or NaN


def dtype_name(wire: int) -> str:
    try:
        return DType.Name(wire)
    except ValueError:
        return str(wire)


def _non_finite(kind: _Kind, array: np.ndarray) -> int:
    """How many elements are NaN or infinite (0 for integer and bool tensors)."""
    if kind.wire == DType.BFLOAT16:
        return int(np.count_nonzero((array & _BFLOAT16_EXPONENT) == _BFLOAT16_EXPONENT))
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _check_content(kind: _Kind, array: np.ndarray, field: str, finite: bool, nonempty: bool) -> None:
    if nonempty and array.size == 0:
        raise InvalidArgument(f"{field}.shape", list(array.shape), "must not be empty (a dimension is 0)")
    if finite and array.size:
        bad = _non_finite(kind, array)
        if bad:
            raise InvalidArgument(field, f"{bad} NaN or infinite of {array.size} values", "values must be finite")


def _decode(t: Tensor, field: str, dtypes: Iterable[int] | None, rank: int | None) -> tuple[_Kind, np.ndarray]:
    """Checks the header against the payload and maps the payload without copying it. The payload
    is read from the message once: each read of a bytes field makes a new Python object."""
    kind = _BY_WIRE.get(t.dtype)
    if kind is None:
        raise InvalidArgument(f"{field}.dtype", dtype_name(t.dtype), "unknown or unspecified tensor dtype")
    if dtypes is not None:
        allowed = tuple(dtypes)
        if t.dtype not in allowed:
            names = ", ".join(dtype_name(d) for d in allowed)
            raise InvalidArgument(f"{field}.dtype", dtype_name(t.dtype), f"expected one of {names}")
    shape = list(t.shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{field}.shape", shape, f"rank above {MAX_RANK}")
    if rank is not None and len(shape) != rank:
        raise InvalidArgument(f"{field}.shape", shape, f"expected rank {rank}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", shape, "negative dimension")
    # numpy and torch refuse a shape whose non-zero dimensions overflow the address space even
    # when another dimension is 0 (so the byte count would match an empty payload).
    if math.prod(d for d in shape if d) * kind.numpy.itemsize > _MAX_BYTES:
        raise InvalidArgument(f"{field}.shape", shape, "too many elements")
    data = t.data
    expected = math.prod(shape) * kind.numpy.itemsize
    if expected != len(data):
        raise InvalidArgument(
            f"{field}.data", f"{len(data)} bytes",
            f"shape {shape} of {dtype_name(t.dtype)} needs {expected} bytes",
        )
    array = np.frombuffer(data, dtype=kind.numpy).reshape(tuple(shape))
    if kind.wire == DType.BOOL and array.size and np.frombuffer(data, np.uint8).max() > 1:
        raise InvalidArgument(f"{field}.data", "bool bytes", "bool elements must be 0 or 1")
    return kind, array


def to_numpy(t: Tensor, field: str, *, dtypes: Iterable[int] | None = None,
             rank: int | None = None, finite: bool = False, nonempty: bool = False) -> np.ndarray:
    """Read-only numpy view of a tensor (bfloat16 comes back as its uint16 bit patterns).
    finite: refuse NaN / inf elements; nonempty: refuse a zero dimension."""
    kind, array = _decode(t, field, dtypes, rank)
    _check_content(kind, array, field, finite, nonempty)
    return array


def to_torch(t: Tensor, field: str, *, dtypes: Iterable[int] | None = None,
             rank: int | None = None, finite: bool = False, nonempty: bool = False) -> torch.Tensor:
    """torch view over the payload (no copy beyond protobuf's own); move or cast it before writing.
    finite: refuse NaN / inf elements; nonempty: refuse a zero dimension."""
    kind, array = _decode(t, field, dtypes, rank)
    _check_content(kind, array, field, finite, nonempty)
    if array.size == 0:
        return torch.empty(array.shape, dtype=kind.torch)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if kind.wire == DType.BFLOAT16 else tensor


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def from_numpy(array: np.ndarray) -> Tensor:
    kind = _BY_NUMPY.get(array.dtype.newbyteorder("="))
    if kind is None:
        raise TypeError(f"no wire dtype for numpy {array.dtype}")
    data = np.ascontiguousarray(_little_endian(array)).tobytes()
    return Tensor(dtype=kind.wire, shape=array.shape, data=data)


def from_torch(tensor: torch.Tensor) -> Tensor:
    kind = _BY_TORCH.get(tensor.dtype)
    if kind is None:
        raise TypeError(f"no wire dtype for torch {tensor.dtype}")
    tensor = tensor.detach().to("cpu").contiguous()
    if kind.wire == DType.BFLOAT16:
        tensor = tensor.view(torch.int16)
    data = _little_endian(tensor.numpy()).tobytes()
    return Tensor(dtype=kind.wire, shape=tuple(tensor.shape), data=data)


def wire_dtype(dtype: torch.dtype) -> int:
    return _BY_TORCH[dtype].wire



def rgb_images(tensors: Iterable[tensor_pb2.Tensor], field: str, max_images: int,
               max_image_bytes: int) -> list[np.ndarray]:
    """A call's images: 1..max_images uint8 [H, W, 3] RGB tensors, each within the memory one
    image may take (diffmesh.imaging.decode_cost), checked before any is used."""
    from diffmesh.imaging import decode_cost

    tensors = list(tensors)
    if not tensors:
        raise InvalidArgument(field, 0, "needs at least one uint8 [H, W, 3] RGB image")
    if len(tensors) > max_images:
        raise InvalidArgument(field, len(tensors), f"at most {max_images} images per call")
    images = []
    for i, tensor in enumerate(tensors):
        name = f"{field}[{i}]"
        image = to_numpy(tensor, name, dtypes=(tensor_pb2.UINT8,), rank=3, nonempty=True)
        if image.shape[2] != 3:
            raise InvalidArgument(f"{name}.shape", list(image.shape), "expected [H, W, 3] RGB")
        if decode_cost(image.shape[1], image.shape[0]) > max_image_bytes:
            raise InvalidArgument(f"{name}.shape", list(image.shape),
                                  f"an image of {image.shape[1]}x{image.shape[0]} needs more than the "
                                  f"{max_image_bytes // 2**20} MiB allowed per image")
        images.append(image)
    return images
