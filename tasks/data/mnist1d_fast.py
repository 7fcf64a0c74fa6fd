"""A vectorised MNIST-1D generator: the distribution of `mnist1d.data.make_dataset` (0.0.2.post1)
without its Python loop over examples.

Every step of `mnist1d.transform.transform` is applied to all examples at once: pad each template
with a random number of zeros, stretch it to `template_len + padding[1]` points, scale, roll,
replace the exact zeros with smoothed gaussian noise, add iid noise, shear, and resample to
`final_seq_length` points. The dataset is then shuffled, optionally permuted along the sequence,
standardised as a whole and cut at `train_split`, as the reference does.

The output is NOT bit-identical to the reference's: the random numbers come from
`numpy.random.default_rng(seed)` in another order. Given the same draws, `transform_batch` agrees
with the reference transform to rounding (tests/test_mnist1d_fast.py replays the reference's draws
to check it), so the two generators sample the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter1d

EPS = 1e-8  # the reference's offset, so that no template point is an exact zero (mask below)


@dataclass(frozen=True)
class Draws:
    """The random numbers behind n examples; L = template_len + padding[1]."""

    pad: np.ndarray  # (n,) int: zeros appended to the template, in [padding[0], padding[1]]
    scale: np.ndarray  # (n,) float: amplitude factor, 1 + scale_coeff * (u - 0.5)
    shift: np.ndarray  # (n,) int: roll to the right, in [0, max_translation)
    corr: np.ndarray  # (n, L) standard normal, smoothed into the correlated noise
    iid: np.ndarray  # (n, L) standard normal
    shear: np.ndarray  # (n,) float: slope, shear_scale * (u - 0.5)


def draw(rng: np.random.Generator, n: int, args: dict[str, Any]) -> Draws:
    low, high = args["padding"]
    length = args["template_len"] + high
    return Draws(
        pad=rng.integers(low, high + 1, size=n),
        scale=1 + args["scale_coeff"] * (rng.random(n) - 0.5),
        shift=rng.integers(0, args["max_translation"], size=n),
        corr=rng.standard_normal((n, length)),
        iid=rng.standard_normal((n, length)),
        shear=args["shear_scale"] * (rng.random(n) - 0.5),
    )


def interpolate_rows(x: np.ndarray, lengths: np.ndarray | int, out_len: int) -> np.ndarray:
    """Row i's first lengths[i] values (x: (n, W)), linearly resampled at out_len equally spaced
    points from its first to its last value: scipy's interp1d on linspace(0, 1, ...) grids.
    lengths: (n,) or one length for all rows. Returns (n, out_len)."""
    lengths = np.asarray(lengths).reshape(-1, 1)  # (n, 1) or (1, 1)
    # position k * (len - 1) / (out_len - 1) in integers, so that grid points are hit exactly
    num = np.arange(out_len) * (lengths - 1)  # (n or 1, out_len)
    lo = np.minimum(num // (out_len - 1), lengths - 2)  # left neighbour
    w = (num - lo * (out_len - 1)) / (out_len - 1)  # weight of the right neighbour, in [0, 1]
    left = np.take_along_axis(x, lo, axis=1)  # (n, out_len)
    right = np.take_along_axis(x, lo + 1, axis=1)
    return left * (1 - w) + right * w


def roll_rows(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Row i of x (n, L) rolled right by shift[i]; like the reference, a shift >= L is none."""
    length = x.shape[1]
    shift = np.where(shift < length, shift, 0)[:, None]  # (n, 1)
    return np.take_along_axis(x, (np.arange(length) - shift) % length, axis=1)


def stretch_templates(templates: np.ndarray, args: dict[str, Any]) -> np.ndarray:
    """Each template (C, T) padded with each allowed number of zeros and stretched to
    L = template_len + padding[1] points: (C, P, L), P = padding[1] - padding[0] + 1."""
    classes, template_len = templates.shape
    low, high = args["padding"]
    padded = np.zeros((classes, template_len + high))  # (C, T + padding[1])
    padded[:, :template_len] = templates + EPS
    lengths = template_len + np.arange(low, high + 1)  # (P,)
    rows = np.repeat(padded, len(lengths), axis=0)  # (C * P, T + padding[1])
    stretched = interpolate_rows(rows, np.tile(lengths, classes), args["template_len"] + high)
    return stretched.reshape(classes, len(lengths), -1)


def transform_batch(
    templates: np.ndarray, index: np.ndarray, draws: Draws, args: dict[str, Any]
) -> np.ndarray:
    """`mnist1d.transform.transform` of templates[index[i]] (templates: (C, T), index: (n,)) for
    every i at once, given the draws. Returns (n, final_seq_length)."""
    length = args["template_len"] + args["padding"][1]  # L
    # only C * P distinct stretched signals: stretch those, then pick one per example
    stretched = stretch_templates(templates, args)  # (C, P, L)
    signal = stretched[index, draws.pad - args["padding"][0]]  # (n, L)
    signal *= draws.scale[:, None]
    signal = roll_rows(signal, draws.shift)  # (n, L)
    # noise only where the (padded, stretched, rolled) signal is an exact zero
    corr = gaussian_filter1d(
        args["corr_noise_scale"] * draws.corr, 2, axis=-1, mode="reflect", truncate=4.0
    )  # (n, L)
    np.copyto(signal, corr, where=signal == 0)
    signal += args["iid_noise_scale"] * draws.iid
    signal -= draws.shear[:, None] * np.linspace(-0.5, 0.5, length)  # shear
    return interpolate_rows(signal, length, args["final_seq_length"])  # (n, final)


def make_dataset_fast(
    args: dict[str, Any], templates: dict[str, np.ndarray] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """`mnist1d.data.make_dataset` vectorised. args: the keys of `get_dataset_args(as_dict=True)`;
    templates: `get_templates()` or a subset of its rows; seed: args["seed"] when None.
    Returns x, x_test (N, final_seq_length) float64; y, y_test (N,); t (final_seq_length,);
    templates; N = num_samples // classes * classes, cut at int(N * train_split)."""
    if templates is None:
        from mnist1d.data import get_templates  # here: mnist1d's import pulls in matplotlib

        templates = get_templates()
    rng = np.random.default_rng(args["seed"] if seed is None else seed)
    classes = len(templates["y"])
    index = rng.permutation(np.repeat(np.arange(classes), args["num_samples"] // classes))  # (N,)
    xs = transform_batch(templates["x"], index, draw(rng, len(index), args), args)  # (N, final)
    ys = templates["y"][index]  # (N,)
    if args["shuffle_seq"]:
        xs = xs[:, rng.permutation(args["final_seq_length"])]
    t = np.asarray(templates["t"], dtype=float)[None]  # (1, template_len)
    t = interpolate_rows(t, t.shape[1], args["template_len"] + args["padding"][1])
    t = interpolate_rows(t, t.shape[1], args["final_seq_length"])[0]  # (final_seq_length,)
    std = xs.std()
    xs = (xs - xs.mean()) / std
    cut = int(len(ys) * args["train_split"])
    return {
        "x": xs[:cut],
        "x_test": xs[cut:],
        "y": ys[:cut],
        "y_test": ys[cut:],
        "t": t / std,
        "templates": templates,
    }
