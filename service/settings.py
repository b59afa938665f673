"""Control-plane settings: one pydantic-settings class, read from ``HPO_*`` variables."""

from __future__ import annotations

import fcntl
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_data_dir
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hpo.workers import storage


def default_data_dir() -> Path:
    return Path(user_data_dir("hpo", appauthor=False))


class Settings(BaseSettings):
    """Everything the control plane reads from its environment.

    ``HPO_DATABASE_URL`` picks the database (a SQLite file under ``data_dir`` by default;
    ``postgresql://user@host/db`` in production). ``HPO_TOKEN`` is the API token; when it is
    unset, ``hpo serve`` creates one in ``data_dir/token`` (mode 0600) that local clients read.
    """

    # NaN or infinity in any number is refused (a NaN interval never fires; an infinite one
    # never returns).
    model_config = SettingsConfigDict(env_prefix="HPO_", extra="ignore", allow_inf_nan=False)

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None
    token: SecretStr | None = None
    auth: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    public_url: str | None = None
    ray_address: str | None = None
    # Default: hpo-<deployment id> (the id is stored in the database at its first start).
    ray_namespace: str | None = None
    ray_num_cpus: float | None = Field(default=None, ge=0)
    ray_num_gpus: float | None = Field(default=None, ge=0)
    ray_object_store_mb: int = Field(default=512, ge=80)  # Ray refuses under 75 MiB
    # Checkpoints: a folder every node shares, or an object store URL (s3://bucket/prefix,
    # gs://..., any fsspec protocol; file:// is a local folder). Default: data_dir/checkpoints.
    storage_path: str | None = None
    # fsspec options of that object store, as JSON (HPO_STORAGE_OPTIONS), e.g.
    # {"client_kwargs": {"endpoint_url": "http://minio:9000"}}; handed to the rank processes.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # The network interface DDP ranks bind gloo/NCCL to (GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME
    # on each rank, unless set there); default: the interface holding the node's Ray address.
    socket_ifname: str | None = None
    # Trials write their metrics as live TensorBoard scalars into
    # <tensorboard_dir>/<study name>/trial-0007 (a folder the workers can write; see
    # hpo.workers.tensorboard). Unset: they do not.
    tensorboard_dir: Path | None = None
    scheduler: bool = True
    # Processes of `hpo serve` on its port (hpo.api.serving: each the whole app on the same
    # database, as replicas are; worker 0 runs the scheduler). One interpreter is the reports'
    # queue under many streaming trials; see the README, "Server processes".
    workers: int = Field(default=1, ge=1, le=64)
    # A worker of `hpo serve --workers N` whose event loop has not beaten for this long (it
    # beats every second) is hung: the server stops with status 1 (hpo.api.serving).
    worker_hang_s: float = Field(default=30.0, ge=5)
    # The node preflight on a cluster (see hpo.service.preflight): how long a node has to run
    # it, and how often a node that failed it is checked again.
    preflight_timeout_s: float = Field(default=30.0, gt=0)
    preflight_recheck_s: float = Field(default=60.0, gt=0)
    scheduler_interval_s: float = Field(default=1.0, gt=0)
    # The scheduler lease: one ``hpo serve`` per database runs the scheduler, renewing this
    # lease every tick; another takes over once it has expired (or its holder is gone).
    scheduler_lease_s: float = Field(default=15.0, gt=0)
    lease_sweep_interval_s: float = Field(default=2.0, gt=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # Samplers that learn from the history (TPE, GP) keep each study's finished trials in
    # memory between asks (service/histories.py): at most this many studies and trials,
    # least recently asked dropped first. About 2.5 KB a trial (100,000: ~250 MB).
    sampler_cache_studies: int = Field(default=32, ge=1)
    sampler_cache_trials: int = Field(default=100_000, ge=1)
    # How long a client's ask waits for a slow sampler's suggestion (GP's fit) before it
    # answers 503 with Retry-After; the fit goes on and the retried ask gets its result.
    ask_wait_s: float = Field(default=10.0, gt=0)
    # How long a dashboard request waits for parameter importance (fitted off the request)
    # before it answers the last result, or 202, with status "computing"; studies of at most
    # ``importance_wait_trials`` complete trials (a fit well under a second) always wait.
    importance_wait_s: float = Field(default=2.0, ge=0)
    importance_wait_trials: int = Field(default=1_000, ge=0)
    # Request bounds (README "Limits"): a larger body is a 413 before it is read.
    max_body_bytes: int = Field(default=8 * 2**20, ge=1024)
    # Requests a second per API token (per client address without one), in bursts of up to
    # ``rate_limit_burst``; 429 with Retry-After beyond. 0 turns the limit off.
    rate_limit_per_s: float = Field(default=2000.0, ge=0)
    rate_limit_burst: int = Field(default=4000, ge=1)

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'hpo.db'}"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "token"

    @property
    def ray_session_file(self) -> Path:
        """Where a local Ray session's processes are recorded (reaped after a crash)."""
        return self.data_dir / "ray-session.json"

    @property
    def checkpoint_dir(self) -> Path | str:
        """Where checkpoints go: a Path for a local folder, the URL of an object store."""
        if self.storage_path:
            return storage.location(self.storage_path)
        return self.data_dir / "checkpoints"

    @property
    def worker_api_url(self) -> str:
        """Where workers send metrics: ``public_url``, else this server's own address."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @field_validator("scheduler_lease_s")
    @classmethod
    def _lease_outlasts_a_tick(cls, value: float, info: ValidationInfo) -> float:
        # The leader renews its lease once a tick: a shorter lease lapses between renewals,
        # and replicas would take the scheduler from each other by turns.
        tick = info.data.get("scheduler_interval_s")
        if tick is not None and value < 2 * tick:
            raise ValueError(
                f"{value} s is shorter than two scheduler ticks (HPO_SCHEDULER_INTERVAL_S "
                f"{tick} s): the lease would lapse between renewals"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty HPO_TOKEN would make the server accept an empty bearer token.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError(
                "HPO_TOKEN is set but empty: set a token, or unset it to use the token file "
                "`hpo serve` writes (HPO_AUTH=false turns auth off)"
            )
        return value

    def api_token(self, *, create: bool = False) -> str | None:
        """The token API calls must carry, or None when auth is off (never empty).

        With ``create=True`` a token file that is missing or blank (an operator's empty file, a
        server killed while writing it) is given a new token (mode 0600); without, such a file
        reads as no token. Writers hold an exclusive lock on the file, so servers starting at
        once on one data directory all serve the one token it ends up holding.
        """
        if not self.auth:
            return None
        if self.token is not None:
            return self.token.get_secret_value().strip()
        existing = self._token_in_file()
        if existing or not create:
            return existing
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_file, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
            value = file.read().strip()
            if not value:
                value = new_token()
                os.fchmod(file.fileno(), 0o600)  # a blank file someone else made may be 0644
                file.seek(0)
                file.truncate()
                file.write(value + "\n")
                file.flush()
                os.fsync(file.fileno())
        return value

    def _token_in_file(self) -> str | None:
        """The token in :attr:`token_file`, or None when it is missing or blank."""
        try:
            return self.token_file.read_text().strip() or None
        except FileNotFoundError:
            return None


TOKEN_PREFIX = "hpo_"


def new_token() -> str:
    """A new random API token. It starts with ``hpo_``: a bare ``token_urlsafe`` starts with
    ``-`` one time in 64, and ``--token -x...`` is then read by the CLI's argument parser as
    another option (the test suite met it)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(24)
