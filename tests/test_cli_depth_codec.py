"""``--depth-codec`` of ``zdepth predict`` and ``zdepth bench``, against a real broker and CPU worker.

The worker runs the generated vits checkpoint (``weights_dir``) at --input-size 28. zstd must change
how each depth map travels (the client decompresses every reply: counted by wrapping the real
``compression.decompress``) and nothing of what is written; a value that is not a codec, or zstd
without the zstandard package, must end the command with one line before anything is sent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from procs import start_live_server, two_small_photos
from zdepth.cli import app
from zdepth.cli.tables import format_bench
from zdepth.protocol import compression

IMAGE_SHAPE = (64, 96)  # two_small_photos: (height, width)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path):
    server = start_live_server(tmp_path_factory.mktemp("live_codec"), weights_dir, models=("vits",))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_small_photos(tmp_path_factory.mktemp("codec_images"))


@pytest.fixture
def decompressed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shape of every array this process decompresses; the real decompression still runs."""
    seen: list[tuple[int, ...]] = []
    real = compression.decompress

    def counting(frame, dtype, shape):
        seen.append(tuple(shape))
        return real(frame, dtype, shape)

    monkeypatch.setattr(compression, "decompress", counting)
    return seen


def predict_args(live, images: Path, out: Path) -> list[str]:
    # One request at a time: every depth map comes from a batch of one, so both runs compute exactly the same floats.
    return ["predict", str(images), "--server", live.client_address, "--input-size", "28", "-f", "npy,png16", "--in-flight", "1", "-o", str(out)]


@pytest.mark.timeout(120)
def test_predict_with_zstd_writes_the_same_depth(runner: CliRunner, live, images: Path, tmp_path: Path, decompressed) -> None:
    env = {"ZDEPTH_KEY": live.key}
    plain = runner.invoke(app, predict_args(live, images, tmp_path / "none"), env=env)
    assert plain.exit_code == 0, plain.output
    assert decompressed == []  # the default: depth travels as it is

    packed = runner.invoke(app, [*predict_args(live, images, tmp_path / "zstd"), "--depth-codec", "zstd"], env=env)
    assert packed.exit_code == 0, packed.output
    assert decompressed == [IMAGE_SHAPE, IMAGE_SHAPE]  # both replies came compressed

    decompressed.clear()
    by_env = runner.invoke(app, predict_args(live, images, tmp_path / "env"), env={**env, "ZDEPTH_DEPTH_CODEC": "zstd"})
    assert by_env.exit_code == 0, by_env.output
    assert decompressed == [IMAGE_SHAPE, IMAGE_SHAPE]

    for name in ("street", "room"):
        depth = np.load(tmp_path / "none" / f"{name}.npy")
        assert depth.shape == IMAGE_SHAPE and depth.std() > 0, "a constant map would make the comparison vacuous"
        for run in ("zstd", "env"):
            np.testing.assert_array_equal(np.load(tmp_path / run / f"{name}.npy"), depth)
            assert (tmp_path / run / f"{name}.depth.png").read_bytes() == (tmp_path / "none" / f"{name}.depth.png").read_bytes()


@pytest.mark.timeout(120)
def test_bench_with_zstd(runner: CliRunner, live, decompressed) -> None:
    args = ["bench", "--server", live.client_address, "-c", "1", "-t", "0.5", "--size", "48x64", "--input-size", "28", "--depth-codec", "zstd", "--json"]
    result = runner.invoke(app, args, env={"ZDEPTH_KEY": live.key})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["frames"] > 0 and report["errors"] == 0 and report["depth_codec"] == "zstd"
    assert decompressed == [(48, 64)] * (report["frames"] + 1)  # the warm-up request too
    assert ", depth maps as zstd," in format_bench(live.client_address, report).splitlines()[0]
    assert "depth maps as" not in format_bench(live.client_address, {**report, "depth_codec": "none"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["predict", "bench"])
def test_an_unknown_codec_is_refused(runner: CliRunner, live, images: Path, tmp_path: Path, command: str) -> None:
    args = [command, "--server", live.client_address] + ([str(images / "street.jpg"), "-o", str(tmp_path / "o")] if command == "predict" else [])
    env = {"ZDEPTH_KEY": live.key, "COLUMNS": "200"}
    for extra, variables, given in (
        (["--depth-codec", "gzip"], {}, "gzip"),
        (["--depth-codec", "ZSTD"], {}, "ZSTD"),  # the protocol's names, as they are
        ([], {"ZDEPTH_DEPTH_CODEC": "lz4"}, "lz4"),
    ):
        result = runner.invoke(app, [*args, *extra], env={**env, **variables})
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--depth-codec'" in result.output and f"'{given}' is not one of 'none', 'zstd'" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(60)
def test_zstd_without_zstandard_is_one_line_naming_the_package(runner: CliRunner, live, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now fails, as where it is not installed
    expected = 'error: --depth-codec zstd needs the zstandard package, which is not installed here: pip install "zdepth[zstd]"'
    env = {"ZDEPTH_KEY": live.key}
    for args in (
        ["predict", str(images / "street.jpg"), "--server", live.client_address, "--depth-codec", "zstd", "-o", str(tmp_path / "o")],
        ["bench", "--server", live.client_address, "-c", "1", "-t", "0.3", "--depth-codec", "zstd"],
    ):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 3, result.output  # EXIT_MISSING, as for a missing torch
        assert isinstance(result.exception, SystemExit)  # no traceback
        assert result.output.strip() == expected
    assert not (tmp_path / "o").exists()
    # The default needs no zstandard.
    result = runner.invoke(
        app, ["predict", str(images / "street.jpg"), "--server", live.client_address, "--input-size", "28", "-f", "npy", "-o", str(tmp_path / "o")], env=env
    )
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "o" / "street.npy").shape == IMAGE_SHAPE
