"""Optuna scripts ported by changing one line run against a served control plane."""

from __future__ import annotations

import difflib
import runpy
from pathlib import Path

import pytest
import torch

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


def test_the_ported_scripts_run_against_a_server(
    sqlite_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each script runs as ``python script.py`` would (``__main__``), in this process: three
    interpreters importing torch and scikit-learn cost more than the trials themselves."""
    monkeypatch.setenv("HPO_URL", sqlite_server.url)
    monkeypatch.setenv("HPO_TOKEN", sqlite_server.token)
    monkeypatch.setenv("HPO_OPTUNA_MAX_TRIALS", "3")  # each script's n_trials, capped
    threads = torch.get_num_threads()  # the torch script sets 1 for itself
    outputs = {}
    try:
        for name in SCRIPTS:
            runpy.run_path(str(HERE / name), run_name="__main__")
            outputs[name] = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
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
