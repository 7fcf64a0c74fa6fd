"""Where tracking goes, and whether it can go there: checked before any work, without importing
the tracking library (seconds of import that a refused command should not pay)."""

from __future__ import annotations

import base64
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
    """Fail in seconds, naming the URI, if the tracking store cannot be reached, or refuses
    this client (a server with authentication and no or wrong credentials)."""
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
                "MLFLOW_TRACKING_URI to record in sqlite:///mlflow.db"
            ) from err
        _check_access(base)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow tracking store {uri}: folder {folder} is not writable")


def _check_access(base: str) -> None:
    """One read that a server with authentication answers only for a known user (/health
    answers anyone), with the credentials MLflow's client sends: a user and password, or a
    token, from the environment."""
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    bearer = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if user and password:
        login = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {login}")
    elif bearer:  # MLflow's client sends a token when there is no user and password
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            given = "were refused" if user and password else "are not set"
            raise TrackingError(
                f"MLflow tracking server {base} requires a login: MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD {given}"
            ) from None
        if err.code == 403:
            raise TrackingError(
                f"MLflow tracking server {base}: user {user!r} may not read experiments; ask "
                "its admin for a permission"
            ) from None
        # anything else (a proxy's page, an older server): the store's own calls will tell
    except (urllib.error.URLError, OSError):
        pass  # /health answered a moment ago: a passing failure, which the store's calls retry
