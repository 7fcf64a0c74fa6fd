"""Where tracking goes, and whether it can go there: checked before any work, without importing
the tracking library (seconds of import that a refused command should not pay)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow retries a failed HTTP request 7 times with a growing backoff (minutes in all); a dead
# server should cost seconds. Set these variables yourself to choose otherwise.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the tracking URI."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking(uri: str) -> None:
    """Fail in seconds, naming the URI, if the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
                "MLFLOW_TRACKING_URI to record in sqlite:///mlflow.db"
            ) from err
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow tracking store {uri}: folder {folder} is not writable")
