"""Request bounds over real HTTP: a body-size limit (413, answered before the body is read),
caps on batches and fields (422 naming the field), a per-token rate limit (429 with
Retry-After), and the security and cache headers on every answer."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, simple_spec

API = "/api/v1"
MiB = 2**20


def assert_error(r: httpx.Response, status: int, code: str, field: str | None) -> dict:
    """The API's usual error body, with this status, code and field."""
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body = r.json()
    assert body["error"] == code and body["field"] == field and body["message"], body
    return body


def studies(http: httpx.Client) -> list[str]:
    return [s["name"] for s in http.get(f"{API}/studies").json()["studies"]]


def running_trial(http: httpx.Client, name: str = "s") -> int:
    sid = http.post(f"{API}/studies", json=simple_spec(name)).json()["id"]
    return http.post(f"{API}/studies/{sid}/ask").json()["trial_id"]


@pytest.fixture
def limited(sqlite_url: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose rate limit is tiny: 3 requests at once, then one every 2 s."""
    env = {"HPO_SCHEDULER": "false", "HPO_RATE_LIMIT_PER_S": "0.5", "HPO_RATE_LIMIT_BURST": "3"}
    with ServerProcess(sqlite_url, tmp_path, env) as proc:
        yield proc


# ------------------------------------------------------------------------ body size


def _raw_post(server: ServerProcess, path: str, length: int, sent: bytes) -> tuple[str, dict, Any]:
    """POST declaring ``length`` bytes but sending only ``sent``; returns the status line, the
    headers and the decoded body of the answer, read until the server closes the connection."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head.encode() + sent)
        data = b""
        while chunk := sock.recv(65536):  # ends when the server closes: it waits for no more
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head_text.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, json.loads(body)


def test_a_huge_body_is_413_before_the_server_reads_it(sqlite_server: ServerProcess) -> None:
    # 1 GiB declared, 64 KiB sent: the answer comes, and the connection closes, at once.
    started = time.monotonic()
    status, headers, body = _raw_post(sqlite_server, f"{API}/studies", 2**30, b"{" + b" " * 65536)
    assert time.monotonic() - started < 10
    assert status.startswith("HTTP/1.1 413"), status
    assert headers["connection"] == "close" and headers["x-content-type-options"] == "nosniff"
    assert body["error"] == "payload_too_large" and body["field"] == "body", body
    assert str(8 * MiB) in body["message"], body
    with sqlite_server.http() as http:
        assert http.get("/healthz").status_code == 200
        assert studies(http) == []


def test_a_chunked_body_is_judged_by_what_arrives(sqlite_server: ServerProcess) -> None:
    """Without a Content-Length the body is read up to the limit: over it, 413; under it, the
    route gets it whole."""

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    with sqlite_server.http() as http:
        spec = json.dumps(simple_spec("chunked", description="x" * 5000)).encode()
        headers = {"content-type": "application/json"}
        big = spec[:-1] + b" " * (9 * MiB) + b"}"
        r = http.post(f"{API}/studies", content=chunks(big), headers=headers)
        assert_error(r, 413, "payload_too_large", "body")
        assert studies(http) == []
        r = http.post(f"{API}/studies", content=chunks(spec), headers=headers)
        assert r.status_code == 201, r.text
        assert studies(http) == ["chunked"]


def test_the_body_limit_is_a_setting(sqlite_url: str, tmp_path: Path) -> None:
    proc = ServerProcess(
        sqlite_url, tmp_path, {"HPO_SCHEDULER": "false", "HPO_MAX_BODY_BYTES": "4096"}
    )
    proc.start()
    try:
        with proc.http() as http:
            padded = simple_spec("small", description="x" * 3000)
            assert http.post(f"{API}/studies", json=padded).status_code == 201
            body = assert_error(
                http.post(f"{API}/studies", json=simple_spec("big", description="x" * 5000)),
                413,
                "payload_too_large",
                "body",
            )
            assert "4096" in body["message"]
            assert studies(http) == ["small"]
    finally:
        proc.stop()


# ------------------------------------------------------------------ batch and field caps


def test_over_long_batches_and_fields_are_422_naming_them(sqlite_server: ServerProcess) -> None:
    with sqlite_server.http() as http:
        tid = running_trial(http)
        points = [{"step": s, "name": "loss", "value": 1.0} for s in range(10_001)]
        r = http.post(f"{API}/trials/{tid}/metrics", json={"points": points})
        assert "10000" in assert_error(r, 422, "invalid_input", "points")["message"]
        assert http.get(f"{API}/trials/{tid}/metrics").json()["points"] == []
        r = http.post(f"{API}/trials/{tid}/metrics", json={"points": points[:10_000]})
        assert r.status_code == 200, r.text

        long_name = [{"step": 0, "name": "m" * 129, "value": 1.0}]
        r = http.post(f"{API}/trials/{tid}/metrics", json={"points": long_name})
        assert_error(r, 422, "invalid_input", "points[0].name")

        too_big: dict[str, dict[str, Any]] = {
            "description": {"description": "x" * 10_001},
            "user_attrs": {"user_attrs": {f"k{i}": i for i in range(20_000)}},
            "trainable.config": {"trainable": {"name": "synthetic", "config": {"a": "x" * 70_000}}},
            "space": {
                "space": {f"p{i}": {"type": "int", "low": 0, "high": 1} for i in range(1001)}
            },
            "space.c.choices": {
                "space": {"c": {"type": "categorical", "choices": list(range(1001))}}
            },
            "objective": {"objective": [{"metric": f"m{i}"} for i in range(65)]},
        }
        for field, over in too_big.items():
            r = http.post(f"{API}/studies", json=simple_spec(f"big-{len(field)}", **over))
            assert_error(r, 422, "invalid_input", field)
        assert studies(http) == ["s"]
        r = http.post(f"{API}/studies", json=simple_spec("fits", description="x" * 10_000))
        assert r.status_code == 201, r.text


# -------------------------------------------------------------------------- rate limit


def test_a_token_over_its_rate_is_429_with_retry_after(limited: ServerProcess) -> None:
    with limited.http() as http:
        answers = [http.get(f"{API}/studies") for _ in range(4)]
        assert [r.status_code for r in answers[:3]] == [200, 200, 200]
        refused = answers[3]
        assert_error(refused, 429, "rate_limited", None)
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 2, refused.headers
        assert refused.headers["x-frame-options"] == "DENY"
        # Another caller has its own bucket (a wrong token is still judged on its merits).
        with limited.http(token="not-the-token") as other:
            assert other.get(f"{API}/studies").status_code == 401
        time.sleep(retry_after + 0.1)
        assert http.get(f"{API}/studies").status_code == 200


def test_the_rate_limit_is_not_dodged_by_spelling_or_made_up_tokens(
    limited: ServerProcess,
) -> None:
    spellings = [
        f"{scheme}{spaces}{limited.token}"
        for scheme in ("Bearer ", "bearer ", "BEARER ")
        for spaces in ("", " ", "  ", "\t")
    ]
    with limited.http() as http:
        codes = [
            http.get(f"{API}/studies", headers={"Authorization": h}).status_code for h in spellings
        ]
    assert codes.count(200) == 3, codes  # one token's burst, however it is written
    # Made-up tokens from one address: each its own token bucket, but one address bucket
    # (ten times a token's) bounds them; each refused before any database read.
    with limited.http(token="x") as http:
        bogus = [
            http.get(f"{API}/studies", headers={"Authorization": f"Bearer made-up-{i}"})
            for i in range(60)
        ]
    assert 429 in [r.status_code for r in bogus]


# ---------------------------------------------------------------------------- headers


SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def test_every_answer_carries_the_security_headers(sqlite_server: ServerProcess) -> None:
    with sqlite_server.http() as http:
        tid = running_trial(http)
        sid = http.get(f"{API}/studies").json()["studies"][0]["id"]
        study = http.get(f"{API}/studies/{sid}")
        answers = {
            "json": http.get(f"{API}/trials/{tid}"),
            "etag": study,
            "304": http.get(
                f"{API}/studies/{sid}", headers={"If-None-Match": study.headers["etag"]}
            ),
            "401": httpx.get(f"{sqlite_server.url}{API}/studies"),
            "404": http.get(f"{API}/studies/999999"),
            "422": http.post(f"{API}/studies", json={"name": "x"}),
            "page": http.get("/"),
            "file": http.get("/static/js/main.js"),
            "health": http.get("/healthz"),
        }
        assert answers["304"].status_code == 304
        for what, r in answers.items():
            for name, value in SECURITY.items():
                assert r.headers.get(name) == value, (what, name, r.headers)
            assert "script-src 'self'" in r.headers["content-security-policy"], what
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], what
            expected = "no-cache" if "etag" in r.headers else "no-store"
            assert r.headers["cache-control"] == expected, (what, r.headers)
        for what in ("etag", "304", "page", "file"):
            assert answers[what].headers["cache-control"] == "no-cache", what
        for what in ("json", "401", "404", "422", "health"):
            assert answers[what].headers["cache-control"] == "no-store", what
        # The interactive docs load Swagger UI from its CDN: no policy that would blank them.
        docs = http.get("/docs")
        assert docs.status_code == 200 and "content-security-policy" not in docs.headers
        assert docs.headers["x-content-type-options"] == "nosniff"
