"""``tessera tokenizer ...``: train-text, train-image, encode, decode."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tessera.cli_common import expected_errors, fail
from tessera.config import ConfigError
from tessera.utils import atomic_path, atomic_write_json, launch_env


class CLIError(Exception):
    pass


PROG = "tessera tokenizer"


def _fail(msg: str) -> int:
    return fail(PROG, msg)


def _train_text(args: argparse.Namespace) -> int:
    from tessera.tokenizers.text import TextTokenizerError
    from tessera.tokenizers.text_train import train_text_tokenizer

    try:
        tok = train_text_tokenizer(
            args.input, args.out, args.vocab_size, character_coverage=args.character_coverage,
            max_sentences=args.max_sentences, seed=args.seed, num_threads=args.threads,
        )
    except TextTokenizerError as exc:
        return _fail(str(exc))
    print(f"wrote {args.out}.model ({tok.vocab_size} pieces)")
    return 0


def _train_image(args: argparse.Namespace) -> int:
    from tessera.tokenizers.image import ImageTokenizerError
    from tessera.tokenizers.image_train import load_train_config, train_image_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_train_config(args.config, args.preset, list(args.overrides or []))
        if args.data:  # set directly (not as an override string) so paths may contain commas
            cfg.data = list(args.data)
        if args.out:
            cfg.out = args.out
        if not cfg.data:
            raise ConfigError("no training data: pass --data DIR|SHARD.tar|IMAGE ...")
        result = train_image_tokenizer(cfg)
    except (ConfigError, ImageTokenizerError) as exc:
        return _fail(str(exc))
    if launch_env()[0] == 0:
        print(
            f"wrote {result.out} after {result.steps} steps in {result.seconds:.0f} s: "
            f"PSNR {result.psnr:.2f} dB, codebook usage {result.codebook_usage:.0%}, "
            f"{result.corrupt} unreadable image(s) skipped"
        )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from tessera.tokenizers.image import ImageTokenizer, ImageTokenizerError, load_image

    try:
        tok = ImageTokenizer.load(args.tokenizer)
        images = [load_image(p) for p in args.images]
        codes = tok.encode(images)
    except ImageTokenizerError as exc:
        return _fail(str(exc))
    doc = {
        "latent_size": tok.latent_size,
        "num_codes": tok.num_codes,
        "images": [{"source": str(p), "codes": c} for p, c in zip(args.images, codes.tolist(), strict=True)],
    }
    out = atomic_write_json(args.out, doc, indent=None)
    print(f"wrote {out}: {len(args.images)} image(s) x {tok.tokens_per_image} codes")
    return 0


def _read_codes(path: Path) -> list[list[int]]:
    if not path.is_file():
        raise CLIError(f"{path}: codes file not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CLIError(f"{path}: invalid JSON: {exc}") from exc
    # Accept our encode output, a bare list of codes, or a list of lists.
    if isinstance(doc, dict):
        if not isinstance(doc.get("images"), list):
            raise CLIError(f"{path}: expected field 'images' (a list of {{'codes': [...]}})")
        try:
            rows = [img["codes"] for img in doc["images"]]
        except (TypeError, KeyError) as exc:
            raise CLIError(f"{path}: field 'images[].codes' missing") from exc
    elif isinstance(doc, list) and doc and all(isinstance(c, int) for c in doc):
        rows = [doc]
    else:
        rows = doc
    if not isinstance(rows, list) or not rows or not all(
        isinstance(r, list) and all(isinstance(c, int) for c in r) for r in rows
    ):
        raise CLIError(f"{path}: codes must be lists of integers")
    return rows


def _decode(args: argparse.Namespace) -> int:
    from tessera.tokenizers.image import ImageTokenizer, ImageTokenizerError

    try:
        tok = ImageTokenizer.load(args.tokenizer)
        rows = _read_codes(Path(args.codes))
        images = tok.decode(rows)
    except (ImageTokenizerError, CLIError) as exc:
        return _fail(str(exc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for img, p in zip(images, paths, strict=True):
        with atomic_path(p) as tmp:
            img.save(tmp)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("train-text", help="train the sentencepiece BPE text tokenizer")
    p.add_argument("--input", nargs="+", required=True,
                   help="text files and/or shards / folders in any raw format (docs/data.md); only their text is read")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True, help="target number of pieces (see docs/tokenizers.md)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=0, help="sample this many lines (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=expected_errors(PROG)(_train_text))

    p = sub.add_parser("train-image", help="train the VQ image tokenizer (accepts --section.key value overrides)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="YAML with sections vq, train (and optionally data, out)")
    g.add_argument("--preset", help="demo | tiny | chameleon")
    p.add_argument("--data", nargs="+", help="image folders, image files, .tar shards (any layout), folders of shards")
    p.add_argument("--out", help="output directory (tokenizer, checkpoints, TensorBoard logs)")
    p.set_defaults(func=expected_errors(PROG)(_train_image), accepts_overrides=True)

    p = sub.add_parser("encode", help="image file(s) -> codes JSON")
    p.add_argument("--tokenizer", required=True, help="directory written by train-image")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", required=True, help="codes.json")
    p.set_defaults(func=expected_errors(PROG)(_encode))

    p = sub.add_parser("decode", help="codes JSON -> PNG reconstruction(s)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("codes", help="codes.json from `tessera tokenizer encode`")
    p.add_argument("--out", required=True, help="recon.png (recon_0.png, recon_1.png ... for several images)")
    p.set_defaults(func=expected_errors(PROG)(_decode))
