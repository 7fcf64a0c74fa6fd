"""Where and how a stage computes: device choice, the intra-op thread count, and torch's
process-wide random generator, shared by the threads a Prefect flow runs groups in."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator, Sequence

import torch

from tasks.config.params import RuntimeParams


def resolve_device(name: str) -> torch.device:
    """'auto' takes cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def configure(runtime: RuntimeParams) -> torch.device:
    """Apply the runtime params to this process and return the device to train on.

    The thread count is part of the result: the same run with 1 and 2 intra-op threads ends
    with different weights on CPU, so every execution path sets the same value from params.
    """
    torch.set_num_threads(runtime.threads)
    device = resolve_device(runtime.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        reuse_freed_memory()
    return device


# glibc's mallopt parameters (malloc.h), and what they are set to
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # bytes: glibc's documented maximum (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 512 << 20  # bytes of free memory at the heap's top kept for reuse


def reuse_freed_memory() -> None:
    """Have glibc's malloc serve tensors of up to 32 MB from its heap and keep freed memory for
    the next ones, rather than map fresh pages for each and unmap them when freed. A stacked
    training step allocates and frees activations of a few MB, and by default every step
    faulted them in again. For 18 members of the default cnn1d, a step took 150 to 550 page
    faults, 0.5 to 1 ms of kernel time and 9.6 to 10.2 ms in all; with this, 8 to 20 faults,
    0.1 ms and 9.1 to 9.3 ms. The cost: a process may keep up to 512 MB of freed memory (a Dask
    worker reports it as unmanaged). Off Linux, or without glibc (musl), nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl has none
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


_PROCESS_RNG = threading.RLock()  # re-entrant: a guarded constructor may build another


@contextlib.contextmanager
def seeded_process_rng(seed: int, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Torch's process-wide generator (and `devices`' CUDA ones), seeded with `seed`, for this
    thread alone, and restored afterwards. For library code that draws from it and takes no
    generator (timm's weight init, torchvision's random transforms): our own draws use
    generators of their own. Two threads both inside would interleave their draws, so they
    take turns; any other code that draws from it unguarded breaks the guarantee."""
    with _PROCESS_RNG, torch.random.fork_rng(devices=list(devices)):
        torch.manual_seed(seed)
        yield
