"""A user trainable: a small MLP fitted to a noisy sine, with retries, resume and pruning."""

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hpo.workers import trainable
from hpo.workers.context import TrialContext
from hpo.workers.guards import LossGuard


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a key is a 422 at study creation

    lr: float = Field(default=1e-2, gt=0)  # a wrong type or range is a 422 as well
    hidden: int = Field(default=32, ge=1)
    epochs: int = Field(default=20, ge=1)


def build_model(s: Settings) -> torch.nn.Module:  # load_model() rebuilds checkpoints with it
    return torch.nn.Sequential(
        torch.nn.Linear(1, s.hidden), torch.nn.Tanh(), torch.nn.Linear(s.hidden, 1)
    )


@trainable(Settings, build_model=build_model)
def train(ctx: TrialContext) -> None:
    s: Settings = ctx.settings
    torch.manual_seed(0)  # the same data and initial weights on every rank
    x = torch.linspace(-3, 3, 512).unsqueeze(1)
    y, x_val = torch.sin(x) + 0.1 * torch.randn_like(x), torch.rand(128, 1) * 6 - 3
    sampler = ctx.sampler(TensorDataset(x, y), shuffle=True)  # this rank's shard
    loader = DataLoader(TensorDataset(x, y), batch_size=32, sampler=sampler)
    model = ctx.wrap(build_model(s))  # on this rank's device; DDP when world_size > 1
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    guard = LossGuard(10.0)  # a NaN loss, or one 10x the first: the trial fails, no retry
    state = {"model": model, "optimizer": optimizer, "sampler": sampler, "guard": guard}
    resumed = ctx.resume(**state)  # a retry: all of it restored from the last checkpoint
    for epoch in range(resumed.next_step if resumed else 1, s.epochs + 1):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = F.mse_loss(model(xb.to(ctx.device)), yb.to(ctx.device))
            guard.observe(epoch, loss)  # judged at settle(): no wait for the GPU each step
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients over the ranks here
            optimizer.step()
        guard.settle(epoch)
        with torch.no_grad():  # the weights are the same on every rank, so is this number
            val_loss = F.mse_loss(model(x_val.to(ctx.device)), torch.sin(x_val).to(ctx.device))
        if ctx.report(epoch, {"val_loss": val_loss.item()}, checkpoint=state):
            return  # pruned, or the study stopped: every rank returns at the same epoch
