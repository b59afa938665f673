"""Tune a Hugging Face ``Trainer`` with hpo: a tiny BERT, built from a config (nothing is
downloaded), learns which of two tokens a sequence holds. Each trial reports its training
loss and ``eval_loss`` through ``HpoCallback``; the median pruner stops the poor ones early.

    hpo serve &                                       # in another shell
    python examples/hf_trainer.py --trials 8 --max-steps 60
    torchrun --nproc-per-node 2 examples/hf_trainer.py --trials 8    # each trial on 2 ranks (DDP)

Needs ``pip install 'hpo[text,integrations]'``.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hpo.api.client import Client, TrialHandle
from hpo.api.integrations import distributed
from hpo.api.integrations.huggingface import HpoCallback

VOCAB, LENGTH = 64, 16
SPEC: dict[str, Any] = {
    "name": "hf-trainer-tiny-bert",
    "objective": {"metric": "eval_loss", "direction": "minimize"},
    "sampler": {"type": "tpe", "seed": 0},
    "pruner": {"type": "median", "n_startup_trials": 2, "min_steps": 10},
    "space": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
    },
}


class TokenTask(torch.utils.data.Dataset):
    """Random token sequences; the label says whether token 1 or token 2 was planted."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[:, 0] = 0  # [CLS]
        self.ids[torch.arange(n), torch.randint(1, LENGTH, (n,), generator=g)] = self.labels + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
        }


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def objective(trial: TrialHandle, *, max_steps: int = 60, eval_steps: int = 10) -> float:
    """Train one trial; its ``eval_loss`` at the end is the value hpo minimizes."""
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=max_steps,
            eval_strategy="steps",
            eval_steps=eval_steps,
            logging_steps=eval_steps,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            learning_rate=trial.params["learning_rate"],
            weight_decay=trial.params["weight_decay"],
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(
            model=tiny_bert(),
            args=args,
            train_dataset=TokenTask(512, seed=0),
            eval_dataset=TokenTask(128, seed=1),
            callbacks=[HpoCallback(trial)],
        )
        trainer.train()  # ends early when hpo prunes the trial
        rank, size = distributed.world()
        if size > 1:
            step = trainer.state.global_step
            print(
                f"rank {rank}: trial {trial.number} {trial.params} ran to step {step}", flush=True
            )
        return trainer.evaluate()["eval_loss"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="hpo server (default: $HPO_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="API token (default: $HPO_TOKEN or the local token file)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--name", default=SPEC["name"], help="study name")
    a = p.parse_args(argv)
    with Client(a.url, a.token) as client:
        study = client.create_study({**SPEC, "name": a.name}, load_if_exists=True)
        # under torchrun: one trial at a time on every rank (rank 0 asks and tells)
        distributed.optimize(
            study,
            lambda t: objective(t, max_steps=a.max_steps, eval_steps=a.eval_steps),
            n_trials=a.trials,
        )
        if distributed.world()[0] > 0:
            return
        best = study.best_trial
        print(f"best eval_loss {best.value:.4f} with {best.params}" if best else "no trial ended")


if __name__ == "__main__":
    main()
