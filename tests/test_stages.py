"""Each stage function on the tiny params, in order, writing the files of the stage contract."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.analysis.statistics import HELPS, HURTS, NO_DIFFERENCE, NO_VARIATION
from tasks.compare import compare, read_results
from tasks.data.datasets import SPLITS, load_meta, load_split
from tasks.extract import extract
from tasks.finetune import RESULT_COLUMNS, finetune
from tasks.models.classifier import classifier_from_checkpoint
from tasks.prepare import prepare
from tasks.pretrain import pretrain
from tasks.recording.recorder import MemoryRecorder
from tasks.workspace.layout import Layout

RECORDED = MemoryRecorder()  # what the stages recorded, kept in memory


@pytest.fixture(scope="module")
def done(tiny_params, tmp_path_factory) -> Layout:
    """The tiny pipeline run stage by stage through the plain functions, recording in memory."""
    layout = Layout(tmp_path_factory.mktemp("workspace"))
    prepare(tiny_params, layout, RECORDED)
    for source in tiny_params.sources:
        pretrain(tiny_params, source, layout, RECORDED)
    for target in tiny_params.targets:
        extract(tiny_params, target, layout, RECORDED)
        finetune(tiny_params, target, layout, RECORDED)
    compare(tiny_params, layout, RECORDED)
    return layout


def test_prepare_writes_disjoint_stratified_splits(done: Layout, tiny_params) -> None:
    for name in [*tiny_params.sources, *tiny_params.targets]:
        meta = load_meta(done.prepared(name))
        source = name in tiny_params.sources
        assert set(meta["sizes"]) == ({"train", "val"} if source else set(SPLITS))
        splits = {s: load_split(done.prepared(name), s) for s in meta["sizes"]}
        assert all(s.x.shape[1:] == (1, 40) for s in splits.values())
        assert {int(s.y.max()) + 1 for s in splits.values()} == {meta["num_classes"]}
        rows = [tuple(r) for s in splits.values() for r in s.x.reshape(len(s), -1).round(6)]
        assert len(set(rows)) == len(rows)  # no example in two splits
        counts = np.bincount(splits["val"].y)
        assert counts.max() - counts.min() <= 1  # stratified
    assert load_meta(done.prepared("new_classes"))["classes"] == [5, 6, 7, 8, 9]
    # pretraining uses train and val only: no test split is cut from the source
    assert not (done.prepared("digits") / "test.npz").exists()


def test_pretrain_checkpoint_is_self_describing(done: Layout, tiny_params) -> None:
    payload = torch.load(done.checkpoint("digits"), weights_only=True)
    assert payload["arch"]["channels"] == tiny_params.model.channels
    assert payload["params"]["pretrain"]["lr"] == tiny_params.pretrain.lr
    assert 0 < payload["metrics"]["val_acc"] <= 1
    model = classifier_from_checkpoint(done.checkpoint("digits"), num_classes=4, seed=0)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 4)


def test_extract_features_match_the_frozen_backbone(done: Layout) -> None:
    model = classifier_from_checkpoint(done.checkpoint("views"), num_classes=1, seed=0).eval()
    inputs = load_split(done.prepared("shifted"), "val")
    features = load_split(done.features("shifted", "views"), "val")
    np.testing.assert_array_equal(features.y, inputs.y)
    with torch.no_grad():
        expected = model.features(torch.from_numpy(inputs.x)).numpy()
    np.testing.assert_allclose(features.x, expected, rtol=1e-5, atol=1e-6)


def test_finetune_covers_the_grid_once(done: Layout, tiny_params) -> None:
    cfg = tiny_params.finetune
    table = read_results(done.results("new_classes"))
    assert list(table.columns) == RESULT_COLUMNS
    budgets = len(cfg.fractions) + len(cfg.shots)  # none merge at these sizes
    # scratch once, every transfer strategy per source
    arms = 1 + (len(cfg.strategies) - 1) * len(tiny_params.sources)
    assert len(table) == arms * budgets * len(cfg.seeds)
    assert not table.duplicated(["source", "strategy", "budget", "seed"]).any()
    assert set(table[table.strategy == "scratch"].source) == {""}
    assert set(table[table.strategy != "scratch"].source) == set(tiny_params.sources)
    assert table.test_acc.between(0, 1).all()
    # paired: every strategy and seed saw the same number of labels at a budget
    assert table.groupby("budget").n_labels.nunique().eq(1).all()
    assert table[table.strategy == "linear_probe"].l2.isin(cfg.probe_l2).all()
    assert table[table.strategy != "linear_probe"].lr.isin(cfg.lrs).all()


def test_compare_writes_tables_report_plots_metrics(done: Layout, tiny_params) -> None:
    cfg, targets = tiny_params.finetune, list(tiny_params.targets)
    table = pd.read_csv(done.reports / "comparison.csv")
    budgets = len(cfg.fractions) + len(cfg.shots)
    arms = 1 + (len(cfg.strategies) - 1) * len(tiny_params.sources)
    assert len(table) == len(targets) * arms * budgets
    assert table[table.strategy != "scratch"].gain_pts_ci_low.notna().all()  # 2 seeds: an interval
    summary = pd.read_csv(done.reports / "summary.csv")
    assert len(summary) == len(targets) * arms
    sources = pd.read_csv(done.reports / "sources.csv")  # the source x target matrix
    assert len(sources) == len(targets) * len(tiny_params.sources)
    assert sources.groupby("target").best.sum().eq(1).all()  # one best source per target
    agreement = pd.read_csv(done.reports / "transferability.csv")
    assert list(agreement.score) == ["logme", "h_score", "leep"]
    assert agreement.set_index("score").pairs.to_dict() == {
        "logme": 4,
        "h_score": 4,
        "leep": 2,  # the contrastive source trained no head
    }
    compute = pd.read_csv(done.reports / "compute.csv")
    assert len(compute) == len(targets) * (arms - 1) * budgets
    assert (compute.seeds_reached <= compute.n_seeds).all()
    verdicts = pd.read_csv(done.reports / "verdicts.csv")
    assert len(verdicts) == len(targets) * budgets
    assert set(verdicts.verdict) <= {HELPS, HURTS, NO_DIFFERENCE, NO_VARIATION}
    assert (done.reports / "comparison.md").read_text().startswith("| target")
    report = (done.reports / "report.md").read_text()
    for target in targets:
        for kind in ("curves", "gain", "features"):
            png = done.reports / "plots" / f"{target}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"(plots/{target}_{kind}.png)" in report  # the report shows every figure
    assert "## Method" in report and "## Verdict" in report and "## Which source?" in report
    assert "(plots/scores_vs_gain.png)" in report and "## Compute saved" in report
    # the report names the execution that made it and every dataset it read
    assert "Execution: MLflow run `memory:root`" in report
    assert f"`{tiny_params.origin.path}` (sha256 {tiny_params.origin.sha256[:12]})" in report
    for key in [
        *(f"sources.{s}" for s in tiny_params.sources),
        *(f"targets.{t}" for t in targets),
    ]:
        assert f"- `{key}`: built-in `mnist1d` generator" in report
    metrics = json.loads((done.reports / "metrics.json").read_text())
    assert set(metrics) == set(targets)
    for target in targets:  # a few headline numbers per target, for `dvc metrics show`
        assert set(metrics[target]) == {
            "aulc_gain_pts",
            "gain_pts_fewest_labels",
            "gain_pts_most_labels",
        }
    assert RECORDED.metrics.keys() == {f"{t}/{k}" for t in targets for k in metrics[t]}
    best = RECORDED.params["new_classes/best_strategy"]  # source/strategy
    assert best.split("/")[0] in tiny_params.sources
    assert best.split("/")[1] in tiny_params.finetune.strategies
    # report.html: the same report, its figures inlined, readable without the plots folder
    page = (done.reports / "report.html").read_text()
    assert page.count('<img alt="learning curves" src="data:image/png;base64,') == len(targets)
    assert "plots/" not in page and "<table>" in page


def test_each_stage_records_under_the_recorder_it_is_given(done: Layout, tiny_params) -> None:
    stages = [r.tags.get("stage") for r in RECORDED.children]
    targets = list(tiny_params.targets)
    sources = list(tiny_params.sources)
    pretrain = ["pretrain"] * len(sources)
    extract = ["extract"] * len(sources)
    assert stages == ["prepare", *pretrain, *[*extract, "finetune"] * len(targets), "compare"]
    assert all(r.status == "FINISHED" for r in RECORDED.children)
    pretrain_record = RECORDED.children[1]
    epochs = [step for step, key, _ in pretrain_record.history if key == "train/loss"]
    assert epochs == list(range(len(epochs))) and epochs  # one value per epoch, in order
    assert pretrain_record.models == [f"{tiny_params.registered_model}-digits"]


def test_every_cell_is_recorded_with_its_training_time_and_every_lr(
    done: Layout, tiny_params
) -> None:
    cfg = tiny_params.finetune
    results = read_results(done.results("new_classes"))
    cells = RECORDED.find(target="new_classes", kind="scratch") + RECORDED.find(
        target="new_classes", kind="transfer"
    )
    assert len(cells) == len(results)  # each (strategy, budget, seed) once
    for cell in cells:
        started, ended = cell.times
        assert started < ended  # the group's real training time
        row = results[
            (results.source == cell.params["source"])
            & (results.strategy == cell.params["strategy"])
            & (results.budget == cell.params["budget"])
            & (results.seed == cell.params["seed"])
        ].iloc[0]
        assert cell.metrics["test/acc"] == row.test_acc
        scratch = results[
            (results.strategy == "scratch")
            & (results.budget == row.budget)
            & (results.seed == row.seed)
        ].iloc[0]
        # in points, on every strategy's run (scratch's is 0), as the compare view plots it
        assert cell.metrics["gain_pts"] == pytest.approx(100 * (row.test_acc - scratch.test_acc))
        if cell.params["strategy"] == "linear_probe":
            assert "chosen_lr" not in cell.tags and not curve(cell)  # the probe trains no epochs
            continue
        assert cell.tags["chosen_lr"] == f"{row.lr:g}"
        assert curve(cell)  # the chosen lr's epochs, then each lr's under its prefix
        for lr in cfg.lrs:
            prefix = f"lr_{lr:g}/"
            mine = [
                (s, k.removeprefix(prefix), v) for s, k, v in cell.history if k.startswith(prefix)
            ]
            mine = [entry for entry in mine if entry[1] in EPOCH_METRICS]
            assert mine and cell.metrics[f"lr_{lr:g}/best/val_acc"] <= 1
            if lr == row.lr:
                assert mine == curve(cell)


def curve(record: MemoryRecorder) -> list[tuple[int, str, float]]:
    """A record's per-epoch metrics of its chosen run (no summary, no other lr)."""
    return [entry for entry in record.history if entry[1] in EPOCH_METRICS]


EPOCH_METRICS = ("train/loss", "val/loss", "val/acc")
