"""A PyTorch Lightning callback that reports validation metrics to hpo and stops training
when hpo prunes the trial.

>>> def objective(trial):                      # study.optimize(objective, n_trials=20)
...     model = MyModule(lr=trial.params["lr"])
...     trainer = L.Trainer(max_epochs=20, callbacks=[HpoCallback(trial)])
...     trainer.fit(model, datamodule=data)
...     return trainer.callback_metrics["val_loss"].item()

At the end of every validation (not the sanity check), the trainer's ``callback_metrics``
(what the module ``self.log``-ged) are reported at its ``global_step`` from rank 0; hpo's
answer is broadcast to every rank and ``trainer.should_stop`` ends the fit. ``study.optimize``
then tells the trial pruned.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl  # type: ignore[no-redef]

from hpo.api.integrations.reporting import TrialReporter
from hpo.api.objective import TrialHandle, TrialTeller


class HpoCallback(pl.Callback):
    """Reports validation metrics to an hpo trial; stops the fit on hpo's prune answer.

    ``trial``: the handle ``study.optimize`` passes the objective, or a trial from
    ``study.ask()`` with its ``study``. ``metrics``: the names to report (default: every
    number in ``trainer.callback_metrics``).
    """

    def __init__(
        self,
        trial: TrialHandle | Mapping[str, Any],
        study: TrialTeller | None = None,
        *,
        metrics: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        self.reporter = TrialReporter(trial, study, metrics)

    @property
    def pruned(self) -> bool:
        return self.reporter.pruned

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        stop = False
        if trainer.is_global_zero:
            stop = self.reporter.report(trainer.global_step, trainer.callback_metrics)
        stop = trainer.strategy.broadcast(stop, src=0)
        if stop:
            trainer.should_stop = True
