"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator

# No test reaches the Hugging Face Hub: set before huggingface_hub is imported (it reads this once).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny models train much faster on one thread (and do not fight
    other processes for cores). Used with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
