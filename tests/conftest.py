"""Fixtures for every test: generated checkpoints (random weights, official key names and shapes),
the one way to find test data (``data_file``), and an independent PLY reader (``read_ply``).

Tests never download weights: a test that needs a checkpoint uses ``weights_dir``;
``golden_weights_dir`` holds the seeded weights of tests/data/golden under the names
the engine looks for.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Everything the tests read lives in the repository, so a fresh clone runs them with nothing beside it.
DATA_DIR = Path(__file__).resolve().parent / "data"


def pytest_configure(config: pytest.Config) -> None:
    # An exception nobody could catch (a socket or context collected half-closed, a __del__ failing) is a
    # bug even when the test around it passes: it once hid a 30 s block in a garbage collection.
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnraisableExceptionWarning")


def data_file(*parts: str) -> Path:
    """The path of a file under tests/data. A missing file fails the test (an incomplete clone must
    not pass by skipping)."""
    path = DATA_DIR.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"test data file missing: {path} (tests/data is part of the repository)")
    return path


def read_ply(path: str | os.PathLike[str]):
    """(points (N, 3) float32, colors (N, 3) uint8 RGB or None) of a PLY file, read by plyfile: a reader
    zdepth did not write, so ``write_ply`` is checked against another implementation of the format."""
    import numpy as np
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"].data
    points = np.stack([vertex[axis] for axis in "xyz"], axis=1).astype(np.float32)
    names = set(vertex.dtype.names)
    colors = None
    if {"red", "green", "blue"} <= names:
        colors = np.stack([vertex[c] for c in ("red", "green", "blue")], axis=1).astype(np.uint8)
    return points, colors


# One vits state dict serves all three ids: relative and metric share every key.
GENERATED_FILES = (
    "depth_anything_v2_vits.pth",
    "depth_anything_v2_metric_hypersim_vits.pth",
    "depth_anything_v2_metric_vkitti_vits.pth",
)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights dir with a random vits checkpoint (fp16, seed 0) as vits, vits-hypersim and vits-vkitti."""
    import torch

    from depth_anything_v2 import build_model

    directory = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model("vits")
    with torch.no_grad():
        # PyTorch's default init leaves the final ReLU's input negative everywhere, so every depth
        # map would be 0 and tests comparing them could not fail; the golden checkpoint's generator
        # gives this last 1x1 conv a bias of 2 and weights of std 2, and so do we.
        last = model.depth_head.scratch.output_conv2[2]
        last.bias.fill_(2.0)
        last.weight.normal_(0.0, 2.0)
    state = {k: v.half() for k, v in model.state_dict().items()}
    first = directory / GENERATED_FILES[0]
    torch.save(state, first)
    for name in GENERATED_FILES[1:]:
        _link_or_copy(first, directory / name)
    return directory


@pytest.fixture(scope="session")
def golden_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded weights of tests/data/golden (fp32, as the references were made) as vits and
    vits-hypersim, so an Engine can be checked against the golden outputs."""
    import torch

    from seeded_weights import seeded_state_dict

    directory = tmp_path_factory.mktemp("golden_weights")
    first = directory / GENERATED_FILES[0]
    torch.save(seeded_state_dict(), first)
    _link_or_copy(first, directory / GENERATED_FILES[1])
    return directory


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A typer CliRunner with no ZDEPTH_* settings leaking in from the environment."""
    from typer.testing import CliRunner

    for name in list(os.environ):
        if name.startswith("ZDEPTH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ZDEPTH_CONFIG", str(tmp_path / "no-profiles.toml"))
    return CliRunner()


@pytest.fixture
def broker_configs(monkeypatch: pytest.MonkeyPatch) -> list:
    """The BrokerConfig each ``zdepth broker`` run builds: ``zdepth.broker.Broker`` is replaced by one that only records it."""
    seen: list = []

    class RecordingBroker:
        def __init__(self, config) -> None:
            seen.append(config)

        def bind(self):
            return "", ""

        def run(self) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr("zdepth.broker.Broker", RecordingBroker)
    return seen
