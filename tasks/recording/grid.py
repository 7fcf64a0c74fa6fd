"""One target's fine-tuning grid as records a person can browse (MLflow's runs table):

    finetune <target>                       the stage
      <target>/<source>/<strategy>/<budget> one per source x strategy x label budget (scratch:
        .../s<seed>                         <target>/scratch/<budget>): the mean test accuracy
                                            over seeds, its interval, the paired gain over
                                            scratch and the verdict; beneath it, a run per seed
                                            with its curves, chosen hyperparameters and gain

Why the middle level: it carries the numbers the comparison is made of (the same as a row of
reports/comparison.csv), so that one filter shows a target's strategies side by side at each
budget, with their verdicts, without averaging seed runs by eye; the seed runs stay beneath it
for the curves. Every run has a `level` tag (execution, stage, budget, seed) to filter on.

A source's strategies train together at every budget and seed (one group), so a budget run is
recorded with its seeds when their group comes back; its gain waits for scratch's group (each
seed run's, for scratch's run on the same subset): scratch trains with the first source's.
Scratch's gain is 0: every strategy then has the metrics the compare view plots. Gains are in
accuracy points.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.analysis.statistics import paired_difference, points, snap, t_interval, verdict
from tasks.recording.recorder import LEVEL, Recorder

if TYPE_CHECKING:
    from tasks.finetune import Cell

Key = tuple[str, str, str, int]  # (source, strategy, budget, seed); scratch's source is ""
Group = tuple[str, str, str]  # (source, strategy, budget)


def strategy_params(strategy: str, freeze_blocks: int) -> dict[str, str]:
    """What a strategy starts from and trains, as params: they tell strategies apart in the
    compare view (its plot takes the first params that differ, in alphabetical order)."""
    return {
        "scratch": {"init": "random", "trains": "all layers"},
        "linear_probe": {"init": "pretrained", "trains": "head (frozen features)"},
        "finetune": {"init": "pretrained", "trains": "all layers"},
        "lp_ft": {"init": "pretrained + probe head", "trains": "head, then all layers"},
        "partial": {"init": "pretrained", "trains": f"all but the first {freeze_blocks} block(s)"},
    }[strategy]


class GridRecords:
    """The records of one target's grid under its stage record, as its groups come back."""

    def __init__(self, stage: Recorder, inputs: list[Path], freeze_blocks: int):
        self.stage, self.inputs, self.freeze_blocks = stage, inputs, freeze_blocks
        self.cells: dict[Key, Cell] = {}
        self.budget_runs: dict[Group, Recorder] = {}
        self.seed_runs: dict[Key, Recorder] = {}
        self.budget_gains: set[Group] = set()  # budget runs whose gain is logged
        self.seed_gains: set[Key] = set()  # ...and seed runs

    def add(self, cells: list[Cell]) -> None:
        """Finished cells (one group's, or every cell resumed from a progress file)."""
        groups: dict[Group, list[Cell]] = {}
        for cell in cells:
            self.cells[cell.key] = cell
            groups.setdefault(cell.key[:3], []).append(cell)
        for group, members in groups.items():
            gain = self._budget_gain(group)
            run = self._record_budget(group, members, gain)
            self.budget_runs[group] = run
            if gain is not None:
                self.budget_gains.add(group)
            for cell in members:
                seed_gain = self._seed_gain(cell.key)
                self.seed_runs[cell.key] = self._record_seed(run, cell, seed_gain)
                if seed_gain is not None:
                    self.seed_gains.add(cell.key)
        self._log_late_gains()

    def _log_late_gains(self) -> None:
        """The gains of runs recorded before scratch's group was in."""
        for group, run in self.budget_runs.items():
            if group not in self.budget_gains and (gain := self._budget_gain(group)):
                metrics, tags = gain
                run.log(metrics=metrics, tags=tags)
                self.budget_gains.add(group)
        for key, run in self.seed_runs.items():
            if key not in self.seed_gains and (seed_gain := self._seed_gain(key)) is not None:
                run.log(metrics={"gain_pts": seed_gain})
                self.seed_gains.add(key)

    def _seed_gain(self, key: Key) -> float | None:
        _, _, budget, seed = key
        scratch = self.cells.get(("", "scratch", budget, seed))
        if scratch is None:
            return None
        difference = self.cells[key].row["test_acc"] - scratch.row["test_acc"]
        return points(float(snap(difference)))

    def _seeds(self, group: Group) -> list[Cell]:
        return [cell for key, cell in sorted(self.cells.items()) if key[:3] == group]

    def _budget_gain(self, group: Group) -> tuple[dict, dict] | None:
        """The paired gain over scratch across seeds, and its verdict, once scratch is in."""
        _, strategy, budget = group
        ours, scratch = self._seeds(group), self._seeds(("", "scratch", budget))
        if len(scratch) < len(ours):
            return None
        if strategy == "scratch":
            return {"gain_pts": 0.0}, {"verdict": "baseline"}
        gain = paired_difference(
            [c.row["test_acc"] for c in ours], [c.row["test_acc"] for c in scratch]
        )
        metrics = {"gain_pts": points(gain.mean)}
        if not pd.isna(gain.low):
            metrics |= {"gain_pts_ci_low": points(gain.low), "gain_pts_ci_high": points(gain.high)}
        return metrics, {"verdict": verdict(gain)}

    def _record_budget(
        self, group: Group, members: list[Cell], gain: tuple[dict, dict] | None
    ) -> Recorder:
        source, strategy, budget = group
        first = members[0].row
        accuracy = t_interval([c.row["test_acc"] for c in members])
        metrics = {"test/acc_mean": accuracy.mean}
        if not pd.isna(accuracy.low):
            metrics |= {"test/acc_ci_low": accuracy.low, "test/acc_ci_high": accuracy.high}
        metrics["val/acc_mean"] = sum(c.row["val_acc"] for c in members) / len(members)
        tags = {"target": first["target"], "strategy": strategy, LEVEL: "budget"}
        tags |= {"source": source} if source else {}
        if gain is not None:
            metrics |= gain[0]
            tags |= gain[1]
        keys = ("target", "source", "strategy", "budget", "n_labels", "per_class")
        params = {k: first[k] for k in keys}
        params |= {"n_seeds": len(members)} | strategy_params(strategy, self.freeze_blocks)
        return self.stage.finished(
            "/".join([first["target"], *filter(None, [source]), strategy, budget]),
            min(c.started for c in members),
            max(c.ended for c in members),
            tags=tags,
            params=params,
            metrics=metrics,
        )

    def _record_seed(self, budget_run: Recorder, cell: Cell, gain: float | None) -> Recorder:
        """One finished run per seed, timed as its training was. Its curves are the chosen
        learning rate's epochs, and every learning rate's under `lr_<lr>/` (one chart per
        metric shows them side by side), with the chosen one in the tag `chosen_lr`: in the same
        request, where runs of their own would cost three requests each."""
        row = cell.row
        transfer = row["strategy"] != "scratch"
        path = [row["target"], *filter(None, [row["source"]]), row["strategy"], row["budget"]]
        name = "/".join([*path, f"s{row['seed']}"])
        tags = {"target": row["target"], "strategy": row["strategy"], LEVEL: "seed"}
        tags |= {"source": row["source"]} if row["source"] else {}
        tags["kind"] = "transfer" if transfer else "scratch"
        keys = ["target", "source", "strategy", "budget", "seed", "n_labels", "per_class"]
        params: dict[str, Any] = {k: row[k] for k in keys}
        params |= strategy_params(row["strategy"], self.freeze_blocks)
        # the hyperparameters it has, chosen on validation ("tuned." sorts them after the
        # params that tell strategies apart: a strategy without one shows a gap in the plot)
        params |= {f"tuned.{k}": row[k] for k in ("lr", "l2") if not pd.isna(row[k])}
        # test/acc first: the compare view plots the first metric every run has
        metrics = {"test/acc": row["test_acc"]}
        if gain is not None:
            metrics["gain_pts"] = gain
        # the chosen epoch's; the history's val/acc shows the last epoch's in MLflow
        metrics |= {"best/val_acc": row["val_acc"], "best/val_loss": row["val_loss"]}
        history = [dict(epoch) for epoch in cell.history]
        epoch_ends = list(cell.epoch_ends)
        for curve in cell.curves:
            prefix = f"lr_{curve['lr']:g}/"
            metrics |= {f"{prefix}best/val_acc": curve["val_acc"]}
            metrics |= {f"{prefix}best_epoch": curve["best_epoch"]}
            history += [{} for _ in range(len(curve["history"]) - len(history))]
            for epoch, values in enumerate(curve["history"]):
                history[epoch] |= {prefix + key: value for key, value in values.items()}
            # the learning rates of a seed train in one stack: their epochs end together
            epoch_ends = max(epoch_ends, curve["epoch_ends"], key=len)
        if cell.curves:
            tags["chosen_lr"] = f"{row['lr']:g}"
        return budget_run.finished(
            name,
            cell.started,
            cell.ended,
            tags=tags,
            params=params,
            metrics=metrics,
            history=history,
            epoch_ends=epoch_ends,
            inputs=self.inputs,
        )
