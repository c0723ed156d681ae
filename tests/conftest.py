"""Shared fixtures, CPU only. Shared non-fixture helpers (tiny ViTs and configs, the `ssl-kd`
process runner) live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.slurm_cluster import LocalSlurm, SlurmUnavailable, local_slurm


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A one-node Slurm cluster on this machine (tests/slurm_cluster.py), for `slurm` tests.

    Skipped, with the reason, when slurm-wlm and munge cannot be installed or started.
    """
    try:
        with local_slurm(tmp_path_factory.mktemp("slurm")) as cluster:
            yield cluster
    except SlurmUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")
