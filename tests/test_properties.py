"""Property-based tests of every wire parser: whatever the bytes, a clear BadRequest or a valid value.

No parser may raise anything but BadRequest, hang, or build an object array.
"""

from __future__ import annotations

import math

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdepth.errors import BadRequest
from zdepth.protocol import (
    MODEL_OPS,
    OPS,
    VERSION,
    parse_command,
    parse_request_header,
    peek_request_id,
    request_header,
)
from zdepth.protocol.codec import (
    ALLOWED_DTYPES,
    array_frames,
    decode_array,
    decode_arrays,
    decode_image_frame,
    image_descriptor,
    params_frame,
    parse_params,
    unpack_body,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
header_like = st.dictionaries(
    st.sampled_from(["v", "id", "key", "op", "model", "timeout_ms", "cmd", "image", "input_size", "max_depth", "intrinsics", "depth_dtype"]),
    msgpack_values | st.sampled_from([VERSION, "health", "relative_depth", "metric_depth", "pointcloud", "vits", "float16"]),
    max_size=8,
)


def packed(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@SETTINGS
@given(st.binary(max_size=300) | header_like.map(packed) | msgpack_values.map(packed))
def test_request_header_parser_never_raises_anything_else(frame):
    try:
        header = parse_request_header(frame)
    except BadRequest:
        return
    assert header.op in OPS and isinstance(header.id, str)


@SETTINGS
@given(st.binary(max_size=300) | header_like.map(packed))
def test_peek_and_command_parsers_are_total(frame):
    assert peek_request_id(frame) is None or isinstance(peek_request_id(frame), str)
    try:
        assert isinstance(parse_command(frame)["cmd"], str)
    except BadRequest:
        pass


@SETTINGS
@given(
    request_id=st.text(min_size=1, max_size=64),
    key=st.none() | st.text(max_size=40),
    op=st.sampled_from(sorted(OPS)),
    model=st.none() | st.from_regex(r"[a-z0-9]{1,20}(-[a-z0-9]{1,20})?", fullmatch=True),
    timeout_ms=st.none() | st.floats(min_value=0.001, max_value=3_600_000),
)
def test_request_header_round_trips(request_id, key, op, model, timeout_ms):
    """Every well-formed header (model ids as PROTOCOL.md spells them) reads back as it was written."""
    header = parse_request_header(request_header(id=request_id, key=key, op=op, model=model, timeout_ms=timeout_ms))
    assert (header.id, header.key, header.op, header.timeout_ms) == (request_id, key, op, timeout_ms)
    assert header.model == model


@SETTINGS
@given(op=st.sampled_from(sorted(MODEL_OPS)), frame=st.binary(max_size=300) | header_like.map(packed))
def test_params_parser_is_total(op, frame):
    try:
        params = parse_params(op, frame)
    except BadRequest:
        return
    assert isinstance(params.image, dict)


@SETTINGS
@given(
    op=st.sampled_from(sorted(MODEL_OPS)),
    input_size=st.none() | st.integers(1, 147).map(lambda n: 14 * n),
    max_depth=st.none() | st.floats(min_value=0.01, max_value=1000),
    depth_dtype=st.sampled_from(["float32", "float16"]),
)
def test_params_round_trip(op, input_size, max_depth, depth_dtype):
    intrinsics = (500.0, 510.0, 320.0, 240.0) if op == "pointcloud" else None
    if op == "relative_depth":
        max_depth = None
    frame = params_frame({"format": "encoded"}, input_size=input_size, max_depth=max_depth, intrinsics=intrinsics, depth_dtype=depth_dtype)
    params = parse_params(op, frame)
    assert (params.input_size, params.max_depth, params.intrinsics, params.depth_dtype) == (input_size, max_depth, intrinsics, depth_dtype)


dtypes = st.sampled_from(sorted(ALLOWED_DTYPES))
shapes = st.lists(st.integers(0, 6), min_size=1, max_size=4)


@SETTINGS
@given(dtype=dtypes, shape=shapes, data=st.data())
def test_arrays_round_trip_through_frames(dtype, shape, data):
    raw = data.draw(st.binary(min_size=math.prod(shape) * np.dtype(dtype).itemsize, max_size=math.prod(shape) * np.dtype(dtype).itemsize))
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    descs, frames = array_frames({"a": array})
    out = decode_arrays(descs, [f.tobytes() for f in frames])["a"]
    assert out.dtype == array.dtype and out.shape == array.shape and out.tobytes() == array.tobytes()


@SETTINGS
@given(desc=msgpack_values | st.fixed_dictionaries({"dtype": st.text(max_size=5) | dtypes, "shape": msgpack_values | shapes}), frame=st.binary(max_size=200))
def test_array_decoder_is_total(desc, frame):
    try:
        array = decode_array(desc, frame)
    except BadRequest:
        return
    assert array.dtype.kind not in "OV" and array.nbytes == len(frame)


@pytest.mark.parametrize("bad", [np.array([{"x": 1}], dtype=object), np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]), np.array(["s"])])
def test_msgpack_numpy_object_and_void_arrays_are_refused_before_decoding(bad):
    frame = msgpack.packb({"image": bad}, default=msgpack_numpy.encode, use_bin_type=True)
    with pytest.raises(BadRequest):
        unpack_body(frame, what="params frame")


def test_msgpack_numpy_pickle_payload_is_never_unpickled(tmp_path):
    """A hand-made msgpack-numpy object array whose data is a pickle that would write a file."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": (1,), b"data": pickle.dumps([Boom()])}
    frame = msgpack.packb({"image": evil}, use_bin_type=True)
    with pytest.raises(BadRequest):
        unpack_body(frame, what="params frame")
    assert not (tmp_path / "pwned").exists()


@SETTINGS
@given(desc=msgpack_values | st.fixed_dictionaries({"format": st.sampled_from(["raw", "encoded", "gif"]), "dtype": dtypes, "shape": shapes}), frame=st.binary(max_size=200))
def test_image_frame_decoder_is_total(desc, frame):
    try:
        image = decode_image_frame(desc, frame)
    except BadRequest:
        return
    assert isinstance(image, (bytes, memoryview, np.ndarray))


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 8), st.sampled_from([None, 1, 3, 4]))
def test_image_descriptor_round_trips_raw_arrays(h, w, c):
    image = np.arange(h * w * (c or 1), dtype=np.uint8).reshape((h, w) if c is None else (h, w, c))
    desc, payload = image_descriptor(image)
    out = decode_image_frame(desc, payload.tobytes())
    assert np.array_equal(out, image)
