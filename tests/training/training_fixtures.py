"""Fixtures of the training tests (loaded with ``pytest_plugins = ["training_fixtures"]``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import make_shapes_dataset


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latent/text cache for the whole session: the random EfficientNet runs once per image."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def one_thread():
    """Training steps on tiny models are fastest single-threaded on the shared 2-core machines."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
