"""A normal (non-editable) install carries every module, migration, static file and entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hpo.service.spec import StudySpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the source files alone: setuptools would also ship what a stale
    # build/ or *.egg-info of an earlier install lists, and hide a package missing here.
    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    # setuptools warns (and a later version refuses) when a folder that Python can import
    # is not in `packages`: the dashboard's static files were shipped that way
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    return next(out.glob("hpo-*.whl"))


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in [
        "hpo/service/spec.py",
        "hpo/service/samplers/tpe.py",
        "hpo/service/db/migrations/env.py",
        "hpo/service/db/migrations/script.py.mako",
        "hpo/service/db/migrations/versions/0001_initial_schema.py",
        "hpo/api/app.py",
        "hpo/workers/runner.py",
        "hpo/workers/trainables/image_classification.py",
    ]:
        assert expected in names, expected
    for top in ("service", "api", "workers"):  # every module of the source tree is shipped
        for path in (ROOT / top).rglob("*.py"):
            shipped = f"hpo/{top}/{path.relative_to(ROOT / top).as_posix()}"
            assert shipped in names, shipped
    static = [p for p in (ROOT / "api" / "static").rglob("*") if p.is_file()]
    assert len(static) >= 5  # the dashboard: its page, its style sheet, its scripts
    for path in static:
        shipped = f"hpo/api/{path.relative_to(ROOT / 'api').as_posix()}"
        assert shipped in names, shipped
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[hpo.trainables]" in text and "image-classification" in text
    assert "hpo = hpo.api.cli:main" in text


def test_installed_wheel_imports_outside_the_source_tree(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    code = (
        "import hpo.service.spec as s, hpo.api.client, hpo.workers.registry as r; "
        "import hpo.service.storage, hpo.service.scheduler, hpo.workers.context; "
        "import hpo.optuna as optuna; assert optuna.create_study and optuna.TrialPruned; "
        f"assert s.__file__.startswith({str(target)!r}); "
        f"assert optuna.__file__.startswith({str(target)!r}); print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_editable_install_imports_hpo_optuna(tmp_path: Path) -> None:
    """`import hpo.optuna as optuna` (the one line a ported Optuna script changes) works from
    the editable install this suite runs in, outside the source tree, from api/optuna."""
    code = "import hpo.optuna as o; print(o.__file__); print(o.samplers.TPESampler().spec['type'])"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    path, kind = result.stdout.split()
    assert Path(path) == ROOT / "api" / "optuna" / "__init__.py" and kind == "tpe"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_are_valid(path: Path) -> None:
    assert StudySpec.from_yaml(path).name
