"""Keeps every running study with a trainable supplied with trials on the cluster.

Each tick: reconcile what is in flight (record placements and checkpoints, finish or retry
attempts that ended, cancel attempts whose trial was stopped, pruned or deleted), then launch
new attempts while the cluster has room, one study at a time in turn so studies share it fairly.
The scheduler decides; the executor (``hpo.service.executor``) is the only part that talks to Ray.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpo.service.errors import BudgetSpent, Conflict, HpoError, StudyNotRunning, TrialFinished
from hpo.service.executor import AttemptStatus, RayExecutor, fits, needs_of
from hpo.service.records import TrialRecord
from hpo.service.spec import StudySpec
from hpo.service.studies import StudyService

log = logging.getLogger("hpo.scheduler")


def check_trainable(spec: StudySpec) -> None:
    """Refuse (ValueError naming the field) a trainable that is not registered, or whose
    settings reject the spec's config or any value its space can take."""
    from hpo.workers import registry

    assert spec.trainable is not None
    space = {name: param.representatives() for name, param in spec.space.items()}
    registry.check_spec(spec.trainable.name, spec.trainable.config, space)


# How long an attempt may keep running after its trial was pruned before it is cancelled.
PRUNED_GRACE_S = 30.0


@dataclass
class _InFlight:
    study_id: int
    attempt: int
    workers: int
    launched_at: float = field(default_factory=time.time)
    placed: bool = False
    checkpoint: str | None = None
    finished_in_db_at: float | None = None


class Scheduler:
    """Runs in a thread of ``hpo serve``; Ray starts only once a study needs it."""

    def __init__(
        self,
        service: StudyService,
        executor: RayExecutor,
        *,
        api_url: str,
        token: str | None,
        checkpoint_dir: Path,
        interval_s: float = 1.0,
    ) -> None:
        self.service = service
        self.executor = executor
        self.api_url = api_url
        self.token = token
        self.checkpoint_dir = checkpoint_dir
        self.interval_s = interval_s
        self.in_flight: dict[int, _InFlight] = {}
        self._evaluated: set[int] = set()  # studies whose best trial went to evaluation
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._turn = 0

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hpo-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def wake(self) -> None:
        """Run a tick now (a study was created, resumed or given more budget)."""
        self._wake.set()

    def _loop(self) -> None:
        # Ray starts and stops in this thread only: a local Ray's processes die with the thread
        # that started them (parent-death signal), so no other thread may outlive or end it.
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:
                    log.exception("scheduler tick failed; retrying")
                self._wake.wait(self.interval_s)
                self._wake.clear()
        finally:
            self.executor.shutdown()

    # ------------------------------------------------------------------- tick

    def tick(self) -> None:
        studies = self.service.dispatched_studies()
        to_evaluate = self.service.studies_to_evaluate(self._evaluated)
        if not self.executor.started:
            if not any(state == "running" for _, state, _ in studies) and not to_evaluate:
                return
            self.executor.start()
            self._adopt(studies)
        self._reconcile()
        self._launch([(sid, spec) for sid, state, spec in studies if state == "running"])
        self._evaluate(to_evaluate)

    def _evaluate(self, todo: list[tuple[StudySpec, TrialRecord, str]]) -> None:
        """Test metrics for the best trial of each completed study, computed once."""
        for trial_id, metrics in self.executor.evaluations():
            if metrics is None:
                metrics = {"note": "the trainable defines no evaluate()"}
            self.service.set_test_metrics(trial_id, metrics)
        for spec, best, checkpoint in todo:
            if spec.multi_objective:
                continue
            self._evaluated.add(best.study_id)
            log.info("evaluating the best trial %s of study %s", best.id, best.study_id)
            try:
                self.executor.evaluate(best, spec, checkpoint)
            except Exception as exc:
                self.service.set_test_metrics(best.id, {"error": str(exc)})

    def _adopt(self, studies: list[tuple[int, str, StudySpec]]) -> None:
        """After a restart: take over attempts Ray still runs; retry the ones that are gone."""
        specs = {sid: spec for sid, _, spec in studies}
        for trial in self.service.active_trials(list(specs)):
            if trial.state != "running":
                continue
            spec = specs[trial.study_id]
            needs = needs_of(spec.resources)
            if self.executor.adopt(trial.id, trial.attempts, needs):
                log.info("re-adopted trial %s attempt %s", trial.id, trial.attempts)
                self.in_flight[trial.id] = _InFlight(
                    trial.study_id, trial.attempts, spec.resources.workers_per_trial
                )
            else:
                self.service.fail_attempt(
                    trial.id, "its Ray attempt was lost when the control plane restarted"
                )

    def _reconcile(self) -> None:
        if not self.in_flight:
            return
        states = self.service.trial_states(list(self.in_flight))
        starting = []
        for status in self.executor.statuses():
            flight = self.in_flight.get(status.trial_id)
            if flight is None:
                continue
            db_state = states.get(status.trial_id)
            if db_state is None or db_state == "failed" or db_state == "waiting":
                # deleted, stopped, lease expired or requeued: this attempt must end now
                log.info("cancelling trial %s: it is %s", status.trial_id, db_state or "deleted")
                self._drop(status.trial_id, cancel=True)
                continue
            self._record_progress(status, flight)
            if status.state in ("done", "failed", "cancelled", "lost"):
                self._finish(status, db_state)
                continue
            if db_state in ("complete", "pruned"):
                flight.finished_in_db_at = flight.finished_in_db_at or time.monotonic()
                if time.monotonic() - flight.finished_in_db_at > PRUNED_GRACE_S:
                    log.info("cancelling trial %s: still running after it ended", status.trial_id)
                    self._drop(status.trial_id, cancel=True)
                continue
            if status.state == "pending" or len(status.placements) < flight.workers:
                starting.append(status.trial_id)  # no reporter yet to keep the lease alive
        self.service.renew_leases(starting)

    def _record_progress(self, status: AttemptStatus, flight: _InFlight) -> None:
        if not flight.placed and len(status.placements) >= flight.workers:
            ranks = status.placements
            started = max(r.get("started_at", flight.launched_at) for r in ranks)
            self.service.set_placement(
                status.trial_id,
                {
                    "executor": "ray",
                    "attempt": status.attempt,
                    "world_size": flight.workers,
                    "nodes": sorted({r["node_ip"] for r in ranks}),
                    # launch → every rank in the process group: visible start-up cost
                    "startup_s": round(max(0.0, started - flight.launched_at), 3),
                    "ranks": ranks,
                },
            )
            flight.placed = True
        if status.checkpoint and status.checkpoint[0] != flight.checkpoint:
            flight.checkpoint = status.checkpoint[0]
            self.service.set_checkpoint(status.trial_id, flight.checkpoint)

    def _finish(self, status: AttemptStatus, db_state: str) -> None:
        trial_id = status.trial_id
        try:
            if status.state == "done" and db_state == "running":
                self._tell(trial_id, status.result or {})
            elif status.state != "done" and db_state == "running":
                error = status.error or {"message": f"attempt {status.state}", "retryable": True}
                text = error["message"]
                if error.get("traceback"):
                    text += "\n" + error["traceback"]
                self.service.fail_attempt(trial_id, text, retryable=error.get("retryable", True))
        finally:
            self._drop(trial_id, cancel=False)

    def _tell(self, trial_id: int, result: dict[str, Any]) -> None:
        trial = self.service.get_trial(trial_id, events=False)
        spec = self.service.spec_of(trial.study_id)
        values = []
        for objective in spec.objectives:
            value = result.get(objective.scope, {}).get(objective.metric)
            if value is None:
                self.service.fail_attempt(
                    trial_id,
                    f"the trainable never reported the objective metric {objective.metric!r}",
                    retryable=False,
                )
                return
            values.append(value)
        with contextlib.suppress(TrialFinished):  # pruned or failed meanwhile: that stands
            self.service.tell(trial_id, values=values)

    def _drop(self, trial_id: int, *, cancel: bool) -> None:
        if cancel:
            self.executor.cancel(trial_id)
        else:
            self.executor.release(trial_id)
        self.in_flight.pop(trial_id, None)

    # ----------------------------------------------------------------- launch

    def _launch(self, studies: list[tuple[int, StudySpec]]) -> None:
        if not studies:
            return
        pending = [tid for tid, f in self.in_flight.items() if not f.placed]
        free = self.executor.free(pending)
        candidates = list(studies)
        while candidates:
            # fairness: the study with the fewest trials in flight goes first; ties rotate
            self._turn += 1
            candidates.sort(key=lambda item: (self._count(item[0]), (item[0] + self._turn) % 997))
            sid, spec = candidates[0]
            needs = needs_of(spec.resources)
            if not fits(needs, free):
                candidates.pop(0)
                continue
            trial = self._ask(sid)
            if trial is None:
                candidates.pop(0)
                continue
            self._start_attempt(trial, spec)
            for key, amount in needs.items():
                free[key] = free.get(key, 0.0) - amount

    def _count(self, study_id: int) -> int:
        return sum(1 for f in self.in_flight.values() if f.study_id == study_id)

    def _ask(self, study_id: int) -> TrialRecord | None:
        try:
            return self.service.ask(study_id, dispatched=True)
        except (BudgetSpent, StudyNotRunning, Conflict):
            return None
        except HpoError as exc:
            log.warning("study %s: cannot ask: %s", study_id, exc)
            return None

    def _start_attempt(self, trial: TrialRecord, spec: StudySpec) -> None:
        from hpo.workers.runner import TrialLaunch

        assert spec.trainable is not None
        launch = TrialLaunch(
            trial_id=trial.id,
            study_id=trial.study_id,
            number=trial.number,
            attempt=trial.attempts,
            trainable=spec.trainable.name,
            config=dict(spec.trainable.config),
            params=dict(trial.params),
            workers=spec.resources.workers_per_trial,
            cpus_per_worker=spec.resources.cpus_per_worker,
            gpus_per_worker=spec.resources.gpus_per_worker,
            api_url=self.api_url,
            token=self.token,
            objectives=[(o.metric, o.direction) for o in spec.objectives],
            keep_metrics=sorted({*(o.metric for o in spec.objectives), spec.pruned_metric}),
            checkpoint_dir=str(
                self.checkpoint_dir / f"study-{trial.study_id}" / f"trial-{trial.id}"
            ),
            lease_s=spec.lease_s,
        )
        try:
            self.executor.launch(launch)
        except Exception as exc:
            log.exception("launching trial %s failed", trial.id)
            self.service.fail_attempt(trial.id, f"launch failed: {exc}")
            return
        self.in_flight[trial.id] = _InFlight(
            trial.study_id, trial.attempts, spec.resources.workers_per_trial
        )
        log.info(
            "launched trial %s (study %s #%s attempt %s)",
            trial.id,
            trial.study_id,
            trial.number,
            trial.attempts,
        )
