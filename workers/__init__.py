"""The Ray side of hpo: trainables, the DDP training loop helpers and the metric reporter.

A trainable is a function ``train(ctx: TrialContext) -> dict | None`` registered under a name
in the entry-point group ``hpo.trainables`` and decorated with :func:`trainable` to declare its
settings. Workers talk to the control plane over HTTP only; they never open the database.
"""

from hpo.workers.registry import TrainableError, trainable

__all__ = ["TrainableError", "trainable"]
