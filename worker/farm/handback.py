"""Handing a job to another host when this host's engine does not answer.

A job that finds its engine down, before anything is built or when the engine fails
under its build (docs/design.md, "Many hosts"), is sent again, same job id and request,
to the queue of a host whose engine answered its last beat
(:func:`pfbuild.client.hosts.handback_target`), and this delivery is acknowledged
without an answer: the job lives on, its flight and waiters with it. Each
hop is recorded in the message (``handed_back``), so a job moves at most
``Settings.max_handbacks`` times and never back to a host it was on; the answer's events
and the job's status say where it went and why. With no such host, or past the limit,
the job fails with the engine's :class:`~pfbuild.client.errors.EngineUnavailable`.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery, Task

from pfbuild.client.errors import EngineUnavailable
from pfbuild.client.hosts import handback_target, host_queue
from pfbuild.client.models import JobState
from pfbuild.client.queue import TASK_NAME, mark_sent
from pfbuild.client.settings import Settings

__all__ = ["events_of", "hand_back"]


def events_of(kwargs: dict[str, Any]) -> list[str]:
    """The hops a job made, as lines of its answer's events."""
    return [
        f"engine on host {hop.get('from')} does not answer; handed to host {hop.get('to')}"
        for hop in kwargs.get("handed_back") or []
        if isinstance(hop, dict)
    ]


def hand_back(
    task: Task,
    app: Celery,
    client: redis.Redis,
    settings: Settings,
    kwargs: dict[str, Any],
    error: EngineUnavailable,
) -> str | None:
    """Send the job to another host whose engine answers; that host's id, or None when
    there is none or the job was handed back ``max_handbacks`` times already."""
    hops = [h for h in kwargs.get("handed_back") or [] if isinstance(h, dict)]
    if len(hops) >= settings.max_handbacks:
        return None
    tried = {str(h.get("from")) for h in hops} | {settings.host_id}
    target = handback_target(client, str(kwargs["profile_id"]), exclude=tried)
    if target is None:
        return None
    job_id = str(task.request.id)
    hop = {"from": settings.host_id, "to": target, "at": time.time(), "reason": error.message}
    moved = {**kwargs, "handed_back": [*hops, hop]}
    # the status first: the next host's stages must not be overwritten by this one
    task.update_state(
        task_id=job_id,
        state=JobState.QUEUED.celery_state,
        meta={
            "profile_id": kwargs["profile_id"],
            "stage": JobState.QUEUED.value,
            "docker_host": target,
            "line": events_of({"handed_back": [hop]})[0],
        },
    )
    app.send_task(
        TASK_NAME,
        kwargs=moved,
        task_id=job_id,
        queue=host_queue(target),
        argsrepr="()",
        kwargsrepr=f"{{profile_id: {kwargs['profile_id']}, handed to: {target}}}",
    )
    mark_sent(client, job_id, settings)  # its record lives on with the new message
    return target
