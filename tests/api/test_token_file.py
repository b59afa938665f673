"""The API token is never empty: a blank token file (an operator's ``touch``, a server killed
while writing it) gets a fresh token at ``hpo serve``'s start instead of making the server
accept ``Authorization: Bearer`` with nothing after it; a blank ``$HPO_TOKEN`` is an error that
names it; servers starting together on one data directory all serve the token in the file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx
import pytest

from hpo.service.settings import Settings
from tests.conftest import free_port


def _serve_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HPO_TOKEN", "HPO_AUTH")}
    env.update(
        HPO_DATA_DIR=str(data_dir),
        HPO_DATABASE_URL=f"sqlite:///{data_dir / 'hpo.db'}",
        HPO_SCHEDULER="false",
        **extra,
    )
    return env


def _status(port: int, path: str, authorization: str | None) -> int:
    """The status of a GET sent byte for byte (httpx refuses a header value that ends in
    whitespace, which is what a client holding an empty token sends)."""
    header = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request.encode())
        status_line = conn.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def test_serve_replaces_a_blank_token_file_and_refuses_an_empty_bearer(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")  # what a kill -9 between create and write used to leave
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpo.api.cli", "serve", "--port", str(port)],
            env=_serve_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        token = token_file.read_text().strip()
        assert token.startswith("hpo_")
        assert token_file.stat().st_mode & 0o777 == 0o600
        studies = url + "/api/v1/studies"
        # ... nor a non-ASCII one (it was a 500: hmac.compare_digest takes ASCII strings only)
        for header in ("Bearer ", "Bearer", "Bearer  \t", "bearer  ", None, "Bearer \u00e9"):
            assert _status(port, "/api/v1/studies", header) == 401, header
        assert httpx.get(studies, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize("value", ["", "  "])
def test_a_blank_hpo_token_is_an_error_naming_it(tmp_path: Path, value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hpo.api.cli", "serve", "--port", str(free_port())],
        env=_serve_env(tmp_path, HPO_TOKEN=value),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "HPO_TOKEN" in done.stdout + done.stderr
    assert not (tmp_path / "hpo.db").exists()  # it stopped before touching anything


def _create_token(data_dir: str) -> str | None:
    return Settings(data_dir=Path(data_dir), token=None, auth=True).api_token(create=True)


def test_servers_starting_together_serve_the_token_in_the_file(tmp_path: Path) -> None:
    """Eight processes create the token of one empty data directory at once, 20 times over:
    every one returns the token the file holds, and no temporary file is left behind."""
    with ProcessPoolExecutor(8, mp_context=get_context("spawn")) as pool:
        for round_ in range(20):
            data_dir = tmp_path / f"round-{round_}"
            if round_ % 2:  # odd rounds start from a blank file
                data_dir.mkdir()
                (data_dir / "token").write_text("")
            tokens = list(pool.map(_create_token, [str(data_dir)] * 8))
            in_file = (data_dir / "token").read_text().strip()
            assert in_file.startswith("hpo_")
            assert tokens == [in_file] * 8, round_
            assert sorted(p.name for p in data_dir.iterdir()) == ["token"]
