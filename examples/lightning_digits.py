"""Tune a PyTorch Lightning model with hpo: a small MLP on scikit-learn's digits (bundled, no
download). Each trial reports ``val_loss`` and ``val_acc`` after every validation through
``HpoCallback``; the median pruner stops the poor ones early.

    hpo serve &                                       # in another shell
    python examples/lightning_digits.py --trials 10 --epochs 10

Needs ``pip install 'hpo[integrations]'`` (and scikit-learn).
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hpo.api.client import Client, TrialHandle
from hpo.api.integrations.lightning import HpoCallback

SPEC: dict[str, Any] = {
    "name": "lightning-digits-mlp",
    "objective": {"metric": "val_loss", "direction": "minimize"},
    "sampler": {"type": "tpe", "seed": 0},
    "pruner": {"type": "median", "n_startup_trials": 2, "min_steps": 1},
    "space": {
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "hidden": {"type": "int", "low": 16, "high": 128},
    },
}


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float, hidden: int) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        )

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Digits scaled to [0, 1], split 80/20 (the same split for every trial)."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train, val = order[:split], order[split:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def objective(
    trial: TrialHandle, *, epochs: int = 10, batches_per_epoch: int | None = None
) -> float:
    """Fit one trial; its last ``val_loss`` is the value hpo minimizes."""
    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=batches_per_epoch,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[HpoCallback(trial)],
    )
    model = DigitsMLP(trial.params["lr"], trial.params["hidden"])
    trainer.fit(model, train, val)  # ends early when hpo prunes the trial
    return float(trainer.callback_metrics["val_loss"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="hpo server (default: $HPO_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="API token (default: $HPO_TOKEN or the local token file)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batches", type=int, default=None, help="training batches per epoch")
    p.add_argument("--name", default=SPEC["name"], help="study name")
    a = p.parse_args(argv)
    with Client(a.url, a.token) as client:
        study = client.create_study({**SPEC, "name": a.name}, load_if_exists=True)
        study.optimize(
            lambda t: objective(t, epochs=a.epochs, batches_per_epoch=a.batches),
            n_trials=a.trials,
        )
        best = study.best_trial
        print(f"best val_loss {best.value:.4f} with {best.params}" if best else "no trial ended")


if __name__ == "__main__":
    main()
