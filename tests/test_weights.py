import dataclasses
import sys
from pathlib import Path

import pytest

from zdepth.engine import weights
from zdepth.engine.weights import MODELS, default_weights_dir, find_checkpoint, get_spec
from zdepth.errors import UnknownModel, WeightsNotFound


def test_table():
    assert set(MODELS) == {
        "vits", "vitb", "vitl", "vitg",
        "vits-hypersim", "vitb-hypersim", "vitl-hypersim",
        "vits-vkitti", "vitb-vkitti", "vitl-vkitti",
    }  # fmt: skip
    for model_id, spec in MODELS.items():
        assert spec.id == model_id and spec.encoder == model_id.split("-")[0]
        assert spec.license == ("Apache-2.0" if spec.encoder == "vits" else "CC-BY-NC-4.0")
    vits = get_spec("vits")
    assert (vits.metric, vits.dataset, vits.default_max_depth) == (False, None, None)
    assert vits.filename == "depth_anything_v2_vits.pth"
    assert vits.url == "https://huggingface.co/depth-anything/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth"
    indoor, outdoor = get_spec("vitb-hypersim"), get_spec("vitl-vkitti")
    assert (indoor.metric, indoor.dataset, indoor.default_max_depth) == (True, "hypersim", 20.0)
    assert indoor.filename == "depth_anything_v2_metric_hypersim_vitb.pth"
    assert indoor.repo_id == "depth-anything/Depth-Anything-V2-Metric-Hypersim-Base"
    assert outdoor.default_max_depth == 80.0 and outdoor.repo_id == "depth-anything/Depth-Anything-V2-Metric-VKITTI-Large"
    assert get_spec("vitg").repo_id is None and get_spec("vitg").url is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        vits.metric = True


@pytest.mark.parametrize("bad", ["vitx", "hypersim", "", None])
def test_unknown_model_lists_valid_ids(bad):
    with pytest.raises(UnknownModel, match="valid models: vits, vitb") as info:
        get_spec(bad)
    assert info.value.code == "unknown_model"


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ZDEPTH_WEIGHTS_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_weights_dir() == tmp_path / "home" / ".cache" / "zdepth" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_weights_dir() == tmp_path / "xdg" / "zdepth" / "weights"
    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(tmp_path / "env"))
    assert default_weights_dir() == tmp_path / "env"


def test_found_in_given_dir_and_env_dir(monkeypatch, tmp_path):
    (tmp_path / "depth_anything_v2_metric_vkitti_vits.pth").write_bytes(b"x")
    assert find_checkpoint("vits-vkitti", tmp_path) == tmp_path / "depth_anything_v2_metric_vkitti_vits.pth"
    monkeypatch.setenv("ZDEPTH_WEIGHTS_DIR", str(tmp_path))
    assert find_checkpoint("vits-vkitti") == tmp_path / "depth_anything_v2_metric_vkitti_vits.pth"


def test_missing_message_says_what_to_do(tmp_path):
    with pytest.raises(WeightsNotFound) as info:
        find_checkpoint("vitb-hypersim", tmp_path)
    message = str(info.value)
    assert "depth_anything_v2_metric_hypersim_vitb.pth" in message
    assert (
        "https://huggingface.co/depth-anything/Depth-Anything-V2-Metric-Hypersim-Base/resolve/main/"
        "depth_anything_v2_metric_hypersim_vitb.pth" in message
    )
    assert f"put it in {tmp_path}" in message
    assert "--download" in message and "huggingface_hub" in message and "CC-BY-NC-4.0" in message
    assert isinstance(info.value, FileNotFoundError)


def test_vitg_is_not_released(tmp_path):
    for download in (False, True):
        with pytest.raises(WeightsNotFound, match="no public release"):
            find_checkpoint("vitg", tmp_path, download=download)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace only the network call; record what it was asked for."""
    calls = []

    def download(repo_id, filename, directory):
        calls.append((repo_id, filename, directory))
        path = Path(directory) / filename
        path.write_bytes(b"weights")
        return path

    monkeypatch.setattr(weights, "_hub_download", download)
    return calls


def test_download(tmp_path, fake_hub):
    target = tmp_path / "new" / "dir"
    path = find_checkpoint("vits", target, download=True)
    assert path == target / "depth_anything_v2_vits.pth" and path.read_bytes() == b"weights"
    assert fake_hub == [("depth-anything/Depth-Anything-V2-Small", "depth_anything_v2_vits.pth", target)]
    assert find_checkpoint("vits", target, download=True) == path  # present now: no second download
    assert len(fake_hub) == 1


def test_download_size_verified(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setitem(MODELS, "vits", dataclasses.replace(MODELS["vits"], size_bytes=7))
    assert find_checkpoint("vits", tmp_path, download=True).stat().st_size == 7
    monkeypatch.setitem(MODELS, "vitb", dataclasses.replace(MODELS["vitb"], size_bytes=1234))
    with pytest.raises(WeightsNotFound, match="7 bytes, expected 1234"):
        find_checkpoint("vitb", tmp_path, download=True)
    assert not (tmp_path / "depth_anything_v2_vitb.pth").exists()


def test_download_failure_is_weights_not_found(tmp_path, monkeypatch):
    def offline(repo_id, filename, directory):
        raise OSError("network unreachable")

    monkeypatch.setattr(weights, "_hub_download", offline)
    with pytest.raises(WeightsNotFound, match="network unreachable") as info:
        find_checkpoint("vitl", tmp_path, download=True)
    assert "resolve/main/depth_anything_v2_vitl.pth" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_download_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(WeightsNotFound, match="pip install huggingface_hub"):
        find_checkpoint("vits", tmp_path, download=True)


def test_real_download_call_shape(tmp_path, monkeypatch):
    """The real _hub_download passes local_dir so the file lands in the weights dir."""
    seen = {}

    class FakeHub:
        @staticmethod
        def hf_hub_download(**kwargs):
            seen.update(kwargs)
            path = Path(kwargs["local_dir"]) / kwargs["filename"]
            path.write_bytes(b"w")
            return str(path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub)
    path = find_checkpoint("vits-hypersim", tmp_path, download=True)
    assert path == tmp_path / "depth_anything_v2_metric_hypersim_vits.pth"
    assert seen == dict(
        repo_id="depth-anything/Depth-Anything-V2-Metric-Hypersim-Small",
        filename="depth_anything_v2_metric_hypersim_vits.pth",
        local_dir=tmp_path,
    )
