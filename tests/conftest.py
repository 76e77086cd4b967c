"""Shared test set-up."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Undo what ``mediaserver serve``'s log set-up (``logging.basicConfig(force=True)``) does to the root logger.

    Tests that run ``main(["serve", ...])`` replace the root handlers with one
    writing to that test's captured stderr; left in place, every later test
    that logs would write to a closed stream.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
