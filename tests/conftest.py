"""Shared fixtures: tiny inputs and the location of ../shared (data and weights beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("FUSIONKIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(
            f"../shared not found at {SHARED} (set FUSIONKIT_SHARED); it holds the real data and weights"
        )
    return SHARED


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
