"""Tessera: train early-fusion, token-based multimodal foundation models (Chameleon-style)."""

__version__ = "0.1.0"

# Refuse an unsupported megatron-core with one line when (and only when) it is first imported, and
# keep its import-time warnings quiet; importing tessera itself stays free of heavy imports.
from tessera import deps as _deps  # noqa: E402

_deps.install_import_guard()
