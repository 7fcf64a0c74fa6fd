"""Prefect flows and deployments: ordering, fan-out, schedules. Thin: the work is in tasks/.

Prefect reads its settings once, when it is first imported; these defaults are set here, before
any module of this package imports it. A user's own settings win.
"""

import os

# Route the stages' progress logs through Prefect (console and UI)...
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
# ...and let the stage functions log quietly when called outside a flow (tests, notebooks).
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# Keep the local server from phoning home (machines without network print an error).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server waits 20 s for itself by default; its first start on a new
# PREFECT_HOME took 13 s on an idle 2-core machine and missed 20 s every time with 4 busy
# processes beside it.
EPHEMERAL_STARTUP_TIMEOUT_S = "180"
os.environ.setdefault(
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_TIMEOUT_S
)
