import struct
import zlib

import cv2
import numpy as np
import pytest

from conftest import data_file
from zdepth.errors import BadRequest
from zdepth.protocol.images import (
    EncodedJpeg,
    decode_image,
    device_decodable_jpeg,
    encode_jpeg,
    read_image,
)

BGR = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def encode(ext, image):
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def assert_bgr8(image, shape):
    assert image.shape == shape and image.dtype == np.uint8 and image.flags.c_contiguous


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_formats_roundtrip(ext):
    if ext == ".webp":
        ok, buf = cv2.imencode(ext, BGR, [cv2.IMWRITE_WEBP_QUALITY, 101])
        data = buf.tobytes()
    else:
        data = encode(ext, BGR)
    np.testing.assert_array_equal(decode_image(data), BGR)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_jpeg_from_any_buffer(wrap):
    data = encode_jpeg(BGR, quality=95)
    assert data[:3] == b"\xff\xd8\xff"
    image = decode_image(wrap(data))
    assert_bgr8(image, BGR.shape)
    np.testing.assert_array_equal(image, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def test_grayscale_and_alpha_become_bgr():
    gray = BGR[..., 0].copy()
    for image in (decode_image(encode(".png", gray)), decode_image(gray), decode_image(gray[..., None])):
        assert_bgr8(image, BGR.shape)
        np.testing.assert_array_equal(image, np.repeat(gray[..., None], 3, axis=2))
    bgra = np.concatenate([BGR, np.full((5, 7, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(encode(".png", bgra)), BGR)
    image = decode_image(bgra)
    assert_bgr8(image, BGR.shape)
    np.testing.assert_array_equal(image, BGR)


def test_uint16_scaled_by_1_over_257():
    wide = (BGR.astype(np.uint16) * 257) + np.uint16(100)
    np.testing.assert_array_equal(decode_image(wide), BGR)
    np.testing.assert_array_equal(decode_image(encode(".png", wide)), BGR)
    extremes = np.array([[0, 128, 129, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(decode_image(extremes)[0, :, 0], [0, 0, 1, 255])


def test_array_passes_through_and_non_contiguous_is_copied():
    assert decode_image(BGR) is BGR
    view = BGR[:, ::2]
    image = decode_image(view)
    assert_bgr8(image, view.shape)
    np.testing.assert_array_equal(image, view)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 4, 3), np.float32), "float32"),
        (np.zeros((4, 4, 3), np.int16), "int16"),
        (np.zeros((4, 4, 3), bool), "bool"),
        (np.zeros(16, np.uint8), r"\(16,\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"\(2, 4, 4, 3\)"),
        (np.zeros((4, 4, 5), np.uint8), r"\(4, 4, 5\)"),
        (np.zeros((4, 4, 2), np.uint8), r"\(4, 4, 2\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_arrays_name_the_value(array, match):
    with pytest.raises(BadRequest, match=match):
        decode_image(array)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 20, "GIF89a"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 40, "JPEG"),
        ("a string", "str"),
    ],
)
def test_bad_bytes(data, match):
    with pytest.raises(BadRequest, match=match):
        decode_image(data)


def test_truncated_png_is_bad_request():
    data = encode(".png", BGR)
    with pytest.raises(BadRequest, match="PNG"):
        decode_image(data[:40])


def png_header_only(width, height):
    """A PNG that declares width x height but carries almost no data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 16


def test_png_bomb_refused_from_header(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded despite the header")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    with pytest.raises(BadRequest, match="100000x100000"):
        decode_image(png_header_only(100_000, 100_000))
    with pytest.raises(BadRequest, match="above the limit of 20"):
        decode_image(encode(".png", BGR), max_pixels=20)


def test_jpeg_header_checked_before_decode(monkeypatch):
    data = encode_jpeg(np.zeros((48, 64, 3), np.uint8))
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded despite the header"))
    with pytest.raises(BadRequest, match="64x48"):
        decode_image(data, max_pixels=64 * 48 - 1)


@pytest.mark.parametrize("ext", [".bmp", ".webp"])
def test_other_headers_checked(ext):
    data = encode(ext, np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(BadRequest, match="header declares 64x48"):
        decode_image(data, max_pixels=100)
    assert decode_image(data, max_pixels=64 * 48).shape == (48, 64, 3)


def test_array_limit_and_no_limit():
    with pytest.raises(BadRequest, match="limit"):
        decode_image(BGR, max_pixels=34)
    assert decode_image(BGR, max_pixels=None) is BGR


def test_read_image_real_photo():
    path = data_file("demo04.jpg")
    image = read_image(path)
    assert_bgr8(image, (416, 640, 3))
    np.testing.assert_array_equal(image, cv2.imread(str(path)))


def test_read_image_names_the_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not an image")
    with pytest.raises(BadRequest, match="broken.jpg"):
        read_image(path)


def test_encode_jpeg_validates_quality():
    with pytest.raises(ValueError, match="101"):
        encode_jpeg(BGR, quality=101)


def with_exif_orientation(jpg: bytes, orientation: int) -> bytes:
    """``jpg`` with an APP1 Exif segment whose IFD0 holds only Orientation."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:]


def test_jpeg_exif_orientation_applied_like_imread():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255
    rotated = with_exif_orientation(encode(".jpg", image), 6)
    assert decode_image(rotated).shape == (40, 20, 3)


FRAME = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(".jpg", FRAME), id="baseline"),
        pytest.param(cv2.imencode(".jpg", FRAME, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(), id="progressive"),
        pytest.param(encode(".jpg", FRAME[:, :, 0]), id="grey"),
    ],
)
@pytest.mark.parametrize("wrap", [bytes, memoryview])
def test_device_decodable_jpeg_keeps_the_bytes_and_the_size(data, wrap):
    jpeg = device_decodable_jpeg(wrap(data))
    assert isinstance(jpeg, EncodedJpeg) and jpeg.shape == (48, 64, 3)
    assert bytes(jpeg.data) == data
    np.testing.assert_array_equal(jpeg.decode(), decode_image(data))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(with_exif_orientation(encode(".jpg", FRAME), 1), id="exif"),
        pytest.param(encode(".png", FRAME), id="png"),
        pytest.param(b"\xff\xd8\xff\xe0", id="truncated header"),
        pytest.param(encode(".jpg", FRAME)[:-200], id="truncated scan"),
        pytest.param(b"not an image at all", id="junk"),
    ],
)
def test_device_decodable_jpeg_leaves_the_rest_to_cv2(data):
    assert device_decodable_jpeg(data) is None


def test_device_decodable_jpeg_refuses_a_bomb_from_its_header():
    with pytest.raises(BadRequest, match="JPEG header declares 64x48"):
        device_decodable_jpeg(encode(".jpg", FRAME), max_pixels=64 * 48 - 1)
