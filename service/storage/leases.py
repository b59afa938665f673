"""Named leases (one holder at a time, fenced by an epoch) and the owners of running attempts.

A lease row (``leases``: name, holder, epoch, expires_at) is taken, renewed and released by
compare-and-set, each in a transaction of its own:

- :func:`acquire` takes a free, expired or abandoned lease (``epoch + 1``) or renews one the
  caller already holds; it returns the epoch held, or None while another holder's lease runs.
- :func:`renew` extends the lease only if holder *and* epoch are still the caller's: a holder
  whose lease was taken over (a new epoch) learns it here and must stop at once.
- :func:`release` ends the caller's lease now, so a standby takes over without waiting.

Expiry is judged by the clock of the server that asks (all servers of one database are
expected to keep their clocks in sync to well under a lease's length). A holder is
*abandoned* when its id names a process on this host that no longer runs (a killed server
restarted at once need not wait out the lease); see :func:`holder_id`.

Every running attempt a scheduler launches or adopts records its holder id in
``trials.owner`` (:func:`own`), written only while the caller's lease epoch is current.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import psutil
from sqlalchemy import exists, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hpo.service.db.models import Lease, Trial, utcnow
from hpo.service.states import TrialState
from hpo.service.storage.session import Transactions

SCHEDULER = "scheduler"  # the lease whose holder runs the one scheduler of a database


@dataclass(frozen=True)
class LeaseRecord:
    """Who holds a lease, since which hand-over (``epoch``), until when."""

    name: str
    holder: str
    epoch: int
    expires_at: datetime


def holder_id() -> str:
    """A new id for this server process: ``host:pid:start-time:random``. The host, pid and
    start time let a server on the same host tell that a holder's process is gone."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{os.getpid()}:{int(me.create_time())}:{secrets.token_hex(4)}"


def abandoned(holder: str) -> bool:
    """Whether ``holder`` names a process on this host that no longer runs."""
    parts = holder.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return False
    try:
        proc = psutil.Process(int(parts[1]))
        return int(proc.create_time()) != int(parts[2])
    except (psutil.NoSuchProcess, ValueError):
        return True
    except psutil.Error:
        return False


def get(storage: Transactions, name: str) -> LeaseRecord | None:
    """The lease named ``name``, if it was ever taken."""
    with storage.read() as s:
        row = s.get(Lease, name)
        return None if row is None else _record(row)


def acquire(storage: Transactions, name: str, holder: str, ttl_s: float) -> int | None:
    """Take or renew the lease for ``ttl_s`` seconds; the epoch now held, or None when another
    holder's lease has not expired."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with storage.write() as s:
        row = s.get(Lease, name)
        if row is None:
            try:
                with s.begin_nested():
                    s.execute(
                        insert(Lease).values(name=name, holder=holder, epoch=1, expires_at=expires)
                    )
            except IntegrityError:  # another server created it first
                return None
            return 1
        epoch = row.epoch if row.holder == holder else row.epoch + 1
        if row.holder != holder and row.expires_at > now and not abandoned(row.holder):
            return None
        taken = s.execute(
            update(Lease)
            .where(Lease.name == name, Lease.epoch == row.epoch, Lease.holder == row.holder)
            .values(holder=holder, epoch=epoch, expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        return epoch if taken.rowcount == 1 else None


def renew(storage: Transactions, name: str, holder: str, epoch: int, ttl_s: float) -> bool:
    """Extend the caller's lease to now + ``ttl_s``; False when it is no longer the caller's
    (taken over: a new epoch or holder)."""
    with storage.write() as s:
        done = s.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder, Lease.epoch == epoch)
            .values(expires_at=utcnow() + timedelta(seconds=ttl_s))
            .execution_options(synchronize_session=False)
        )
        return done.rowcount == 1


def release(storage: Transactions, name: str, holder: str, epoch: int) -> None:
    """End the caller's lease now (nothing happens if it is no longer the caller's)."""
    with storage.write() as s:
        s.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder, Lease.epoch == epoch)
            .values(expires_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def own(session: Session, trial_id: int, attempt: int, holder: str, epoch: int) -> bool:
    """Record ``holder`` as the owner of the trial's running ``attempt``, if the holder's
    scheduler lease (``epoch``) is still current; whether it was recorded."""
    current = exists().where(Lease.name == SCHEDULER, Lease.holder == holder, Lease.epoch == epoch)
    done = session.execute(
        update(Trial)
        .where(
            Trial.id == trial_id,
            Trial.attempts == attempt,
            Trial.state == TrialState.RUNNING.value,
            current,
        )
        .values(owner=holder)
        .execution_options(synchronize_session=False)
    )
    return done.rowcount == 1


def _record(row: Lease) -> LeaseRecord:
    return LeaseRecord(row.name, row.holder, row.epoch, row.expires_at)
