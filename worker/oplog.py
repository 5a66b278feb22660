"""One log line per job stage change, for an operator to search (docs/design.md,
"Operating the farm").

Every line names the job, its profile, the host and the stage; ``log_format="json"``
(``pfbuild worker --log-format json``) writes each as one JSON object on stderr, else
it is a plain ``key=value`` line through the worker's usual logging.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "configure", "log_stage"]

log = logging.getLogger("pfbuild.jobs")


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **fields,
        }
        return json.dumps(doc, default=str, sort_keys=False)


def configure(log_format: str) -> None:
    """Send stage lines as JSON to stderr (``json``), or through the root logger."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    if log_format == "json":
        # the stream is taken now, before Celery redirects sys.stderr into its logger
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.propagate = False
    else:
        log.propagate = True


def log_stage(job_id: str, profile_id: str, host: str, stage: str, **extra: Any) -> None:
    """Log that ``job_id`` entered ``stage``."""
    fields = {"job_id": job_id, "profile_id": profile_id, "host": host, "stage": stage}
    fields.update({k: v for k, v in extra.items() if v is not None})
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    log.info("job stage %s", text, extra={"fields": {**fields, "at": time.time()}})
