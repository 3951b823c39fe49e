"""What ``zdepth predict`` reads: files, folders, globs, videos and image URLs, expanded into frames, each
once, in order; a source that cannot be read is a ``Failure`` of its own, never the end of the run."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from zdepth.client.urls import URL_SCHEMES, fetch_image, is_url, shown_url
from zdepth.errors import ZdepthError
from zdepth.protocol.images import decode_image

logger = logging.getLogger("zdepth.client.files")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2", ".pgm", ".ppm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".mjpeg", ".mjpg"})


# ----------------------------------------------------------------------------- inputs


DEFAULT_URL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Source:
    """One input: a file (``video`` for files read frame by frame), or an image by ``url`` (``path`` is then its name)."""

    path: Path
    video: bool
    url: str | None = None

    @property
    def shown(self) -> str:
        """The input for messages: the path, or the URL without credentials or query."""
        return shown_url(self.url) if self.url is not None else os.fspath(self.path)


@dataclass(frozen=True)
class Frame:
    """One image to predict: the output name, the pixels (HxWx3 uint8 BGR) and what to send a server."""

    name: str
    image: np.ndarray
    payload: Any  # encoded bytes for image files (smaller on the wire), the pixels for video frames


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _kind(path: Path) -> bool | None:
    """True for a video, False for an image, None for anything else."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    return None


def url_name(url: str) -> str:
    """The file name a URL's image is saved under: its last path segment (``.../photos/cat.jpg?w=640`` -> ``cat.jpg``),
    else its host; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``."""
    import re
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
        segment = urllib.parse.unquote(parts.path.rstrip("/").rpartition("/")[2]) or parts.hostname or ""
    except ValueError:
        segment = ""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", segment).strip(".")
    return name or "image"


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Source], list[Failure]]:
    """Files, folders (their images and videos, sorted, not recursive), globs and image URLs, in the order given.

    Files named explicitly are taken whatever their suffix (a video suffix
    makes them videos); inside folders and globs only known image and video
    suffixes count. ``http://`` and ``https://`` URLs are images, fetched when
    their turn comes; other schemes, and URLs of videos, are failures. Inputs
    that match nothing become failures. A file or URL reached twice is taken
    once.
    """
    sources: list[Source] = []
    failures: list[Failure] = []
    seen: set[Path | str] = set()

    def add(path: Path, *, explicit: bool) -> None:
        kind = _kind(path)
        if kind is None and not explicit:
            return
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            sources.append(Source(path, bool(kind)))

    for item in inputs:
        text = os.fspath(item)
        if is_url(text):
            scheme = text.partition("://")[0].lower()
            name = url_name(text)
            if scheme not in URL_SCHEMES:
                failures.append(Failure(shown_url(text), f"only {' and '.join(f'{s}://' for s in URL_SCHEMES)} URLs are fetched; for a local file give its path"))
            elif _kind(Path(name)):
                failures.append(Failure(shown_url(text), "videos are not fetched by URL; download the file and give its path"))
            elif text not in seen:
                seen.add(text)
                sources.append(Source(Path(name), False, url=text))
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            before = len(sources)
            for child in sorted(path.iterdir()):
                if child.is_file():
                    add(child, explicit=False)
            if len(sources) == before:
                failures.append(Failure(text, "folder holds no image or video files"))
        elif path.is_file():
            add(path, explicit=True)
        elif _is_glob(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            before = len(sources)
            for match in matches:
                if Path(match).is_file():
                    add(Path(match), explicit=False)
            if len(sources) == before:
                failures.append(Failure(text, "no image or video file matches this pattern"))
        else:
            failures.append(Failure(text, "no such file or folder"))
    return sources, failures


def count_frames(source: Source, every: int = 1) -> int | None:
    """How many frames ``iter_frames`` will give (a video's container count may be missing or approximate)."""
    if not source.video:
        return 1
    capture = cv2.VideoCapture(os.fspath(source.path))
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
    finally:
        capture.release()
    return (total + every - 1) // every if total > 0 else None


def iter_frames(source: Source, every: int = 1, *, url_timeout: float = DEFAULT_URL_TIMEOUT_S) -> Iterator[Frame | Failure]:
    """An image's one frame (a URL's downloaded within ``url_timeout`` seconds), or every ``every``-th frame of a video
    as ``STEM_000123`` (frame index)."""
    stem = source.path.name[: -len(source.path.suffix)] if source.path.suffix else source.path.name
    if source.url is not None:
        try:
            data = fetch_image(source.url, timeout=url_timeout)
            yield Frame(stem, decode_image(data), data)
        except ZdepthError as exc:
            yield Failure(source.shown, reason(exc))
        return
    if not source.video:
        try:
            data = source.path.read_bytes()
            yield Frame(stem, decode_image(data), data)
        except (OSError, ZdepthError) as exc:
            yield Failure(os.fspath(source.path), reason(exc))
        return
    capture = cv2.VideoCapture(os.fspath(source.path))
    try:
        if not capture.isOpened():
            yield Failure(os.fspath(source.path), "cv2 cannot open this video (unsupported codec or not a video)")
            return
        index = 0
        while True:
            if index % every:
                if not capture.grab():  # skip without decoding
                    break
            else:
                ok, image = capture.read()
                if not ok:
                    break
                try:
                    image = decode_image(image)
                except ZdepthError as exc:
                    yield Failure(f"{source.path}#{index}", reason(exc))
                else:
                    yield Frame(f"{stem}_{index:06d}", image, image)
            index += 1
        if index == 0:
            yield Failure(os.fspath(source.path), "the video has no readable frame")
    finally:
        capture.release()


def unique_frames(frames: Iterable[Frame | Failure]) -> Iterator[Frame | Failure]:
    """Keep output names apart when two inputs share a stem (a.jpg and a.png, or x/1.jpg and y/1.jpg)."""
    used: set[str] = set()
    for item in frames:
        if isinstance(item, Frame):
            name, n = item.name, 1
            while name in used:
                n += 1
                name = f"{item.name}-{n}"
            used.add(name)
            if name != item.name:
                item = Frame(name, item.image, item.payload)
        yield item


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    code = getattr(exc, "code", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"[{code}] {text}" if isinstance(code, str) else text
