"""The sampler contract and the plain data it works on."""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress, repeat
from operator import is_
from typing import Any, ClassVar

import numpy as np

from hpo.service.spec import StudySpec
from hpo.service.states import ACTIVE_TRIAL_STATES, TrialState


@dataclass(frozen=True)
class ObservedTrial:
    """What a sampler may know of an earlier trial."""

    number: int
    state: TrialState  # a plain string value is accepted too
    params: dict[str, Any]
    values: tuple[float, ...] | None = None
    intermediate: dict[int, float] = field(default_factory=dict)
    # The last reported value of each metric the spec's constraints read (finished trials).
    metrics: dict[str, float] = field(default_factory=dict)
    # What the sampler kept of its own suggestion of this trial (``Suggestion.info["kept"]``),
    # loaded only for samplers with ``keeps_state``.
    kept: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return TrialState(self.state).finished


@dataclass(frozen=True)
class StudyView:
    """A study as a sampler sees it: its spec, every trial so far (in number order), and the
    number to fill.

    ``prepared``, when given, runs alongside ``trials``: for each finished trial the form its
    sampler made of it with :meth:`Sampler.prepare` on an earlier ask (None where there is
    none), so a study's history is converted once, not on every ask. ``memo``, when given, is
    the study's scratch space kept between asks: a sampler may keep there only what follows
    from the finished trials alone (they never change), so that a suggestion is the same with
    or without it. ``arrivals``, given with ``memo``, holds the same prepared forms (None
    included) in the order the history received them: for one ``memo``, an earlier view's
    ``arrivals`` is a prefix of a later one's, so a sampler may keep arrays in the memo,
    extend them by what arrived since, and read the prefix its own view covers.
    """

    spec: StudySpec
    trials: Sequence[ObservedTrial]
    number: int
    prepared: Sequence[Any] | None = None
    memo: dict[str, Any] | None = None
    arrivals: Sequence[Any] | None = None
    # For samplers with ``uses_rungs``: ``{rung step: {trial number: (params, value there)}}``
    # of every trial that reached each rung of the study's ASHA/Hyperband pruner.
    rungs: Mapping[int, Mapping[int, tuple[Mapping[str, Any], float]]] | None = None

    @property
    def complete(self) -> list[ObservedTrial]:
        return [t for t in self.trials if t.state == TrialState.COMPLETE and t.values is not None]

    @cached_property
    def unprepared(self) -> list[int]:
        """The positions of the trials with no prepared form, in order (all of them without
        ``prepared``): the active ones, and any finished one its sampler made none of. Found
        once: a view's lists are not changed after it is made. Raises ValueError when
        ``prepared`` does not run alongside ``trials``."""
        if self.prepared is None:
            return list(range(len(self.trials)))
        if len(self.prepared) != len(self.trials):
            raise ValueError("view.prepared must run alongside view.trials")
        # Identity tests in C: a view holds 10,000s of trials, and ``None in prepared`` or
        # ``== None`` would call a prepared form's __eq__ on each.
        return list(compress(range(len(self.prepared)), map(is_, self.prepared, repeat(None))))

    @property
    def pending(self) -> list[ObservedTrial]:
        # A set lookup, not TrialState(...) per trial. Only the unprepared can be active
        # (prepared forms are of finished trials).
        trials = self.trials
        return [t for i in self.unprepared if (t := trials[i]).state in ACTIVE_TRIAL_STATES]


@dataclass(frozen=True)
class Suggestion:
    """Parameters for a new trial, and why they were chosen (stored with the trial)."""

    params: dict[str, Any]
    info: dict[str, Any]


class Sampler(ABC):
    """Suggests parameters for trial ``view.number`` of a study.

    Implementations must be deterministic given the spec's seed, the trial number and the
    observed trials, so that a restarted control plane makes the same suggestions. They keep no
    state between calls: everything they know comes from the :class:`StudyView`.
    """

    name: ClassVar[str]
    # Whether ``suggest`` reads ``view.trials``; when it does not, the study's trials are not
    # loaded for it (random search stays O(1) per ask at any study size).
    uses_history: ClassVar[bool] = True
    # Whether the sampler stores state with each suggestion (under ``info["kept"]``, JSON) and
    # reads it back in ``ObservedTrial.kept``: an evolution strategy's generation, say. It is
    # part of the trial's record, so a restarted server suggests as the first one would.
    keeps_state: ClassVar[bool] = False
    # Whether a suggestion may take seconds (a model fit): an ask then computes it off the
    # request thread and waits a bounded time for it (service/asking.py).
    slow: ClassVar[bool] = False
    # Whether ``suggest`` reads ``view.rungs`` (the values at the pruner's rungs), which the
    # ask then loads.
    uses_rungs: ClassVar[bool] = False

    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec

    @classmethod
    def check(cls, spec: StudySpec) -> None:
        """Raise ``ValueError`` (naming the parameter) if this sampler cannot search the space."""

    def capacity(self) -> int | None:
        """How many distinct trials the sampler can suggest, or None when unbounded."""
        return None

    def prepare(self, trial: ObservedTrial) -> Any:
        """The sampler's own form of a finished trial, kept between asks and handed back in
        :attr:`StudyView.prepared`; None (the default) when the sampler keeps none. It must
        depend only on the trial and the spec's space, sampler, objectives and constraints."""
        return None

    @abstractmethod
    def suggest(self, view: StudyView) -> Suggestion:
        """Parameters for trial ``view.number``; raises ``GridExhausted`` when none are left."""

    def trial_seed(self, number: int) -> int:
        """A seed for one trial, derived from the study seed (or fresh entropy when unseeded)."""
        base = self.spec.sampler.seed
        if base is None:
            return secrets.randbits(32)
        return int(np.random.SeedSequence([base, number]).generate_state(1)[0])
