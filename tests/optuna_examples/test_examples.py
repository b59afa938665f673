"""Optuna scripts ported by changing one line run against a served control plane."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

HERE = Path(__file__).parent
SCRIPTS = ["sklearn_simple.py", "pytorch_simple.py", "simple_pruning.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_port_changes_the_import_line_only(name: str) -> None:
    original = (HERE / "original" / name).read_text().splitlines()
    ported = (HERE / name).read_text().splitlines()
    changed = [
        line
        for line in difflib.unified_diff(original, ported, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed == ["-import optuna", "+import hpo.optuna as optuna"]


def test_the_ported_scripts_run_against_a_server(sqlite_server: ServerProcess) -> None:
    env = {
        **os.environ,
        "HPO_URL": sqlite_server.url,
        "HPO_TOKEN": sqlite_server.token,
        "HPO_OPTUNA_MAX_TRIALS": "3",  # each script's n_trials, capped for the test
    }
    outputs = {}
    for name in SCRIPTS:
        done = subprocess.run(
            [sys.executable, name], cwd=HERE, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}"
        outputs[name] = done.stdout
    assert "state=<TrialState.COMPLETE" in outputs["sklearn_simple.py"]
    assert "Number of complete trials:  " in outputs["pytorch_simple.py"]
    pruning = outputs["simple_pruning.py"]
    assert "Number of finished trials: 3" in pruning
    assert "First trial (queued): {'alpha': 0.001}" in pruning
    with sqlite_server.client() as client:
        studies = [s for s in client.studies() if s.name.startswith("optuna-")]
        assert len(studies) == 3 and all(s.counts["running"] == 0 for s in studies)
        spaces = {frozenset(s.spec["space"]) for s in studies}
        # Define-by-run: each study learned the parameters its trials named.
        assert frozenset({"alpha"}) in spaces
        assert any({"classifier", "n_layers", "optimizer", "lr"} & set(s) for s in spaces)
