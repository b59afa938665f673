"""Where checkpoints live: a folder every node shares, or an object store URL.

(Being built: this module grows fsspec support for ``s3://``, ``gs://`` and ``file://``.)
"""

from __future__ import annotations

import secrets
from pathlib import Path


class StorageError(RuntimeError):
    """The checkpoint storage cannot be written or read back from here; the message says why."""


def probe(root: str, name: str) -> None:
    """Write, read back and delete a small probe file under ``root``.

    ``name`` says who probes (a node id, ``control-plane``): it is part of the file name, so
    probes from several nodes never collide. Raises StorageError naming the root and the error.
    """
    folder = Path(root) / ".hpo-probe"
    payload = secrets.token_hex(8)
    path = folder / f"{name}-{payload}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(payload)
        if path.read_text() != payload:
            raise StorageError(f"checkpoint storage {root}: a probe file read back differently")
        path.unlink()
    except OSError as exc:
        raise StorageError(f"checkpoint storage {root} is not usable from here: {exc}") from exc
