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
    from test_data_standins import ByteTokenizer, PatchColourTokenizer

    from tessera.data.pretokenize import pretokenize
    from tessera.data.synth import write_synth

    root = tmp_path_factory.mktemp("tiny_pretok")
    out = {}
    for name, seed, docs in (("train", 1, 30), ("heldout", 2, 10)):
        m = write_synth(root / f"raw_{name}", docs, image_size=32, seed=seed, shard_size=100, progress=False)
        pretokenize(m["train_pattern"], root / name, ByteTokenizer(), PatchColourTokenizer(), progress=False)
        out[name] = root / name
    return out
