"""A trial's checkpoints on disk: written atomically, found only inside the trial's folder, and
read back with a fall-back to the previous one when the newest is unreadable.

Layout: ``<trial folder>/attempt-<n>/checkpoint-<step:06d>/`` holding ``state.pt`` (tensors,
numbers and strings: read with ``torch.load(weights_only=True)``, so nothing in it is executed)
and ``meta.json``. A checkpoint exists once its folder has its final name: it is written under
a hidden temporary name, every file is fsynced, and the folder is renamed into place (the
parent fsynced after), so a crash at any point leaves the earlier checkpoints as they were and
no half-written one under a checkpoint name. Each attempt writes only into its own folder, so
a stale attempt never overwrites what the live one resumes from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("hpo.workers.checkpoints")


def attempt_folder(trial_dir: Path, attempt: int) -> Path:
    """Where attempt ``attempt`` of the trial writes its checkpoints."""
    return trial_dir / f"attempt-{attempt}"


def write(folder: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``checkpoint-<step>`` into ``folder`` atomically and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
        for path in (tmp / "state.pt", tmp / "meta.json", tmp):
            _fsync(path)
        if final.exists():  # the same step saved again: replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints of ``folder``; remove older ones and the leftovers
    of writes a crash cut short."""
    found = sorted(p for p in folder.glob("checkpoint-*") if _step(p) is not None)
    for old in found[:-keep] if keep > 0 else found:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def candidates(trial_dir: Path, *, before_attempt: int) -> list[Path]:
    """The complete checkpoints that earlier attempts left in ``trial_dir``, newest first.

    Chosen from the files, not from what the control plane last heard: an attempt cut off by a
    crash may have saved checkpoints the control plane never learned about. A checkpoint behind
    a symbolic link, or whose real path lies outside the trial's folder, is refused (logged).
    """
    root = trial_dir.resolve()
    found = []
    for ckpt in trial_dir.glob("attempt-*/checkpoint-*"):
        attempt, step = _attempt(ckpt.parent), _step(ckpt)
        if attempt is None or step is None or attempt >= before_attempt:
            continue
        files = (ckpt / "state.pt", ckpt / "meta.json")
        if not all(f.is_file() for f in files):
            continue  # cut off while writing (written before atomic renames existed)
        if not _inside(root, ckpt.parent, ckpt, *files):
            log.warning("refusing checkpoint %s: it leads outside %s", ckpt, root)
            continue
        found.append((step, attempt, ckpt))
    return [ckpt for _, _, ckpt in sorted(found, reverse=True)]


def load(path: Path, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state and meta data of the checkpoint at ``path``.

    Raises whatever reading fails with (OSError, ValueError, RuntimeError, pickle errors): a
    truncated or tampered file, or one holding objects ``weights_only`` refuses.
    """
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise ValueError(f"{path} holds no checkpoint dictionary")
    return state, meta


def load_newest(
    paths: list[Path], device: torch.device
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The first of ``paths`` that reads back (path, state, meta); None if none does."""
    for path in paths:
        try:
            return (path, *load(path, device))
        except Exception as exc:  # unreadable: every retry would fail the same way on it
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None


def _inside(root: Path, *paths: Path) -> bool:
    return not any(p.is_symlink() for p in paths) and all(
        p.resolve().is_relative_to(root) for p in paths
    )


def _number(name: str, prefix: str) -> int | None:
    digits = name.removeprefix(prefix)
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def _attempt(folder: Path) -> int | None:
    return _number(folder.name, "attempt-")


def _step(folder: Path) -> int | None:
    return _number(folder.name, "checkpoint-")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
