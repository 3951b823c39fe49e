"""torch.compile's kernels go to a folder that outlives a reboot, unless the operator chose one."""

from __future__ import annotations

import os

from zdepth.engine import Engine
from zdepth.engine.compile_cache import COMPILE_CACHE_ENV, compile_cache_dir


def test_a_compiling_engine_keeps_its_kernels_next_to_the_weights(monkeypatch, tmp_path, weights_dir):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert compile_cache_dir() == tmp_path / "cache" / "zdepth" / "torch-compile"
    Engine(device="cpu", weights_dir=weights_dir).load("vits")
    assert COMPILE_CACHE_ENV not in os.environ  # an engine that does not compile leaves torch alone
    Engine(device="cpu", weights_dir=weights_dir, compile=True).load("vits")  # compiles lazily, on the first call
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "cache" / "zdepth" / "torch-compile")


def test_the_operators_folder_wins(monkeypatch, tmp_path, weights_dir):
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    Engine(device="cpu", weights_dir=weights_dir, compile=True).load("vits")
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "mine")
