"""An S3-compatible server for the checkpoint storage tests: moto's, started in this process on
127.0.0.1 and a free port, reached over real HTTP by s3fs here, by ``hpo serve`` and by its Ray
workers."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from hpo.api.demo import free_port


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the environment a process needs to use it: credentials as
    ``AWS_*`` variables, the endpoint in ``HPO_STORAGE_OPTIONS``."""

    endpoint: str

    @property
    def options(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "hpo-test",
            "AWS_SECRET_ACCESS_KEY": "hpo-test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "HPO_STORAGE_OPTIONS": json.dumps(self.options),
        }

    def filesystem(self) -> Any:
        """An s3fs filesystem on the server (uncached), for looking at what is stored."""
        import s3fs

        return s3fs.S3FileSystem(
            key="hpo-test", secret="hpo-test", skip_instance_cache=True, **self.options
        )

    def new_bucket(self) -> str:
        """A fresh, empty bucket; returns its name."""
        name = f"hpo-{secrets.token_hex(6)}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with this process's environment set to use it (as a worker's is)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
