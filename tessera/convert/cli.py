"""``tessera convert``: from-hf, from-meta, to-hf."""

from __future__ import annotations

import argparse

from tessera.cli_common import add_dtype, expected_errors
from tessera.convert.errors import ConvertError
from tessera.utils import dtype_name


def _from_hf(args: argparse.Namespace) -> int:
    from tessera.convert.hf import from_hf

    res = from_hf(args.hf_dir, args.out_dir, dtype=_dtype(args, "auto"), overwrite=args.overwrite)
    print(res.summary())
    return 0


def _from_meta(args: argparse.Namespace) -> int:
    from tessera.convert.hf import from_meta

    res = from_meta(args.meta_dir, args.out_dir, model=args.model, dtype=_dtype(args, "auto"), overwrite=args.overwrite)
    print(res.summary())
    return 0


def _to_hf(args: argparse.Namespace) -> int:
    from tessera.convert.hf import to_hf

    res = to_hf(
        args.checkpoint,
        args.out_dir,
        dtype=_dtype(args, None),
        text_tokenizer=args.text_tokenizer,
        image_tokenizer=args.image_tokenizer,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gib * 2**30),
        allow_missing_vq=args.allow_missing_vq,
        from_import=args.from_import,
        base=args.base,
    )
    print(res.summary())
    return 0


def _dtype(args: argparse.Namespace, auto: str | None) -> str | None:
    """``--dtype`` as the converters take it: torch's name, or ``auto`` for auto."""
    return auto if args.dtype == "auto" else dtype_name(args.dtype)


def _guard(fn):
    """Bad input (a message for the user, not a traceback) -> one line, exit status 2."""
    from tessera.model.checkpoint import CheckpointError
    from tessera.tokenizers.image import ImageTokenizerError
    from tessera.tokenizers.text import TextTokenizerError
    from tessera.tokenizers.vocab import VocabularyError

    return expected_errors("tessera convert", ConvertError, CheckpointError, ImageTokenizerError, TextTokenizerError,
                           VocabularyError)(fn)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)
    dtypes = ("auto", "fp32", "bf16")  # float32 / bfloat16: deprecated spellings (cli_common.dtype_flag)

    p = sub.add_parser("from-hf", help="transformers ChameleonForConditionalGeneration dir -> Tessera checkpoint")
    p.add_argument("hf_dir", help="directory with config.json, safetensors (or an index) and tokenizer files")
    p.add_argument("out_dir", help="Tessera checkpoint directory to create")
    add_dtype(p, choices=dtypes, default="auto", help="parameter dtype (auto: bf16 if the source is)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=_guard(_from_hf))

    p = sub.add_parser("from-meta", help="Meta's Chameleon release (params.json, consolidated.NN.pth) -> Tessera")
    p.add_argument("meta_dir", help="release root (models/<size>/, tokenizer/) or the models/<size> directory")
    p.add_argument("out_dir", help="Tessera checkpoint directory to create")
    p.add_argument("--model", default=None, help="which models/<size> to convert (e.g. 7b, 30b) when several exist")
    add_dtype(p, choices=dtypes, default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_guard(_from_meta))

    p = sub.add_parser("to-hf", help="Tessera checkpoint -> transformers ChameleonForConditionalGeneration dir")
    p.add_argument("checkpoint", help="checkpoint dir, or a run dir / checkpoints dir (uses `latest`)")
    p.add_argument("out_dir", help="directory to create (from_pretrained-loadable)")
    p.add_argument("--text-tokenizer", default=None, help="sentencepiece .model for a checkpoint trained in Tessera")
    p.add_argument("--image-tokenizer", default=None, help="ImageTokenizer directory (default CKPT/tokenizers/image)")
    add_dtype(p, choices=dtypes, default="auto", help="dtype of the written weights (auto: as stored)")
    p.add_argument("--max-shard-gib", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--allow-missing-vq", action="store_true", help="export without an image tokenizer (text only)")
    p.add_argument("--from-import", default=None,
                   help="for a run started from an imported checkpoint: that checkpoint (or its tokenizers/text), "
                   "whose id map restores Chameleon's token order (found automatically when copied along)")
    p.add_argument("--base", default=None,
                   help="for an adapter (LoRA) checkpoint whose base has moved: the base checkpoint (its files must "
                   "hash to the recorded SHA-256); the adapters are merged into it")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_guard(_to_hf))
