"""A tiny package for pfbuild's example build."""

import os


def greeting() -> str:
    return os.environ.get("HELLO_GREETING", "hello")
