"""tessera.generate: KV-cached interleaved text-image generation (engine, CFG, documents, CLI, bench).

    from tessera.generate import GenerationConfig, Generator, generate_document, load_tokenizers
    model = tessera.model.load("runs/demo")
    doc = generate_document(model, load_tokenizers(model.path), ["a small red circle"], GenerationConfig(mode="image"))
    doc.save("out/gen")   # document.json, 0.png, ..., document.html
"""

from tessera.generate.config import GenerationConfig, SamplingParams
from tessera.generate.document import (
    GeneratedDocument,
    Generator,
    generate_chat,
    generate_document,
    generate_documents,
)
from tessera.generate.engine import GeneratedSequence, GenerationEngine, GenerationError, GenerationStats
from tessera.generate.tokenizers import Tokenizers, find_tokenizer_paths, load_tokenizers

__all__ = [
    "GeneratedDocument",
    "GeneratedSequence",
    "GenerationConfig",
    "GenerationEngine",
    "GenerationError",
    "GenerationStats",
    "Generator",
    "SamplingParams",
    "Tokenizers",
    "find_tokenizer_paths",
    "generate_chat",
    "generate_document",
    "generate_documents",
    "load_tokenizers",
]
