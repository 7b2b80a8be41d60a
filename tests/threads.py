"""One torch thread for tests that run models.

On a two-core machine shared with other work (CI, tests running side by side), torch's intra-op
threads wait on each other: SmolLM2's forward passes took 15x longer than with one thread, and for the
tiny random models one thread is as fast anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
