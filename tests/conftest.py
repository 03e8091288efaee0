"""Shared pytest fixtures: seeded randomness and the golden vectors' location."""

import pathlib

import pytest
import torch

DATA_DIR = pathlib.Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def golden_path() -> pathlib.Path:
    return DATA_DIR / "goft_v1_golden.npz"
