"""A trial's metrics as live TensorBoard scalars, written by its rank 0 as it reports them.

With ``HPO_TENSORBOARD_DIR`` set on the control plane, each trial writes its points into
``<dir>/<study name>/trial-0007`` (the run names ``hpo export --tensorboard`` uses), one
event file per attempt, flushed every second: ``tensorboard --logdir <dir>``
shows the curves while the trials run. The folder must be one the workers can write (a
local folder for local Ray, a shared one on a cluster). Without the ``tensorboard`` package
on the workers, or where the folder cannot be written, nothing is written and the trial runs
on (a warning says why).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("hpo.workers.tensorboard")


def scalar_event(name: str, value: float, step: int, wall_time: float) -> Any:
    """A TensorBoard event holding one scalar."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=name, simple_value=value)])
    return Event(wall_time=wall_time, step=step, summary=summary)


class LiveScalars:
    """Appends reported points to an event file in ``folder`` as they come."""

    def __init__(self, folder: str, attempt: int, flush_s: float = 1.0) -> None:
        self._writer: Any = None
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            log.warning("HPO_TENSORBOARD_DIR is set but tensorboard is not installed here")
            return
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(
                folder, flush_secs=flush_s, filename_suffix=f".attempt-{attempt}"
            )
        except OSError as exc:  # not writable here: the trial runs on without it
            log.warning("cannot write TensorBoard events to %s: %s", folder, exc)

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        now = time.time()
        try:
            for name, value in metrics.items():
                self._writer.add_event(scalar_event(name, float(value), int(step), now))
        except Exception as exc:  # the writer's thread failed (disk full...): stop writing
            log.warning("TensorBoard events stopped: %s", exc)
            self._writer = None

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:
                log.warning("TensorBoard events not flushed: %s", exc)
