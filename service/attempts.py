"""Attempt tokens: the credential of one attempt of one trial.

Each claim of a trial (a new trial, or a waiting one claimed for its next attempt) creates a
random token ``hpo_att.<trial id>.<attempt>.<secret>``. Only its sha256 is stored
(``trials.attempt_token_hash``), and a new claim replaces it, so a token stops working the
moment its attempt is no longer current. The trial id and attempt in the clear let the server
find the trial and tell a stale attempt (409) from a wrong token without a search.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from hpo.service.errors import StaleAttempt

PREFIX = "hpo_att"


@dataclass(frozen=True)
class AttemptToken:
    """A parsed attempt token: the trial and attempt it claims, and its hash."""

    trial_id: int
    attempt: int
    digest: str

    def check(self, trial_id: int, attempt: int, stored_digest: str | None) -> bool:
        """Whether this token is the credential of attempt ``attempt`` of trial ``trial_id``
        (whose stored hash is ``stored_digest``). Raises StaleAttempt when it names an
        earlier attempt of that trial; False means a wrong token."""
        if self.trial_id != trial_id:
            return False
        if self.attempt < attempt:
            raise StaleAttempt(
                f"attempt {self.attempt} of trial {trial_id} is no longer current "
                f"(attempt {attempt} is); nothing was stored",
                field="attempt",
            )
        return (
            self.attempt == attempt
            and stored_digest is not None
            and hmac.compare_digest(self.digest, stored_digest)
        )


def new_token(trial_id: int, attempt: int) -> tuple[str, str]:
    """A fresh token for attempt ``attempt`` of trial ``trial_id``, and the hash to store."""
    token = f"{PREFIX}.{trial_id}.{attempt}.{secrets.token_urlsafe(32)}"
    return token, digest(token)


def digest(token: str) -> str:
    """The stored form of a token: its sha256 in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse(token: str) -> AttemptToken | None:
    """The token as an AttemptToken, or None when it is not shaped like one."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        return None
    _, trial, attempt, secret = parts
    if not (trial.isascii() and trial.isdigit() and attempt.isascii() and attempt.isdigit()):
        return None
    if not secret or len(trial) > 19 or len(attempt) > 9:
        return None
    return AttemptToken(int(trial), int(attempt), digest(token))


def is_attempt_token(token: str) -> bool:
    """Whether ``token`` is shaped like an attempt token (and not an admin token)."""
    return token.startswith(PREFIX + ".")


def require_current(
    trial_id: int,
    current: int,
    stored_digest: str | None,
    *,
    token: AttemptToken | None = None,
    attempt: int | None = None,
    refuse_unnamed: bool = False,
) -> None:
    """Check that a write comes from attempt ``current`` of the trial: made with that
    attempt's ``token`` when given, and naming that ``attempt`` when it names one. A write
    with neither is accepted unless ``refuse_unnamed`` (an admin-token write over HTTP to a
    trial handed out again: which attempt sent it is unknown).

    Raises StaleAttempt (nothing may be stored) otherwise.
    """
    if refuse_unnamed and token is None and attempt is None:
        raise StaleAttempt(
            f"trial {trial_id} was handed out again (attempt {current} is current): a write "
            "with the API token must say which attempt it comes from; send the attempt's "
            "token (`attempt_token` of the ask) or name the `attempt`; nothing was stored",
            field="attempt",
        )
    if token is not None and not token.check(trial_id, current, stored_digest):
        raise StaleAttempt(
            f"the token of attempt {token.attempt} of trial {trial_id} is no longer valid "
            f"(attempt {current} is current); nothing was stored",
            field="attempt",
        )
    if attempt is not None and attempt != current:
        raise StaleAttempt(
            f"attempt {attempt} of trial {trial_id} is not current (attempt {current} is); "
            "nothing was stored",
            field="attempt",
        )
