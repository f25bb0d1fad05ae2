"""``tessera data ...``: synth, curate, pretokenize, report (docs/data.md); ``bench`` is a deprecated spelling
of ``tessera bench data``."""

from __future__ import annotations

import argparse
import json
import logging

from tessera.cli_common import expected_errors, fail, named_dirs
from tessera.config import ConfigError

PROG = "tessera data"


def _fail(msg: str) -> int:
    return fail(PROG, msg)


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tessera.data").setLevel(logging.INFO)


def _synth(args: argparse.Namespace) -> int:
    from tessera.data.synth import write_synth

    try:
        m = write_synth(args.out, args.docs, args.image_size, args.seed, args.shard_size, args.heldout_docs)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"wrote {m['docs']} train documents ({m['train_pattern']}) and {m['heldout_docs']} held-out "
          f"({m['heldout_pattern']}) at {m['image_size']} px; manifest {args.out}/synth.json")
    return 0


def _pretokenize(args: argparse.Namespace) -> int:
    from tessera.convert.errors import ConvertError
    from tessera.data.pretokenize import PretokenizeError, PretokenizeOptions, pretokenize

    _logging()
    try:
        opts = PretokenizeOptions(
            max_doc_tokens=args.max_doc_tokens, max_images=args.max_images, max_text_chars=args.max_text_chars,
            batch_docs=args.batch_docs, image_batch=args.image_batch, device=args.device, reader=_reader_options(args),
            loss_on=args.loss_on, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )
        st = pretokenize(args.input, args.out, args.text_tokenizer, args.image_tokenizer, args.workers, opts, args.overwrite)
    except (PretokenizeError, ConvertError, OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"wrote {args.out}: {st['documents']} documents, {st['tokens']:,} tokens "
          f"(text {st['text_tokens']:,}, image {st['image_tokens']:,}, special {st['special_tokens']:,}); "
          f"skipped {st['skipped_total']} {json.dumps({k: v for k, v in st['skipped'].items() if v})}")
    if st["loss_mask"]:
        print(f"loss mask (--loss-on {st['loss_on']}): {st['target_tokens']:,} of {st['tokens']:,} tokens are targets; "
              f"{st['conversations']} conversations")
    return 0


def _curate(args: argparse.Namespace) -> int:
    from tessera.data.curate import CurateConfig, CurateError, curate

    _logging()
    try:
        cfg = CurateConfig(
            min_side=args.min_side, max_aspect=args.max_aspect, min_colours=args.min_colours, min_entropy=args.min_entropy,
            min_text_chars=args.min_text_chars, max_text_chars=args.max_text_chars,
            max_repeat_ratio=args.max_repeat_ratio, max_nonprintable_ratio=args.max_nonprintable_ratio,
            languages=tuple(x for x in (args.language or "").split(",") if x),
            min_language_score=args.min_language_score, scorer=args.scorer, min_score=args.min_score,
            scorer_image_size=args.scorer_image_size, dedup_text=not args.no_dedup_text,
            dedup_images=not args.no_dedup_images, near_dup_hamming=args.near_dup_hamming, shard_size=args.shard_size,
        )
        st = curate(args.input, args.out, cfg, _reader_options(args), args.workers, args.overwrite)
    except (CurateError, OSError, ValueError) as exc:
        return _fail(str(exc))
    from tessera.data.curate import format_report

    print(format_report(st), end="")
    print(f"wrote {args.out}: {st['documents']} documents in {len(st['shards'])} shard(s); stats {args.out}/stats.json")
    return 0


def _reader_options(args: argparse.Namespace):
    from tessera.data.formats import ReaderOptions

    return ReaderOptions(format=args.format, caption_first=args.caption_first, image_column=args.image_column,
                         text_column=args.text_column)


def _add_reader_flags(p: argparse.ArgumentParser) -> None:
    from tessera.data.formats import FORMATS

    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="shard format (default: detected per shard; docs/data.md lists them)")
    p.add_argument("--caption-first", type=float, default=0.5,
                   help="share of image-caption pairs written caption first (the rest image first)")
    p.add_argument("--image-column", default=None, help="parquet: the image column (default: image, jpg, ...)")
    p.add_argument("--text-column", default=None, help="parquet: the caption column (default: text, caption, ...)")


def _batch_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """--global-batch / --micro-batch, else the training config's parallel section, else 64 / 8."""
    from tessera.data.config import batch_sizes

    gbs, mbs = batch_sizes(args.config)
    return int(args.global_batch or gbs or 64), int(args.micro_batch or mbs or 8)


def _report(args: argparse.Namespace) -> int:
    _logging()
    from tessera.data.config import load_data_config
    from tessera.data.pretokenize import PretokenizeError
    from tessera.data.report import blend_balance, format_report, source_balance

    try:
        blend = weights = None
        if args.config:
            cfg = load_data_config(args.config)
            dirs = {s.name: s.path for s in cfg.train_sources()}
            if args.steps > 0:
                gbs, mbs = _batch_sizes(args)
                it = cfg.iterator(gbs, mbs, start_step=args.start_step)
                weights = it.schedule.weights_dict(args.start_step)
                blend = blend_balance(it, args.steps)
        else:
            dirs = named_dirs(args.dirs)
        if not dirs:
            return _fail("give pretokenized directories or --config DATA.yaml")
        per = {n: source_balance(p) for n, p in dirs.items()}
    except (ConfigError, PretokenizeError, ValueError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({"sources": per, "blend": blend}, indent=2))
    else:
        print(format_report(per, blend, weights))
    return 0


def _bench_deprecated(args: argparse.Namespace) -> int:
    from tessera.bench.cli import cmd_data
    from tessera.cli_common import warn

    warn("tessera data bench", "deprecated and will be removed: use `tessera bench data` (same flags)")
    return cmd_data(args)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("synth", help="write the built-in synthetic shapes corpus (train + held-out shards)")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--heldout-docs", type=int, default=None, help="default: docs // 10 (at least 1)")
    p.set_defaults(func=expected_errors(PROG)(_synth))

    p = sub.add_parser("pretokenize", help="raw shards -> megatron indexed dataset of unified-vocabulary ids")
    p.add_argument("--input", required=True, nargs="+",
                   help="shards (.tar, .parquet, .jsonl), image folders, folders of shards, brace patterns")
    p.add_argument("--text-tokenizer", required=True,
                   help="sentencepiece .model, or an imported Chameleon's IMPORT/tokenizers/text")
    p.add_argument("--image-tokenizer", required=True, help="VQ tokenizer directory (or IMPORT/tokenizers/image)")
    _add_reader_flags(p)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1, help="processes, shards split among them")
    p.add_argument("--max-doc-tokens", type=int, default=None, help="skip (and count) longer documents")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-text-chars", type=int, default=None)
    p.add_argument("--batch-docs", type=int, default=64)
    p.add_argument("--image-batch", type=int, default=64)
    p.add_argument("--device", default=None, help="VQ encoder device (default: cuda when present)")
    p.add_argument("--loss-on", default="auto", choices=("auto", "assistant", "all", "image", "text"),
                   help="which tokens are training targets (written as OUT/loss_mask): assistant turns' content and "
                        "end marker, all, image codes only, text only (default auto: assistant for conversations, "
                        "all for other documents; docs/finetuning.md)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None, metavar="N",
                   help="pad the vocabulary to a multiple of N (megatron's rule: 128 x the tensor-parallel size "
                        "must divide it; default 1024, valid for TP up to 8; 128 gives a TP-1 model a smaller "
                        "output layer). An imported Chameleon's tokenizer keeps its own padding")
    p.add_argument("--overwrite", action="store_true", help="replace a complete output directory")
    p.set_defaults(func=expected_errors(PROG)(_pretokenize))

    p = sub.add_parser("curate", help="filter and deduplicate raw shards (any format) into segments-layout shards")
    p.add_argument("--input", required=True, nargs="+", help="shards, image folders, folders of shards, brace patterns")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1, help="processes, shards split among them (same output)")
    p.add_argument("--overwrite", action="store_true")
    _add_reader_flags(p)
    g = p.add_argument_group("image filters (off unless given)")
    g.add_argument("--min-side", type=int, default=0, help="drop images with a shorter side (pixels)")
    g.add_argument("--max-aspect", type=float, default=None, help="drop images longer than this x their width")
    g.add_argument("--min-colours", type=int, default=0, help="drop images with fewer distinct colours (blank)")
    g.add_argument("--min-entropy", type=float, default=0.0, help="drop images with less grey-level entropy (bits)")
    g = p.add_argument_group("text filters (off unless given)")
    g.add_argument("--min-text-chars", type=int, default=0)
    g.add_argument("--max-text-chars", type=int, default=None)
    g.add_argument("--max-repeat-ratio", type=float, default=None, help="share of characters in runs of 3+ equal ones")
    g.add_argument("--max-nonprintable-ratio", type=float, default=None)
    g.add_argument("--language", default=None, help="keep these languages, e.g. en,de (needs py3langid)")
    g.add_argument("--min-language-score", type=float, default=0.5)
    g = p.add_argument_group("alignment scorer (yours; nothing is downloaded)")
    g.add_argument("--scorer", default=None, help="TorchScript file (pixels [n,3,S,S] in [0,1], texts) or module:function")
    g.add_argument("--min-score", type=float, default=None)
    g.add_argument("--scorer-image-size", type=int, default=224)
    g = p.add_argument_group("deduplication across all shards (first occurrence kept)")
    g.add_argument("--no-dedup-text", action="store_true", help="keep documents whose text was seen before")
    g.add_argument("--no-dedup-images", action="store_true", help="keep documents whose image pixels were seen before")
    g.add_argument("--near-dup-hamming", type=int, default=4, help="perceptual-hash bits (-1: off)")
    p.add_argument("--shard-size", type=int, default=1000, help="documents per output shard")
    p.set_defaults(func=expected_errors(PROG)(_curate))

    p = sub.add_parser("report", help="modality balance per source and in the blended stream")
    p.add_argument("dirs", nargs="*", help="pretokenized directories (NAME=DIR or DIR)")
    p.add_argument("--config", default=None,
                   help="a `tessera train` config (its data and parallel sections) or a file with only the data section")
    p.add_argument("--steps", type=int, default=20, help="blended steps to measure (with --config)")
    p.add_argument("--start-step", type=int, default=0)
    p.add_argument("--global-batch", type=int, default=None, help="default: the config's parallel section, else 64")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the config's parallel section, else 8")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=expected_errors(PROG)(_report))

    # the benchmark lives in tessera.bench; this spelling stays for one release
    from tessera.bench.cli import add_data_arguments

    p = sub.add_parser("bench", help="deprecated: use `tessera bench data`")
    add_data_arguments(p)
    p.set_defaults(func=_bench_deprecated)
