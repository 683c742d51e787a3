"""What-if: a one-copy sender and zero-copy receiver for a message carrying one big Tensor.

The bytes on the wire are ordinary protobuf (any diffmesh.v1 parser reads them): the sender
serialises the message with the Tensor's header (dtype, shape) but no data, then appends a second
occurrence of the same Tensor field holding only `data`; protobuf merges repeated occurrences of a
message field, so the receiver sees one Tensor. b"".join copies the payload once (from the array's
memory into the outgoing bytes) instead of tobytes + field set + sub-message copy + serialise.

The receiver walks the top-level fields, takes the Tensor field's `data` as a memoryview slice of
the received bytes (no copy) and parses everything else with FromString (small).
Used by bench.hops as the `zero_copy` variant, to show what the wire format allows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_LEN = 2
_VARINT = 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _field_number(cls: Any, field: str) -> int:
    return cls.DESCRIPTOR.fields_by_name[field].number


def encode(message: Any, field: str, array: np.ndarray, wire_dtype: int) -> bytes:
    """message: the message with every field set except `field`; array: C-contiguous, little-endian."""
    target = getattr(message, field)
    target.dtype = wire_dtype
    del target.shape[:]
    target.shape.extend(array.shape)
    head = message.SerializeToString()
    number = _field_number(type(message), field)
    data = memoryview(np.ascontiguousarray(array)).cast("B")
    inner_prefix = _varint((3 << 3) | _LEN) + _varint(data.nbytes)  # Tensor.data = 3
    outer_prefix = _varint((number << 3) | _LEN) + _varint(len(inner_prefix) + data.nbytes)
    return b"".join((head, outer_prefix, inner_prefix, data))


def decode(data: bytes, cls: Any, field: str) -> tuple[Any, int, tuple[int, ...], memoryview]:
    """-> (the message without the tensor's data, dtype, shape, data as a view of `data`)."""
    buf = memoryview(data)
    number = _field_number(cls, field)
    rest: list[memoryview] = []
    dtype = 0
    shape: list[int] = []
    payload = buf[0:0]
    pos = 0
    end = len(buf)
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos)
        wire = key & 7
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if key >> 3 == number:
                inner = buf[pos:pos + size]
                ipos = 0
                while ipos < size:
                    ikey, ipos = _read_varint(inner, ipos)
                    inum, iwire = ikey >> 3, ikey & 7
                    if iwire == _VARINT:
                        value, ipos = _read_varint(inner, ipos)
                        if inum == 1:
                            dtype = value
                        elif inum == 2:
                            shape.append(value)
                    elif iwire == _LEN:
                        isize, ipos = _read_varint(inner, ipos)
                        if inum == 2:  # packed shape
                            sub, spos = inner[ipos:ipos + isize], 0
                            while spos < isize:
                                value, spos = _read_varint(sub, spos)
                                shape.append(value)
                        elif inum == 3:
                            payload = inner[ipos:ipos + isize]
                        ipos += isize
                    else:
                        raise ValueError(f"unexpected wire type {iwire} in Tensor")
                pos += size
                continue
            pos += size
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"unexpected wire type {wire}")
        rest.append(buf[start:pos])
    message = cls.FromString(b"".join(rest))
    return message, dtype, tuple(shape), payload
