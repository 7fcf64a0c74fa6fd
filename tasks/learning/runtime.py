"""Where and how a stage computes: device choice, the intra-op thread count, and torch's
process-wide random generator, shared by the threads a Prefect flow runs groups in."""

from __future__ import annotations

import contextlib
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
    return device


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
