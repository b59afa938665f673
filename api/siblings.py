"""What the workers of one ``hpo serve --workers N`` share (:mod:`hpo.api.serving`): a folder
where each publishes its series and its scheduler's role, and each worker's beat. A module of
its own, importing nothing of hpo, so that the app and the supervisor both use it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any


class Siblings:
    """The folder that the workers of one ``hpo serve --workers N`` share, and worker
    ``index``'s beat (the write end of its pipe to the supervisor).

    Worker ``index`` writes ``<index>.json`` there (its Prometheus text and its scheduler's
    role; replaced atomically, each write from a file of its own); every worker reads all of
    them. A file is at most ``interval_s`` old while its
    worker is healthy (it publishes that often, and once more when it answers a scrape)."""

    def __init__(
        self, folder: Path, index: int, *, beat_fd: int | None = None, interval_s: float = 1.0
    ) -> None:
        self.folder = folder
        self.index = index
        self.beat_fd = beat_fd
        self.interval_s = interval_s
        self.lock = threading.Lock()  # held by a worker from making its text to its file

    def beat(self) -> None:
        """Tell the supervisor this worker's event loop runs (a byte on its pipe; none when
        the pipe is full or the supervisor gone)."""
        if self.beat_fd is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self.beat_fd, b".")

    def publish(self, metrics_text: str, scheduler: str) -> None:
        """Replace this worker's file (nothing once the folder is gone: the server stops)."""
        entry = json.dumps({"metrics": metrics_text, "scheduler": scheduler})
        with contextlib.suppress(FileNotFoundError):
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(entry)
                os.replace(tmp, self.folder / f"{self.index}.json")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    def read(self) -> dict[int, dict[str, Any]]:
        """Every worker's last file by index (fewer before all of them have published)."""
        found = {}
        for path in self.folder.glob("*.json"):
            try:
                found[int(path.stem)] = json.loads(path.read_text())
            except (OSError, ValueError):  # removed at shutdown
                continue
        return found

    def scheduler_role(self) -> str:
        """The role of worker 0's scheduler (``running``, ``standby`` or ``off``: the server's
        scheduler is off; the supervisor writes what it starts as before worker 0 is up), or
        ``unknown`` when its file cannot be read."""
        try:
            return str(json.loads((self.folder / "0.json").read_text())["scheduler"])
        except (OSError, ValueError, KeyError):
            return "unknown"
