"""Where checkpoints live: a folder every node shares, or an object store URL.

``HPO_STORAGE_PATH`` is either a local path (an NFS/Lustre mount, a PVC: written with atomic
renames, see :mod:`hpo.workers.checkpoints`) or a URL of any fsspec filesystem: ``s3://bucket/
prefix`` (the ``s3`` extra, s3fs), ``gs://`` (gcsfs), ``memory://``... A ``file://`` URL is a
local path. A remote location is kept as its URL string and a local one as a :class:`Path`, so
``isinstance(x, Path)`` tells the fast path from the object store one.

Storage options (an endpoint, credentials) are fsspec keyword arguments read from the
``HPO_STORAGE_OPTIONS`` JSON variable, e.g. ``{"client_kwargs": {"endpoint_url": "http://minio:
9000"}}``; the usual variables of each backend (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...)
apply as well. ``hpo serve`` hands both to the rank processes it starts on Ray
(:func:`worker_env`). S3 calls get short connect timeouts and few retries unless the options
say otherwise, so an unreachable endpoint is an error within seconds, never a hang.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

Location = Path | str  # a local folder, or the URL of one on an object store

OPTIONS_ENV = "HPO_STORAGE_OPTIONS"
_LOCAL_PROTOCOLS = ("file", "local")
# Variables the rank processes on a cluster need to reach an object store (see worker_env).
_FORWARDED_PREFIXES = ("AWS_",)
# S3 defaults unless HPO_STORAGE_OPTIONS sets them: fail fast on an unreachable endpoint.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
_PROBE_S3_CONFIG = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 2}}


PROBE_FOLDER = ".hpo-probe"  # probe and marker files, under the storage root


class StorageError(RuntimeError):
    """The checkpoint storage cannot be written or read back from here; the message says why."""


def protocol_of(value: Location) -> str | None:
    """The URL scheme of ``value`` (``s3``, ``file``...), None for a plain path."""
    if isinstance(value, Path):
        return None
    scheme, sep, _ = str(value).partition("://")
    return scheme.lower() if sep and scheme.replace("+", "").replace("-", "").isalnum() else None


def is_remote(value: Location) -> bool:
    """Whether ``value`` names an object store (any URL but ``file://``)."""
    protocol = protocol_of(value)
    return protocol is not None and protocol not in _LOCAL_PROTOCOLS


def location(value: Location) -> Location:
    """``value`` as this module keeps it: a Path for a local folder (``file://`` URLs
    included), the URL without a trailing slash for an object store."""
    if isinstance(value, Path):
        return value
    if is_remote(value):
        return value.rstrip("/")
    if protocol_of(value) in _LOCAL_PROTOCOLS:
        return Path(value.split("://", 1)[1])
    return Path(value)


def join(base: Location, *parts: str) -> Location:
    """``base/part/...`` for a local folder or an object store URL."""
    base = location(base)
    if isinstance(base, Path):
        return base.joinpath(*parts)
    return "/".join([base, *parts])


def options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The fsspec options of ``HPO_STORAGE_OPTIONS`` (a JSON object; empty when unset)."""
    raw = (os.environ if environ is None else environ).get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{OPTIONS_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise StorageError(f"{OPTIONS_ENV} must be a JSON object, not {type(value).__name__}")
    return value


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None, *, probing: bool = False
) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it (``bucket/key`` for S3).

    ``storage_options`` defaults to :func:`options`; S3 gets the fail-fast timeouts
    (tighter with ``probing``) wherever they leave them unset. A backend that is not
    installed (``pip install 'hpo[s3]'``) is a :class:`StorageError` saying so."""
    from fsspec.core import url_to_fs

    kwargs = dict(options() if storage_options is None else storage_options)
    if protocol_of(url) in ("s3", "s3a"):
        config = dict(_PROBE_S3_CONFIG if probing else _S3_CONFIG)
        config.update(kwargs.get("config_kwargs") or {})
        kwargs["config_kwargs"] = config
    try:
        return url_to_fs(url, **kwargs)
    except ImportError as exc:
        raise StorageError(f"checkpoint storage {url} needs a filesystem package: {exc}") from exc


def relative(path: Location, root: Location) -> str | None:
    """``path`` relative to ``root`` (``a/b``) if it lies strictly inside it, else None.

    For URLs this is a check on the key: the same scheme, the root's prefix followed by a
    ``/``, and no empty, ``.`` or ``..`` part (object keys may hold ``../``). Local paths are
    resolved first, so a symbolic link leading out is outside."""
    path, root = location(path), location(root)
    if isinstance(path, Path) or isinstance(root, Path):
        if not (isinstance(path, Path) and isinstance(root, Path)):
            return None
        resolved = path.resolve()
        base = root.resolve()
        inside = resolved != base and resolved.is_relative_to(base)
        return resolved.relative_to(base).as_posix() if inside else None
    if protocol_of(path) != protocol_of(root):
        return None
    return relative_key(path.split("://", 1)[1], root.split("://", 1)[1])


def relative_key(key: str, prefix: str) -> str | None:
    """``key`` relative to the key ``prefix`` if it lies under it, with no empty, ``.`` or
    ``..`` part (keys are plain strings: ``a/../b`` is a key of its own), else None."""
    prefix = prefix.rstrip("/") + "/"
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :].rstrip("/")
    parts = rest.split("/")
    if not rest or any(part in ("", ".", "..") for part in parts):
        return None
    return "/".join(parts)


def fetch(url: str, dest: Path, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Download the checkpoint folder at ``url`` (its files, not deeper) into
    ``dest/<its name>`` and return that local folder. Raises FileNotFoundError when it holds
    no ``meta.json`` (it is gone, or was never completed)."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    names = {PurePosixPath(p).name: p for p in fs.ls(path, detail=False)}
    if "meta.json" not in names:
        raise FileNotFoundError(f"no complete checkpoint at {url}")
    local = dest / PurePosixPath(path).name
    local.mkdir(parents=True, exist_ok=True)
    for name, remote in names.items():
        if fs.isfile(remote):
            fs.get_file(remote, str(local / name))
    return local


def worker_env(
    root: Location,
    storage_options: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables rank processes on Ray need to reach an object store ``root``:
    ``HPO_STORAGE_OPTIONS`` and the ``AWS_*`` ones this process has (nothing for a local
    folder). Only these: the database URL and the admin token never go to a cluster."""
    if not is_remote(root):
        return {}
    env = {
        name: value
        for name, value in (os.environ if environ is None else environ).items()
        if name.startswith(_FORWARDED_PREFIXES)
    }
    if storage_options:
        env[OPTIONS_ENV] = json.dumps(dict(storage_options))
    return env


def probe(
    root: str,
    name: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
    shared: tuple[str, str] | None = None,
) -> None:
    """Write, read back and delete a small probe file under ``root`` (a folder or URL).

    ``name`` says who probes (a node id, ``control-plane``): it is part of the file name, so
    probes from several nodes never collide. ``shared``: a marker (name, content) the control
    plane wrote with :func:`mark`; reading it back proves this node sees the same storage as
    the control plane, not a folder of its own under the same path. Raises StorageError naming
    the root and the error, within ``timeout_s`` at the latest (an endpoint that never answers
    included)."""
    _bounded(root, name, timeout_s, lambda: _probe(root, name, storage_options, shared))


def mark(
    root: str,
    marker: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> str:
    """Write the marker file ``marker`` under ``root`` with fresh content and return that
    content: nodes that read it back with :func:`probe` (``shared=``) share this storage.
    Raises StorageError like :func:`probe`."""
    content = secrets.token_hex(16)

    def write() -> None:
        where = location(root)
        if isinstance(where, Path):
            folder = where / PROBE_FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{marker}.{content}"
            tmp.write_text(content)
            tmp.replace(folder / marker)  # readers never see a half-written marker
        else:
            fs, base = filesystem(where, storage_options, probing=True)
            fs.pipe_file(f"{base}/{PROBE_FOLDER}/{marker}", content.encode())

    _bounded(root, marker, timeout_s, write)
    return content


# Helper threads still blocked in a storage call that timed out, by (root, name): a mount that
# hangs keeps them forever, so the same check is not started again while one is (else every
# recheck would leave one more thread behind).
_stuck: dict[tuple[str, str], threading.Thread] = {}
_stuck_lock = threading.Lock()


def _bounded(root: str, name: str, timeout_s: float, work: Callable[[], None]) -> None:
    """Run ``work`` on a helper thread and wait at most ``timeout_s``; its errors (and the
    wait running out) become StorageError naming ``root``. While an earlier call for the same
    ``root`` and ``name`` is still blocked, fail at once instead of starting another."""
    key = (str(root), name)
    with _stuck_lock:
        earlier = _stuck.get(key)
        if earlier is not None and earlier.is_alive():
            raise StorageError(
                f"checkpoint storage {root} has not answered an earlier call yet (it hangs)"
            )
        _stuck.pop(key, None)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    worker = threading.Thread(target=attempt, name=f"hpo-storage-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        with _stuck_lock:
            _stuck[key] = worker
        raise StorageError(f"checkpoint storage {root} did not answer within {timeout_s:g} s")
    error = outcome[0]
    if isinstance(error, StorageError):
        raise error
    if error is not None:
        detail = f"{type(error).__name__}: {error}".strip()
        raise StorageError(f"checkpoint storage {root} is not usable from here: {detail}") from (
            error
        )


def _probe(
    root: str,
    name: str,
    storage_options: Mapping[str, Any] | None,
    shared: tuple[str, str] | None,
) -> None:
    payload = secrets.token_hex(8)
    where = location(root)
    if isinstance(where, Path):
        folder = where / PROBE_FOLDER
        path = folder / f"{name}-{payload}"
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(payload)
        back = path.read_text()
        path.unlink()
        marker = None
        if shared is not None and (folder / shared[0]).is_file():
            marker = (folder / shared[0]).read_text()
    else:
        fs, base = filesystem(where, storage_options, probing=True)
        path = f"{base}/{PROBE_FOLDER}/{name}-{payload}"
        fs.pipe_file(path, payload.encode())
        back = fs.cat_file(path).decode()
        fs.rm_file(path)
        marker = None
        if shared is not None and fs.exists(f"{base}/{PROBE_FOLDER}/{shared[0]}"):
            marker = fs.cat_file(f"{base}/{PROBE_FOLDER}/{shared[0]}").decode()
    if back != payload:
        raise StorageError(f"checkpoint storage {root}: a probe file read back differently")
    if shared is not None and marker != shared[1]:
        raise StorageError(
            f"checkpoint storage {root} here is not the storage the control plane writes "
            f"(its marker {PROBE_FOLDER}/{shared[0]} is "
            f"{'missing' if marker is None else 'different'} here): mount the same shared "
            "folder or bucket on every node and on the control plane"
        )
