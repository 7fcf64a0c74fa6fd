"""Where did this number come from? Print an MLflow run's code, data and checkpoint versions and
the commands that reproduce it.

    python -m flows.trace <mlflow-run-id>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.recording.lineage import COMMIT_TAG, DIRTY_TAG, MD5_TAG
from tasks.recording.tracking import PARENT_TAG, tracking_uri


def locked_md5s(lock: Path) -> dict[str, str]:
    """path -> md5 of every file dvc.lock records (folders appear with their .dir hash)."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        entry["path"]: entry.get("md5", "")
        for stage in stages.values()
        for kind in ("deps", "outs")
        for entry in stage.get(kind, [])
    }


def stage_of(lineage: list[dict[str, str]]) -> str | None:
    """The DVC stage that made a run, from the tags of the run and its ancestors, nearest
    first: the nearest `stage` tag (a grid run's is its stage run's, two levels up)."""
    stage = next((tags["stage"] for tags in lineage if "stage" in tags), None)
    target = next((tags["target"] for tags in lineage if "target" in tags), None)
    source = next((tags["source"] for tags in lineage if "source" in tags), None)
    corpus = next((tags["corpus"] for tags in lineage if "corpus" in tags), None)
    if stage in ("extract", "finetune") and target:
        return f"{stage}@{target}"
    if stage == "pretrain" and source:
        return f"{stage}@{source}"
    if stage == "synthesize" and corpus:
        return f"{stage}@{corpus}"
    return stage


def ancestry(client: MlflowClient, tags: dict[str, str]) -> list[dict[str, str]]:
    """The tags of a run (given) and of each of its ancestors, up to its execution's parent."""
    lineage = [tags]
    while parent := lineage[-1].get(PARENT_TAG):
        lineage.append(client.get_run(parent).data.tags)
    return lineage


def trace(run_id: str, lock: Path = Path("dvc.lock")) -> str:
    client = MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    tags = run.data.tags
    locked = locked_md5s(lock)
    commit = tags.get(COMMIT_TAG, "unknown")
    lines = [
        f"run {run_id} ({run.info.run_name}), status {run.info.status}",
        f"  orchestrator: {tags.get('orchestrator', 'unknown')}"
        + (
            f", Prefect flow run {tags['prefect.flow_run_id']}"
            if "prefect.flow_run_id" in tags
            else ""
        ),
        f"  code: git commit {commit}"
        + (" (uncommitted changes!)" if tags.get(DIRTY_TAG) == "true" else ""),
        "  data and checkpoint versions (DVC md5):",
    ]
    for key, digest in sorted(tags.items()):
        if key.startswith(MD5_TAG):
            path = key.removeprefix(MD5_TAG)
            now = locked.get(path)
            note = (
                ""
                if now is None
                else "  = dvc.lock"
                if now == digest
                else f"  (dvc.lock now holds {now})"
            )
            lines.append(f"    {path}  {digest}{note}")
    if run.data.params:
        lines.append(
            "  params: " + ", ".join(f"{k}={v}" for k, v in sorted(run.data.params.items()))
        )
    stage = stage_of(ancestry(client, tags))
    lines += [
        "to reproduce:",
        f"  git checkout {commit}",
        "  dvc pull        # the exact data and checkpoint, if the repo has a DVC remote",
        f"  dvc repro {stage}" if stage else "  dvc repro",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="an MLflow run id (see the MLflow UI)")
    args = parser.parse_args(argv)
    try:
        print(trace(args.run_id))
    except MlflowException as err:
        print(f"error: {tracking_uri()}: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
