"""Fixtures for the tests and the benchmarks: small models, checkpoints and data made on the spot, nothing
downloaded. The product never imports this package (tests/test_import_layers.py).

* ``checkpoints``: tiny Chameleons in transformers' and Meta's release formats, with Chameleon-shaped
  tokenizers (``make_hf_chameleon``, ``write_meta_layout``, ``make_chameleon_tokenizer``);
* ``hf_reference``: the same weights as a Tessera ``GPTModel`` in transformers'
  ``ChameleonForConditionalGeneration`` (the decode benchmark's peer, the greedy-equivalence reference);
* ``shapes``: generated coloured-shape pictures (VQ tokenizer training data for tests).
"""
