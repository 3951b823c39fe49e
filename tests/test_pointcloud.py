import json

import numpy as np
import pytest

from conftest import read_ply
from zdepth.errors import BadRequest, ConfigError
from zdepth.pointcloud import Intrinsics, depth_to_points, write_ply

# The real 4095x3071 camera of tests/data/README.md.
CAMERA = Intrinsics(fx=1982.43, fy=1978.03, cx=2061.59, cy=1546.35)


def test_hand_checked_pixels():
    depth = np.ones((4, 5), dtype=np.float32)
    depth[0, 0], depth[3, 4], depth[1, 2] = 2.0, 5.0, 0.5
    points, colors = depth_to_points(depth, CAMERA)
    assert points.shape == (20, 3) and points.dtype == np.float32 and colors is None
    # (u, v, Z) -> X = (u - cx) Z / fx, Y = (v - cy) Z / fy, worked out by hand.
    expected = {
        (0, 0): (-2.079861584015577, -1.5635253257028456, 2.0),
        (4, 3): (-5.189565331436671, -3.901230011678286, 5.0),
        (2, 1): (-0.5194609645737807, -0.3906285546730838, 0.5),
    }
    for (u, v), xyz in expected.items():
        np.testing.assert_allclose(points[v * 5 + u], xyz, rtol=1e-6)


def test_principal_point_is_on_the_axis():
    intr = Intrinsics(fx=100.0, fy=200.0, cx=2.0, cy=1.0)
    points, _ = depth_to_points(np.full((3, 5), 4.0), intr)
    np.testing.assert_array_equal(points[1 * 5 + 2], [0.0, 0.0, 4.0])
    np.testing.assert_allclose(points[0], [-2 * 4 / 100, -1 * 4 / 200, 4.0], rtol=1e-6)


def test_colors_are_rgb_in_pixel_order():
    bgr = np.zeros((2, 3, 3), dtype=np.uint8)
    bgr[1, 2] = (10, 20, 30)
    _, colors = depth_to_points(np.ones((2, 3)), CAMERA, bgr)
    assert colors.shape == (6, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors[5], (30, 20, 10))


@pytest.mark.parametrize(
    "depth, colors",
    [
        (np.ones((2, 3, 1)), None),
        (np.ones((0, 3)), None),
        (np.ones((2, 3)), np.zeros((3, 2, 3), np.uint8)),
        (np.ones((2, 3)), np.zeros((2, 3, 3), np.float32)),
    ],
)
def test_bad_shapes(depth, colors):
    with pytest.raises(BadRequest):
        depth_to_points(depth, CAMERA, colors)


@pytest.mark.parametrize(
    "kwargs", [dict(fx=0.0), dict(fy=-1.0), dict(cx=float("nan")), dict(fx="500"), dict(cy=True)]
)
def test_intrinsics_validation_names_the_value(kwargs):
    values = dict(fx=500.0, fy=500.0, cx=320.0, cy=240.0) | kwargs
    with pytest.raises(BadRequest, match=next(iter(kwargs))):
        Intrinsics(**values)


def test_from_matrix_roundtrip_and_rejects():
    assert Intrinsics.from_matrix(CAMERA.as_matrix()) == CAMERA
    assert Intrinsics.from_matrix(np.eye(3).tolist()) == Intrinsics(1.0, 1.0, 0.0, 0.0)
    with pytest.raises(BadRequest, match="3x3"):
        Intrinsics.from_matrix(np.eye(4))
    with pytest.raises(BadRequest, match="skew"):
        Intrinsics.from_matrix([[500, 3, 320], [0, 500, 240], [0, 0, 1]])
    with pytest.raises(BadRequest, match="pinhole"):
        Intrinsics.from_matrix([[500, 0, 320], [0, 500, 240], [0, 0, 2]])


K_TEXT = "1982.43 0 2061.59\n0 1978.03 1546.35\n0 0 1\n"


@pytest.mark.parametrize(
    "name, content",
    [
        ("K.txt", K_TEXT),
        ("K.txt", "[[1982.43, 0, 2061.59], [0, 1978.03, 1546.35], [0, 0, 1]]"),
        ("intr.txt", "1982.43, 1978.03, 2061.59, 1546.35"),
        ("intr.json", json.dumps(dict(fx=1982.43, fy=1978.03, cx=2061.59, cy=1546.35))),
        ("intr.json", json.dumps({"camera_intrinsics": dict(fx=1982.43, fy=1978.03, cx=2061.59, cy=1546.35)})),
        ("intr.json", json.dumps({"K": CAMERA.as_matrix().tolist()})),
        ("intr.json", json.dumps([1982.43, 1978.03, 2061.59, 1546.35])),
    ],
)
def test_from_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert Intrinsics.from_file(path) == CAMERA


def test_from_file_npy(tmp_path):
    np.save(tmp_path / "K.npy", CAMERA.as_matrix())
    assert Intrinsics.from_file(tmp_path / "K.npy") == CAMERA


@pytest.mark.parametrize("name, content", [("a.txt", "1 2 3"), ("a.json", "{\"fx\": 1}"), ("a.json", "not json")])
def test_from_file_errors_name_the_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=name):
        Intrinsics.from_file(tmp_path / name)


def test_scaled_keeps_pixel_centres_aligned():
    small = CAMERA.scaled(640 / 4095, 480 / 3071)
    np.testing.assert_allclose(
        [small.fx, small.fy, small.cx, small.cy],
        [309.83032967032966, 309.16782806903285, 321.7802442002442, 241.27401497883423],
    )
    assert CAMERA.scaled(1.0, 1.0) == CAMERA
    back = CAMERA.scaled(0.5, 0.25).scaled(2.0, 4.0)
    np.testing.assert_allclose([back.fx, back.fy, back.cx, back.cy], [CAMERA.fx, CAMERA.fy, CAMERA.cx, CAMERA.cy])
    with pytest.raises(BadRequest):
        CAMERA.scaled(0, 1)


@pytest.mark.parametrize("with_colors", [False, True])
def test_ply_roundtrip(tmp_path, with_colors):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(7, 3)).astype(np.float32)
    colors = rng.integers(0, 256, size=(7, 3), dtype=np.uint8) if with_colors else None
    path = tmp_path / "cloud.ply"
    write_ply(path, points, colors)
    data = path.read_bytes()
    assert b"format binary_little_endian 1.0\n" in data and b"element vertex 7\n" in data
    assert len(data) - data.index(b"end_header\n") - len(b"end_header\n") == 7 * (15 if with_colors else 12)
    got_points, got_colors = read_ply(path)
    np.testing.assert_array_equal(got_points, points)
    if with_colors:
        np.testing.assert_array_equal(got_colors, colors)
    else:
        assert got_colors is None


def test_ply_from_depth(tmp_path):
    bgr = np.random.default_rng(1).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    points, colors = depth_to_points(np.linspace(1, 2, 48).reshape(6, 8), CAMERA, bgr)
    write_ply(tmp_path / "c.ply", points, colors)
    got_points, got_colors = read_ply(tmp_path / "c.ply")
    np.testing.assert_array_equal(got_points, points)
    np.testing.assert_array_equal(got_colors, bgr[..., ::-1].reshape(-1, 3))


def test_write_ply_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError):
        write_ply(tmp_path / "a.ply", np.zeros((3, 2)))
    with pytest.raises(ValueError):
        write_ply(tmp_path / "a.ply", np.zeros((3, 3)), np.zeros((2, 3), np.uint8))
