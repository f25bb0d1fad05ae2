"""Shared fixtures (keep small)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron_1proc():
    """A 1-process (TP=1, PP=1) megatron parallel state on gloo, shared by the tests that need one."""
    from tessera.model.parallel import ensure_single_process

    ensure_single_process()
    yield
