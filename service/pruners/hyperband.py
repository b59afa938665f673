"""Hyperband (Li et al., 2017) run asynchronously: several brackets of ASHA side by side.

With ``s_max = floor(log_η(max_steps / min_steps))`` there are ``s_max + 1`` brackets; trial
number ``n`` belongs to bracket ``n % (s_max + 1)``, whose first rung is ``min_steps * η**b``:
bracket 0 judges early and often (most aggressive), the last one runs its trials to
``max_steps`` before any judgement. A trial competes only with the trials of its own bracket,
at that bracket's rungs, in either mode (``stopping`` or ``promotion``) as ASHA does.
"""

from __future__ import annotations

from functools import cached_property

from hpo.service.pruners.asha import AshaPruner


class HyperbandPruner(AshaPruner):
    """Brackets of ASHA; see the module docstring."""

    @cached_property
    def n_brackets(self) -> int:  # type: ignore[override]
        opts = self.spec.pruner
        assert opts.max_steps is not None  # the spec requires it for hyperband
        brackets = 1  # s_max + 1: the last bracket starts at max_steps (no early stopping)
        while opts.min_steps * opts.reduction_factor**brackets <= opts.max_steps:
            brackets += 1
        return brackets
