"""What a model id means, in one torch-free place: encoders, metric training sets, the
checkpoint table, and the network input sizes a request may ask for.

The protocol, the client, the worker, the engine and the command line all read these;
none of them spells a model id or the 518 default again.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from zdepth.errors import UnknownModel

# An encoder name, optionally a dash and a training set: vits, vitl-hypersim. Lower-case letters and digits.
MODEL_ID = re.compile(r"[a-z0-9]+(-[a-z0-9]+)?")
ENCODERS = ("vits", "vitb", "vitl", "vitg")
DEFAULT_ENCODER = "vits"
DEFAULT_DATASET = "hypersim"  # the metric training set used when a caller names none

PATCH_SIZE = 14  # the ViT's patch: the network input side is a multiple of it
DEFAULT_INPUT_SIZE = 518  # the training size
FAST_INPUT_SIZE = 364  # a faster choice, named in error messages
MIN_INPUT_SIZE = PATCH_SIZE
MAX_INPUT_SIZE = 2058  # 147 patches a side

HUB_URL = "https://huggingface.co"


def split_model_id(model: str | None) -> tuple[str | None, str | None]:
    """``vitl-hypersim`` -> (``vitl``, ``hypersim``); ``vits`` -> (``vits``, None); None -> (None, None)."""
    if not model:
        return None, None
    encoder, _, dataset = model.partition("-")
    return encoder, dataset or None


def is_metric_model(model_id: str) -> bool:
    """Metric model ids name their training set after a dash (``vitl-hypersim``); relative ids do not (``vitl``)."""
    return "-" in model_id


def input_size_problem(input_size: object) -> str | None:
    """Why ``input_size`` cannot be a network input side, or None when it can. Callers raise their own error."""
    if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
        if MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE and input_size % PATCH_SIZE == 0:
            return None
    return (
        f"input_size must be a multiple of {PATCH_SIZE} within [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}] "
        f"({DEFAULT_INPUT_SIZE} is the default, {FAST_INPUT_SIZE} a faster choice), got {input_size!r}"
    )


def checkpoint_url(repo_id: str, filename: str) -> str:
    """The direct download URL of a file in a hub model repository."""
    return f"{HUB_URL}/{repo_id}/resolve/main/{filename}"


@dataclass(frozen=True)
class ModelSpec:
    """One servable checkpoint.

    ``repo_id`` is None where no public release exists (vitg). ``size_bytes``
    is checked after a download when known; None skips the check.
    """

    id: str
    encoder: str
    dataset: str | None
    metric: bool
    default_max_depth: float | None
    filename: str
    repo_id: str | None
    license: str
    size_bytes: int | None = None

    @property
    def url(self) -> str | None:
        """Where a person can download the file by hand; None if unreleased."""
        return checkpoint_url(self.repo_id, self.filename) if self.repo_id else None


SIZE_NAMES = {"vits": "Small", "vitb": "Base", "vitl": "Large", "vitg": "Giant"}
_LICENSES = {"vits": "Apache-2.0", "vitb": "CC-BY-NC-4.0", "vitl": "CC-BY-NC-4.0", "vitg": "CC-BY-NC-4.0"}
_METRIC_DATASETS = {"hypersim": ("Hypersim", 20.0), "vkitti": ("VKITTI", 80.0)}  # hub name, default max depth (m)


def _build_table() -> dict[str, ModelSpec]:
    table: dict[str, ModelSpec] = {}
    for enc in ENCODERS:
        table[enc] = ModelSpec(
            id=enc,
            encoder=enc,
            dataset=None,
            metric=False,
            default_max_depth=None,
            filename=f"depth_anything_v2_{enc}.pth",
            # The Giant model was announced but never released.
            repo_id=None if enc == "vitg" else f"depth-anything/Depth-Anything-V2-{SIZE_NAMES[enc]}",
            license=_LICENSES[enc],
        )
    for enc in ("vits", "vitb", "vitl"):
        for dataset, (hub_name, max_depth) in _METRIC_DATASETS.items():
            model_id = f"{enc}-{dataset}"
            table[model_id] = ModelSpec(
                id=model_id,
                encoder=enc,
                dataset=dataset,
                metric=True,
                default_max_depth=max_depth,
                filename=f"depth_anything_v2_metric_{dataset}_{enc}.pth",
                repo_id=f"depth-anything/Depth-Anything-V2-Metric-{hub_name}-{SIZE_NAMES[enc]}",
                license=_LICENSES[enc],
            )
    return table


MODELS: dict[str, ModelSpec] = _build_table()


def get_spec(model_id: str) -> ModelSpec:
    """The spec for ``model_id``; UnknownModel lists the valid ids."""
    try:
        return MODELS[model_id]
    except (KeyError, TypeError):
        raise UnknownModel(
            f"unknown model {model_id!r}; valid models: {', '.join(MODELS)}",
            details={"model": str(model_id), "valid": list(MODELS)},
        ) from None
