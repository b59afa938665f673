"""deploy/ray/lib.sh's Ray token handling, sourced by bash as the scripts do (no Ray)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.deploy.conftest import DEPLOY


def hpo_ray_token(env: dict[str, str], mode: str = "require") -> subprocess.CompletedProcess:
    script = (
        f'source "{DEPLOY / "ray" / "lib.sh"}"; hpo_ray_token {mode}; echo "$RAY_AUTH_TOKEN_PATH"'
    )
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True
    )


def test_a_token_file_that_is_a_link_to_a_private_file_is_taken(tmp_path: Path) -> None:
    """A mounted Kubernetes secret is a symbolic link (mode 777) to a private file: the mode
    checked is the file's, not the link's (the scripts refused it as readable by all)."""
    secret = tmp_path / "secret"
    secret.write_text("0" * 64)
    secret.chmod(0o600)
    link = tmp_path / "auth_token"
    link.symlink_to(secret)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HPO_RAY_TOKEN_FILE": str(link)}
    result = hpo_ray_token(env)
    assert result.returncode == 0 and result.stdout.strip() == str(link), result.stderr
    secret.chmod(0o644)
    result = hpo_ray_token(env)
    assert result.returncode == 1 and "has mode 644" in result.stderr, result.stderr


def test_without_home_the_token_file_must_be_named(tmp_path: Path) -> None:
    """A systemd unit may run with no HOME: the default ~/.ray/auth_token cannot be found,
    and the script says what to set (it died with "HOME: unbound variable")."""
    result = hpo_ray_token({"PATH": os.environ["PATH"]}, mode="create")
    assert result.returncode != 0
    assert "HOME is unset: set HPO_RAY_TOKEN_FILE or RAY_AUTH_TOKEN" in result.stderr
