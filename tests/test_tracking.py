"""What a pipeline execution leaves in the tracking store, on the default sqlite store."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from tasks.recording.store import tracking_uri
from tasks.recording.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, start_pipeline_run


def test_the_experiment_is_marked_as_model_training_and_a_kind_set_by_hand_is_kept(
    tmp_path: Path,
) -> None:
    # MLflow's UI opens an experiment without this tag in its GenAI mode (traces, evaluations)
    with start_pipeline_run("new-study", "dvc", root=tmp_path):
        pass
    client = MlflowClient(tracking_uri())
    assert client.get_experiment_by_name("new-study").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # an experiment from before (no kind) gets it; one a user set stays theirs
    older = client.create_experiment("older-study")
    mine = client.create_experiment("my-study", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("older-study", "my-study"):
        with start_pipeline_run(name, "dvc", root=tmp_path):
            pass
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"
