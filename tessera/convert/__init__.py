"""tessera.convert: checkpoint interop with Hugging Face transformers and Meta Chameleon formats.

Public API (imports are deferred so ``import tessera.convert`` stays cheap)::

    from_hf(hf_dir, out_dir, dtype="auto", overwrite=False) -> ConvertResult
    from_meta(meta_dir, out_dir, model=None, dtype="auto", overwrite=False) -> ConvertResult
    to_hf(ckpt, out_dir, dtype=None, text_tokenizer=None, image_tokenizer=None, overwrite=False,
          max_shard_bytes=5 * 2**30, allow_missing_vq=False) -> ConvertResult
    load_text_tokenizer(path) -> TextTokenizer | HFTextTokenizer
    HFTextTokenizer, IdMap, ConvertError
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "from_hf": "tessera.convert.hf",
    "from_meta": "tessera.convert.hf",
    "to_hf": "tessera.convert.hf",
    "ConvertResult": "tessera.convert.hf",
    "HFTextTokenizer": "tessera.convert.hf_tokenizer",
    "load_text_tokenizer": "tessera.convert.hf_tokenizer",
    "IdMap": "tessera.convert.hf_vocab",
    "ConvertError": "tessera.convert.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tessera.convert' has no attribute {name!r}")
