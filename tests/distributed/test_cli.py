"""The seed's flow from the command line: a Ray cluster already running (``ray start
--head``), then ``optkit generate --cluster ADDRESS`` from another process."""

import os
import subprocess
import sys

import pytest

from optkit.cli import main

pytestmark = pytest.mark.xdist_group("ray")


def test_generate_cli_joins_a_running_cluster(ray_session, weights, capsys):
    address = ray_session.get_runtime_context().gcs_address
    argv = ["generate", "--model", "alpa/opt-tiny", "--path", str(weights), "--prompt",
            "Paris is the capital city of", "--max-new-tokens", "8"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    run = subprocess.run([sys.executable, "-m", "optkit.cli", *argv, "--cluster", address],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["generate", "--model", "jax/opt-tiny", *argv[3:]]) == 0
    here = capsys.readouterr().out
    assert "Paris is the capital city of" in run.stdout
    assert run.stdout.strip().splitlines()[0] == here.strip().splitlines()[0]
