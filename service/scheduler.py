"""Keeps every running study with a trainable supplied with trials on the cluster.

Each tick: reconcile what is in flight (record placements and checkpoints, finish or retry
attempts that ended, cancel attempts whose trial was stopped, pruned or deleted), then launch
new attempts while the cluster has room, one study at a time in turn so studies share it fairly.
The scheduler decides; an :class:`~hpo.service.executor.Executor` runs what it decides (on Ray:
``hpo.service.ray_executor``). Everything in flight is keyed by (trial, attempt): launching attempt
N of a trial first cancels any other attempt of it, so two never run together.

One scheduler per database: a tick does anything only while its server holds the ``scheduler``
lease (:mod:`hpo.service.storage.leases`), which the tick renews. Another server's scheduler
stands by and takes the lease over once it expires (or its holder's process is gone); it then
adopts the attempts it finds running: re-adopted if the executor still runs them, else failed
as infrastructure losses (retried without spending ``max_retries``). Every attempt launched or
adopted records its owner (``trials.owner``); a scheduler that lost its lease launches nothing
more and lets go of what it tracked.

Placement per node: the scheduler reads the cluster's nodes from the executor (at most every
``NODES_REFRESH_S``) and publishes them for every replica's creation check
(:mod:`hpo.service.placement`). A study whose ranks fit no node has its next trial failed as
``deterministic`` with the reason, and no further trial asked while the nodes stay the same;
ranks that fit a node's total but not what is free now wait.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpo.service import placement
from hpo.service.db.models import utcnow
from hpo.service.errors import (
    AskContention,
    BudgetSpent,
    Conflict,
    HpoError,
    StaleAttempt,
    StudyNotRunning,
    TrialFinished,
)
from hpo.service.executor import (
    AttemptError,
    AttemptLaunch,
    AttemptRef,
    AttemptResult,
    AttemptState,
    AttemptStatus,
    ClusterNode,
    EvaluationRequest,
    Executor,
    FailureClass,
    fits,
    needs_of,
)
from hpo.service.leadership import SchedulerLease
from hpo.service.preflight import ClusterPreflight
from hpo.service.records import ClaimedTrial, MetricInput, TrialRecord
from hpo.service.spec import Resources, StudySpec
from hpo.service.states import StudyState, TrialState
from hpo.service.storage import meta
from hpo.service.studies import StudyService
from hpo.workers import storage

log = logging.getLogger("hpo.scheduler")

# How long an attempt may keep running after its trial was pruned before it is cancelled.
PRUNED_GRACE_S = 30.0
# How often the scheduler reads the cluster's nodes from the executor.
NODES_REFRESH_S = 2.0


@dataclass
class _InFlight:
    study_id: int
    workers: int
    launched_at: float = field(default_factory=time.time)
    placed: bool = False
    checkpoint: str | None = None
    finished_in_db_at: float | None = None


# A tick that keeps failing the same way (a cluster that cannot be reached) is logged whole
# once, then as one line at most this often, not as a traceback every tick.
REPEATED_FAILURE_LOG_S = 60.0
# After a failed start of the executor (Ray did not start, or cannot be reached), the next try
# waits this long, doubled after each further failure up to the second figure.
START_RETRY_S = (1.0, 30.0)


class _Failing:
    """The scheduler loop's log of failed ticks: the first failure of a kind with its
    traceback; the same failure again only as a count, every REPEATED_FAILURE_LOG_S; and
    the recovery."""

    def __init__(self) -> None:
        self.what: str | None = None
        self.times = 0
        self.logged_at = -math.inf

    def failed(self, exc: Exception) -> None:
        what = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if what != self.what:
            self.what, self.times, self.logged_at = what, 1, now
            log.exception("scheduler tick failed; retrying")
            return
        self.times += 1
        if now - self.logged_at >= REPEATED_FAILURE_LOG_S:
            self.logged_at = now
            log.error("scheduler tick failed %d times in a row, as before: %s", self.times, what)

    def recovered(self) -> None:
        if self.what is not None:
            log.info("scheduler tick works again, after %d failed ticks", self.times)
        self.what, self.times = None, 0


class Scheduler:
    """Runs in a thread of ``hpo serve``; Ray starts only once a study needs it."""

    def __init__(
        self,
        service: StudyService,
        executor: Executor,
        *,
        api_url: str,
        token: str | None,
        checkpoint_dir: Path | str,
        interval_s: float = 1.0,
        wake: threading.Event | None = None,
        lease_s: float = 15.0,
        holder: str | None = None,
        preflight: ClusterPreflight | None = None,
        deployment: str | None = None,
        nodes_refresh_s: float = NODES_REFRESH_S,
        tensorboard_dir: Path | str | None = None,
    ) -> None:
        """``wake`` is the event whose setting runs a tick now (a study was created, resumed
        or given more budget): the app passes its ``set`` to the study service as
        ``on_change``, so both are whole when made. ``lease_s`` is the length of the
        scheduler lease, ``holder`` this server's id in it (a new one by default).
        ``preflight``, when enabled, connects to the cluster at once and checks every node
        that joins (see :mod:`hpo.service.preflight`). ``deployment`` (the database's
        deployment id) scopes the trial folders: ``checkpoint_dir/deployment-<id>/study-<s>/
        trial-<t>``, so deployments sharing a checkpoint store (or a database wiped and started
        again on the same one) never resume from each other's checkpoints of a trial with
        the same id. The cluster's nodes are read every ``nodes_refresh_s`` (for placement and
        the preflight alike). ``tensorboard_dir``: where trials write live TensorBoard
        scalars, a folder per study and trial (``HPO_TENSORBOARD_DIR``); None: nowhere."""
        self.service = service
        self.executor = executor
        self.api_url = api_url
        self.token = token
        self.checkpoint_dir = (
            storage.join(checkpoint_dir, f"deployment-{deployment}")
            if deployment
            else checkpoint_dir
        )
        self.tensorboard_dir = tensorboard_dir
        self.interval_s = interval_s
        self.in_flight: dict[AttemptRef, _InFlight] = {}
        # completed studies whose best trial went to evaluation, or that have nothing to
        # evaluate: not read again each tick
        self._evaluated: set[int] = set()
        self._wake = wake or threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._turn = 0
        self.lease = SchedulerLease(service.storage, lease_s, holder)
        self._adopted_epoch: int | None = None
        self.preflight = preflight
        self.nodes_refresh_s = nodes_refresh_s
        self._preflight_epoch: int | None = None
        self.nodes: list[ClusterNode] | None = None  # None: unknown (launch as if they fit)
        self._nodes_read_at = -math.inf
        self._published: tuple | None = None  # the fingerprint of the last stored snapshot
        self._published_at = -math.inf
        self._refused: dict[int, tuple] = {}  # study → node fingerprint it was refused under
        self._start_failure: dict | None = None  # the executor's failing start, as stored
        self._start_retry_at = -math.inf
        self._note_stored = True  # an earlier server's note may be there: delete it once

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hpo-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    def _loop(self) -> None:
        # Ray starts and stops in this thread only: a local Ray's processes die with the thread
        # that started them (parent-death signal), so no other thread may outlive or end it.
        try:
            failing = _Failing()
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception as exc:
                    failing.failed(exc)
                else:
                    if self._start_failure is None:  # not a tick that waits to start again
                        failing.recovered()
                self._wake.wait(self.interval_s if self.leading else self.lease.lease_s / 3)
                self._wake.clear()
        finally:
            self.executor.shutdown()
            self.release()

    @property
    def leading(self) -> bool:
        """Whether this scheduler holds the scheduler lease (and so may launch)."""
        return self.lease.held

    @property
    def holder(self) -> str:
        """This server's id in the scheduler lease and in ``trials.owner``."""
        return self.lease.holder

    @property
    def epoch(self) -> int | None:
        """The scheduler lease's epoch while this server holds it."""
        return self.lease.epoch

    def release(self) -> None:
        """Give the scheduler lease up (a standby takes over at once). Never raises."""
        self.lease.release()

    def _let_go(self) -> None:
        """The lease was taken over: launch nothing more and let go of the attempts (the new
        holder adopts them; on a local cluster they end with this one)."""
        log.warning("this server stops scheduling: another one holds the scheduler lease")
        self.executor.shutdown()
        self.in_flight.clear()
        self._evaluated.clear()
        self._refused.clear()
        self.nodes, self._nodes_read_at, self._published = None, -math.inf, None
        self._start_failure, self._start_retry_at = None, -math.inf  # the new holder's now

    # ------------------------------------------------------------------- tick

    def tick(self) -> None:
        """One round: hold the lease, then reconcile, launch and evaluate (nothing without
        the lease)."""
        held, lost = self.lease.hold()
        if lost:
            self._let_go()
        if not held:
            return
        preflight = self.preflight
        if preflight is not None and self._preflight_epoch != self.epoch:
            with self.lease.kept():  # it marks the storage, which may be slow to answer
                preflight.reset()  # a new holder checks every node again
            self._preflight_epoch = self.epoch
        studies = self.service.dispatched_studies()
        # a study that runs again (reopened) is looked at afresh once it completes
        self._evaluated.difference_update(sid for sid, _, _ in studies)
        to_evaluate, settled = self.service.studies_to_evaluate(self._evaluated)
        self._evaluated |= settled
        if not self.executor.started:
            adopting = self._adopted_epoch != self.epoch and bool(studies)  # paused ones drain
            running = any(state == StudyState.RUNNING for _, state, _ in studies)
            checking = preflight is not None and preflight.enabled
            if not (running or to_evaluate or adopting or checking):
                self._unpublish_nodes()
                self._forget_start_failures()  # nothing waits for it any more
                return
            if time.monotonic() < self._start_retry_at:
                return  # the last start failed: wait before the next one
            with self.lease.kept():  # a local Ray may take longer than the lease to start
                try:
                    self.executor.start()
                except Exception as exc:
                    self._start_failed(exc)
                    if checking and preflight is not None:
                        preflight.cluster_failed(exc)
                    raise
            if self._start_failure is not None:
                log.info("the executor started after %d failed tries", self._start_failure["tries"])
            self._forget_start_failures()
        elif self._note_stored:
            self._forget_start_failures()  # its deletion failed last time
        if self._adopted_epoch != self.epoch:
            with self.lease.kept():
                self._adopt(studies)
            self._adopted_epoch = self.epoch
        self._refresh_nodes()
        self._reconcile()
        self._launch([(sid, spec) for sid, state, spec in studies if state == StudyState.RUNNING])
        self._evaluate(to_evaluate)
        if preflight is not None:
            try:
                if preflight.mark_due:
                    with self.lease.kept():  # the storage may be slow to answer
                        preflight.remark()
                preflight.step(self.executor, self.nodes)
            except Exception:  # the node checks never stop the scheduling
                log.exception("the node preflight failed; retrying")

    def _start_failed(self, exc: Exception) -> None:
        """Wait longer before each next start, and tell every server's ``/healthz`` why no
        trial starts (a failure to store that is only logged: the start's is raised)."""
        tries = 1 + (self._start_failure or {}).get("tries", 0)
        wait = min(START_RETRY_S[0] * 2 ** (tries - 1), START_RETRY_S[1])
        self._start_retry_at = time.monotonic() + wait
        now = utcnow().isoformat()
        self._start_failure = {
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "tries": tries,
            "since": (self._start_failure or {}).get("since", now),
            "last_try": now,
            "next_try_in_s": wait,
            "holder": self.holder,
        }
        try:
            if self.lease.still_ours():  # else another server schedules: the note is its own
                meta.store_executor_failure(self.service.storage, self._start_failure)
                self._note_stored = True
        except Exception:
            log.exception("could not store why the executor does not start")

    def _forget_start_failures(self) -> None:
        """Start the next failure count afresh, and delete the stored note (this server's or
        an earlier one's; tried again next time if the database does not answer)."""
        self._start_failure, self._start_retry_at = None, -math.inf
        if self._note_stored:
            with contextlib.suppress(Exception):
                storage = self.service.storage
                if meta.executor_failure(storage) is not None:  # a read: no write turn taken
                    meta.store_executor_failure(storage, None)
                self._note_stored = False

    def _evaluate(self, todo: list[tuple[StudySpec, TrialRecord, str]]) -> None:
        """Test metrics for the best trial of each completed study, computed once."""
        for done in self.executor.evaluations():
            if done.error is not None:
                metrics: dict[str, object] = {"error": done.error}
            elif done.metrics is None:
                metrics = {"note": "the trainable defines no evaluate()"}
            else:
                metrics = dict(done.metrics)
            self.service.storage.set_test_metrics(done.trial_id, metrics)
        for spec, best, checkpoint in todo:
            if spec.multi_objective or spec.trainable is None:
                continue
            self._evaluated.add(best.study_id)
            log.info("evaluating the best trial %s of study %s", best.id, best.study_id)
            request = EvaluationRequest(
                trial_id=best.id,
                trainable=spec.trainable.name,
                config=dict(spec.trainable.config),
                params=dict(best.params),
                checkpoint=checkpoint,
                cpus=spec.resources.cpus_per_worker,
                gpus=spec.resources.gpus_per_worker,
            )
            try:
                self.executor.evaluate(request)
            except Exception as exc:
                self.service.storage.set_test_metrics(best.id, {"error": str(exc)})

    def _adopt(self, studies: list[tuple[int, str, StudySpec]]) -> None:
        """Having taken the lease: own the running attempts this scheduler does not track,
        re-adopting those the executor still runs; the others were lost with their control
        plane and are retried as infrastructure losses."""
        specs = {sid: spec for sid, _, spec in studies}
        for trial in self.service.storage.paused_owned(list(specs)):
            # paused by an attempt an earlier scheduler launched: follow it to its end if the
            # cluster still runs it, else it has ended and the trial may be promoted
            ref = AttemptRef(trial.id, trial.attempts)
            if ref in self.in_flight:
                continue
            resources = specs[trial.study_id].resources
            if self.executor.adopt(ref, _needs(resources)):
                self.in_flight[ref] = _InFlight(trial.study_id, resources.workers_per_trial)
            else:
                self._settle_paused(trial)
        for trial in self.service.storage.active_trials(list(specs)):
            ref = AttemptRef(trial.id, trial.attempts)
            if trial.state != TrialState.RUNNING or ref in self.in_flight:
                continue
            resources = specs[trial.study_id].resources
            if self.executor.adopt(ref, _needs(resources)):
                if not self._own(ref):
                    self.executor.release(ref)
                    if self.epoch is None:
                        return
                    continue
                log.info("re-adopted trial %s attempt %s", trial.id, trial.attempts)
                self.in_flight[ref] = _InFlight(trial.study_id, resources.workers_per_trial)
            else:
                self.service.fail_attempt(
                    trial.id,
                    "its attempt was lost when the control plane restarted",
                    failure_class=FailureClass.INFRASTRUCTURE,
                    attempt=trial.attempts,
                )

    def _settle_paused(self, trial: TrialRecord) -> None:
        """Release a paused trial whose attempt ended unseen (its control plane died), having
        recorded the newest checkpoint its folder holds: the dead scheduler may never have
        heard of the one saved at the pause."""
        from hpo.workers import checkpoints

        folder = self._trial_dir(trial.study_id, trial.id)
        try:
            found = checkpoints.candidates(folder, before_attempt=trial.attempts + 1)
        except Exception as exc:  # the store cannot be listed: the promotion check decides
            log.warning("cannot list the checkpoints of paused trial %s: %s", trial.id, exc)
            found = []
        if found:
            self.service.storage.set_checkpoint(trial.id, str(found[0]))
        self.service.release_paused(trial.id, trial.attempts)

    def _trial_dir(self, study_id: int, trial_id: int) -> str:
        return str(storage.join(self.checkpoint_dir, f"study-{study_id}", f"trial-{trial_id}"))

    def _own(self, ref: AttemptRef) -> bool:
        """Record this scheduler as the attempt's owner; False when it cannot (the lease was
        taken over: then this scheduler lets go of everything)."""
        epoch = self.lease.epoch
        if epoch is not None and self.service.own_attempt(
            ref.trial_id, ref.attempt, self.holder, epoch
        ):
            return True
        if not self.lease.still_ours():
            self._let_go()
        return False  # else the attempt moved on meanwhile; the lease is still ours

    def _reconcile(self) -> None:
        if not self.in_flight:
            return
        states = self.service.storage.trial_states(sorted({ref.trial_id for ref in self.in_flight}))
        starting = []
        for status in self.executor.statuses():
            ref = status.ref
            flight = self.in_flight.get(ref)
            if flight is None:
                continue
            db_state = states.get(ref.trial_id)
            if db_state in (None, TrialState.FAILED, TrialState.WAITING):
                # deleted, stopped, lease expired or requeued: this attempt must end now
                log.info("cancelling attempt %s: its trial is %s", ref, db_state or "deleted")
                self._drop(ref, cancel=True)
                continue
            self._record_progress(status, flight)
            if status.state.ended:
                self._finish(status, db_state)
                continue
            if db_state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.PAUSED):
                flight.finished_in_db_at = flight.finished_in_db_at or time.monotonic()
                if time.monotonic() - flight.finished_in_db_at > PRUNED_GRACE_S:
                    log.info("cancelling attempt %s: still running after its trial ended", ref)
                    self._drop(ref, cancel=True)
                    if db_state == TrialState.PAUSED:
                        self.service.release_paused(ref.trial_id, ref.attempt)
                continue
            if status.state == AttemptState.PENDING or len(status.placements) < flight.workers:
                starting.append(ref.trial_id)  # no reporter yet to keep the lease alive
        self.service.renew_leases(starting)

    def _record_progress(self, status: AttemptStatus, flight: _InFlight) -> None:
        trial_id = status.ref.trial_id
        if not flight.placed and len(status.placements) >= flight.workers:
            ranks = status.placements
            started = max(r.started_at for r in ranks)
            self.service.storage.merge_placement(
                trial_id,
                {
                    "executor": self.executor.name,
                    "attempt": status.ref.attempt,
                    "world_size": flight.workers,
                    "nodes": sorted({r.node_ip for r in ranks}),
                    # launch → every rank in the process group: visible start-up cost
                    "startup_s": round(max(0.0, started - flight.launched_at), 3),
                    "ranks": [asdict(r) for r in ranks],
                },
            )
            flight.placed = True
        if status.checkpoint and status.checkpoint.path != flight.checkpoint:
            flight.checkpoint = status.checkpoint.path
            self.service.storage.set_checkpoint(trial_id, flight.checkpoint)

    def _finish(self, status: AttemptStatus, db_state: str) -> None:
        trial_id = status.ref.trial_id
        try:
            if db_state == TrialState.PAUSED:  # its last checkpoint is recorded: promotable
                self.service.release_paused(trial_id, status.ref.attempt)
                return
            if db_state != TrialState.RUNNING:
                return
            if status.state == AttemptState.DONE:
                self._tell(status.ref, status.result or AttemptResult())
                return
            error = status.error or AttemptError(kind=str(status.state), message=_ended(status))
            self.service.fail_attempt(
                trial_id,
                error.describe(),
                failure_class=error.effective_class,
                attempt=status.ref.attempt,
            )
        finally:
            self._drop(status.ref, cancel=False)

    def _tell(self, ref: AttemptRef, result: AttemptResult) -> None:
        """Tell the finished attempt's trial its objectives' values, after storing the points
        its reporter could not deliver before it closed (as the reporter would have)."""
        trial_id = ref.trial_id
        if result.unsent:
            points = [
                MetricInput(int(p["step"]), str(p["name"]), float(p["value"]))
                for p in result.unsent
            ]
            with contextlib.suppress(StaleAttempt, TrialFinished):
                self.service.report(trial_id, points, attempt=ref.attempt)
        trial = self.service.storage.get_trial(trial_id, events=False)
        spec = self.service.storage.spec_of(trial.study_id)
        values = []
        for objective in spec.objectives:
            value = result.values(objective.scope).get(objective.metric)
            if value is None:
                self.service.fail_attempt(
                    trial_id,
                    f"the trainable never reported the objective metric {objective.metric!r}",
                    failure_class=FailureClass.DETERMINISTIC,
                )
                return
            values.append(value)
        with contextlib.suppress(TrialFinished):  # pruned or failed meanwhile: that stands
            self.service.tell(trial_id, values=values)

    def _drop(self, ref: AttemptRef, *, cancel: bool) -> None:
        if cancel:
            self.executor.cancel(ref)
        else:
            self.executor.release(ref)
        self.in_flight.pop(ref, None)

    # ----------------------------------------------------------------- launch

    def _launch(self, studies: list[tuple[int, StudySpec]]) -> None:
        if not studies:
            return
        pending = [ref for ref, f in self.in_flight.items() if not f.placed]
        free = self.executor.free(pending)
        candidates = list(studies)
        while candidates and self.leading:  # a lost lease stops launching at once
            # fairness: the study with the fewest trials in flight goes first; ties rotate
            self._turn += 1
            candidates.sort(key=lambda item: (self._count(item[0]), (item[0] + self._turn) % 997))
            sid, spec = candidates[0]
            problem = placement.placement_problem(spec.resources, self.nodes or [])
            if problem is not None:  # no node holds its ranks: waiting would be forever
                self._refuse(sid, problem)
                candidates.pop(0)
                continue
            needs = _needs(spec.resources)
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

    def _refresh_nodes(self) -> None:
        """Read the cluster's nodes (at most every NODES_REFRESH_S) and publish them for the
        API's creation check when they changed or the stored snapshot grows old. A cluster
        that cannot say leaves them unknown (then nothing is refused)."""
        now = time.monotonic()
        if now - self._nodes_read_at < self.nodes_refresh_s:
            return
        self._nodes_read_at = now
        try:
            self.nodes = self.executor.nodes()
        except Exception as exc:
            log.warning("cannot read the cluster's nodes: %s", exc)
            self.nodes = None
            return
        shape = placement.fingerprint(self.nodes)
        if shape == self._published and now - self._published_at < placement.SNAPSHOT_REFRESH_S:
            return
        if shape != self._published:
            log.info("cluster nodes (CPU, GPU) → count: %s", dict(shape))
        try:
            placement.store_snapshot(self.service.storage, self.nodes)
        except Exception as exc:  # the database is down: the next round tries again
            log.warning("cannot publish the cluster's nodes: %s", exc)
            return
        self._published, self._published_at = shape, now

    def _unpublish_nodes(self) -> None:
        """Remove the stored node snapshot while this leader's executor is not started (it
        reads no nodes then): the snapshot is another run's (a restart on a larger local Ray,
        a new cluster address) and would refuse studies this cluster holds. Once per start."""
        if self._published == ():
            return
        try:
            placement.store_snapshot(self.service.storage, None)
        except Exception as exc:  # the database is down: the next round tries again
            log.warning("cannot remove the stored cluster nodes: %s", exc)
            return
        self._published, self._published_at = (), time.monotonic()

    def _refuse(self, study_id: int, problem: placement.Problem) -> None:
        """Fail the study's next trial as deterministic: its ranks fit no node. Once per
        study while the nodes stay the same (a study with a large budget does not burn it
        all on one cluster; a node that joins gives it another try)."""
        shape = placement.fingerprint(self.nodes or [])
        if self._refused.get(study_id) == shape:
            return
        trial = self._ask(study_id)
        if trial is None:
            return
        log.warning("study %s: trial %s cannot be placed: %s", study_id, trial.id, problem.message)
        self.service.fail_attempt(
            trial.id,
            f"cannot be placed on the cluster: {problem.message}",
            failure_class=FailureClass.DETERMINISTIC,
            attempt=trial.attempts,
        )
        self._refused[study_id] = shape  # only once it is failed (else its lease requeues it)

    def _count(self, study_id: int) -> int:
        return sum(1 for f in self.in_flight.values() if f.study_id == study_id)

    def _ask(self, study_id: int) -> ClaimedTrial | None:
        try:
            return self.service.ask(study_id, dispatched=True)
        except (BudgetSpent, StudyNotRunning, Conflict, AskContention):
            return None  # nothing to launch now; the next tick asks again
        except HpoError as exc:
            log.warning("study %s: cannot ask: %s", study_id, exc)
            return None

    def _start_attempt(self, trial: ClaimedTrial, spec: StudySpec) -> None:
        launch = self._launch_of(trial, spec)
        # The ask may have expired this trial's lease and requeued it in the same call: an
        # older attempt still in flight must end before this one starts.
        for older in [r for r in self.in_flight if r.trial_id == trial.id and r != launch.ref]:
            log.info("cancelling attempt %s: attempt %s supersedes it", older, launch.attempt)
            self._drop(older, cancel=True)
        if not self._own(launch.ref):
            self.service.fail_attempt(
                trial.id,
                "its scheduler lost the scheduler lease before launching it",
                failure_class=FailureClass.INFRASTRUCTURE,
                attempt=launch.attempt,
            )
            return
        try:
            self.executor.launch(launch)
        except Exception as exc:
            log.exception("launching attempt %s failed", launch.ref)
            self.service.fail_attempt(
                trial.id,
                f"launch failed: {exc}",
                failure_class=FailureClass.INFRASTRUCTURE,
                attempt=launch.attempt,
            )
            return
        self.in_flight[launch.ref] = _InFlight(trial.study_id, launch.workers)
        log.info(
            "launched trial %s (study %s #%s attempt %s)",
            trial.id,
            trial.study_id,
            trial.number,
            trial.attempts,
        )

    def _launch_of(self, trial: ClaimedTrial, spec: StudySpec) -> AttemptLaunch:
        if spec.trainable is None:
            raise ValueError(f"study {trial.study_id} has no trainable to launch")
        return AttemptLaunch(
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
            token=trial.attempt_token,  # the attempt's own credential, never the admin token
            objectives=[(o.metric, o.direction) for o in spec.objectives],
            keep_metrics=sorted(
                {*(o.metric for o in spec.objectives), spec.pruned_metric, *spec.constraint_metrics}
            ),
            checkpoint_dir=self._trial_dir(trial.study_id, trial.id),
            lease_s=spec.lease_s,
            resume_from=trial.resume_from,
            tensorboard_dir=(
                str(Path(self.tensorboard_dir, spec.name, f"trial-{trial.number:04d}"))
                if self.tensorboard_dir
                else None
            ),
        )


def _needs(resources: Resources) -> dict[str, float]:
    return needs_of(
        resources.workers_per_trial, resources.cpus_per_worker, resources.gpus_per_worker
    )


def _ended(status: AttemptStatus) -> str:
    return f"attempt {status.state}"
