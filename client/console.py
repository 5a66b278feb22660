"""What every command shares: the settings a command was started with, and one JSON
object on stdout (an answer, or ``{"error": ...}`` with the exit code to leave with).
Imported by the client's commands and the worker's; imports no command."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from pfbuild.client.errors import PfbuildError
from pfbuild.client.settings import Settings

__all__ = ["emit", "fail", "settings_of"]


def settings_of(ctx: typer.Context) -> Settings:
    settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    return settings


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def fail(exc: PfbuildError) -> typer.Exit:
    """Print ``exc`` as one JSON error; the exit to raise."""
    emit({"error": exc.to_info().model_dump(mode="json", exclude_none=True)})
    return typer.Exit(exc.exit_code)
