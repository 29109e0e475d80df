"""Fixtures shared by the test files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread while a test module runs, the count restored after
    it: tiny models run fastest so, and the test machine's cores are shared.
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # here, not at collection: torch-free test modules stay torch-free

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
