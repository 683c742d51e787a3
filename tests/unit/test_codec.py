"""The tensor codec: exact round trips, zero-copy decode, and no crash on any malformed payload."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmesh.runtime import codec
from diffmesh.runtime.codec import DType, Tensor
from diffmesh.errors import InvalidArgument

FIELD = "request.latents"
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
INTP_MAX = np.iinfo(np.intp).max

# wire dtype -> (numpy carrier dtype, torch dtype, torch integer dtype of the same width)
SPEC = {
    DType.FLOAT16: (np.dtype("<f2"), torch.float16, torch.int16),
    DType.BFLOAT16: (np.dtype("<u2"), torch.bfloat16, torch.int16),
    DType.FLOAT32: (np.dtype("<f4"), torch.float32, torch.int32),
    DType.FLOAT64: (np.dtype("<f8"), torch.float64, torch.int64),
    DType.UINT8: (np.dtype("u1"), torch.uint8, torch.uint8),
    DType.INT32: (np.dtype("<i4"), torch.int32, torch.int32),
    DType.INT64: (np.dtype("<i8"), torch.int64, torch.int64),
    DType.BOOL: (np.dtype("?"), torch.bool, torch.uint8),
}
NUMPY_WIRE = [d for d in codec.WIRE_DTYPES if d != DType.BFLOAT16]

fast = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


def test_wire_dtypes_cover_every_enum_value_but_unspecified() -> None:
    assert sorted(codec.WIRE_DTYPES) == sorted(v for v in DType.values() if v != DType.DTYPE_UNSPECIFIED)
    assert set(SPEC) == set(codec.WIRE_DTYPES)


def _raw(wire: int, shape: tuple[int, ...], data: bytes) -> bytes:
    """Payload bytes for `shape` of `wire`; bool bytes are forced to 0/1."""
    if wire == DType.BOOL:
        data = bytes(b & 1 for b in data)
    return data


@st.composite
def payloads(draw: st.DrawFn, wires: list[int]) -> tuple[int, tuple[int, ...], bytes]:
    wire = draw(st.sampled_from(wires))
    shape = draw(shapes)
    size = math.prod(shape) * SPEC[wire][0].itemsize
    return wire, shape, _raw(wire, shape, draw(st.binary(min_size=size, max_size=size)))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view of the same memory, so NaN payloads compare exactly."""
    return tensor.contiguous().view(SPEC[codec.wire_dtype(tensor.dtype)][2])


# --- round trips -----------------------------------------------------------------------------


@fast
@given(payloads(list(codec.WIRE_DTYPES)))
def test_torch_round_trip_is_bit_exact(payload: tuple[int, tuple[int, ...], bytes]) -> None:
    wire, shape, data = payload
    carrier, torch_dtype, _ = SPEC[wire]
    if wire == DType.BFLOAT16:
        original = torch.from_numpy(np.frombuffer(data, "<i2").reshape(shape).copy()).view(torch.bfloat16)
    else:
        original = torch.from_numpy(np.frombuffer(data, carrier).reshape(shape).copy())

    message = codec.from_torch(original)
    assert message.dtype == wire
    assert tuple(message.shape) == shape
    assert message.data == data  # little-endian C order, every NaN payload preserved

    decoded = codec.to_torch(Tensor.FromString(message.SerializeToString()), FIELD)
    assert decoded.dtype == torch_dtype
    assert tuple(decoded.shape) == shape
    assert torch.equal(_bits(decoded), _bits(original))


@fast
@given(payloads(NUMPY_WIRE))
def test_numpy_round_trip_is_bit_exact(payload: tuple[int, tuple[int, ...], bytes]) -> None:
    wire, shape, data = payload
    carrier = SPEC[wire][0]
    original = np.frombuffer(data, carrier).reshape(shape).copy()

    message = codec.from_numpy(original)
    assert message.dtype == wire
    assert tuple(message.shape) == shape
    assert message.data == data

    decoded = codec.to_numpy(Tensor.FromString(message.SerializeToString()), FIELD)
    assert decoded.dtype == carrier
    assert decoded.shape == shape
    assert decoded.tobytes() == original.tobytes()


def test_nan_payloads_survive_bit_for_bit() -> None:
    # quiet, signalling, negative and payload-carrying NaNs, plus infinities and -0.0
    patterns32 = np.array([0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FBFFFFF, 0x7F800000, 0x80000000],
                          dtype=np.uint32)
    patterns16 = np.array([0x7E00, 0x7C01, 0xFE01, 0x7DFF, 0x7C00, 0x8000], dtype=np.uint16)
    for array in (patterns32.view(np.float32), patterns16.view(np.float16)):
        assert codec.to_numpy(codec.from_numpy(array), FIELD).tobytes() == array.tobytes()
        tensor = torch.from_numpy(array.copy())
        assert codec.to_torch(codec.from_torch(tensor), FIELD).numpy().tobytes() == array.tobytes()
    bf16 = torch.from_numpy(patterns16.astype(np.int16)).view(torch.bfloat16)
    assert torch.equal(_bits(codec.to_torch(codec.from_torch(bf16), FIELD)), _bits(bf16))


def test_bfloat16_travels_as_bit_patterns() -> None:
    values = torch.tensor([1.0, -2.5, 3.140625, float("inf")], dtype=torch.bfloat16)
    message = codec.from_torch(values)
    assert message.dtype == DType.BFLOAT16
    assert message.data == values.view(torch.int16).numpy().astype("<i2").tobytes()
    as_numpy = codec.to_numpy(message, FIELD)
    assert as_numpy.dtype == np.dtype("<u2")  # numpy has no bfloat16: the uint16 carrier
    assert as_numpy.tolist() == [0x3F80, 0xC020, 0x4049, 0x7F80]
    assert torch.equal(codec.to_torch(message, FIELD), values)


def test_scalars_empty_and_noncontiguous_inputs() -> None:
    scalar = codec.from_numpy(np.array(7, dtype=np.int64))
    assert list(scalar.shape) == [] and codec.to_numpy(scalar, FIELD)[()] == 7
    assert codec.to_torch(codec.from_torch(torch.tensor(2.5)), FIELD).item() == 2.5

    empty = codec.to_torch(codec.from_torch(torch.zeros(3, 0, 2, dtype=torch.float16)), FIELD)
    assert empty.shape == (3, 0, 2) and empty.dtype == torch.float16

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()  # not contiguous: must still encode in C order of the logical shape
    decoded = codec.to_torch(codec.from_torch(transposed), FIELD)
    assert torch.equal(decoded, transposed.contiguous())
    grad = torch.ones(2, requires_grad=True) * 3
    assert codec.to_torch(codec.from_torch(grad), FIELD).tolist() == [3.0, 3.0]

    strided = np.arange(20, dtype=np.int32).reshape(4, 5)[::2, ::-1]
    assert np.array_equal(codec.to_numpy(codec.from_numpy(strided), FIELD), strided)


@pytest.mark.parametrize("dtype", [">f2", ">f4", ">f8", ">i4", ">i8"])
def test_big_endian_numpy_is_encoded_little_endian(dtype: str) -> None:
    values = np.array([[1, -2, 3], [4, 5, -6]], dtype=dtype)
    message = codec.from_numpy(values)
    assert message.data == values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert message.data != values.tobytes()
    decoded = codec.to_numpy(message, FIELD)
    assert decoded.dtype.byteorder in ("<", "=")
    assert np.array_equal(decoded, values)


def test_unsupported_dtypes_are_type_errors() -> None:
    for array in (np.zeros(2, np.complex64), np.zeros(2, np.uint16), np.zeros(2, np.int8)):
        with pytest.raises(TypeError, match=str(array.dtype)):
            codec.from_numpy(array)
    with pytest.raises(TypeError, match="complex64"):
        codec.from_torch(torch.zeros(2, dtype=torch.complex64))


def test_wire_dtype() -> None:
    for wire, (_, torch_dtype, _) in SPEC.items():
        assert codec.wire_dtype(torch_dtype) == wire


# --- zero copy ---------------------------------------------------------------------------------


def _root(array: np.ndarray) -> object:
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base


@pytest.mark.parametrize("wire", NUMPY_WIRE)
def test_numpy_decode_is_a_read_only_view_of_the_message_bytes(wire: int) -> None:
    carrier = SPEC[wire][0]
    message = codec.from_numpy(np.ones((2, 3), dtype=carrier))
    array = codec.to_numpy(message, FIELD)
    assert array.flags.writeable is False
    assert array.base is not None
    owner = _root(array)
    assert isinstance(owner, bytes) and owner == message.data
    # the array's memory is the bytes object's buffer itself, not a copy of it
    assert array.ctypes.data == np.frombuffer(owner, np.uint8).ctypes.data
    with pytest.raises(ValueError):
        array[0, 0] = 0


def test_torch_decode_shares_memory_with_the_numpy_view(monkeypatch: pytest.MonkeyPatch) -> None:
    views: list[np.ndarray] = []
    real_decode = codec._decode

    def spy(t: Tensor, field: str, dtypes: object, rank: object) -> tuple:
        kind, array = real_decode(t, field, dtypes, rank)
        views.append(array)
        return kind, array

    monkeypatch.setattr(codec, "_decode", spy)
    for source in (torch.randn(4, 5), torch.randn(3, 2).to(torch.bfloat16), torch.arange(6)):
        tensor = codec.to_torch(codec.from_torch(source), FIELD)
        assert tensor.data_ptr() == views[-1].ctypes.data
        assert _root(views[-1]) is not None and isinstance(_root(views[-1]), bytes)
        assert torch.equal(_bits(tensor), _bits(source))


# --- validation ----------------------------------------------------------------------------------


def _msg(wire: int, shape: list[int], nbytes: int) -> Tensor:
    return Tensor(dtype=wire, shape=shape, data=bytes(nbytes))


@pytest.mark.parametrize("decode", [codec.to_numpy, codec.to_torch])
def test_dtype_restriction_names_field_dtype(decode) -> None:
    message = _msg(DType.INT64, [2], 16)
    with pytest.raises(InvalidArgument) as info:
        decode(message, FIELD, dtypes=(DType.FLOAT16, DType.FLOAT32))
    assert info.value.field == f"{FIELD}.dtype"
    assert f"{FIELD}.dtype" in str(info.value) and "INT64" in str(info.value)
    assert "FLOAT16" in str(info.value) and "FLOAT32" in str(info.value)
    # the same tensor passes when its dtype is allowed (a generator works as `dtypes` too)
    assert tuple(decode(message, FIELD, dtypes=(d for d in [DType.INT64])).shape) == (2,)


@pytest.mark.parametrize("decode", [codec.to_numpy, codec.to_torch])
@pytest.mark.parametrize("wire", [0, 99, -1, 2**31 - 1])
def test_unknown_dtype_names_field_dtype(decode, wire: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(_msg(wire, [1], 4), FIELD)
    assert info.value.field == f"{FIELD}.dtype"


@pytest.mark.parametrize("decode", [codec.to_numpy, codec.to_torch])
def test_rank_restriction_names_field_shape(decode) -> None:
    message = _msg(DType.FLOAT32, [1, 4, 8, 8], 4 * 256)
    assert tuple(decode(message, FIELD, rank=4).shape) == (1, 4, 8, 8)
    for rank in (3, 5, 0):
        with pytest.raises(InvalidArgument) as info:
            decode(message, FIELD, rank=rank)
        assert info.value.field == f"{FIELD}.shape" and f"{FIELD}.shape" in str(info.value)


@pytest.mark.parametrize("decode", [codec.to_numpy, codec.to_torch])
@pytest.mark.parametrize("shape", [[1] * 9, [-1, 2], [0, -3], [2**62, 2**62, 0], [0, 2**63 - 1],
                                   [2**40, 2**40]])
def test_bad_shapes_are_invalid_arguments(decode, shape: list[int]) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(_msg(DType.FLOAT32, shape, 0 if 0 in shape else 4), FIELD)
    assert info.value.field in (f"{FIELD}.shape", f"{FIELD}.data")
    assert FIELD in str(info.value)


@pytest.mark.parametrize("decode", [codec.to_numpy, codec.to_torch])
@pytest.mark.parametrize("nbytes", [0, 23, 25, 48])
def test_byte_length_mismatch_names_field_data(decode, nbytes: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(_msg(DType.FLOAT32, [2, 3], nbytes), FIELD)
    assert info.value.field == f"{FIELD}.data"
    assert f"{nbytes} bytes" in str(info.value) and "24 bytes" in str(info.value)


@pytest.mark.parametrize("decode", [codec.to_numpy, codec.to_torch])
def test_bool_bytes_must_be_zero_or_one(decode) -> None:
    good = decode(Tensor(dtype=DType.BOOL, shape=[3], data=b"\x00\x01\x01"), FIELD)
    assert [bool(x) for x in good.tolist()] == [False, True, True]
    for bad in (b"\x00\x02\x01", b"\xff\x00\x00", b"\x01\x01\x80"):
        with pytest.raises(InvalidArgument) as info:
            decode(Tensor(dtype=DType.BOOL, shape=[3], data=bad), FIELD)
        assert info.value.field == f"{FIELD}.data"


# --- fuzz: any message is either decoded correctly or rejected as InvalidArgument ---------------

_huge = st.sampled_from([2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1])
_dims = st.one_of(st.integers(0, 5), _huge, st.integers(0, 2**63 - 1))


@st.composite
def messages(draw: st.DrawFn) -> Tensor:
    wire = draw(st.one_of(st.sampled_from([*codec.WIRE_DTYPES, 0, 9, 99, -1]), st.integers(*INT32)))
    how = draw(st.sampled_from(["consistent", "huge", "random"]))
    if how == "consistent":  # a right-sized payload (give or take a byte): the success path
        shape = draw(st.lists(st.integers(0, 4), max_size=10))
        itemsize = SPEC[wire][0].itemsize if wire in SPEC else draw(st.integers(1, 8))
        size = max(math.prod(shape) * itemsize + draw(st.sampled_from([0, 0, 0, 1, -1])), 0)
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        shape = draw(st.lists(_dims, max_size=12))
        if how == "huge":  # zero elements, but dimensions whose product overflows 64 bits
            shape.insert(draw(st.integers(0, len(shape))), 0)
            data = b""
        else:
            data = draw(st.binary(max_size=64))
        if shape and draw(st.integers(0, 3)) == 0:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-(2**63), -1))
    return Tensor(dtype=wire, shape=shape, data=data)


def _acceptable(t: Tensor) -> bool:
    """Independent statement of the contract."""
    if t.dtype not in SPEC:
        return False
    shape, itemsize = list(t.shape), SPEC[t.dtype][0].itemsize
    if len(shape) > codec.MAX_RANK or any(d < 0 for d in shape):
        return False
    if math.prod(d for d in shape if d) * itemsize > INTP_MAX:
        return False
    if math.prod(shape) * itemsize != len(t.data):
        return False
    return t.dtype != DType.BOOL or all(b <= 1 for b in t.data)


@settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.sampled_from(["to_numpy", "to_torch"]),
       st.sampled_from(["latents", "request.init.latents", "x"]))
def test_any_message_decodes_correctly_or_is_invalid_argument(t: Tensor, how: str, field: str) -> None:
    t = Tensor.FromString(t.SerializeToString())
    try:
        result = getattr(codec, how)(t, field)
    except InvalidArgument as exc:  # any other exception fails the test
        assert exc.field.startswith(field + ".")
        assert field in str(exc)
        assert not _acceptable(t), f"valid tensor rejected: {exc}"
        return
    assert _acceptable(t), "malformed tensor accepted"
    assert tuple(result.shape) == tuple(t.shape)
    if how == "to_torch":
        assert result.dtype == SPEC[t.dtype][1]
        raw = _bits(result).numpy().tobytes() if result.numel() else b""
    else:
        assert result.dtype == SPEC[t.dtype][0]
        raw = result.tobytes()
    assert raw == t.data
