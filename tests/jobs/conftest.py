"""Shared by the job tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Two torch threads on 2 cores shared with other processes spin-wait badly; one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
