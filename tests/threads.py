"""Running tiny models on one torch thread."""

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """Tiny models are many small torch ops: on a loaded 2-core machine two OpenMP threads make
    each op wait for a time slice (40 s instead of ~5 s for a test here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
