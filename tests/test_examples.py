"""Every example runs as written, as a subprocess against a live server (headless: no camera, no window)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from procs import REPO, child_env, small_image, small_video, start_live_server

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path):
    server = start_live_server(tmp_path_factory.mktemp("examples-live"), weights_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_image(tmp_path_factory.mktemp("photos") / "street.jpg", "demo01.jpg")


def run_example(name: str, *args: str, live, timeout: float = 90, cwd: Path | None = None, **env_extra: str | None) -> subprocess.CompletedProcess:
    env = child_env(ZDEPTH_KEY=live.key, ZDEPTH_SERVER=live.client_address, **env_extra)
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd
    )


def test_every_example_is_tested() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"camera_loop.py", "one_shot.py", "pointcloud_to_ply.py", "async_client.py"}


@pytest.mark.timeout(150)
def test_one_shot(live, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "depth.png"
    result = run_example("one_shot.py", str(photo), "--input-size", "28", "--out", str(out), live=live)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "depth 96x64" in result.stdout and f"wrote {out}" in result.stdout
    image = cv2.imread(str(out))
    assert image.shape == (64, 96, 3)

    metric = run_example("one_shot.py", str(photo), "--model", "vits-hypersim", "--input-size", "28", "--out", str(tmp_path / "m.png"), live=live)
    assert metric.returncode == 0, metric.stderr
    assert " m\n" in metric.stdout


@pytest.mark.timeout(150)
def test_pointcloud_to_ply(live, photo: Path, tmp_path: Path) -> None:
    from conftest import read_ply

    out = tmp_path / "cloud.ply"
    args = [str(photo), "--fx", "80", "--fy", "80", "--cx", "47.5", "--cy", "31.5", "--input-size", "28", "--out", str(out), "--max-depth", "4"]
    result = run_example("pointcloud_to_ply.py", *args, live=live)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{64 * 96} points" in result.stdout
    points, colors = read_ply(out)
    assert points.shape == (64 * 96, 3) and colors is not None and colors.shape == (64 * 96, 3)
    assert 0 < points[:, 2].max() <= 4.0

    relative = run_example("pointcloud_to_ply.py", str(photo), "--model", "vits", "--fx", "1", "--fy", "1", "--cx", "0", "--cy", "0", live=live)
    assert relative.returncode == 2 and "metric" in relative.stderr


@pytest.mark.timeout(150)
def test_async_client(live, photo: Path, tmp_path: Path) -> None:
    other = small_image(tmp_path / "room.png", "demo04.jpg")
    result = run_example("async_client.py", str(photo), str(other), "--input-size", "28", live=live)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 worker(s)" in result.stdout
    assert "gather: 2 request(s)" in result.stdout and "stream: 2 of 2 result(s)" in result.stdout


@pytest.mark.timeout(150)
def test_camera_loop_headless_on_a_video_file(live, tmp_path: Path) -> None:
    video = small_video(tmp_path / "clip.avi", frames=15, fps=15.0)
    frames = tmp_path / "frames"
    result = run_example("camera_loop.py", "--source", str(video), "--no-display", "--save-dir", str(frames), "--input-size", "28", live=live)
    assert result.returncode == 0, result.stdout + result.stderr
    count = int(result.stdout.split()[0])
    saved = sorted(frames.glob("depth_*.png"))
    assert 1 <= count <= 15 and len(saved) == count
    view = cv2.imread(str(saved[-1]))
    assert view.shape == (64, 2 * 96, 3)  # the frame beside its depth
    indices = [int(p.stem.split("_")[1]) for p in saved]
    assert indices == sorted(indices) and indices[-1] <= 14  # in order; latest-frame-wins may skip some

    # Reading as fast as possible with latest-frame-wins, capped by --max-frames.
    fast = run_example("camera_loop.py", "--source", str(video), "--no-display", "--no-pace", "--max-frames", "2", "--input-size", "28", live=live)
    assert fast.returncode == 0, fast.stderr
    assert 1 <= int(fast.stdout.split()[0]) <= 2


@pytest.mark.timeout(150)
def test_camera_loop_default_mode_without_a_window(live, tmp_path: Path) -> None:
    """As a user runs it, with no display (and, as installed, OpenCV's headless build): it still works,
    writing the annotated frames to a folder, and says how to get a window."""
    video = small_video(tmp_path / "clip.avi", frames=6, fps=30.0)
    result = run_example(
        "camera_loop.py", "--source", str(video), "--input-size", "28", live=live, cwd=tmp_path, DISPLAY=None, WAYLAND_DISPLAY=None
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Writing the annotated frames to camera_loop_frames/" in result.stderr
    if "GUI: NONE" in " ".join(cv2.getBuildInformation().split()):  # the headless build zdepth installs
        assert "pip uninstall -y opencv-python-headless && pip install opencv-python" in result.stderr
    saved = sorted((tmp_path / "camera_loop_frames").glob("depth_*.png"))
    assert len(saved) == int(result.stdout.split()[0]) >= 1


def test_camera_loop_overlay_outline_hugs_the_text() -> None:
    """The black outline surrounds the white text along the whole line, instead of drifting off it."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from camera_loop import overlay
    finally:
        sys.path.remove(str(EXAMPLES))
    image = overlay(np.full((40, 420, 3), 128, np.uint8), "123.4 FPS  56 ms  frame 7890")
    gray = image[..., 0]
    text, outline = gray > 200, gray < 60
    assert text.sum() > 200 and outline.sum() > 200
    near_text = cv2.dilate(text.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert not (outline & ~near_text).any()  # every outline pixel is within 2 px of the text
    near_outline = cv2.dilate(outline.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert near_outline[text].mean() > 0.3  # and the text is edged by it, not bare


@pytest.mark.timeout(60)
def test_camera_loop_reports_a_bad_source(live, tmp_path: Path) -> None:
    result = run_example("camera_loop.py", "--source", str(tmp_path / "nothing.mp4"), "--no-display", live=live)
    assert result.returncode != 0 and "cannot open video source" in result.stderr


@pytest.mark.timeout(60)
def test_examples_report_an_unreachable_server(live, photo: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = child_env(ZDEPTH_KEY=live.key)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "one_shot.py"), str(photo), "--server", f"tcp://127.0.0.1:{port}", "--timeout", "0.5"],
        capture_output=True, text=True, env=env, timeout=50,
    )  # fmt: skip
    assert result.returncode == 1 and "error:" in result.stderr
    np.testing.assert_equal(result.stdout, "")
