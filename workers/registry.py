"""Trainables by name: the entry-point group ``hpo.trainables`` (built-ins register the same
way), plus ``HPO_EXTRA_TRAINABLES`` for local development. Names are the only thing the REST
API carries; nothing sent over the network is imported or executed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

GROUP = "hpo.trainables"
log = logging.getLogger("hpo.workers.registry")


class TrainableError(Exception):
    """A trainable's own failure that retrying cannot fix (bad data, NaN loss...)."""


def batch_problem(batch_size: int, world_size: int, micro_batches: int = 1) -> str | None:
    """Why a global batch of ``batch_size`` does not split into ``world_size`` ranks x
    ``micro_batches`` equal parts, or None. (Flooring the quotient trained another batch than
    the one searched: 16 over 3 ranks was 15, 4 in 8 micro-batches was 8.)"""
    parts = world_size * micro_batches
    if batch_size % parts == 0:
        return None
    over = f"{world_size} DDP rank{'s' if world_size > 1 else ''}"
    if micro_batches > 1:
        over += f" x {micro_batches} micro-batches"
    return (
        f"a global batch of {batch_size} does not split evenly over {over}: use a multiple "
        f"of {parts}"
    )


def per_rank_batch(settings: Any, ctx: Any, micro_batches: int = 1) -> int:
    """This rank's share of ``settings.batch_size`` over ``ctx.world_size`` ranks and
    ``micro_batches``. A listed batch that does not split evenly is refused when the study is
    created; one drawn from a range (or perturbed by PBT) is rounded down here, with a
    warning, and the batch trained is in ``ctx.extra["effective_batch_size"]``; one smaller
    than the parts (it would round to nothing) is a TrainableError."""
    parts = ctx.world_size * micro_batches
    if settings.batch_size < parts:  # rounding down leaves nothing: it would train more
        raise TrainableError(f"batch_size: {settings.split_problem(ctx.world_size)}")
    share = settings.batch_size // parts
    effective = share * parts
    ctx.extra["effective_batch_size"] = effective
    if effective != settings.batch_size and ctx.is_main:
        log.warning(
            "batch_size %d: %s; training with %d a step",
            settings.batch_size,
            settings.split_problem(ctx.world_size),
            effective,
        )
    return share


class Trainable(Protocol):
    settings_model: type[BaseModel]
    __name__: str

    def __call__(self, ctx: Any) -> Mapping[str, float] | None: ...


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="allow")


def trainable(
    settings: type[BaseModel] | None = None,
    *,
    evaluate: Callable[..., Mapping[str, float]] | None = None,
    build_model: Callable[[Any], Any] | None = None,
) -> Callable[[Callable], Trainable]:
    """Declare a function a trainable, with the pydantic model of its settings.

    Fixed settings (``trainable.config`` of a spec) and searched parameters (``space``) are
    merged into one instance of ``settings``, so a wrong key or type is refused when the
    study is created, not in a worker.

    ``evaluate(checkpoint_dir: Path, settings, device) -> metrics`` computes held-out test
    metrics from a checkpoint; the service runs it for the best trial once a study completes.
    ``build_model(settings) -> torch.nn.Module`` rebuilds the model so that
    :func:`hpo.workers.inference.load_model` can load any checkpoint of the trainable.
    """

    def wrap(fn: Callable) -> Trainable:
        fn.settings_model = settings or NoSettings  # type: ignore[attr-defined]
        fn.evaluate = evaluate  # type: ignore[attr-defined]
        fn.build_model = build_model  # type: ignore[attr-defined]
        return fn  # type: ignore[return-value]

    return wrap


def _extra() -> dict[str, str]:
    pairs = [p for p in os.environ.get("HPO_EXTRA_TRAINABLES", "").split(",") if p.strip()]
    out = {}
    for pair in pairs:
        name, _, target = pair.partition("=")
        out[name.strip()] = target.strip()
    return out


def available() -> dict[str, str]:
    """Registered names and their ``module:function`` targets."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    found.update(_extra())
    return found


@lru_cache(maxsize=64)
def load(name: str) -> Trainable:
    """The trainable registered under ``name``; KeyError if there is none."""
    targets = available()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise KeyError(f"no trainable named {name!r} is registered (known: {known})")
    module, _, attr = targets[name].partition(":")
    fn = import_module(module)
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not hasattr(fn, "settings_model"):
        fn.settings_model = NoSettings  # type: ignore[attr-defined]
    return fn  # type: ignore[return-value]


def settings_for(fn: Trainable, config: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """The trainable's settings: fixed ``config`` overridden by searched ``params``."""
    return fn.settings_model.model_validate({**config, **params})


def check_spec(
    name: str, config: Mapping[str, Any], space: Mapping[str, Any], world_size: int = 1
) -> None:
    """Raise ValueError naming the field if a spec's trainable part cannot work.

    ``space`` maps each searched parameter to the values worth trying (its choices, or the ends
    of its range): every one is validated against the trainable's settings, beside ``config``.
    A ``config`` key that is searched as well is validated too, although trials override it.
    Settings with a ``split_problem(world_size)`` method (the built-ins': their global batch)
    are asked it for the trial's ``world_size`` ranks too.
    """
    try:
        fn = load(name)
    except KeyError as exc:
        raise ValueError(f"trainable.name: {exc.args[0]}") from exc
    except Exception as exc:  # an import error in a registered trainable
        raise ValueError(f"trainable.name: {name!r} failed to load: {exc}") from exc
    model = fn.settings_model
    if model.model_config.get("extra") == "forbid":
        for key in config:
            if key not in model.model_fields:
                raise ValueError(
                    f"trainable.config.{key}: not a setting of {name!r}{_known(model)}"
                )
        for key in space:
            if key not in model.model_fields:
                raise ValueError(f"space.{key}: not a setting of {name!r}{_known(model)}")
    first = {key: values[0] for key, values in space.items() if values}
    _validate(model, {**config, **first}, "trainable.config", set(space), world_size)
    for key in config.keys() & space.keys():  # fixed, though every trial overrides it
        data = {**config, **first, key: config[key]}
        _validate(model, data, "trainable.config", set(), world_size)
    for key, values in space.items():
        for value in values[1:]:
            _validate(model, {**config, **first, key: value}, "space", {key}, world_size)
    if "batch_size" in space and "grad_accum" in space:  # they split the batch together
        for b in space["batch_size"]:
            for g in space["grad_accum"]:
                data = {**config, **first, "batch_size": b, "grad_accum": g}
                _validate(model, data, "space", {"batch_size", "grad_accum"}, world_size)


def _validate(
    model: type[BaseModel], data: dict[str, Any], prefix: str, searched: set, world_size: int
) -> None:
    try:
        settings = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        root = str(err["loc"][0]) if err["loc"] else ""
        if root in searched:
            prefix = "space"
            where = f"{where} ({data.get(root)!r})"
        raise ValueError(f"{prefix}.{where}: {err['msg']}") from exc
    split_problem = getattr(settings, "split_problem", None)
    if callable(split_problem) and (problem := split_problem(world_size)) is not None:
        varied = [k for k in ("batch_size", "grad_accum") if k in searched]
        if varied:  # searched values the trials may take, named with their values
            also = "".join(f", with {k} {data[k]!r}" for k in varied[1:])
            raise ValueError(f"space.{varied[0]} ({data[varied[0]]!r}{also}): {problem}")
        ranks = " (resources.workers_per_trial)" if world_size > 1 else ""
        raise ValueError(f"{prefix}.batch_size: {problem}{ranks}")


def _known(model: type[BaseModel]) -> str:
    return f" (settings: {', '.join(model.model_fields)})"
