"""A Hugging Face ``Trainer`` callback that reports to hpo and stops training when hpo prunes
the trial.

>>> def objective(trial):                      # study.optimize(objective, n_trials=20)
...     args = TrainingArguments(..., learning_rate=trial.params["learning_rate"],
...                              eval_strategy="steps", eval_steps=50)
...     trainer = Trainer(model, args, ..., callbacks=[HpoCallback(trial)])
...     trainer.train()
...     return trainer.evaluate()["eval_loss"]

Every log (the training loss every ``logging_steps``, the ``eval_*`` metrics at each
evaluation) is reported at the trainer's global step, from the main process only. When hpo
answers that the trial should stop, ``control.should_training_stop`` ends training after the
current step; ``study.optimize`` then tells the trial pruned.

Under several processes (``torchrun``) run the trials with
:func:`hpo.api.integrations.distributed.optimize`: every rank trains the same trial, and at
each log every rank takes rank 0's answer, so all of them stop at the same step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hpo.api.integrations.distributed import stop_together
from hpo.api.integrations.reporting import TrialReporter
from hpo.api.objective import TrialHandle, TrialTeller

# What the Trainer logs about itself rather than the model: not reported unless asked for.
BOOKKEEPING_SUFFIXES = ("_runtime", "_per_second", "total_flos")


class HpoCallback(TrainerCallback):
    """Reports the Trainer's logs to an hpo trial; stops training on hpo's prune answer.

    ``trial``: the handle ``study.optimize`` passes the objective, or a trial from
    ``study.ask()`` with its ``study``. ``metrics``: the log keys to report (default: every
    number, e.g. ``loss``, ``learning_rate``, ``eval_loss``, ``eval_accuracy``, but the
    Trainer's timings and ``total_flos``).
    """

    def __init__(
        self,
        trial: TrialHandle | Mapping[str, Any],
        study: TrialTeller | None = None,
        *,
        metrics: Collection[str] | None = None,
    ) -> None:
        self.reporter = TrialReporter(trial, study, metrics)
        self.every_number = metrics is None

    @property
    def pruned(self) -> bool:
        return self.reporter.pruned

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # Every rank logs at the same steps (the Trainer gathers the loss first): where the
        # ranks agree on rank 0's answer.
        stop = False
        if state.is_world_process_zero and logs:
            if self.every_number:
                logs = {k: v for k, v in logs.items() if not k.endswith(BOOKKEEPING_SUFFIXES)}
            stop = self.reporter.report(state.global_step, logs)
        if stop_together(stop):
            control.should_training_stop = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # A heartbeat of study.optimize may have learnt it too; with several ranks the next
        # log carries it to the others.
        if self.reporter.pruned and args.world_size == 1:
            control.should_training_stop = True
