"""``image-classification``: a small CNN on scikit-learn's bundled digits images (8x8, 1,797).

Train/validation split with a fixed seed; every epoch reports ``val_loss`` and ``val_accuracy``
(averaged over all DDP ranks) and saves a checkpoint; a retried attempt resumes from it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hpo.workers import trainable
from hpo.workers.context import TrialContext


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=64, ge=1)
    epochs: int = Field(default=10, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    channels: int = Field(default=16, ge=1, le=512)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0


class DigitsCNN(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * 16, 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(val_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The digits images as (N, 1, 8, 8) floats in [0, 1], split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    idx = np.arange(len(y))
    train_idx, val_idx = train_test_split(
        idx, test_size=val_fraction, random_state=seed, stratify=data.target
    )
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def make_optimizer(s: Settings, params: object) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    cls = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=s.lr, weight_decay=s.weight_decay)


@trainable(Settings)
def train(ctx: TrialContext) -> None:
    s: Settings = ctx.settings
    torch.manual_seed(s.seed)
    train_set, val_set = digits_split(s.val_fraction, s.seed)
    sampler = ctx.sampler(train_set, shuffle=True, seed=s.seed)
    loader = DataLoader(train_set, batch_size=s.batch_size, sampler=sampler)
    val_loader = DataLoader(val_set, batch_size=256, sampler=ctx.sampler(val_set, shuffle=False))
    model = ctx.wrap(DigitsCNN(s.channels, s.dropout))
    optimizer = make_optimizer(s, model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    first_epoch = 1
    state = ctx.load_checkpoint()
    if state is not None:  # a retry resumes where the failed attempt saved
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = int(state["epoch"]) + 1
    for epoch in range(first_epoch, s.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
        ctx.log(epoch, {"train_loss": loss.item()})
        val_loss, val_accuracy = evaluate(ctx, model, val_loader, loss_fn)
        ctx.save_checkpoint(
            {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
            },
            epoch,
            settings=s.model_dump(),
        )
        if ctx.report(epoch, {"val_loss": val_loss, "val_accuracy": val_accuracy}):
            return  # pruned: every rank stops at the same epoch


def evaluate(
    ctx: TrialContext, model: nn.Module, loader: DataLoader, loss_fn: nn.Module
) -> tuple[float, float]:
    """Loss and accuracy over the whole validation set (summed across ranks)."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            logits = model(x)
            loss_sum += loss_fn(logits, y).item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    loss_sum, correct, count = ctx.all_reduce_sum([loss_sum, correct, count])
    return loss_sum / count, correct / count


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
