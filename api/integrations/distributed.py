"""``study.optimize`` for a job of several processes (``torchrun``, a Slurm ``srun`` of
torch.distributed ranks) that trains each trial with DDP.

Every process runs the same script; started plainly, each would ask its own trial. Here rank
0 asks and tells, as ``study.optimize`` does, and hands each asked trial to every rank, so
all of them train the same parameters::

    from hpo.api.integrations import distributed
    from hpo.api.integrations.huggingface import HpoCallback

    def objective(trial):                    # runs on every rank, with the same trial
        trainer = Trainer(..., callbacks=[HpoCallback(trial)])
        trainer.train()
        return trainer.evaluate()["eval_loss"]

    distributed.optimize(study, objective, n_trials=20)   # torchrun --nproc-per-node 2 ...

Rank 0 reports and keeps the trial's lease; the callbacks make every rank agree on hpo's stop
answer at the same step (:func:`stop_together`), so no rank is left waiting in a collective.
The other ranks' handles send nothing: their ``report`` answers False, so a loop of your own
must agree on rank 0's answer on every rank at the same step::

    if distributed.stop_together(trial.report(step, {"loss": loss})):
        break                                 # every rank, at this step

They never tell. The control messages go over a gloo group of their own, whatever the training
backend.

Imports torch when called, not on import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from hpo.api.objective import TrialHandle, TrialPruned

log = logging.getLogger("hpo.api.integrations")

_group: Any = None  # the gloo group of the control messages, once made


def world() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, else torchrun's
    ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _control_group() -> Any:
    """The gloo group the ranks share decisions over; joins the default process group from
    torchrun's environment first when nobody has (NCCL for CUDA tensors where there is a GPU,
    gloo otherwise: a trainer that comes later finds it initialized and uses it)."""
    global _group
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    if _group is None:
        _group = dist.new_group(backend="gloo")
    return _group


def share(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (collective: every rank calls it)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def stop_together(stop: bool) -> bool:
    """Rank 0's stop answer on every rank (collective: every rank calls it at the same
    step). On a single process: ``stop``."""
    if world()[1] == 1:
        return stop
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if stop else 0], dtype=torch.int32)
    dist.broadcast(flag, src=0, group=_control_group())
    return bool(flag.item())


class _Follower:
    """The study as a rank other than 0 sees it: reports and heartbeats go nowhere (rank 0
    sends them), and it never tells."""

    def report(self, trial: Any, step: int, metrics: Mapping[str, float]) -> bool:
        return False

    def heartbeat(self, trial: Any, *, retry: Any = None) -> bool:
        return False

    def tell(self, trial: Any, value: float | None = None, **outcome: Any) -> Any:
        rank = world()[0]
        raise RuntimeError(f"rank {rank} does not tell a trial: rank 0 does")


def optimize(
    study: Any,
    objective: Callable[[TrialHandle], Any],
    n_trials: int | None = None,
    *,
    catch: tuple[type[BaseException], ...] = (),
) -> None:
    """:meth:`Study.optimize <hpo.api.client.Study.optimize>` on every rank of a job, with
    one trial at a time shared by all ranks (see the module). On a single process it is
    ``study.optimize``.

    An exception that rank 0 does not ``catch`` ends its run (the trial is told failed), and
    the job with it: the other ranks are then waiting in a collective, as in any DDP job."""
    rank, size = world()
    if size == 1:
        study.optimize(objective, n_trials, catch=catch)
        return
    if rank == 0:

        def lead(handle: TrialHandle) -> Any:
            share(handle.asked)
            return objective(handle)

        study.optimize(lead, n_trials, catch=catch)
        share(None)  # no more trials
        return
    metric = study.objective_metric
    while (asked := share(None)) is not None:
        handle = TrialHandle(_Follower(), asked, metric)
        try:
            objective(handle)
        except TrialPruned:
            pass
        except catch:
            log.warning("trial %d failed on rank %d; going on", handle.number, rank, exc_info=True)
