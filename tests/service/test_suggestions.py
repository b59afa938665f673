"""Slow samplers off the request thread: an ask waits a bounded time, the fit goes on, and
the kept suggestion is handed to the next ask of that study and number, once."""

from __future__ import annotations

import threading
import time

import pytest

from hpo.service.asking import Suggestions
from hpo.service.errors import SuggestionPending
from hpo.service.samplers.base import Sampler, StudyView, Suggestion
from hpo.service.spec import StudySpec
from tests.conftest import simple_spec


class GatedSampler(Sampler):
    """A sampler whose suggestion takes until ``gate`` opens; it counts its suggestions."""

    name = "gated"
    slow = True
    uses_history = False

    def __init__(self, spec: StudySpec) -> None:
        super().__init__(spec)
        self.gate = threading.Event()
        self.calls = 0

    def suggest(self, view: StudyView) -> Suggestion:
        self.calls += 1
        assert self.gate.wait(30)
        return Suggestion({"x": float(view.number)}, {"call": self.calls})


def test_a_slow_suggestion_is_kept_for_the_retry_and_handed_out_once() -> None:
    spec = StudySpec.model_validate(simple_spec("gated"))
    sampler, pending = GatedSampler(spec), Suggestions(wait_s=0.05)
    view = StudyView(spec, (), 3)
    for _ in range(2):  # past the wait: 503-to-be; the one fit goes on, not a second one
        with pytest.raises(SuggestionPending) as refused:
            pending.suggest(1, sampler, view)
        assert refused.value.retry_after_s >= 1 and "#3" in refused.value.message
    assert sampler.calls == 1
    sampler.gate.set()
    deadline = time.monotonic() + 10
    while not pending._jobs.ready((1, 3)) and time.monotonic() < deadline:
        time.sleep(0.01)
    kept = pending.suggest(1, sampler, view)  # the retry takes the kept result
    assert kept.info == {"call": 1} and kept.params == {"x": 3.0} and sampler.calls == 1
    again = pending.suggest(1, sampler, view)  # handed out once: a later ask fits anew
    assert again.info == {"call": 2}
    assert pending.suggest(2, sampler, view).info == {"call": 3}  # studies apart


def test_the_schedulers_asks_and_fast_samplers_do_not_wait_a_bound() -> None:
    spec = StudySpec.model_validate(simple_spec("gated"))
    sampler, pending = GatedSampler(spec), Suggestions(wait_s=0.01)
    threading.Timer(0.3, sampler.gate.set).start()
    assert pending.suggest(1, sampler, StudyView(spec, (), 0), dispatched=True).info == {"call": 1}
    sampler.slow = False
    sampler.gate.clear()
    threading.Timer(0.3, sampler.gate.set).start()
    assert pending.suggest(1, sampler, StudyView(spec, (), 1)).info == {"call": 2}
