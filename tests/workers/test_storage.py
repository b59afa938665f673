"""Checkpoint storage on a shared folder (``file://`` URLs included) and on an object store
(S3 over real HTTP, a moto server started by the tests): what counts as inside a trial's
folder, the write/list/prune/load life cycle, resuming past a corrupt newest checkpoint,
downloads, the preflight probe, and what rank processes are handed."""

from __future__ import annotations

import io
import json
import socket
import tarfile
from pathlib import Path

import pytest
import torch

from hpo.api.routes.checkpoints import _archive
from hpo.service.errors import NotFound
from hpo.service.executor import control_plane_secrets
from hpo.workers import checkpoints, storage
from hpo.workers.storage import StorageError
from tests.workers.conftest import S3Server
from tests.workers.test_checkpoints import context

CPU = torch.device("cpu")


def test_locations_and_what_lies_inside_a_prefix(tmp_path: Path) -> None:
    assert storage.location(str(tmp_path)) == tmp_path
    assert storage.location(f"file://{tmp_path}") == tmp_path  # a local folder, not a store
    assert storage.location("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert storage.join("s3://bucket/p", "study-1", "trial-2") == "s3://bucket/p/study-1/trial-2"
    assert storage.join(tmp_path, "study-1") == tmp_path / "study-1"
    assert [storage.is_remote(x) for x in ("s3://b/k", "gs://b/k", "file:///x", "/x")] == [
        True,
        True,
        False,
        False,
    ]
    root = "s3://bucket/p/trial-1"
    assert storage.relative(f"{root}/attempt-1/checkpoint-000002", root) == (
        "attempt-1/checkpoint-000002"
    )
    for outside in (
        "s3://bucket/p/trial-10/attempt-1/checkpoint-000002",  # a sibling sharing the prefix
        "s3://bucket/p/trial-1/../trial-2/attempt-1/checkpoint-000002",  # a key with ".."
        "s3://bucket/p/trial-1//attempt-1",  # an empty part
        "s3://other/p/trial-1/attempt-1/checkpoint-000002",  # another bucket
        "gs://bucket/p/trial-1/attempt-1/checkpoint-000002",  # another store
        str(tmp_path / "trial-1" / "attempt-1"),  # a local path against a URL root
        root,  # the root itself is no checkpoint
    ):
        assert storage.relative(outside, root) is None, outside
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "out").symlink_to(tmp_path)
    assert storage.relative(tmp_path / "store" / "out" / "x", tmp_path / "store") is None


def test_a_file_url_is_the_local_atomic_path(tmp_path: Path) -> None:
    trial = f"file://{tmp_path}/trial-1"
    written = checkpoints.write(checkpoints.attempt_folder(trial, 1), 3, {"w": 1}, {"step": 3})
    assert written == tmp_path / "trial-1" / "attempt-1" / "checkpoint-000003"
    assert sorted(p.name for p in written.iterdir()) == ["meta.json", "state.pt"]
    assert checkpoints.candidates(trial, before_attempt=2) == [written]
    storage.probe(f"file://{tmp_path}", "node-a")
    storage.probe(str(tmp_path), "node-a")
    assert not any((tmp_path / ".hpo-probe").iterdir())  # the probe cleans up after itself
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match=r"a-file is not usable from here: .*Error"):
        storage.probe(str(tmp_path / "a-file"), "node-a")


def test_s3_checkpoints_are_written_listed_pruned_and_loaded(s3: S3Server) -> None:
    bucket = s3.new_bucket()
    trial = f"s3://{bucket}/hpo/study-1/trial-1"
    folder = checkpoints.attempt_folder(trial, 1)
    written = [
        checkpoints.write(folder, step, {"w": torch.ones(2) * step}, {"step": step})
        for step in (1, 2, 3)
    ]
    assert written[-1] == f"{trial}/attempt-1/checkpoint-000003"
    checkpoints.prune(folder, keep=2)
    fs = s3.filesystem()
    assert sorted(fs.find(f"{bucket}/hpo")) == [
        f"{bucket}/hpo/study-1/trial-1/attempt-1/checkpoint-00000{s}/{f}"
        for s in (2, 3)
        for f in ("meta.json", "state.pt")
    ]
    # What a crash or a stranger leaves under the prefix is never a candidate:
    base = f"{bucket}/hpo/study-1/trial-1"
    fs.pipe_file(f"{base}/attempt-1/checkpoint-000007/state.pt", b"cut off before meta.json")
    fs.pipe_file(f"{base}/attempt-1/../attempt-1/checkpoint-000008/meta.json", b"{}")
    fs.pipe_file(f"{base}/attempt-1/../attempt-1/checkpoint-000008/state.pt", b"x")
    fs.pipe_file(f"{base}0/attempt-1/checkpoint-000009/meta.json", b"{}")  # trial-10
    fs.pipe_file(f"{base}0/attempt-1/checkpoint-000009/state.pt", b"x")
    checkpoints.write(checkpoints.attempt_folder(trial, 2), 5, {"w": 5}, {"step": 5})
    assert checkpoints.candidates(trial, before_attempt=2) == written[:0:-1]  # 3, then 2
    assert (
        checkpoints.candidates(trial, before_attempt=3)[0] == f"{trial}/attempt-2/checkpoint-000005"
    )
    state, meta = checkpoints.load(written[-1], CPU)
    assert state["w"].tolist() == [3.0, 3.0] and meta == {"step": 3}
    with pytest.raises(FileNotFoundError):
        checkpoints.load(written[0], CPU)  # pruned


def test_s3_resume_falls_back_past_a_corrupt_newest_checkpoint(s3: S3Server) -> None:
    bucket = s3.new_bucket()
    trial = f"s3://{bucket}/trial-1"
    first = context(trial, 1)
    model = torch.nn.Linear(2, 1)
    for step in (1, 2):
        first.report(step, {"acc": 0.5 * step}, checkpoint={"model": model, "seen": step})
    fs = s3.filesystem()
    newest = f"{bucket}/trial-1/attempt-1/checkpoint-000002/state.pt"
    fs.pipe_file(newest, fs.cat_file(newest)[:100])  # truncated in the store
    second = context(trial, 2)
    restored = torch.nn.Linear(2, 1)
    resumed = second.resume(model=restored)
    assert resumed is not None and resumed.step == 1 and resumed.values == {"seen": 1}
    assert resumed.path == f"{trial}/attempt-1/checkpoint-000001"
    assert torch.equal(restored.weight, model.weight) and second.best == {"acc": 0.5}
    saved = second.save(2, model=restored, seen=2)  # the new attempt writes its own folder
    assert saved == f"{trial}/attempt-2/checkpoint-000002"


def test_an_s3_checkpoint_downloads_as_an_archive_only_from_inside_the_store(
    s3: S3Server, tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    root = f"s3://{bucket}/store"
    path = checkpoints.write(f"{root}/study-1/trial-1/attempt-1", 4, {"w": 4}, {"step": 4})
    response = _archive(path, root, s3.options, "trial-1")
    with tarfile.open(fileobj=io.BytesIO(response.body)) as tar:
        assert sorted(tar.getnames()) == [
            "checkpoint-000004",
            "checkpoint-000004/meta.json",
            "checkpoint-000004/state.pt",
        ]
        assert json.load(tar.extractfile("checkpoint-000004/meta.json")) == {"step": 4}
    other = s3.new_bucket()
    elsewhere = checkpoints.write(f"s3://{other}/x", 1, {"w": 1}, {"step": 1})
    with pytest.raises(NotFound, match="outside the checkpoint store"):
        _archive(elsewhere, root, s3.options, "trial-1")
    with pytest.raises(NotFound, match="is gone"):
        _archive(f"{root}/study-1/trial-1/attempt-1/checkpoint-000009", root, s3.options, "t")
    local = storage.fetch(path, tmp_path)  # what evaluation hands to evaluate()
    assert checkpoints.load(local, CPU) == ({"w": 4}, {"step": 4})


def test_the_probe_passes_on_s3_and_names_what_is_wrong(s3: S3Server) -> None:
    bucket = s3.new_bucket()
    storage.probe(f"s3://{bucket}/hpo", "node-a")
    assert s3.filesystem().find(bucket) == []  # nothing left behind
    with pytest.raises(StorageError, match=r"s3://hpo-missing-bucket/x is not usable .*bucket"):
        storage.probe("s3://hpo-missing-bucket/x", "node-a")
    nobody = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}  # nothing listens
    with pytest.raises(StorageError, match=r"is not usable from here: EndpointConnectionError"):
        storage.probe(f"s3://{bucket}/hpo", "node-a", storage_options=nobody)


def test_ranks_get_the_store_settings_and_never_the_control_planes_secrets() -> None:
    environ = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "HPO_DATABASE_URL": "postgresql://secret@db/hpo",
        "HPO_TOKEN": "admin",
        "PGPASSWORD": "pw",
    }
    options = {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert storage.worker_env("s3://b/p", options, environ) == {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "HPO_STORAGE_OPTIONS": json.dumps(options),
    }
    assert storage.worker_env(Path("/shared/hpo"), options, environ) == {}
    assert "HPO_STORAGE_OPTIONS" not in control_plane_secrets({"HPO_STORAGE_OPTIONS": "{}"})
    with pytest.raises(StorageError, match="HPO_STORAGE_OPTIONS is not valid JSON"):
        storage.options({"HPO_STORAGE_OPTIONS": "{endpoint"})


def test_load_model_reads_the_newest_checkpoint_of_a_trial_on_s3(s3: S3Server) -> None:
    from hpo.workers.inference import load_model
    from hpo.workers.trainables import image_classification as digits

    trial = f"s3://{s3.new_bucket()}/study-1/trial-1"
    model = digits.build_model(digits.Settings())
    meta = {"trainable": "image-classification", "settings": {}}
    for attempt, step in ((1, 1), (2, 2)):
        folder = checkpoints.attempt_folder(trial, attempt)
        checkpoints.write(folder, step, {"model": model.state_dict()}, {**meta, "step": step})
    loaded = load_model(trial)  # the trial's folder: its newest checkpoint
    assert loaded.meta["step"] == 2 and loaded.path.name == "checkpoint-000002"
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
    one = load_model(f"{trial}/attempt-1/checkpoint-000001")
    assert one.meta["step"] == 1 and one.trainable == "image-classification"


def test_the_control_plane_reads_a_url_and_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpo.service.settings import Settings

    monkeypatch.setenv("HPO_STORAGE_PATH", "s3://bucket/hpo/")
    monkeypatch.setenv("HPO_STORAGE_OPTIONS", '{"client_kwargs": {"endpoint_url": "http://m:9"}}')
    settings = Settings()
    assert settings.checkpoint_dir == "s3://bucket/hpo"
    assert settings.storage_options == {"client_kwargs": {"endpoint_url": "http://m:9"}}
    monkeypatch.setenv("HPO_STORAGE_PATH", "file:///shared/hpo")
    assert Settings().checkpoint_dir == Path("/shared/hpo")


def test_a_node_with_a_folder_of_its_own_fails_the_shared_check(
    tmp_path: Path, s3: S3Server
) -> None:
    shared, own = tmp_path / "shared", tmp_path / "own"
    content = storage.mark(str(shared), "control-plane-x")
    storage.probe(str(shared), "node-a", shared=("control-plane-x", content))
    with pytest.raises(StorageError, match=r"own here is not the storage .* is missing here"):
        storage.probe(str(own), "node-b", shared=("control-plane-x", content))
    newer = storage.mark(str(shared), "control-plane-x")  # a new leader writes a new one
    with pytest.raises(StorageError, match=r"is different here"):
        storage.probe(str(shared), "node-a", shared=("control-plane-x", content))
    storage.probe(str(shared), "node-a", shared=("control-plane-x", newer))
    bucket, other = s3.new_bucket(), s3.new_bucket()
    content = storage.mark(f"s3://{bucket}/hpo", "control-plane-x")
    storage.probe(f"s3://{bucket}/hpo", "node-a", shared=("control-plane-x", content))
    with pytest.raises(StorageError, match=r"is missing here"):
        storage.probe(f"s3://{other}/hpo", "node-b", shared=("control-plane-x", content))


def test_downloads_from_a_store_that_never_answers_leave_the_api_serving(
    tmp_path: Path,
) -> None:
    """A store that accepts connections and never answers (a hung gateway) holds each
    download for minutes; many of them must not take every request thread of the server
    (then /healthz, metrics and asks hang too): the excess is a 503 at once."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import httpx

    from hpo.service.db import make_engine
    from hpo.service.storage import Storage
    from tests.conftest import ServerProcess, simple_spec

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(512)  # connections complete in the backlog; nothing ever reads or answers
    endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
    env = {
        "HPO_SCHEDULER": "false",
        "HPO_STORAGE_PATH": "s3://bucket/hpo",
        "HPO_STORAGE_OPTIONS": json.dumps(
            {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}
        ),
    }
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    server = ServerProcess(url, tmp_path, env)
    server.start()
    pool = ThreadPoolExecutor(48)
    try:
        with server.http() as http:
            sid = http.post("/api/v1/studies", json=simple_spec()).json()["id"]
            tid = http.post(f"/api/v1/studies/{sid}/ask").json()["trial_id"]
        engine = make_engine(url)
        Storage(engine).set_checkpoint(tid, "s3://bucket/hpo/s/t/attempt-1/checkpoint-000001")
        engine.dispose()

        def download() -> int | None:
            try:
                with server.http() as http:
                    return http.get(f"/api/v1/trials/{tid}/checkpoint", timeout=60).status_code
            except httpx.TimeoutException:
                return None

        pending = [pool.submit(download) for _ in range(48)]
        health = httpx.get(server.url + "/healthz", timeout=15)  # not stuck behind them
        assert health.status_code == 200
        with server.http() as http:  # nor is the rest of the API
            assert http.get(f"/api/v1/trials/{tid}", timeout=15).status_code == 200
        first = next(as_completed(pending))  # the excess is refused, not queued
        assert first.result() == 503
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        server.kill()
        hole.close()


def test_a_storage_call_that_hangs_is_not_started_again_while_it_does() -> None:
    """A hung mount keeps the helper thread of a timed-out call forever: a recheck every
    minute must not leave one more thread behind each time."""
    import threading

    from hpo.workers.storage import _bounded

    release = threading.Event()

    def hang() -> None:
        release.wait()

    def helpers() -> int:  # other tests' threads come and go: count only this check's
        return sum(t.name == "hpo-storage-control-plane-x" for t in threading.enumerate())

    assert helpers() == 0
    with pytest.raises(StorageError, match="did not answer within"):
        _bounded("/hung", "control-plane-x", 0.05, hang)
    for _ in range(5):
        with pytest.raises(StorageError, match="has not answered an earlier call yet"):
            _bounded("/hung", "control-plane-x", 0.05, hang)
    assert helpers() == 1  # the first call's thread only
    release.set()  # the mount came back: the next call runs again
    for thread in threading.enumerate():
        if thread.name == "hpo-storage-control-plane-x":
            thread.join()
    _bounded("/hung", "control-plane-x", 5, lambda: None)
