"""Shared fixtures (keep small)."""

from __future__ import annotations

import os

import pytest

# Triton decides compiled vs interpreted when a kernel is defined; with no GPU here every test wants
# the interpreter, and setting it before any import keeps that independent of test order.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def megatron_1proc():
    """A 1-process (TP=1, PP=1) megatron parallel state on gloo, shared by the tests that need one."""
    from tessera.model.parallel import ensure_single_process

    ensure_single_process()
    yield


@pytest.fixture(scope="session")
def tiny_pretok(tmp_path_factory):
    """Tiny pretokenized train (30 docs, seed 1) and held-out (10 docs, seed 2) sets made with the stand-in
    byte / colour-patch tokenizers: real packed data for the trainer tests, built once per session."""
    from test_data_standins import pretokenized_synth

    return pretokenized_synth(tmp_path_factory.mktemp("tiny_pretok"), (("train", 1, 30), ("heldout", 2, 10)))
