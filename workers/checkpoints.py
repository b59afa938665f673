"""A trial's checkpoints: written atomically, found only inside the trial's folder, and read back
with a fall-back to the previous one when the newest is unreadable.

Layout: ``<trial folder>/attempt-<n>/checkpoint-<step:06d>/`` holding ``state.pt`` (tensors,
numbers and strings: read with ``torch.load(weights_only=True)``, so nothing in it is executed)
and ``meta.json``. A checkpoint exists once its folder has its final name: it is written under
a hidden temporary name, every file is fsynced, and the folder is renamed into place (the
parent fsynced after), so a crash at any point leaves the earlier checkpoints as they were and
no half-written one under a checkpoint name. Each attempt writes only into its own folder, so
a stale attempt never overwrites what the live one resumes from.

On an object store (a URL, see :mod:`hpo.workers.storage`) the same layout holds under the
trial's prefix. There is no rename there, but each put is atomic: the checkpoint is written to
a local staging folder, ``state.pt`` is uploaded first and ``meta.json`` last, and a checkpoint
counts only once its ``meta.json`` is there. Listing reads the trial's prefix only; loading
downloads into a temporary folder first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from hpo.workers import storage
from hpo.workers.storage import Location

log = logging.getLogger("hpo.workers.checkpoints")


def attempt_folder(trial_dir: Location, attempt: int) -> Location:
    """Where attempt ``attempt`` of the trial writes its checkpoints."""
    return storage.join(trial_dir, f"attempt-{attempt}")


def write(folder: Location, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Location:
    """Write ``checkpoint-<step>`` into ``folder`` atomically and return its path (its URL on
    an object store)."""
    folder = storage.location(folder)
    if not isinstance(folder, Path):
        return _write_remote(folder, step, state, meta)
    name = _name(step)
    with _placing(folder, name) as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))
    return folder / name


def copy(source: Location, folder: Location) -> Location:
    """Copy the checkpoint at ``source`` into ``folder`` under the same name, as atomically as
    :func:`write` (``meta.json`` last on an object store); returns the copy's path."""
    source, folder = storage.location(source), storage.location(folder)
    name = PurePosixPath(str(source).rstrip("/")).name
    if isinstance(source, Path) and isinstance(folder, Path):
        with _placing(folder, name) as tmp:
            for file in ("state.pt", "meta.json"):
                shutil.copyfile(source / file, tmp / file)
        return folder / name
    src_fs, src_root = storage.filesystem(str(source))
    dst_fs, dst_root = storage.filesystem(str(folder))
    with contextlib.suppress(FileNotFoundError):
        dst_fs.rm_file(f"{dst_root}/{name}/meta.json")
    for file in ("state.pt", "meta.json"):
        dst_fs.pipe_file(f"{dst_root}/{name}/{file}", src_fs.cat_file(f"{src_root}/{file}"))
    return storage.join(folder, name)


@contextlib.contextmanager
def _placing(folder: Path, name: str) -> Iterator[Path]:
    """A hidden temporary folder in ``folder`` for the block to fill; when the block ends, its
    files and it are fsynced and it replaces ``folder/name`` (``folder`` fsynced after). A
    block that raises leaves nothing behind."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        yield tmp
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        if final.exists():  # the same step saved (or copied) again: replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove(path: Location) -> None:
    """Remove one checkpoint (on an object store ``meta.json`` first, so that a checkpoint
    half removed no longer counts)."""
    path = storage.location(path)
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, root = storage.filesystem(str(path))
    for file in ("meta.json", "state.pt"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{root}/{file}")


def prune(folder: Location, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints of ``folder``; remove older ones and the leftovers
    of writes a crash cut short."""
    folder = storage.location(folder)
    if not isinstance(folder, Path):
        _prune_remote(folder, keep)
        return
    # by step, not by name: six digits of padding sort checkpoint-1000000 before -999999
    found = sorted((p for p in folder.glob("checkpoint-*") if step_of(p) is not None), key=step_of)
    for old in found[:-keep] if keep > 0 else found:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def candidates(trial_dir: Location, *, before_attempt: int) -> list[Location]:
    """The complete checkpoints that earlier attempts left in ``trial_dir``, newest first:
    the latest attempt's first, each attempt's by step. A later attempt's state supersedes an
    earlier one's even at a lower step: an attempt told to pause late may have saved past its
    pause, and the next attempt resumed from the pause (or from a PBT copy) instead.

    Chosen from the files, not from what the control plane last heard: an attempt cut off by a
    crash may have saved checkpoints the control plane never learned about. A checkpoint behind
    a symbolic link, or whose real path lies outside the trial's folder, is refused (logged);
    on an object store, only keys under the trial's prefix, shaped
    ``attempt-<n>/checkpoint-<step>/<file>`` with no ``.``/``..`` parts, are considered.
    """
    trial_dir = storage.location(trial_dir)
    if not isinstance(trial_dir, Path):
        return _candidates_remote(trial_dir, before_attempt)
    root = trial_dir.resolve()
    found = []
    for ckpt in trial_dir.glob("attempt-*/checkpoint-*"):
        attempt, step = _attempt(ckpt.parent), step_of(ckpt)
        if attempt is None or step is None or attempt >= before_attempt:
            continue
        files = (ckpt / "state.pt", ckpt / "meta.json")
        if not all(f.is_file() for f in files):
            continue  # cut off while writing (written before atomic renames existed)
        if not _inside(root, ckpt.parent, ckpt, *files):
            log.warning("refusing checkpoint %s: it leads outside %s", ckpt, root)
            continue
        found.append((attempt, step, ckpt))
    return [ckpt for _, _, ckpt in sorted(found, reverse=True)]


def load(path: Location, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state and meta data of the checkpoint at ``path`` (downloaded to a temporary
    folder first when it is on an object store).

    Raises whatever reading fails with (OSError, ValueError, RuntimeError, pickle errors): a
    truncated or tampered file, or one holding objects ``weights_only`` refuses.
    """
    path = storage.location(path)
    if not isinstance(path, Path):
        fs, key = storage.filesystem(path)
        with tempfile.TemporaryDirectory(prefix="hpo-checkpoint-") as tmp:
            local = Path(tmp)
            for name in ("meta.json", "state.pt"):
                fs.get_file(f"{key}/{name}", str(local / name))
            return load(local, device)
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise ValueError(f"{path} holds no checkpoint dictionary")
    return state, meta


def load_newest(
    paths: list[Location], device: torch.device
) -> tuple[Location, dict[str, Any], dict[str, Any]] | None:
    """The first of ``paths`` that reads back (path, state, meta); None if none does."""
    for path in paths:
        try:
            return (path, *load(path, device))
        except Exception as exc:  # unreadable: every retry would fail the same way on it
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
    return None


def _write_remote(folder: str, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Stage the checkpoint locally, then upload ``state.pt`` and, last, ``meta.json``: a
    crash before the last put leaves no ``meta.json``, so no checkpoint."""
    fs, root = storage.filesystem(folder)
    final = f"{root}/{_name(step)}"
    with tempfile.TemporaryDirectory(prefix="hpo-checkpoint-") as tmp:
        staged = Path(tmp)
        torch.save(state, staged / "state.pt")
        (staged / "meta.json").write_text(json.dumps(meta, default=str))
        # The same step saved again: incomplete until its new meta.json lands, so a reader
        # never pairs the new state with the old meta data.
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{final}/meta.json")
        fs.put_file(str(staged / "state.pt"), f"{final}/state.pt")
        fs.put_file(str(staged / "meta.json"), f"{final}/meta.json")
    return storage.join(folder, _name(step))


def _listing(url: str) -> tuple[Any, str, dict[tuple[str, ...], list[str]]]:
    """The keys under ``url`` (one listing of that prefix, not cached), grouped by their
    folder parts relative to it: ``{("attempt-1", "checkpoint-000002"): [keys]}``."""
    fs, root = storage.filesystem(url)
    fs.invalidate_cache(root)
    groups: dict[tuple[str, ...], list[str]] = {}
    for key in fs.find(root):
        rel = storage.relative_key(key, root)
        if rel is None:
            if key.startswith(f"{root}/"):  # ".." or empty parts: not a path inside it
                log.warning("refusing object %s: it does not name a file under %s", key, root)
            continue
        *folders, _ = PurePosixPath(rel).parts
        groups.setdefault(tuple(folders), []).append(key)
    return fs, root, groups


def _prune_remote(folder: str, keep: int) -> None:
    fs, _, groups = _listing(folder)
    steps = {}
    for folders, keys in groups.items():
        step = _number(folders[0], "checkpoint-") if len(folders) == 1 else None
        if step is not None:
            complete = {PurePosixPath(k).name for k in keys} >= {"state.pt", "meta.json"}
            steps[step] = (complete, keys)
    kept = sorted(step for step, (complete, _) in steps.items() if complete)
    kept = set(kept[-keep:]) if keep > 0 else set()
    doomed = [key for step, (_, keys) in steps.items() if step not in kept for key in keys]
    if doomed:
        fs.rm(doomed)


def _candidates_remote(trial_dir: str, before_attempt: int) -> list[str]:
    _, _, groups = _listing(trial_dir)
    found = []
    for folders, keys in groups.items():
        if len(folders) != 2:
            continue
        attempt, step = _number(folders[0], "attempt-"), _number(folders[1], "checkpoint-")
        if attempt is None or step is None or attempt >= before_attempt:
            continue
        if {PurePosixPath(k).name for k in keys} >= {"state.pt", "meta.json"}:
            found.append((attempt, step, storage.join(trial_dir, *folders)))
    return [ckpt for _, _, ckpt in sorted(found, reverse=True)]


def _inside(root: Path, *paths: Path) -> bool:
    return not any(p.is_symlink() for p in paths) and all(
        p.resolve().is_relative_to(root) for p in paths
    )


def step_of(path: Location) -> int | None:
    """The step a checkpoint holds, read from its folder's own name (``checkpoint-000012``:
    12; a local path or a URL), or None."""
    return _number(PurePosixPath(str(path).rstrip("/")).name, "checkpoint-")


def attempt_of(path: Location) -> int | None:
    """The attempt that wrote a checkpoint, read from its attempt folder's name
    (``attempt-3/checkpoint-000012``: 3), or None."""
    return _number(PurePosixPath(str(path).rstrip("/")).parent.name, "attempt-")


def beside(path: Location, step: int) -> str:
    """Where the checkpoint of ``step`` is in the attempt folder of the one at ``path``."""
    return f"{str(path).rstrip('/').rpartition('/')[0]}/{_name(step)}"


def _name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def _number(name: str, prefix: str) -> int | None:
    digits = name.removeprefix(prefix)
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None


def _attempt(folder: Path) -> int | None:
    return _number(folder.name, "attempt-")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
