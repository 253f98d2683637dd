"""Benchmark fixtures: a random opt-tiny weight folder (loads faster than ``dummy=True``)."""

import pytest


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A folder holding random ``opt-tiny-np/`` (vocab 50272, hidden 64, 2 layers)."""
    import numpy as np

    from optkit.config import OPTConfig
    from optkit.weights.random import write_random_folder

    root = tmp_path_factory.mktemp("bench-weights")
    write_random_folder(root / "opt-tiny-np", OPTConfig.from_name("opt-tiny"), seed=0,
                        dtype=np.float32, progress=False)
    return str(root)
