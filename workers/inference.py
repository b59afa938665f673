"""Load a trial's checkpoint for inference in one call::

    from hpo.workers.inference import load_model

    best = load_model("best.tar.gz")        # or a checkpoint-000003/ directory, or its URL
    best.predict(["Shares rose sharply after the merger"])   # -> ['business']
    best.model                              # the torch.nn.Module, in eval mode

The checkpoint is a directory written by ``ctx.save`` (``state.pt`` and
``meta.json``, which names the trainable and its settings) or the ``.tar.gz`` that
``GET /api/v1/studies/{id}/best/checkpoint`` (or ``/trials/{id}/checkpoint``) returns, or the
URL of a checkpoint (or of a trial's folder) on an object store (``s3://...``, read with
``HPO_STORAGE_OPTIONS``: see :mod:`hpo.workers.storage`). The model
is rebuilt by the trainable's ``build_model(settings)`` and its weights are read with
``torch.load(weights_only=True)``: nothing in a checkpoint is executed.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpo.workers import checkpoints, registry, storage


@dataclass
class LoadedModel:
    """A checkpoint's model with what it needs to predict.

    ``model`` is the ``torch.nn.Module`` (eval mode, on ``device``); ``predict(inputs)`` returns
    one label per input: raw texts for ``text-classification`` (tokenized with the model
    folder's tokenizer, label names out), 8x8 images in [0, 1] for ``image-classification``.
    """

    model: torch.nn.Module
    settings: Any
    trainable: str
    meta: dict[str, Any]
    path: Path
    device: torch.device
    _tmp: Any = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Any:
        """The text model's tokenizer (None for models without one)."""
        return getattr(self.model, "tokenizer", None)

    @property
    def labels(self) -> list[Any] | None:
        return getattr(self.model, "labels", None)

    def predict(self, inputs: Any) -> list[Any]:
        if hasattr(self.model, "predict"):
            return self.model.predict(inputs)
        with torch.no_grad():  # a plain module: a tensor batch in, class indices out
            x = torch.as_tensor(inputs, dtype=torch.float32, device=self.device)
            return self.model(x).argmax(-1).tolist()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a checkpoint directory, ``.tar.gz`` archive or object store URL, weights
    loaded, eval mode."""
    where = storage.location(path)
    device = torch.device(device)
    tmp = None
    if not isinstance(where, Path):  # downloaded to a folder that lives as long as the model
        tmp = tempfile.TemporaryDirectory(prefix="hpo-checkpoint-")
        path = _download(where, Path(tmp.name))
    else:
        path = where
    if path.is_file():
        tmp = tempfile.TemporaryDirectory(prefix="hpo-checkpoint-")
        with tarfile.open(path, "r:*") as tar:
            tar.extractall(tmp.name, filter="data")
        path = _checkpoint_dir(Path(tmp.name))
    elif not (path / "meta.json").is_file():
        path = _checkpoint_dir(path)  # a trial directory: its newest checkpoint
    meta = json.loads((path / "meta.json").read_text())
    name = meta.get("trainable")
    if not name:
        raise ValueError(f"{path / 'meta.json'} names no trainable")
    fn = registry.load(name)
    if getattr(fn, "build_model", None) is None:
        raise ValueError(f"trainable {name!r} declares no build_model(); cannot rebuild it")
    settings = fn.settings_model.model_validate(meta.get("settings") or {})
    model = fn.build_model(settings)
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    model.load_state_dict(state.get("model", state))
    model.to(device).eval()
    return LoadedModel(model, settings, name, meta, path, device, tmp)


def _download(url: str, dest: Path) -> Path:
    """The checkpoint at ``url`` (or the newest one under a trial's folder) in ``dest``."""
    try:
        return storage.fetch(url, dest)
    except FileNotFoundError:
        newest = checkpoints.candidates(url, before_attempt=2**31)
        if not newest:
            raise
        return storage.fetch(str(newest[0]), dest)


def _newness(folder: Path) -> tuple[int, int, str]:
    """How new a checkpoint folder is: by attempt, then step (numbers, not names: attempt-10
    is newer than attempt-9), its path last."""
    return (checkpoints.attempt_of(folder) or 0, checkpoints.step_of(folder) or 0, str(folder))


def _checkpoint_dir(root: Path) -> Path:
    found = sorted(
        (p.parent for p in root.rglob("meta.json") if (p.parent / "state.pt").is_file()),
        key=_newness,
    )
    if not found:
        raise FileNotFoundError(f"no checkpoint (meta.json + state.pt) under {root}")
    return found[-1]
