"""tessera.data: corpora, pretokenization and the training batch stream (docs/data.md).

- ``document``: the core ``Document`` type and the segments-layout writer (``document_to_tar_members``, ``write_tar``).
- ``synth``: the built-in synthetic shapes corpus (``make_document``, ``render_scene``, ``caption``,
  ``parse_caption``, ``write_synth``); ``detect``: its detector and text<->image scores.
- ``formats`` / ``raw``: the one reader: img2dataset, parquet, OBELICS / MINT-1T interleaved, image folders,
  conversations (transformers' ``messages``) and the segments layout, detected per shard; ``iter_documents``
  counts and skips corrupt samples.
- ``chat``: the chat template (conversation -> ids, the same at generation time: ``format_chat``) and the
  per-token flags the loss masks are cut from (docs/finetuning.md).
- ``curate``: filters and exact / near-duplicate removal across shards (``tessera data curate``).
- ``pretokenize``: shards -> megatron IndexedDataset (+ a loss-mask one) + vocab.json + stats.json, atomic and
  resumable.
- ``batches`` / ``blend`` / ``config``: packed samples (loss masks, document boundaries), blend schedules
  (the mixture of sources and how it changes with the step), ``BlendedBatchIterator``, ``DataConfig`` (the
  ``data:`` section of a training config).
- ``report``, ``bench``: modality balance and ``benchmark_batches``.
"""
