"""Live depth from a webcam or a video file, with an FPS overlay.

    python examples/camera_loop.py --server tcp://gpu-box:5555            # webcam 0
    python examples/camera_loop.py --source clip.mp4 --model vits-hypersim
    python examples/camera_loop.py --source clip.mp4 --no-display --save-dir out/   # no window

A window needs an OpenCV build with a GUI. zdepth installs the headless build
(opencv-python-headless); with it, the default mode writes the annotated frames
to ./camera_loop_frames/ instead and says how to get a window:
``pip uninstall -y opencv-python-headless && pip install opencv-python``.

Frames go through ``Client.stream`` with ``latest_only=True``: a few requests
stay in flight (pipelining hides the network round trip), and when the camera
is faster than the server the frame waiting to be sent is replaced by the
newest one, so what you see lags the camera by about one round trip instead of
a growing queue. Video files are read at their own frame rate, like a camera
(``--no-pace`` reads them as fast as possible). Press q or Esc to quit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from zdepth import Client, ZdepthError
from zdepth.models import split_model_id


def connect(server: str, **options) -> Client:
    """An address (tcp://host:5555) or a profile name from ~/.config/zdepth/profiles.toml."""
    if "://" in server:
        return Client(server, **options)
    return Client.from_profile(server, **options)


def open_source(source: str) -> tuple[cv2.VideoCapture, float | None]:
    """A webcam index ("0") or a video file; the file's frame rate, None for a camera."""
    capture = cv2.VideoCapture(int(source)) if source.isdigit() else cv2.VideoCapture(source)
    if not capture.isOpened():
        raise SystemExit(f"error: cannot open video source {source!r}")
    fps = capture.get(cv2.CAP_PROP_FPS) if not source.isdigit() else None
    return capture, (fps if fps and fps > 0 else None)


def read_frames(capture: cv2.VideoCapture, pace_fps: float | None, recent: dict[int, np.ndarray]) -> Iterator[np.ndarray]:
    """Frames from the capture, at ``pace_fps`` if given; keeps the latest few in ``recent`` for display."""
    index, started = 0, time.monotonic()
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        recent[index] = frame
        recent.pop(index - 16, None)
        yield frame
        index += 1
        if pace_fps:
            delay = started + index / pace_fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def colorize(depth: np.ndarray, *, metric: bool) -> np.ndarray:
    unit = cv2.normalize(np.nan_to_num(depth.astype(np.float32)), None, 0.0, 1.0, cv2.NORM_MINMAX)
    if metric:
        unit = 1.0 - unit  # metric depth is small when near: flip so near is bright either way
    return cv2.applyColorMap((unit * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)


def overlay(image: np.ndarray, text: str, origin: tuple[int, int] = (8, 24)) -> np.ndarray:
    """White text with a black outline. The outline is the text's own mask grown by a pixel, not a
    second, thicker putText: in some OpenCV builds a thicker stroke also widens each glyph's advance,
    so the two renderings drift apart along the line."""
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.putText(mask, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 1, cv2.LINE_AA)
    outline = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    shaded = image.astype(np.float32) * (1.0 - outline[..., None] / 255.0)  # black outline
    alpha = mask[..., None] / 255.0
    image[...] = (shaded * (1.0 - alpha) + 255.0 * alpha).round().astype(np.uint8)
    return image


GUI_HINT = "pip uninstall -y opencv-python-headless && pip install opencv-python"
FALLBACK_DIR = Path("camera_loop_frames")


def why_no_window() -> str | None:
    """Why cv2 cannot open a window here, or None when it can (as far as one can tell without trying)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:") and line.split(":", 1)[1].strip().upper() == "NONE":
            return f"this OpenCV build has no GUI, so it cannot open windows; for a window: {GUI_HINT}"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "there is no display (DISPLAY is not set)"
    return None


def without_window(save_dir: Path | None, why: str) -> Path:
    """Where frames go when no window can be shown; says so once on stderr."""
    target = save_dir or FALLBACK_DIR
    print(f"note: {why}. Writing the annotated frames to {target}/ instead (Ctrl-C stops).", file=sys.stderr)
    target.mkdir(parents=True, exist_ok=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.environ.get("ZDEPTH_SERVER", "tcp://localhost:5555"), help="address or profile name")
    parser.add_argument("--source", default="0", help="webcam index or video file (default: 0)")
    parser.add_argument("--model", default="vits", help="vits, vitb, vitl (relative) or e.g. vits-hypersim (metric)")
    parser.add_argument("--input-size", type=int, default=None, help="network input side, a multiple of 14; smaller is faster")
    parser.add_argument("--in-flight", type=int, default=2, help="requests in flight at once")
    parser.add_argument("--no-display", action="store_true", help="no window: count frames (and write them with --save-dir)")
    parser.add_argument("--save-dir", type=Path, default=None, help="write each depth frame as a PNG here")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many depth frames (0: until the source ends)")
    parser.add_argument("--no-pace", action="store_true", help="read video files as fast as possible instead of at their frame rate")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each frame's depth")
    args = parser.parse_args()

    encoder, dataset = split_model_id(args.model)
    metric = bool(dataset)
    op = "metric_depth" if metric else "relative_depth"
    options = {"encoder": encoder, "input_size": args.input_size}
    if metric:
        options["dataset"] = dataset
    capture, file_fps = open_source(args.source)
    display = not args.no_display
    if display and (why := why_no_window()):
        display, args.save_dir = False, without_window(args.save_dir, why)
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    windows = False
    recent: dict[int, np.ndarray] = {}
    frames = read_frames(capture, None if args.no_pace else file_fps, recent)

    shown, fps, started = 0, 0.0, time.monotonic()
    last = started
    try:
        with connect(args.server, timeout=args.timeout) as client:
            stream = client.stream(frames, op=op, max_in_flight=args.in_flight, latest_only=True, **options)
            for result in stream:
                now = time.monotonic()
                rate = 1.0 / max(now - last, 1e-6)
                fps = rate if shown <= 1 else 0.9 * fps + 0.1 * rate  # smoothed; the first frame has no interval
                last = now
                shown += 1
                view = overlay(
                    colorize(result.depth, metric=metric),
                    f"{fps:5.1f} FPS  {result.timings['round_trip_ms']:.0f} ms  frame {result.index}",
                )
                frame = recent.get(result.index)
                if frame is not None and frame.shape[:2] == view.shape[:2]:
                    view = np.hstack([frame, view])
                if display:
                    try:
                        cv2.imshow("zdepth", view)
                    except cv2.error as exc:  # a GUI build that still cannot open a window here
                        display, args.save_dir = False, without_window(args.save_dir, f"cv2.imshow failed ({exc.err.strip()})")
                    else:
                        windows = True
                        if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                            break
                if args.save_dir:
                    cv2.imwrite(str(args.save_dir / f"depth_{result.index:06d}.png"), view)
                if args.max_frames and shown >= args.max_frames:
                    break
    except ZdepthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        capture.release()
        if windows:
            cv2.destroyAllWindows()

    elapsed = time.monotonic() - started
    print(f"{shown} depth frames in {elapsed:.1f} s ({shown / elapsed if elapsed else 0.0:.1f} FPS)")
    return 0 if shown else 1


if __name__ == "__main__":
    sys.exit(main())
