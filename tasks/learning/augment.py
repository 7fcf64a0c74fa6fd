"""Augmentation of training images with torchvision.transforms.v2, declared in params
(`pretrain.augment`, `finetune.augment`): the same transforms for every strategy, on the device,
training batches only (validation and test images are never touched).

Each image gets its own random draw. A v2 transform draws its parameters once per call from
torch's process-wide generator, so it is called once per image, with that generator seeded from
the run's seed and the batch's key (epoch and position): the same run draws the same
augmentations in any thread or process, and a resumed run draws what an uninterrupted one
would. Prefect runs groups in threads that share that generator, so the draws of one batch
happen under runtime.seeded_process_rng's lock, and the generator is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tasks.config.params import ParamsError
from tasks.learning.runtime import seeded_process_rng
from tasks.learning.train import TRAIN_KEY, Objective


def build_augmentation(
    augment: list[dict[str, dict[str, Any]]], key: str, shape: tuple[int, ...]
) -> torch.nn.Module | None:
    """The declared transforms (params key `key`) for images of `shape` (C, H, W), composed in
    order; None for none. Raises ParamsError naming the key and entry for an unknown
    transform, args it refuses, or one that fails on such an image or changes its shape or
    dtype (validation and test images are never transformed: they must stay alike)."""
    if not augment:
        return None
    from torchvision.transforms import v2  # a slow import, for image studies only

    steps = []
    for i, entry in enumerate(augment):
        ((name, args),) = entry.items()
        transform = getattr(v2, name, None)
        if not (isinstance(transform, type) and issubclass(transform, v2.Transform)):
            raise ParamsError(
                f"{key}.{i}: {name!r} is not a torchvision.transforms.v2 transform "
                "(e.g. RandomCrop, RandomHorizontalFlip, RandomAffine, ColorJitter)"
            )
        try:
            steps.append(transform(**(args or {})))
            # drawn from a generator of its own, and transformed under the process-wide one's
            # lock: another thread's seeded augmentation may be drawing from that right now
            sample = torch.rand(shape, generator=torch.Generator().manual_seed(0))
            with seeded_process_rng(0):
                out = steps[-1](sample)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ParamsError(f"{key}.{i}: {name}{args or {}}: {err}") from err
        if not (torch.is_tensor(out) and out.shape == sample.shape and out.dtype == sample.dtype):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ParamsError(
                f"{key}.{i}: {name}{args or {}} turns a {tuple(shape)} float image into {got}; "
                "an augmentation must keep the image's shape and type"
            )
    return v2.Compose(steps)


@dataclass(frozen=True)
class Augmented:
    """An objective (tasks.learning.train.Objective) whose training batches are augmented
    first; `base` then makes the model's inputs as it would have."""

    base: Objective
    transform: torch.nn.Module
    seed: int

    def inputs(
        self, x: torch.Tensor, y: torch.Tensor, key: tuple[int, ...]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        if key[0] == TRAIN_KEY:
            x = self.augment(x, key)
        return self.base.inputs(x, y, key)

    def augment(self, x: torch.Tensor, key: tuple[int, ...]) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), each image transformed with its own draw."""
        state = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
        devices = [x.device] if x.device.type == "cuda" else []
        with seeded_process_rng(int(state), devices):
            return torch.stack([self.transform(image) for image in x])
