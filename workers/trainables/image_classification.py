"""``image-classification``: a small CNN on scikit-learn's bundled digits images (8x8, 1,797).

The data is cleaned (duplicates, blank images) and split train/validation/test with a fixed
seed (or k-fold: ``folds``/``fold``). Every epoch reports ``val_loss``, ``val_accuracy`` and
macro ``val_precision``/``val_recall``/``val_f1`` (identical on all DDP ranks) plus the
cumulative ``train_samples``, and saves a checkpoint; a retried attempt resumes from it.
``evaluate`` scores a checkpoint on the held-out test split.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from hpo.workers import cleaning, trainable
from hpo.workers.context import TrialContext
from hpo.workers.guards import EarlyStopping, GuardSettings, LossGuard
from hpo.workers.metrics import gathered_metrics, held_out_metrics
from hpo.workers.registry import batch_problem, per_rank_batch
from hpo.workers.schedules import Schedule, ScheduleSettings
from hpo.workers.splits import SplitSettings, shard, split_by


class Settings(ScheduleSettings, GuardSettings, SplitSettings):
    model_config = ConfigDict(extra="forbid")

    # optimisation (the LR schedule, early stopping and divergence guard are inherited)
    lr: float = Field(default=1e-2, gt=0)
    batch_size: int = Field(default=64, ge=1, description="Global batch, split over the ranks.")
    epochs: int = Field(default=10, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only.")
    weight_decay: float = Field(default=0.0, ge=0)
    # structure and initialisation
    depth: int = Field(default=2, ge=1, le=4, description="Conv layers (pool after 2nd, 4th).")
    channels: int = Field(default=16, ge=1, le=512, description="Width of the first conv.")
    hidden: int = Field(default=64, ge=1, le=4096, description="Width of the dense layer.")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    batch_norm: bool = False
    init: Literal["default", "xavier", "he"] = "default"
    # augmentation
    shift: int = Field(default=0, ge=0, le=3, description="Random shifts up to N pixels.")
    noise: float = Field(default=0.0, ge=0, le=1, description="Gaussian pixel noise (std).")
    # data (the splits are inherited)
    seed: int = Field(default=0, ge=0, description="Initialisation and shuffling.")

    def split_problem(self, world_size: int) -> str | None:
        """Why ``batch_size`` does not split over ``world_size`` ranks, or None."""
        return batch_problem(self.batch_size, world_size)


class DigitsCNN(nn.Module):
    """``depth`` conv layers (3x3, optional batch norm, ReLU; 2x2 max-pool after the 2nd and
    4th), then a dense layer with dropout and a 10-way head."""

    def __init__(self, s: Settings) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = 1, 8
        for i in range(s.depth):
            c_out = s.channels if i == 0 else 2 * s.channels
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1)]
            layers += [nn.BatchNorm2d(c_out)] if s.batch_norm else []
            layers += [nn.ReLU()]
            if i % 2 == 1:
                layers += [nn.MaxPool2d(2)]
                size //= 2
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * size * size, s.hidden),
            nn.ReLU(),
            nn.Dropout(s.dropout),
            nn.Linear(s.hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: object) -> list[int]:
        """Digits (0-9) for 8x8 images with pixels in [0, 1] (``load_digits().images / 16``)."""
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 8, 8)
        device = next(self.parameters()).device
        return self(x.to(device)).argmax(1).tolist()


def build_model(s: Settings) -> DigitsCNN:
    return DigitsCNN(s)


def init_weights(model: nn.Module, scheme: str) -> None:
    """``xavier`` (Glorot uniform) or ``he`` (Kaiming normal, fan-in) for conv and dense
    weights, zero biases; ``default`` keeps PyTorch's initialisation."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)


@lru_cache(maxsize=1)
def load_digits() -> tuple[torch.Tensor, torch.Tensor, cleaning.CleaningReport]:
    """The cleaned digits images as (N, 1, 8, 8) floats in [0, 1], their labels, and what
    cleaning removed."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    keep, report = cleaning.clean_arrays(raw.images, raw.target)
    x = torch.tensor(raw.images[keep] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(raw.target[keep], dtype=torch.long), report


def datasets(s: Settings) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    x, y, _ = load_digits()
    parts = split_by(y.numpy(), s)
    return tuple(TensorDataset(x[i], y[i]) for i in (parts.train, parts.val, parts.test))


def augment(x: torch.Tensor, s: Settings) -> torch.Tensor:
    """Random shifts (each image by up to ``shift`` pixels, zero fill) and Gaussian noise."""
    if s.shift:
        n, pad = len(x), s.shift
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = (torch.randint(0, 2 * pad + 1, (n,)) for _ in range(2))
        rows = (dy[:, None] + torch.arange(8))[:, :, None]
        cols = (dx[:, None] + torch.arange(8))[:, None, :]
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    if s.noise:
        x = (x + s.noise * torch.randn_like(x)).clamp(0, 1)
    return x


def make_optimizer(s: Settings, params: object) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    cls = torch.optim.Adam if s.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=s.lr, weight_decay=s.weight_decay)


@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple:
    """Summed loss, labels and predictions over ``loader``."""
    model.eval()
    loss_sum, y_true, y_pred = 0.0, [], []
    for x, y in loader:
        logits = model(x.to(device))
        loss_sum += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        y_true += y.tolist()
        y_pred += logits.argmax(1).tolist()
    return loss_sum, y_true, y_pred


def evaluate(checkpoint: Path, settings: Settings, device: torch.device) -> dict[str, float]:
    """Test loss, accuracy and macro precision/recall/F1 of a checkpoint on the test split."""
    from hpo.workers.inference import load_model

    model = load_model(checkpoint, device=device).model
    test_set = datasets(settings)[2]
    return held_out_metrics(*predict_loader(model, DataLoader(test_set, 512), device))


@trainable(Settings, evaluate=evaluate, build_model=build_model)
def train(ctx: TrialContext) -> None:
    s: Settings = ctx.settings
    torch.manual_seed(s.seed)
    train_set, val_set, _ = datasets(s)
    sampler = ctx.sampler(train_set, shuffle=True, seed=s.seed)
    loader = DataLoader(train_set, per_rank_batch(s, ctx), sampler=sampler)
    val_shard = Subset(val_set, shard(len(val_set), ctx.rank, ctx.world_size))
    val_loader = DataLoader(val_shard, batch_size=512)

    model = build_model(s)
    init_weights(model, s.init)
    model = ctx.wrap(model)  # DDP: rank 0's initial weights are broadcast to every rank
    optimizer = make_optimizer(s, model.parameters())
    schedule = Schedule.of(optimizer, s, epochs=s.epochs, steps=len(loader))
    guard, stopper = LossGuard(s.explode_factor), EarlyStopping(s.patience)
    state = {"model": model, "optimizer": optimizer, "scheduler": schedule, "sampler": sampler}
    state |= {"guard": guard, "early_stopping": stopper}
    resumed = schedule.resume(ctx, state)  # a retry continues where the failed attempt saved
    cleaning.publish(load_digits()[2], ctx, "digits", fresh=resumed is None)
    seen = resumed.values["train_samples"] if resumed else 0.0
    for epoch in range(resumed.next_step if resumed else 1, s.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        ctx.reseed(s.seed, epoch)  # augmentation and dropout draw the same after a resume
        loss_sum = count = 0.0
        for x, y in loader:
            x, y = augment(x, s).to(ctx.device), y.to(ctx.device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            guard.observe(schedule.steps + 1, loss)  # no wait for the device each step
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            schedule.step()
            loss_sum, count = loss_sum + loss.detach() * len(y), count + len(y)
        sums = [float(loss_sum), count]
        loss_sum, count = guard.settle_across(schedule.steps, sums, ctx.all_reduce_sum)
        seen += count
        ctx.log(epoch, {"train_loss": loss_sum / count, "lr": schedule.lr})
        metrics = gathered_metrics(ctx, *predict_loader(model, val_loader, ctx.device))
        schedule.epoch_end(metrics["val_loss"])
        stop_early = stopper.update(metrics["val_accuracy"])
        saved = {**state, "epoch": epoch, "train_samples": seen}
        if ctx.report(epoch, {**metrics, "train_samples": seen}, saved) or stop_early:
            return  # pruned or early-stopped: every rank stops at the same epoch
