"""The built-in trainables: settings validation, data sources, the divergence guard, resuming
from a checkpoint, and one-epoch DDP trials (world size 2, gloo) through ``hpo serve`` on a
local Ray, whose best checkpoints load for inference and score on the test split."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hpo.workers import TrainableError, registry
from hpo.workers.context import Objective, TrialContext
from hpo.workers.inference import load_model
from hpo.workers.trainables import text_classification as text
from tests.conftest import ServerProcess, failed_attempts, wait_for

TINY_TEXT = {
    "max_train_samples": 32,
    "max_eval_samples": 16,
    "max_length": 32,
    "epochs": 1,
    "batch_size": 8,
    "log_every": 2,
}


def run_local(
    name: str, config: dict[str, Any], trial_dir: Path, attempt: int = 1
) -> tuple[TrialContext, list[tuple[int, dict[str, float]]], list[tuple[int, dict]]]:
    """Run attempt ``attempt`` of a trainable in this process (world size 1, no control
    plane); returns the context, the reports it made and the points it logged."""
    fn = registry.load(name)
    ctx = TrialContext(
        trial_id=1,
        study_id=1,
        number=0,
        attempt=attempt,
        params={},
        settings=registry.settings_for(fn, config, {}),
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        objectives=[Objective("val_accuracy", "maximize")],
        trial_dir=trial_dir,
        trainable=name,
    )
    reports: list[tuple[int, dict[str, float]]] = []
    logged: list[tuple[int, dict]] = []
    report, log = ctx.report, ctx.log

    def recording(step: int, metrics: Any, checkpoint: Any = None) -> bool:
        reports.append((step, dict(metrics)))
        return report(step, metrics, checkpoint)

    def logging(step: int, metrics: Any) -> None:
        logged.append((step, dict(metrics)))
        log(step, metrics)

    ctx.report = recording  # type: ignore[method-assign]
    ctx.log = logging  # type: ignore[method-assign]
    fn(ctx)
    return ctx, reports, logged


# ------------------------------------------------------------------- settings validation


@pytest.mark.parametrize(
    ("name", "config", "space", "message"),
    [
        ("text-classification", {"max_lenght": 64}, {}, "trainable.config.max_lenght: not a"),
        ("text-classification", {"lr": "fast"}, {}, "trainable.config.lr: Input should be"),
        ("text-classification", {"epochs": 0}, {}, "trainable.config.epochs: Input should be"),
        ("text-classification", {}, {"scheduler": ["cosine", "warm"]}, "space.scheduler ('warm')"),
        ("text-classification", {}, {"layer_decay": [0.5, 1.5]}, "space.layer_decay (1.5)"),
        ("text-classification", {"folds": 5, "fold": 5}, {}, "fold must be below folds"),
        ("text-classification", {"val_fraction": 0.6, "test_fraction": 0.5}, {}, "below 1"),
        ("image-classification", {"depth": 9}, {}, "trainable.config.depth: Input should be"),
        ("image-classification", {}, {"init": ["he", "lecun"]}, "space.init ('lecun')"),
        ("image-classification", {}, {"optimiser": ["sgd"]}, "space.optimiser: not a setting"),
        ("image-classification", {"batch_norm": "maybe"}, {}, "config.batch_norm: Input should"),
    ],
)
def test_wrong_settings_are_refused_at_study_creation(
    name: str, config: dict, space: dict, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        registry.check_spec(name, config, space)
    assert message in str(info.value)


def test_full_search_spaces_validate() -> None:
    registry.check_spec(
        "text-classification",
        {"max_train_samples": 200, "max_eval_samples": 100, "max_length": 64},
        {
            "lr": [1e-5, 1e-3],
            "batch_size": [8, 16, 32],
            "epochs": [2, 4],
            "weight_decay": [0.0, 0.1],
            "warmup_frac": [0.0, 0.2],
            "scheduler": ["constant", "linear", "cosine", "step", "exponential", "plateau"],
            "layer_decay": [0.6, 1.0],
            "dropout": [0.0, 0.3],
            "max_grad_norm": [0.5, 5.0],
            "freeze_layers": [0, 4],
            "max_length": [32, 128],
        },
    )
    registry.check_spec(
        "image-classification",
        {"epochs": 5},
        {
            "optimizer": ["sgd", "adam", "adamw"],
            "init": ["default", "xavier", "he"],
            "scheduler": ["constant", "cosine", "step"],
            "depth": [1, 4],
            "channels": [4, 64],
            "dropout": [0.0, 0.5],
            "batch_norm": [True, False],
            "shift": [0, 2],
            "noise": [0.0, 0.2],
        },
    )


# ------------------------------------------------------------------------------ text data


def test_text_sources_csv_jsonl_saved_dataset_and_folder(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    rows = pd.DataFrame(
        {
            "body": ["Goal!", "goal! ", "", "Shares fell", "Shares rose", "x" * 99, "Vote"],
            "topic": ["sport", "sport", "sport", "business", "business", "politics", "politics"],
        }
    )
    rows.to_csv(tmp_path / "news.csv", index=False)
    rows.to_json(tmp_path / "news.jsonl", orient="records", lines=True)
    datasets.Dataset.from_pandas(rows).save_to_disk(str(tmp_path / "saved"))
    for topic, group in rows.groupby("topic"):
        (tmp_path / "folder" / topic).mkdir(parents=True)
        for i, body in enumerate(group["body"]):
            (tmp_path / "folder" / topic / f"{i}.txt").write_text(body)
    for source in ("news.csv", "news.jsonl", "saved"):
        cleaned, names, report = text.load_texts(str(tmp_path / source), "body", "topic", 50, None)
        assert names == ["business", "politics", "sport"]
        assert cleaned["text"] == ["Goal!", "Shares fell", "Shares rose", "Vote"]
        assert cleaned["label"] == [2, 0, 0, 1]
        assert (report.duplicates, report.empty, report.too_long) == (1, 1, 1)
    cleaned, names, _ = text.load_texts(str(tmp_path / "folder"), "text", "label", 50, None)
    assert names == ["business", "politics", "sport"] and len(cleaned) == 4
    # fixed label names: their order is the id order, other labels are dropped (and counted)
    cleaned, names, report = text.load_texts(
        str(tmp_path / "news.csv"), "body", "topic", None, ("sport", "business")
    )
    assert cleaned["label"] == [0, 1, 1] and report.unknown_label == 2
    with pytest.raises(TrainableError, match="no column 'text'"):
        text.read_source(str(tmp_path / "news.csv"), "text", "topic")


def test_rows_without_a_label_are_dropped_not_made_a_class(tmp_path: Path) -> None:
    """An empty label cell was read as the string "None": a class of its own, trained and
    scored, and no cleaning count said so."""
    import pandas as pd

    rows = pd.DataFrame(
        {
            "text": [f"pos {i}" for i in range(4)] + [f"neg {i}" for i in range(4)] + ["a", "b"],
            "label": ["pos"] * 4 + ["neg"] * 4 + [None, " "],
        }
    )
    rows.to_csv(tmp_path / "t.csv", index=False)
    rows.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    for source in ("t.csv", "t.jsonl"):
        path = str(tmp_path / source)
        cleaned, names, report = text.load_texts(path, "text", "label", None, None)
        assert names == ["neg", "pos"], source
        assert len(cleaned) == report.kept == 8 and report.missing_label == 2, source


def test_default_data_is_bbc_news_cleaned() -> None:
    cleaned, names, report = text.load_texts(None, "text", "label", 10_000, None)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert report.rows == 2225 and report.duplicates == 101 and report.too_long == 7
    assert len(cleaned) == report.kept == 2117


def test_frozen_layers_and_layer_wise_lr_decay() -> None:
    s = text.Settings(lr=1e-3, layer_decay=0.5, freeze_layers=2, weight_decay=0.1)
    net = text.build_model(s).net  # MiniLM-L6: embeddings + 6 layers + pooler/head
    groups = text.param_groups(net, s)
    embeddings, layers = text._blocks(net)
    frozen = [*embeddings.parameters(), *layers[0].parameters(), *layers[1].parameters()]
    assert not any(p.requires_grad for p in frozen)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not in_groups & {id(p) for p in frozen}
    assert in_groups == {id(p) for p in net.parameters() if p.requires_grad}
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(layers[2].attention.self.query.weight)] == pytest.approx(1e-3 * 0.5**4)
    assert lr_of[id(layers[5].output.dense.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(net.classifier.weight)] == pytest.approx(1e-3)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(net.classifier.bias) in no_decay and id(net.classifier.weight) not in no_decay
    plain = text.param_groups(text.build_model(text.Settings()).net, text.Settings())
    assert {g["lr"] for g in plain} == {5e-5}  # no decay, nothing frozen
    top = text.Settings(layers=2)  # the issue's `layers`: fine-tune the top two of six
    net = text.build_model(top).net
    text.param_groups(net, top)
    embeddings, layers = text._blocks(net)
    assert not any(p.requires_grad for b in (embeddings, *layers[:4]) for p in b.parameters())
    assert all(p.requires_grad for b in layers[4:] for p in b.parameters())
    every = text.Settings(layers=6)  # all six layers: the embeddings stay frozen (were trained)
    net = text.build_model(every).net
    text.param_groups(net, every)
    embeddings, layers = text._blocks(net)
    assert not any(p.requires_grad for p in embeddings.parameters())
    assert all(p.requires_grad for b in layers for p in b.parameters())


# ------------------------------------------------------------------- in-process training


def test_a_huge_learning_rate_fails_the_text_trial_as_diverged(tmp_path: Path) -> None:
    config = {**TINY_TEXT, "lr": 1e3, "max_grad_norm": None, "warmup_frac": 0.0}
    with pytest.raises(TrainableError, match="training diverged"):
        run_local("text-classification", config, tmp_path)


def test_a_huge_learning_rate_fails_the_image_trial_as_diverged(tmp_path: Path) -> None:
    with pytest.raises(TrainableError, match=r"train_loss .* at steps? [\d-]+.*training diverged"):
        run_local("image-classification", {"optimizer": "sgd", "lr": 1e4, "epochs": 2}, tmp_path)


def test_image_trial_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Augmentation and dropout on: the resumed epoch draws what the uninterrupted one drew
    (they replayed epoch 1's draws), so it ends with the same model."""
    config = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "scheduler": "cosine", "shift": 1}
    config |= {"noise": 0.1, "dropout": 0.3}
    _, reports, logged = run_local("image-classification", config, tmp_path)
    checkpoint = tmp_path / "attempt-1" / "checkpoint-000001"
    assert [step for step, _ in reports] == [1, 2] and checkpoint.is_dir()
    assert [step for step, points in logged if "data_rows" in points] == [0]
    shutil.rmtree(tmp_path / "attempt-1" / "checkpoint-000002")  # as if it died after epoch 1
    ctx, resumed, logged = run_local("image-classification", config, tmp_path, attempt=2)
    assert [step for step, _ in resumed] == [2]  # epoch 1 is not trained again
    assert resumed[0][1]["train_samples"] == reports[1][1]["train_samples"]
    assert resumed[0][1]["val_loss"] == pytest.approx(reports[1][1]["val_loss"], rel=1e-6)
    assert ctx.extra["cleaning"]["rows"] == 1797
    assert not [points for _, points in logged if "data_rows" in points]  # sent on attempt 1


def test_image_trial_resumed_with_another_rate_trains_on_with_it(tmp_path: Path) -> None:
    """A replayed schedule's next segment resumes the trial's own checkpoint with a new
    learning rate: the optimizer it loads holds the old one, and the built-in rebases it."""
    config = {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "scheduler": "constant"}
    _, _, logged = run_local("image-classification", config, tmp_path)
    assert [p["lr"] for _, p in logged if "lr" in p] == [0.05, 0.05]
    shutil.rmtree(tmp_path / "attempt-1" / "checkpoint-000002")
    _, resumed, logged = run_local("image-classification", {**config, "lr": 0.01}, tmp_path, 2)
    assert [step for step, _ in resumed] == [2]
    assert [p["lr"] for _, p in logged if "lr" in p] == [0.01]


def test_a_global_batch_that_does_not_split_evenly_is_refused_or_said(tmp_path: Path) -> None:
    """The per-rank batch was floored without a word: batch 16 on 3 ranks trained 15 a step,
    and 4 blocks in 8 micro-batches trained 8, so a search over grad_accum searched the batch
    size. A listed value (or a range's end) is refused at creation; one drawn from inside a
    range, or perturbed by PBT, is rounded as before, and the trial says what it trained."""
    check = registry.check_spec
    check("image-classification", {"batch_size": 64}, {}, world_size=2)
    with pytest.raises(
        ValueError,
        match=r"^trainable\.config\.batch_size: a global batch of 64 "
        r"does not split evenly over 3 DDP ranks: use a multiple of 3",
    ):
        check("image-classification", {"batch_size": 64}, {}, world_size=3)
    with pytest.raises(ValueError, match=r"^space\.batch_size \(16\): a global batch of 16"):
        check("text-classification", {}, {"batch_size": [18, 16]}, world_size=3)
    with pytest.raises(ValueError, match=r"^space\.grad_accum \(8\): .* 2 DDP ranks x 8 micro"):
        check("language-modeling", {"batch_size": 8}, {"grad_accum": [2, 8]}, world_size=2)
    with pytest.raises(ValueError, match=r"^space\.batch_size \(6, with grad_accum 4\): "):
        check("language-modeling", {}, {"batch_size": [6, 8], "grad_accum": [4, 2]}, world_size=1)
    with pytest.raises(ValueError, match=r"^space\.batch_size \(6\): .* over 1 DDP rank x 4"):
        check("language-modeling", {}, {"batch_size": [8, 6], "grad_accum": [4, 2]}, world_size=1)
    # an int range is judged at its ends on its lattice (65 is no value of 16..65 step 16)
    check("image-classification", {}, {"batch_size": [16, 64]}, world_size=2)
    from hpo.service.spec import IntParam

    ends = IntParam(type="int", low=16, high=65, step=16).representatives()
    assert ends == [16, 64]
    with pytest.raises(ValueError, match=r"^space\.batch_size \(8, with grad_accum 8\)"):
        check("language-modeling", {}, {"batch_size": [32, 8], "grad_accum": [1, 8]}, world_size=2)
    with pytest.raises(TrainableError, match="batch_size: a global batch of 4 does not split"):
        run_local("language-modeling", {**TINY_LM, "batch_size": 4, "grad_accum": 8}, tmp_path)
    # a value from inside a range trains the batch it rounds to, and says so
    config = {**TINY_LM, "batch_size": 6, "grad_accum": 4}
    ctx, reports, _ = run_local("language-modeling", config, tmp_path)
    assert ctx.extra["effective_batch_size"] == 4  # 1 block in each of 4 micro-batches
    assert reports[-1][1]["train_tokens"] == 6 * 4 * 32  # steps x 4 blocks x context


def test_a_fixed_setting_that_is_also_searched_is_validated() -> None:
    with pytest.raises(ValueError, match=r"trainable\.config\.batch_size: Input should be"):
        registry.check_spec("image-classification", {"batch_size": "sixteen"}, {"batch_size": [16]})
    registry.check_spec("image-classification", {"batch_size": 8}, {"batch_size": [16, 32]})


# --------------------------------------------------------------------- through the service

RAY_ENV = {"HPO_RAY_NUM_CPUS": "4", "HPO_SCHEDULER_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("trainables")
    with ServerProcess(f"sqlite:///{tmp / 'hpo.db'}", tmp, RAY_ENV) as server:
        yield server


def ddp_spec(name: str, trainable: str, config: dict, **over: Any) -> dict:
    spec = {
        "name": name,
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "budget": {"max_trials": 1},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "trainable": {"name": trainable, "config": config},
        "space": {"seed": {"type": "categorical", "choices": [0]}},
    }
    spec.update(over)
    return spec


def run_study(server: ServerProcess, spec: dict) -> tuple[Any, Any]:
    client = server.client()
    study = client.create_study(spec)
    try:
        wait_for(lambda: study.state in ("completed", "stopped"), 240, f"study {spec['name']}")
    except AssertionError as timeout:  # say where the study stood, and what the server said
        trials = [
            (t.number, t.state, [(e.state, e.detail) for e in client.trial(t.id).events])
            for t in study.trials()
        ]
        log = server.log_path.read_text()[-6000:]
        raise AssertionError(f"{timeout}; state {study.state}, trials {trials}\n{log}") from None
    return study, client.trial(study.trials()[0].id)


def best_checkpoint(server: ServerProcess, study: Any, tmp: Path) -> Path:
    archive = tmp / f"best-{study.id}.tar.gz"
    response = server.client().request("GET", f"/api/v1/studies/{study.id}/best/checkpoint")
    archive.write_bytes(response.content)
    return archive


def check_streams(study: Any, trial: Any, epochs: int) -> dict[str, list]:
    points: dict[str, list] = {}
    for p in study.metrics(trial.id):
        points.setdefault(p.name, []).append((p.step, p.value))
    for name in ("val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1"):
        assert [step for step, _ in points[name]] == list(range(1, epochs + 1)), name
    assert "train_loss" in points and points["data_rows"][0][0] == 0
    return points


@pytest.mark.ray
def test_image_classification_ddp_epoch_then_load_and_evaluate(
    ray_server: ServerProcess, tmp_path: Path
) -> None:
    config = {
        "epochs": 1,
        "depth": 3,
        "batch_norm": True,
        "init": "he",
        "shift": 1,
        "noise": 0.05,
        "optimizer": "adamw",
        "scheduler": "cosine",
        "warmup_frac": 0.1,
    }
    study, trial = run_study(ray_server, ddp_spec("digits-ddp", "image-classification", config))
    assert trial.state == "complete", trial.error
    assert trial.placement["world_size"] == 2
    points = check_streams(study, trial, 1)
    assert points["val_accuracy"][0][1] > 0.5
    # every one of the 1,257 training images once; DistributedSampler pads to an even count
    assert points["train_samples"][0][1] == 1258
    assert points["data_duplicates"][0][1] == 0

    loaded = load_model(best_checkpoint(ray_server, study, tmp_path))
    assert loaded.trainable == "image-classification" and not loaded.model.training
    assert loaded.settings.depth == 3 and loaded.settings.batch_norm
    from sklearn.datasets import load_digits

    digits = load_digits()
    predicted = loaded.predict(digits.images[:200] / 16.0)
    assert sum(int(p == t) for p, t in zip(predicted, digits.target[:200], strict=True)) > 100

    fn = registry.load("image-classification")
    metrics = fn.evaluate(loaded.path, loaded.settings, torch.device("cpu"))
    assert set(metrics) >= {"test_accuracy", "test_precision", "test_recall", "test_f1"}
    assert metrics["test_samples"] == 270
    best = wait_for(lambda: study.best_trial.test_metrics, 90, "test metrics from the service")
    assert best["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


@pytest.mark.ray
def test_text_classification_ddp_epoch_then_load_and_evaluate(
    ray_server: ServerProcess, tmp_path: Path
) -> None:
    config = {**TINY_TEXT, "lr": 2e-4, "freeze_layers": 1, "layer_decay": 0.9}
    study, trial = run_study(ray_server, ddp_spec("text-ddp", "text-classification", config))
    assert trial.state == "complete", trial.error
    assert trial.placement["world_size"] == 2
    points = check_streams(study, trial, 1)
    assert [step for step, _ in points["train_loss"]] == [2, 4]  # 32 rows / batch 8
    assert points["train_samples"][0][1] == 32
    assert points["data_duplicates"][0][1] == 101 and points["data_too_long"][0][1] == 7

    archive = best_checkpoint(ray_server, study, tmp_path)
    loaded = load_model(archive)
    assert loaded.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert not loaded.model.training and loaded.tokenizer is not None
    answers = loaded.predict(["The striker scored twice in the cup final.", "Shares fell 5%."])
    assert len(answers) == 2 and set(answers) <= set(loaded.labels)
    meta = json.loads((loaded.path / "meta.json").read_text())
    assert meta["trainable"] == "text-classification" and meta["settings"]["max_length"] == 32

    fn = registry.load("text-classification")
    settings = registry.settings_for(fn, config, {"seed": 0})
    metrics = fn.evaluate(loaded.path, settings, torch.device("cpu"))
    assert metrics["test_samples"] == 16 and 0 <= metrics["test_f1"] <= 1
    best = wait_for(lambda: study.best_trial.test_metrics, 90, "test metrics from the service")
    assert best["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


@pytest.mark.ray
def test_a_diverging_trial_fails_without_retry_and_says_why(ray_server: ServerProcess) -> None:
    config = {"epochs": 2, "optimizer": "sgd", "lr": 1e4}
    spec = ddp_spec("diverge", "image-classification", config, max_retries=2)
    _, trial = run_study(ray_server, spec)
    failures, charged = failed_attempts(trial)  # no retry can fix it
    assert trial.state == "failed" and trial.attempts == len(failures), failures
    assert len(charged) == 1 and charged[0].startswith("[deterministic]"), failures
    assert "TrainableError: train_loss" in trial.error and "training diverged" in trial.error


@pytest.mark.ray
def test_wrong_text_settings_are_422(ray_server: ServerProcess) -> None:
    with ray_server.http() as http:
        spec = ddp_spec("typo", "text-classification", {"max_lenght": 64})
        answer = http.post("/api/v1/studies", json=spec)
        assert answer.status_code == 422
        assert "trainable.config.max_lenght: not a setting" in answer.json()["message"]
        spec = ddp_spec("bad-type", "text-classification", {"batch_size": "big"})
        answer = http.post("/api/v1/studies", json=spec)
        assert answer.status_code == 422 and "trainable.config.batch_size" in answer.text


# ------------------------------------------------------------------------- language-modeling

TINY_LM = {
    "layers": 1,
    "heads": 2,
    "width": 32,
    "context": 32,
    "vocab_size": 512,
    "dropout": 0.0,
    "batch_size": 4,
    "grad_accum": 2,
    "lr": 3e-3,
    "warmup_frac": 0.0,
    "steps": 6,
    "eval_every": 2,
    "log_every": 2,
    "max_train_articles": 20,
    "max_eval_articles": 10,
    "max_eval_blocks": 8,
}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"width": 64, "heads": 3}, "width (64) must be a multiple of heads (3)"),
        ({"eval_every": 10, "checkpoint_every": 15}, "checkpoint_every must be a multiple"),
        ({"contxt": 64}, "trainable.config.contxt: not a setting"),
    ],
)
def test_wrong_language_model_settings_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        registry.check_spec("language-modeling", config, {})


def test_language_model_learns_and_a_retry_resumes_at_its_checkpoint(tmp_path: Path) -> None:
    """With dropout on: a resumed attempt replayed the first steps' dropout masks (torch was
    seeded once per attempt), so it trained another model than an uninterrupted run."""
    config = {**TINY_LM, "dropout": 0.1}
    _, reports, logged = run_local("language-modeling", config, tmp_path)
    assert [step for step, _ in reports] == [2, 4, 6]
    losses = [m["val_loss"] for _, m in reports]
    assert losses[-1] < losses[0]
    for _, m in reports:
        assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    assert reports[-1][1]["train_tokens"] == 6 * 4 * 32  # steps x blocks x context
    assert [step for step, points in logged if "train_loss" in points] == [2, 4, 6]
    shutil.rmtree(tmp_path / "attempt-1" / "checkpoint-000006")  # as if it died after step 4
    _, resumed, _ = run_local("language-modeling", config, tmp_path, attempt=2)
    assert [step for step, _ in resumed] == [6]  # steps 1-4 are not trained again
    # the same data order, optimizer, schedule state and random draws: the same model
    assert resumed[0][1]["val_loss"] == pytest.approx(losses[-1], rel=1e-6)
    assert resumed[0][1]["train_tokens"] == reports[-1][1]["train_tokens"]
    loaded = load_model(tmp_path / "attempt-2")
    assert loaded.trainable == "language-modeling" and len(loaded.model.vocab) == 512
    assert isinstance(loaded.predict("the minister said")[0], str)
    fn = registry.load("language-modeling")
    scored = fn.evaluate(loaded.path, loaded.settings, torch.device("cpu"))
    assert math.isfinite(scored["test_perplexity"]) and scored["test_tokens"] > 0


def test_a_local_causal_lm_folder_is_fine_tuned(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from hpo.workers.trainables import language_modeling as lm

    config = GPT2Config(vocab_size=30522, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "tiny-gpt2")  # no tokenizer: MiniLM's
    settings = {**TINY_LM, "model_path": str(tmp_path / "tiny-gpt2"), "steps": 2}
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "tiny-gpt2").state_dict()
    built = lm.build_model(lm.Settings(**settings), pretrained=True)
    assert built.vocab is None  # the folder's own ids, no compact vocabulary
    assert all(torch.equal(saved[k], v) for k, v in built.net.state_dict().items())
    _, reports, _ = run_local("language-modeling", settings, tmp_path / "trial")
    assert [step for step, _ in reports] == [2]
    assert math.isfinite(reports[0][1]["val_perplexity"])
    too_long = {**settings, "context": 64}
    with pytest.raises(TrainableError, match="context: 64 exceeds the model's 32 positions"):
        run_local("language-modeling", too_long, tmp_path / "trial-2")


@pytest.mark.ray
def test_language_modeling_ddp_reports_perplexity(ray_server: ServerProcess) -> None:
    objective = {"metric": "val_loss", "direction": "minimize"}
    spec = ddp_spec("lm-ddp", "language-modeling", {**TINY_LM, "steps": 4}, objective=objective)
    study, trial = run_study(ray_server, spec)
    assert trial.state == "complete", trial.error
    assert trial.placement["world_size"] == 2
    points: dict[str, list] = {}
    for p in study.metrics(trial.id):
        points.setdefault(p.name, []).append((p.step, p.value))
    assert [step for step, _ in points["val_perplexity"]] == [2, 4]
    assert points["train_tokens"][-1][1] == 4 * 4 * 32  # both ranks' blocks counted once
    best = wait_for(lambda: study.best_trial.test_metrics, 90, "test metrics from the service")
    assert math.isfinite(best["test_perplexity"])
