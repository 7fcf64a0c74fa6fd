"""Which source for which target: the source x target matrix of AULC gains, the best source per
target, and whether a cheap transferability score could have picked it.

Every choice is made on validation (Agostinelli et al. 2022 found that no score wins
everywhere, so the scores are checked here against gains measured on the user's own data):
- a (source, target) pair's strategy is the one with the best validation AULC (ties: the
  simpler strategy), and its gain is that strategy's paired test AULC gain over scratch: per
  seed, the area under the transfer run's learning curve minus scratch's (the same subsets),
  with a t-interval over seeds and a verdict;
- a target's best source is the one whose chosen strategy has the best validation AULC.
A score's agreement with the gains is Kendall's tau across (source, target) pairs, with a
bootstrap interval, and the share of targets where the score's top source is the one with the
largest measured gain (a test-split figure: it judges the score, it chooses nothing).
"""

from __future__ import annotations

import pandas as pd

from tasks.analysis.statistics import area_under_curve, paired_difference, points, verdict
from tasks.analysis.transferability import rank_agreement

SCORES = ["logme", "h_score", "leep"]
# ties between strategies go to the simpler one: fewer trained parameters, then fewer steps
SIMPLICITY = ["linear_probe", "partial", "finetune", "lp_ft"]


def transfer_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The transfer strategies' rows, with their rank in SIMPLICITY (for breaking ties)."""
    transfer = table[table.strategy != "scratch"]
    return transfer.assign(simplicity=transfer.strategy.map(SIMPLICITY.index))


def _seed_aulcs(results: pd.DataFrame) -> pd.DataFrame:
    """Per target x source x strategy x seed: the test and validation AULC of its runs."""
    rows = [
        {
            **dict(zip(["target", "source", "strategy", "seed"], key, strict=True)),
            "aulc": area_under_curve(runs.n_labels, runs.test_acc),
            "val_aulc": area_under_curve(runs.n_labels, runs.val_acc),
        }
        for key, runs in results.groupby(["target", "source", "strategy", "seed"], sort=False)
    ]
    return pd.DataFrame(rows)


def aulc_gains(results: pd.DataFrame) -> pd.DataFrame:
    """Per target x source x transfer strategy: the paired AULC gain over scratch in points
    (mean over seeds, interval, verdict) and the mean validation AULC it is chosen by."""
    seeds = _seed_aulcs(results)
    scratch = seeds[seeds.strategy == "scratch"].set_index(["target", "seed"])
    rows = []
    transfer = seeds[seeds.strategy != "scratch"]
    for (target, source, strategy), arm in transfer.groupby(
        ["target", "source", "strategy"], sort=False
    ):
        baseline = scratch.loc[[(target, seed) for seed in arm.seed]]
        gain = paired_difference(arm.aulc.to_numpy(), baseline.aulc.to_numpy())
        rows.append(
            {
                "target": target,
                "source": source,
                "strategy": strategy,
                "aulc_gain_pts": points(gain.mean),
                "aulc_gain_pts_ci_low": points(gain.low),
                "aulc_gain_pts_ci_high": points(gain.high),
                "verdict": verdict(gain),
                "val_aulc": arm.val_aulc.mean(),
            }
        )
    return pd.DataFrame(rows)


def source_matrix(gains: pd.DataFrame) -> pd.DataFrame:
    """One row per (target, source): its strategy chosen on validation AULC, with that
    strategy's gain and verdict; `best` marks each target's source chosen on validation."""
    ranked = transfer_rows(gains).sort_values(
        ["val_aulc", "simplicity"], ascending=[False, True], kind="stable"
    )
    chosen = ranked.groupby(["target", "source"], sort=False).head(1)
    best = chosen.groupby("target", sort=False).head(1).index
    matrix = chosen.assign(best=chosen.index.isin(best)).drop(columns="simplicity")
    return matrix.sort_values(["target", "source"], kind="stable", ignore_index=True)


def pair_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (target, source): each score's mean over label budgets and seeds (every source of a
    target is scored on the same subsets)."""
    return scores.groupby(["target", "source"], sort=False)[SCORES].mean().reset_index()


def score_agreement(matrix: pd.DataFrame, scores: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per score: Kendall's tau between its pair means and the pairs' AULC gains, with a 95%
    bootstrap interval, and in how many targets its top source had the largest gain."""
    pairs = matrix.merge(pair_scores(scores), on=["target", "source"], validate="1:1")
    rows = []
    for score in SCORES:
        scored = pairs.dropna(subset=[score])
        agreement = rank_agreement(scored[score], scored.aulc_gain_pts, seed=seed)
        picks = [
            pair.loc[pair[score].idxmax(), "source"]
            == pair.loc[pair.aulc_gain_pts.idxmax(), "source"]
            for _, pair in scored.groupby("target", sort=False)
            if pair.source.nunique() > 1
        ]
        rows.append(
            {
                "score": score,
                "kendall_tau": agreement.tau,
                "tau_ci_low": agreement.low,
                "tau_ci_high": agreement.high,
                "pairs": agreement.n,
                "targets_picked": sum(picks),
                "targets_compared": len(picks),
            }
        )
    return pd.DataFrame(rows)
