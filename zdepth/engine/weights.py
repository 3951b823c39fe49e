"""Checkpoint names, local lookup and the optional hub download.

Weights are never fetched behind the user's back: ``find_checkpoint`` looks in
one directory and, only when asked (``download=True``, the CLI's
``--download``), fetches the official file with ``huggingface_hub``. When the
file is missing the error says exactly which file, where to get it and where
to put it, because on many lab machines the download has to be done by hand.

Licenses differ per encoder: Small (vits) is Apache-2.0; Base, Large and Giant
are CC-BY-NC-4.0 (non-commercial). Tell users where they choose a model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from zdepth.errors import WeightsNotFound
from zdepth.models import MODELS, SIZE_NAMES, ModelSpec, checkpoint_url, get_spec

__all__ = [
    "ModelSpec",
    "MODELS",
    "WEIGHTS_DIR_ENV",
    "get_spec",
    "default_weights_dir",
    "checkpoint_url",
    "find_checkpoint",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "ZDEPTH_WEIGHTS_DIR"
# Reaching the hub: one quick connection per attempt, one log line per failed attempt.
CONNECT_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5.0
RETRY_DELAYS_S = (1.0, 2.0)


def default_weights_dir() -> Path:
    """``$ZDEPTH_WEIGHTS_DIR``, else ``$XDG_CACHE_HOME/zdepth/weights``, else ``~/.cache/zdepth/weights``."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return cache_home() / "weights"


def cache_home() -> Path:
    """zdepth's folder for what it keeps between runs: ``$XDG_CACHE_HOME/zdepth``, else ``~/.cache/zdepth``."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "zdepth"


def find_checkpoint(model_id: str, weights_dir: str | os.PathLike[str] | None = None, *, download: bool = False) -> Path:
    """The local path of ``model_id``'s checkpoint, downloading it if allowed.

    Raises UnknownModel for a bad id and WeightsNotFound, with the file name,
    URL and target directory, when the file is missing and cannot be fetched.
    """
    spec = get_spec(model_id)
    directory = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
    path = directory / spec.filename
    if path.is_file():
        return path
    if not download:
        raise WeightsNotFound(_missing_message(spec, directory, _DOWNLOAD_HINT))
    if spec.repo_id is None:
        raise WeightsNotFound(_missing_message(spec, directory))
    logger.info("downloading %s (%s, license %s) into %s", spec.filename, spec.repo_id, spec.license, directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        downloaded = _hub_download(spec.repo_id, spec.filename, directory)
    except WeightsNotFound as exc:
        if str(exc).startswith("the download failed"):
            raise WeightsNotFound(_missing_message(spec, directory, "T" + str(exc)[1:].rstrip(".") + ".")) from exc
        raise
    except Exception as exc:  # network, HTTP and disk errors all mean the same here
        raise WeightsNotFound(_missing_message(spec, directory, f"The download failed: {_first_line(exc)}.")) from exc
    _verify_size(spec, downloaded)
    return downloaded


def _hub_download(repo_id: str, filename: str, directory: Path) -> Path:
    """The one network call (tests replace it); huggingface_hub draws the progress bar.

    The hub is probed first, with one warning per failed attempt: offline,
    huggingface_hub would spend about 25 s in retries of its own, each logged
    twice (by its handler and by ours). Its logging is kept quiet while it runs;
    a failure surfaces once, in our WeightsNotFound.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise WeightsNotFound(
            f"downloading {filename} needs huggingface_hub: pip install huggingface_hub "
            f"(or download {checkpoint_url(repo_id, filename)} into {directory} by hand)"
        ) from exc
    _reach_hub(filename)
    try:
        with _quiet_hub():
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_dir=directory))
    except Exception as exc:  # noqa: BLE001 - one line for whatever the hub library raised
        raise WeightsNotFound(f"the download failed: {_first_line(exc)}") from exc


def hub_endpoint() -> str | None:
    """The hub's base URL as huggingface_hub has it configured (``HF_ENDPOINT``), or None if it does not say."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    endpoint = getattr(constants, "ENDPOINT", None)
    return str(endpoint) if endpoint else None


def _reach_hub(filename: str) -> None:
    """Open one TCP connection to the hub per attempt; WeightsNotFound after CONNECT_ATTEMPTS failures.

    Skipped behind a proxy (the proxy, not this machine, reaches the hub), in
    huggingface_hub's offline mode (it answers from its cache or fails at once),
    and when the library does not say which endpoint it uses.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE")):
        return
    endpoint = hub_endpoint()
    if endpoint is None:
        return
    url = urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    for attempt in range(1, CONNECT_ATTEMPTS + 1):
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
        delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1] if attempt < CONNECT_ATTEMPTS else 0.0
        then = f"; trying again in {delay:g} s" if delay else ""
        logger.warning("downloading %s: cannot reach %s:%d (attempt %d of %d): %s%s", filename, host, port, attempt, CONNECT_ATTEMPTS, reason, then)
        time.sleep(delay)
    raise WeightsNotFound(f"the download failed: cannot reach the model hub at {host}:{port} ({reason}; {CONNECT_ATTEMPTS} attempts)")


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's retry warnings silenced for the duration (its progress bar is not logging and stays)."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].rstrip('.')}" if text else type(exc).__name__


def _verify_size(spec: ModelSpec, path: Path) -> None:
    """Remove and reject a downloaded file whose size is not the published one."""
    if spec.size_bytes is None:
        return
    size = path.stat().st_size
    if size != spec.size_bytes:
        path.unlink(missing_ok=True)
        raise WeightsNotFound(
            f"downloaded {path} has {size} bytes, expected {spec.size_bytes}; "
            "the file was removed, try the download again"
        )


_DOWNLOAD_HINT = 'Or let zdepth fetch it: pass --download (download=True in Python); that needs `pip install "zdepth[hub]"` (or huggingface_hub).'


def _missing_message(spec: ModelSpec, directory: Path, hint: str = "") -> str:
    lines = [f"checkpoint for model {spec.id!r} not found: {directory / spec.filename}"]
    if spec.url is None:
        lines.append(
            f"{spec.encoder} ({SIZE_NAMES[spec.encoder]}) has no public release; "
            f"if you have the file, put it in {directory} as {spec.filename}"
        )
    else:
        lines.append(f"Download {spec.url}")
        lines.append(f"and put it in {directory} (or point {WEIGHTS_DIR_ENV} at the folder that holds it).")
        if hint:
            lines.append(hint)
        lines.append(f"License: {spec.license}.")
    return "\n".join(lines)
