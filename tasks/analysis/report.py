"""reports/report.md: the study's answer, readable on its own (tables, figures, method); and
report.html, the same page with its figures inlined, which opens anywhere (MLflow's artifact
viewer included) without the plots folder beside it."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from tasks.analysis.statistics import CONFIDENCE, NO_VARIATION
from tasks.config.params import (
    AUDIO_KINDS,
    FOLDER_KINDS,
    IMAGE_BACKBONES,
    DatasetSpec,
    Params,
    ParamsOrigin,
)
from tasks.data.datasets import load_meta
from tasks.data.sources import datasets
from tasks.data.synthesis import recorded_version
from tasks.recording.lineage import md5
from tasks.workspace.layout import Layout

if TYPE_CHECKING:
    from tasks.compare import Comparison

FRESH_LAYER = (
    "A target the pretrained input layer cannot take gets a fresh one (seed 0 in every run, so "
    "the probe's features are the ones fine-tuning starts from), trained at the head's "
    "learning rate and never frozen; every other layer keeps its pretrained weights."
)
SHAPES = {  # what input shapes each backbone's pretrained input layer takes
    "cnn1d": "The backbone pools over time, so a target may have any length; its input layer "
    f"takes the source's channel count. {FRESH_LAYER}",
    "mlp": f"The backbone flattens C x L, so its input layer takes the source's shape only. "
    f"{FRESH_LAYER}",
    "transformer": "Every text is encoded by the tokenizer trained on the source's training "
    "texts, to the same number of tokens, so the encoder takes every target as it is; its "
    "features are the mean of its last layer over a text's tokens (padding excluded).",
    "pretrained": "Every text is encoded by the off-the-shelf encoder's own tokenizer, to the "
    "same number of tokens; its features are the mean of its last layer over a text's tokens "
    "(padding excluded).",
    "timm": "`prepare` makes every image the same size and channel count (params `image`), so "
    "the network takes every target as it is; its features are timm's global average pool of "
    "its last stage. Blocks (for `partial` and layer-wise decay) are timm's feature stages, the "
    "stem first.",
}

SHAPE_NAMES = {  # what a dataset's input shape counts, by backbone
    **{"cnn1d": "(C, L)", "mlp": "(C, L)", "timm": "(C, H, W)"},
    **{"transformer": "tokens", "pretrained": "tokens"},
}


@dataclass(frozen=True)
class Context:
    """What the report says about the execution that made it, so that a stale report can
    never pass for a new one."""

    execution: str | None  # the MLflow parent run's id (None: not tracked)
    params_origin: ParamsOrigin | None  # the params file, its hash and overrides
    datasets: list[str]  # one line per dataset: where it came from, its shape and classes
    notes: dict[str, list[str]] = field(default_factory=dict)  # per target: data caveats
    failed: dict[str, str] = field(default_factory=dict)  # target -> its error


def describe_datasets(params: Params, layout: Layout) -> list[str]:
    """A line per dataset: its params key, its file and md5 (or its generator), shape and class
    names as stored."""
    lines = []
    for name, (spec, key) in datasets(params).items():
        meta = load_meta(layout.prepared(name))
        if spec.kind == "fortunes":
            cipher = f", letters enciphered (seed {spec.cipher_seed})" if spec.cipher_seed else ""
            read = meta.get("files_md5", {})  # file -> md5
            hashes = ", ".join(v[:8] for v in read.values())
            origin = f"Debian's fortune files in `{spec.fortunes_dir}` (md5 {hashes}){cipher}"
        elif spec.corpus is not None:
            origin = _corpus(params, spec.corpus, layout)
        elif spec.kind in FOLDER_KINDS:  # a folder: its files' md5s, where few
            hashes = ", ".join(v[:8] for v in meta.get("files_md5", {}).values())
            origin = f"{spec.kind} folder `{spec.path}`" + (f" (md5 {hashes})" if hashes else "")
        elif spec.path is not None:
            origin = f"`{spec.path}` (md5 {md5(spec.path)})"
        else:
            origin = f"built-in `{spec.kind}` generator, seed {spec.generator_args.seed}"
        if spec.scramble_seed is not None:
            cells = "spectrogram cells" if spec.kind in AUDIO_KINDS else "pixels"
            origin += f", {cells} scrambled (seed {spec.scramble_seed})"
        classes = ", ".join(f"`{c}`" for c in meta["classes"])
        shape = "x".join(map(str, meta["input_shape"]))
        shape = f"{_shape_name(params, spec)} {shape}"
        sizes = ", ".join(f"{k} {v}" for k, v in meta["sizes"].items())
        role = f"; {_pretraining(params, name, meta)}" if name in params.sources else ""
        lines.append(f"- `{key}`: {origin}; {shape}; {sizes}; classes {classes}{role}")
    for name, spec in params.sources.items():
        if spec.kind == "joint":
            meta = load_meta(layout.prepared(name))
            sizes = ", ".join(f"{k} {v}" for k, v in meta["sizes"].items())
            members = ", ".join(f"`{m}`" for m in spec.of or [])
            lines.append(
                f"- `sources.{name}`: the union of {members}, each one's classes kept apart; "
                f"{sizes}; {_pretraining(params, name, meta)}"
            )
    return lines


def _augmentation(params: Params) -> list[str]:
    """The method's line on augmentation: images only, where params declare some."""
    steps = params.finetune.augment
    if not steps:
        return []
    named = ", ".join(f"`{name}({args or ''})`" for step in steps for name, args in step.items())
    return [
        f"- **Augmentation.** Every network strategy, scratch included, trains on training "
        f"images transformed by torchvision's {named}, a draw per image; validation and test "
        "images are never transformed."
    ]


def _shape_name(params: Params, spec: DatasetSpec) -> str:
    """What the input shape counts: sounds are log-mel spectrograms."""
    if spec.kind not in AUDIO_KINDS:
        return SHAPE_NAMES[params.model.backbone]
    image = params.model.backbone in IMAGE_BACKBONES  # the spectrogram as an image
    return "log-mel (1, mel bands, frames)" if image else "log-mel (mel bands, frames)"


def _corpus(params: Params, corpus: str, layout: Layout) -> str:
    """A synthesised corpus: who spoke which words, and with what variation."""
    spec = params.synthesis[corpus]
    version = recorded_version(layout.synthesizer_version(corpus))
    words = ", ".join(f"{label}: {word}" for label, word in spec.words.items())
    return (
        f"spoken-word corpus `{corpus}` synthesised offline by {version}, language "
        f"{spec.language}, voices {', '.join(spec.voices)}, {spec.per_word} sounds per word "
        f"({words}); each drew a rate x{spec.rate[0]:g}-{spec.rate[1]:g}, pitch "
        f"x{spec.pitch[0]:g}-{spec.pitch[1]:g}, noise at {spec.snr_db[0]:g}-{spec.snr_db[1]:g} "
        f"dB SNR and gain {spec.gain_db[0]:g} to {spec.gain_db[1]:g} dB; "
        f"read at {params.audio.sample_rate} Hz, the first {params.audio.duration:g} s"
    )


def _pretraining(params: Params, name: str, source_meta: dict) -> str:
    """How the backbone came from source `name`: trained on its labels, on two augmented views
    of each example, or on its masked tokens, or not at all (an off-the-shelf encoder, named by
    its weights' hash)."""
    if "pretrained" in source_meta:
        origin = source_meta["pretrained"]
        return (
            f"**not pretrained here**: the off-the-shelf weights `{origin['path']}` (sha256 "
            f"{origin['sha256'][:12]}) stand in for it; "
            + ("only its texts were tokenised" if "tokens" in source_meta else "unused")
        )
    objective = params.sources[name].objective_or(params.pretrain.objective)
    if objective == "mlm":
        return "pretrained by masked-language modelling on its texts (labels unused)"
    if objective == "contrastive":
        return (
            "pretrained contrastively (SimCLR's NT-Xent on two augmented views, temperature "
            f"{params.pretrain.temperature:g}; labels unused)"
        )
    return "pretrained on its labels"


def _points(value: float) -> str:
    return f"{value:+.1f}"


def _interval(low: float, high: float) -> str:
    if pd.isna(low):
        return "n/a (one seed)"
    return f"[{_points(low)}, {_points(high)}]"


def read_verdicts(path: Path) -> pd.DataFrame:
    """reports/verdicts.csv as `compare` wrote it (target names stay strings)."""
    return pd.read_csv(
        path,
        dtype={"target": str, "source": str, "strategy": str, "arm": str, "verdict": str},
        keep_default_na=False,
        na_values={"gain_pts_ci_low": [""], "gain_pts_ci_high": [""]},
    )


def verdict_table(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdict table as people read it: per target and label budget, the transfer strategy
    with the best validation accuracy, its paired gain over scratch and what the interval says."""
    return pd.DataFrame(
        {
            "target": verdicts.target,
            "budget": verdicts.budget,
            "labels": verdicts.n_labels,
            "per class": verdicts.per_class,
            "best transfer (on val)": verdicts.arm,
            "test acc": verdicts.test_acc_mean.map("{:.3f}".format),
            "scratch": verdicts.scratch_acc_mean.map("{:.3f}".format),
            "gain, points": verdicts.gain_pts.map(_points),
            f"{CONFIDENCE:.0%} CI": [
                _interval(lo, hi)
                for lo, hi in zip(verdicts.gain_pts_ci_low, verdicts.gain_pts_ci_high, strict=True)
            ],
            "verdict": verdicts.verdict,
        }
    )


def summary_markdown(summary: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "target": summary.target,
            "strategy": summary.arm,
            "AULC": summary.aulc.map("{:.3f}".format),
            "AULC gain, points": summary.aulc_gain_pts.map(_points),
            "data multiplier, fewest labels": summary.data_multiplier_at_fewest_labels,
            "data multiplier, most labels": summary.data_multiplier_at_most_labels,
        }
    )
    return shown.to_markdown(index=False, disable_numparse=True)


def _header(context: Context) -> list[str]:
    origin = context.params_origin
    params_line = "given in code"
    if origin:
        overrides = ", ".join(f"`--set {o}`" for o in origin.overrides)
        params_line = f"`{origin.path}` (sha256 {origin.sha256[:12]})"
        params_line += f" with {overrides}" if overrides else ""
    lines = [
        f"Execution: MLflow run `{context.execution or 'not tracked'}`. Params: {params_line}.",
        "",
        "Data:",
        "",
        *context.datasets,
        "",
    ]
    if context.failed:
        lines += [
            "**Failed targets**, left out of every table below:",
            "",
            *(f"- `{target}`: {error}" for target, error in context.failed.items()),
            "",
        ]
    return lines


def source_matrix_markdown(sources: pd.DataFrame) -> str:
    """Targets as rows, sources as columns: each pair's AULC gain with its interval, verdict
    and strategy (chosen on validation); the target's best source (on validation) in bold."""
    texts = []
    for row in sources.itertuples():
        interval = _interval(row.aulc_gain_pts_ci_low, row.aulc_gain_pts_ci_high)
        text = f"{_points(row.aulc_gain_pts)} {interval} {row.verdict} ({row.strategy})"
        texts.append(f"**{text}**" if row.best else text)
    cells = sources.assign(text=texts)
    matrix = cells.pivot(index="target", columns="source", values="text")
    best = sources[sources.best].set_index("target").source
    matrix["best source (on val)"] = best
    return matrix.reset_index().to_markdown(index=False, disable_numparse=True)


def agreement_markdown(agreement: pd.DataFrame) -> str:
    shown = pd.DataFrame(
        {
            "score": agreement.score,
            "Kendall's tau": agreement.kendall_tau.map(
                lambda tau: "n/a" if pd.isna(tau) else f"{tau:+.2f}"
            ),
            f"{CONFIDENCE:.0%} bootstrap interval": [
                "n/a" if pd.isna(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
                for lo, hi in zip(agreement.tau_ci_low, agreement.tau_ci_high, strict=True)
            ],
            "pairs": agreement.pairs,
            "picked the best source": [
                f"{p} of {n} targets" if n else "n/a (fewer than two sources scored)"
                for p, n in zip(agreement.targets_picked, agreement.targets_compared, strict=True)
            ],
        }
    )
    return shown.to_markdown(index=False, disable_numparse=True)


def _multiplier(value: float) -> str:
    return "never" if pd.isna(value) else f"{value:.2f}x"


def compute_markdown(compute: pd.DataFrame, sources: pd.DataFrame) -> str:
    """The compute table for each (target, source) pair's chosen strategy, budget by budget."""
    chosen = sources[["target", "source", "strategy"]]
    rows = compute.merge(chosen, on=["target", "source", "strategy"], validate="m:1")
    shown = pd.DataFrame(
        {
            "target": rows.target,
            "source": rows.source,
            "strategy": rows.strategy,
            "budget": rows.budget,
            "reached": [f"{r}/{n}" for r, n in zip(rows.seeds_reached, rows.n_seeds, strict=True)],
            "steps: scratch / transfer": [
                f"{s:.0f} / {'n/a' if pd.isna(t) else f'{t:.0f}'}"
                for s, t in zip(rows.scratch_steps, rows.steps, strict=True)
            ],
            "seconds: scratch / transfer": [
                f"{s:.2f} / {'n/a' if pd.isna(t) else f'{t:.2f}'}"
                for s, t in zip(rows.scratch_seconds, rows.seconds, strict=True)
            ],
            "multiplier, steps": [
                "n/a" if strategy == "linear_probe" else _multiplier(value)
                for strategy, value in zip(rows.strategy, rows.multiplier_steps, strict=True)
            ],
            "multiplier, seconds": rows.multiplier_seconds.map(_multiplier),
            "with pretraining, amortised": rows.multiplier_with_pretraining.map(_multiplier),
            "paid off": rows.paid_off.map({True: "yes", False: "no"}),
        }
    )
    return shown.to_markdown(index=False, disable_numparse=True)


def compute_verdicts(compute: pd.DataFrame, params: Params) -> list[str]:
    """A line per source: in how many cells its pretraining paid for itself in compute."""
    lines = []
    for source, cells in compute.groupby("source", sort=False):
        paid = int(cells.paid_off.sum())
        lines.append(
            f"- `{source}`: pretraining paid for itself in compute in {paid} of {len(cells)} "
            f"cells (target x strategy x budget), its cost shared by {len(params.targets)} "
            "targets."
        )
    return lines


def render(params: Params, targets: list[str], result: Comparison, context: Context) -> str:
    """report.md for the `targets` that finished."""
    cfg = params.finetune
    verdicts, summary = result.verdicts, result.summary
    lines = [
        "# Does pretraining on the sources help the targets?",
        "",
        *_header(context),
        "## Verdict",
        "",
        "Transfer **helps** where the whole paired 95% interval of (transfer - scratch) lies",
        "above zero, **hurts** (negative transfer) where it lies below, and otherwise makes **no",
        f"significant difference**; **{NO_VARIATION}** where the gain was the same on every",
        "seed, so the interval has no width and says nothing. Gains within 1e-6 are zero. The",
        "strategy shown is the one with the best mean *validation* accuracy (ties: the lower",
        "mean validation loss, then the simpler strategy: linear_probe, partial, finetune,",
        "lp_ft), so the test split chooses nothing here either.",
        "",
        verdict_table(verdicts).to_markdown(index=False, disable_numparse=True),
        "",
        "## Learning-curve summary",
        "",
        "AULC: mean test accuracy over log(labels) (trapezoid area / log range). Data",
        "multiplier (Hernandez et al. 2021): how many times more labels scratch needs to match",
        "the strategy. It is read off a monotone envelope of scratch's learning curve",
        "(interpolated linearly in log labels) pinned at the strategy's budget n: above n the",
        "envelope is scratch's best accuracy from n up to that budget, below n its worst from",
        "that budget up to n. So a positive gain at n always gives a multiplier above 1 and a",
        "negative one below 1. `>` means scratch never gets there within the largest budget,",
        "`<` that scratch is already there at the smallest.",
        "",
        summary_markdown(summary),
        "",
        "## Which source?",
        "",
        "Per target and source: the AULC gain over scratch in points, its paired 95% interval",
        "over seeds (per seed, the transfer curve's area minus scratch's on the same subsets),",
        "the verdict, and the strategy it is for, chosen on validation AULC. In bold, the",
        "target's best source: the one whose chosen strategy has the best validation AULC.",
        "",
        source_matrix_markdown(result.sources),
        "",
        "## Could a cheap score have picked the source?",
        "",
        "Transferability scores computed by `extract` from each source's frozen features on the",
        "target's labelled training examples, at every label budget and seed (the subsets",
        "fine-tuning draws), before any fine-tuning: LogME (You et al. 2021), H-score (Bao et",
        "al. 2019), and LEEP (Nguyen et al. 2020) where the source trained a classifier head",
        "(supervised). A pair's score is its mean over budgets and seeds. Kendall's tau-b",
        "between the scores and the AULC gains above, across (source, target) pairs, with a",
        "percentile bootstrap interval over pairs; and in how many targets the score's top",
        "source had the largest measured gain. Scores of different targets are on different",
        "scales, so tau across pairs mixes them: read the per-target picks beside it.",
        "",
        agreement_markdown(result.agreement),
        "",
        "![scores against gains](plots/scores_vs_gain.png)",
        "",
        "## Compute saved",
        "",
        "What transfer needs to reach scratch's best validation accuracy on the same labelled",
        "subset: optimizer steps and seconds of the epochs until its validation accuracy first",
        "reaches it (scratch: until its best epoch; the probe: its whole L-BFGS fit, seconds",
        "only, for its whole L2 grid; lp_ft's steps leave out its probe's fit, whose seconds",
        "are spread over its epochs). Multiplier:",
        "scratch's cost / transfer's (above 1: transfer is cheaper), the geometric mean over",
        "the seeds that reached it. With pretraining: transfer's seconds",
        "plus the source's pretraining seconds shared by the targets. Seconds are each run's",
        "share of its group's training time, by optimizer steps (a group's runs train",
        "together): measured (in the flow, groups share the cores), so",
        "they vary between executions and orchestrators; read them as indicative, the steps as",
        "exact. Shown: each pair's chosen strategy; every cell is in reports/compute.csv.",
        "",
        *compute_verdicts(result.compute, params),
        "",
        compute_markdown(result.compute, result.sources),
        "",
    ]
    for target in targets:
        notes = context.notes.get(target, [])
        lines += [
            f"## {target}",
            "",
            *(line for note in notes for line in (f"> **Note:** {note}.", "")),
            f"![learning curves](plots/{target}_curves.png)",
            f"![gain over scratch](plots/{target}_gain.png)",
            "",
            f"![features vs raw inputs](plots/{target}_features.png)",
            "",
        ]
    lines += [
        "## Method",
        "",
        f"- **Splits.** Each target is cut once into stratified train / val / test "
        f"({1 - params.split.val - params.split.test:.0%} / {params.split.val:.0%} / "
        f"{params.split.test:.0%}, seed {params.split.seed}), unless it ships its own test "
        "arrays; the source into train / val only (pretraining scores the source's own test "
        "arrays when it ships them).",
        f"- **Shapes.** {SHAPES[params.model.backbone]}",
        f"- **Label budgets.** Fractions {cfg.fractions} of each target's training split "
        f"(stratified, at least one example per class) and {cfg.shots or 'no'} labels per class "
        "(shots; a class with fewer gives all it has). A subset contains every smaller one that "
        "takes no more in any class (5% contains 2%, 10-shot contains 5-shot); budgets that "
        "take the same number of labels are merged into the first listed.",
        f"- **Seeds.** {cfg.seeds}: a seed fixes the label subset, the init and the data order. "
        "The same seed gives every strategy the same subset, so differences are paired.",
        "- **Strategies.** `scratch`: random init, same architecture. `linear_probe`: "
        "L2-regularised logistic regression on the frozen features (L-BFGS). `finetune`: all "
        f"layers from the pretrained weights, the backbone at {cfg.backbone_lr_scale:g} x the "
        f"head's learning rate, times {cfg.layer_decay:g} per block down from the head "
        "(layer-wise decay; 1: none). `lp_ft`: the probe's solution as the head, then "
        f"`finetune` (Kumar et al. 2022). `partial`: `finetune` with the first "
        f"{cfg.freeze_blocks} backbone block(s) frozen (and a text encoder's embeddings).",
        *_augmentation(params),
        f"- **Tuning budget.** Every network strategy, scratch included, tries learning rates "
        f"{cfg.lrs} with Adam, early stopping on validation accuracy (patience "
        f"{cfg.patience}, at most {cfg.max_epochs} epochs); the probe tries L2 strengths "
        f"{cfg.probe_l2}. Choices use the validation split only; the test split is scored "
        "once per run, after them.",
        f"- **Statistics.** Means over seeds with {CONFIDENCE:.0%} Student-t intervals; the gain "
        "is the mean of per-seed differences to scratch with its paired t-interval; relative "
        "error reduction = (scratch error - strategy error) / scratch error.",
        "",
    ]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
blockquote { border-left: 4px solid #e0b000; margin: 1em 0; padding: 0.2em 1em;
             background: #fffbea; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(markdown_text: str, folder: Path) -> str:
    """report.md as one self-contained HTML page: its figures (paths relative to `folder`)
    inlined as data URIs."""
    import markdown  # here only: the stages that do not write reports never need it

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")

    def inline(match: re.Match) -> str:
        data = base64.b64encode((folder / html.unescape(match[1])).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    title = "Does pretraining on the source help the targets?"
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
