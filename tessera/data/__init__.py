"""tessera.data: corpora, pretokenization and the training batch stream (docs/data.md).

- ``document``: the core ``Document`` type and the segments-layout writer (``document_to_tar_members``, ``write_tar``).
- ``synth``: the built-in synthetic shapes corpus (``make_document``, ``render_scene``, ``caption``,
  ``parse_caption``, ``write_synth``); ``detect``: its detector and text<->image scores.
- ``raw``: ``iter_documents`` over webdataset shards, counting and skipping corrupt samples.
- ``pretokenize``: shards -> megatron IndexedDataset + vocab.json + stats.json, atomic and resumable.
- ``batches`` / ``weave`` / ``config``: packed samples, weave schedules, ``WovenBatchIterator``.
- ``report``, ``bench``: modality balance and ``benchmark_batches``.
"""
