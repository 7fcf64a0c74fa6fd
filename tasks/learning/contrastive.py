"""Contrastive pretraining, SimCLR's objective (Chen et al. 2020): two random augmentations
("views") of every example go through the backbone and a small projector, and each view must
find its partner among the other 2B - 1 views of the batch by cosine similarity. The loss is
NT-Xent, the normalised temperature-scaled cross-entropy. Labels are not used, so a source
without any can be pretrained; the projector is dropped afterwards and the backbone transfers.

Views are drawn for signals (B, C, L) and images (B, C, H, W) by batched tensor operations, on
any device. Like the MLM objective (tasks/learning/mlm.py), a batch's draw depends only on the
seed and the batch's key (epoch and position), from a CPU generator of its own, never on torch's
process-wide generator (the flow's threads share it) or numpy's: the same seed and key give the
same views bit for bit, a resumed run draws what an uninterrupted one would, and the validation
views are the same at every epoch, so their score is comparable.

Under `fit`, the "accuracy" of a batch is top-1 retrieval: the share of views whose most
similar other view is their partner. It depends on the batch size (more views, more
distractors), so it compares runs of the same batch size only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.models.classifier import reset_parameters

# --- signal views (B, C, L) --------------------------------------------------------------------
# The kinds of augmentation of the time-series recipes TS-TCC (Eldele et al. 2021: jitter and
# scaling) and TF-C (Zhang et al. 2022: jitter, scaling, time shift, cropping). Those papers tune
# the strengths per dataset; these were chosen on MNIST-1D, whose digits are templates
# stretched, circularly shifted and scaled, by the linear probe of a cnn1d backbone after 30
# epochs of contrastive pretraining at temperature 0.1 (tests/test_contrastive.py's acceptance
# test, shorter). Mean probe test accuracy over 6 seeds: a crop of 70-100%, shifts of up to L/8
# and scaling N(1, 0.2): 0.560; these: 0.594; a random backbone: 0.399. Over 3 seeds, jitter 0.3
# or scaling N(1, 0.4) lowered 0.545 to 0.52, and shifts of up to L/2 lowered 0.613 to 0.577.
SIGNAL_CROP = (0.5, 1.0)  # a window of 50-100% of the length, stretched back to L (linear)
SIGNAL_MAX_SHIFT = 1 / 4  # a circular shift of up to L/4 steps either way
SIGNAL_SCALE_SIGMA = 0.1  # amplitude x N(1, 0.1) per example and channel (MNIST-1D's own
# amplitude factor is U(0.8, 1.2): std 0.115)
SIGNAL_JITTER = 0.1  # Gaussian noise, sigma = 0.1 x each channel's std in the example

# --- image views (B, C, H, W), values in [0, 1] ----------------------------------------------
# SimCLR's recipe (its appendix A), milder: no colour distortions that need colour (hue,
# saturation, greyscale) and no blur (for ImageNet-sized images); not tuned on any dataset here.
IMAGE_CROP_AREA = (0.4, 1.0)  # random resized crop: share of the image's area (SimCLR: 0.08-1)
IMAGE_CROP_RATIO = (3 / 4, 4 / 3)  # its width / height, drawn log-uniformly (as torchvision)
IMAGE_FLIP = 0.5  # horizontal flip probability
IMAGE_BRIGHTNESS = (0.6, 1.4)  # x factor (SimCLR's colour jitter 0.8 s at strength s = 0.5)
IMAGE_CONTRAST = (0.6, 1.4)  # blend with the image's mean by factor
IMAGE_NOISE = 0.03  # Gaussian noise sigma, then clamped to [0, 1]

# The similarity of a view to itself, in place of the cosine / temperature: exp of it is exactly
# 0 in float32, so cross-entropy over a row is NT-Xent's sum over the other 2B - 1 views, as
# SimCLR's own code does it (LARGE_NUM = 1e9). A finite value rather than -inf: -inf gives the
# same loss and gradients under plain cross-entropy (exp(-inf) = 0), but NaN (0 x -inf) under
# anything that weighs every logit, e.g. label smoothing or soft targets.
SELF_SIMILARITY = -1e9


@dataclass(frozen=True)
class TwoViews:
    """The contrastive objective (see tasks.learning.train.Objective)."""

    seed: int

    def inputs(
        self, x: torch.Tensor, y: torch.Tensor, key: tuple[int, ...]
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """x: (B, C, L) signals or (B, C, H, W) images in [0, 1] -> ((views (2B, ...),),
        positives (2B,)): views[:B] are the first augmented view of each example, views[B:] the
        second; positives[i] = i + B for i < B and i - B otherwise. Labels y are not used."""
        state = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        both = torch.cat([x, x])  # (2B, ...): each example twice, each copy its own draw
        if x.dim() == 3:
            views = signal_views(both, generator)
        elif x.dim() == 4:
            views = image_views(both, generator)
        else:
            shape = tuple(x.shape)
            raise ValueError(f"contrastive views: expected (B, C, L) or (B, C, H, W), got {shape}")
        b = len(x)
        index = torch.arange(b, device=x.device)
        return (views,), torch.cat([index + b, index])


def _uniform(
    low: float, high: float, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def signal_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x: (N, C, L) -> (N, C, L), each example with its own draw, in this order: a random crop
    stretched back to L, a circular shift, amplitude scaling, jitter. Draws on CPU."""
    n, c, length = x.shape
    # crop: the window [start, start + share] of the series (as shares of its length), sampled
    # at L points by linear interpolation: grid_sample over (N, C, 1, L), where -1 and 1 are the
    # first and last points (align_corners)
    share = _uniform(*SIGNAL_CROP, (n, 1), generator)  # (N, 1)
    start = torch.rand(n, 1, generator=generator) * (1 - share)  # (N, 1)
    most = round(length * SIGNAL_MAX_SHIFT)
    shift = torch.randint(-most, most + 1, (n, 1), generator=generator)  # (N, 1)
    scale = 1 + SIGNAL_SCALE_SIGMA * torch.randn(n, c, 1, generator=generator)  # (N, C, 1)
    noise = torch.randn(x.shape, generator=generator)  # (N, C, L)
    at = 2 * (start + share * torch.linspace(0, 1, length)) - 1  # (N, L), in [-1, 1]
    grid = torch.stack([at, torch.zeros_like(at)], dim=-1)[:, None]  # (N, 1, L, 2): (x, y)
    grid, shift, scale, noise = (t.to(x.device) for t in (grid, shift, scale, noise))
    rows = x[:, :, None, :]  # (N, C, 1, L)
    view = F.grid_sample(rows, grid.to(x.dtype), mode="bilinear", align_corners=True)[:, :, 0]
    # circular shift: view[t] = cropped[t - shift], as torch.roll does per example
    index = (torch.arange(length, device=x.device) - shift) % length  # (N, L)
    view = view.gather(2, index[:, None, :].expand(n, c, length))
    view = view * scale.to(x.dtype)
    sigma = SIGNAL_JITTER * view.std(dim=2, keepdim=True)  # (N, C, 1)
    return view + sigma * noise.to(x.dtype)


def image_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1], each image with its own draw: a
    random resized crop and horizontal flip (one affine resampling, bilinear, border padding:
    the crop lies inside the image, so only the half pixel at its edges can reach outside),
    then brightness and contrast jitter and Gaussian noise, clamped. Draws on CPU."""
    n, c, height, width = x.shape
    area = _uniform(*IMAGE_CROP_AREA, (n,), generator)
    log_ratio = _uniform(*(math.log(r) for r in IMAGE_CROP_RATIO), (n,), generator)
    ratio = log_ratio.exp() * (height / width)  # in pixels: (w * W) / (h * H) = drawn ratio
    # the crop's width and height as shares of the image's (at most all of it)
    w = (area * ratio).sqrt().clamp(max=1)
    h = (area / ratio).sqrt().clamp(max=1)
    cx = (2 * torch.rand(n, generator=generator) - 1) * (1 - w)  # centre in [-1, 1] coords,
    cy = (2 * torch.rand(n, generator=generator) - 1) * (1 - h)  # the crop inside the image
    flip = torch.where(torch.rand(n, generator=generator) < IMAGE_FLIP, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    brightness = _uniform(*IMAGE_BRIGHTNESS, (n, 1, 1, 1), generator)
    contrast = _uniform(*IMAGE_CONTRAST, (n, 1, 1, 1), generator)
    noise = torch.randn(x.shape, generator=generator)
    theta, brightness, contrast, noise = (
        t.to(x.device, x.dtype) for t in (theta, brightness, contrast, noise)
    )
    grid = F.affine_grid(theta, [n, c, height, width], align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = (view * brightness).clamp(0, 1)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    view = ((view - mean) * contrast + mean).clamp(0, 1)
    return (view + IMAGE_NOISE * noise).clamp(0, 1)


class Contrastive(nn.Module):
    """backbone -> 2-layer MLP projector (Linear, ReLU, Linear), L2-normalised; forward(views
    (2B, ...)) -> logits (2B, 2B) = cosine similarities / temperature with each view's
    similarity to itself masked out (so cross-entropy against `positives` is NT-Xent, and
    argmax == positive is top-1 retrieval accuracy). The projector is dropped after
    pretraining: `backbone` is what transfers."""

    def __init__(
        self, backbone: nn.Module, temperature: float, projection_dim: int = 128, seed: int = 0
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be positive, got {temperature}")
        self.backbone = backbone
        self.temperature = temperature
        width = backbone.feature_dim
        # built without an init (skip_init: no draw from torch's process-wide generator, which
        # threads share), then initialised from the seed's own generator
        self.projector = nn.Sequential(
            nn.utils.skip_init(nn.Linear, width, width),
            nn.ReLU(),
            nn.utils.skip_init(nn.Linear, width, projection_dim),
        )
        reset_parameters(self.projector, torch.Generator().manual_seed(seed))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        projected = self.projector(self.backbone(views))  # (2B, projection_dim)
        # similarities in float32 even under bf16 autocast: at temperature 0.1 a bf16 cosine's
        # rounding (~0.004) would move the logits by ~0.04
        with torch.autocast(views.device.type, enabled=False):
            z = F.normalize(projected.float(), dim=1)  # (2B, P), unit rows
            logits = z @ z.T / self.temperature  # (2B, 2B)
        itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
        return logits.masked_fill(itself, SELF_SIMILARITY)
