"""The WSGI callable every fixture app serves (never called by the doctor)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


def hello(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]
