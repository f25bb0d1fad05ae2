"""``tessera generate``: continue an interleaved prompt with a checkpoint and write the document.

    tessera generate --checkpoint RUN_OR_CKPT --prompt "a small red circle" --mode image --out out/gen
    tessera generate --checkpoint CKPT --image in.png --prompt "This picture shows" --mode text --out out/cap
    tessera generate --checkpoint LORA_RUN --chat conversation.json --mode text --out out/reply

``--prompt`` and ``--image`` may repeat; their order on the command line is the prompt's order.
``--chat FILE``: a conversation (JSON: a list of messages, or ``{"messages": [...]}`` as in training data,
image parts' paths relative to the file) through the chat template; the reply stops at the template's END.
Any ``GenerationConfig`` field can also be set as ``--text.top_k 50`` / ``--image.temperature 0.9``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tessera.cli_common import add_dtype, expected_errors
from tessera.config import load_config, parse_overrides
from tessera.generate.config import GenerationConfig
from tessera.progress import Progress
from tessera.utils import default_device, dtype_name


class _Ordered(argparse.Action):
    """Collect --prompt / --image into one list that keeps their command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        parts = getattr(namespace, "parts", None) or []
        parts.append((self.dest, values))
        namespace.parts = parts


def register(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir (uses checkpoints/latest)")
    p.add_argument("--prompt", dest="text", action=_Ordered, metavar="TEXT", help="prompt text (repeatable)")
    p.add_argument("--image", dest="image", action=_Ordered, metavar="PNG", help="prompt image file (repeatable)")
    p.add_argument("--chat", default=None, metavar="JSON",
                   help="a conversation (list of messages or {\"messages\": [...]}) to answer, through the chat "
                        "template (docs/finetuning.md); not with --prompt / --image")
    p.add_argument("--adapters", choices=("merge", "unmerged"), default="merge",
                   help="an adapter (LoRA) checkpoint: fold the adapters into the weights (default) or decode with "
                        "them as separate low-rank terms (same logits)")
    p.add_argument("--mode", choices=("interleaved", "text", "image"), default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None, help="image guidance by the prompt text (g_txt)")
    p.add_argument("--cfg-image-scale", type=float, default=None, help="image guidance by prompt images (g_img)")
    p.add_argument("--temperature", type=float, default=None, help="text temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None, help="text top-p")
    p.add_argument("--top-k", type=int, default=None, help="text top-k (0 = off)")
    p.add_argument("--image-temperature", type=float, default=None)
    p.add_argument("--image-top-p", type=float, default=None)
    p.add_argument("--image-top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    add_dtype(p, choices=("auto", "fp32", "bf16", "fp16"), default=None,
              help="decoding precision (default: auto = bf16); float32 / bfloat16 / float16 are deprecated spellings")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (small models on a busy CPU decode faster with 1)")
    p.add_argument("--config", default=None, help="YAML file with GenerationConfig fields")
    p.add_argument("--text-tokenizer", default=None,
                   help="sentencepiece model, or an imported checkpoint's tokenizers/text/ dir "
                        "(default: CKPT/tokenizers/text.model or CKPT/tokenizers/text/)")
    p.add_argument("--image-tokenizer", default=None, help="VQ tokenizer dir (default: CKPT/tokenizers/image/)")
    p.add_argument("--stream", action="store_true", help="print the generated text as it is produced")
    p.add_argument("--out", required=True, help="output directory (document.json, *.png, document.html)")
    p.set_defaults(func=main, accepts_overrides=True, parts=None)


def _config(args: argparse.Namespace) -> GenerationConfig:
    flags = {
        "mode": args.mode, "max_new_tokens": args.max_new_tokens, "cfg_scale": args.cfg_scale,
        "cfg_image_scale": args.cfg_image_scale, "seed": args.seed, "device": args.device,
        "dtype": args.dtype if args.dtype in (None, "auto") else dtype_name(args.dtype),
        "text.temperature": args.temperature, "text.top_p": args.top_p, "text.top_k": args.top_k,
        "image.temperature": args.image_temperature, "image.top_p": args.image_top_p,
        "image.top_k": args.image_top_k,
    }
    overrides = {k: str(v) for k, v in flags.items() if v is not None}
    overrides.update(parse_overrides(list(getattr(args, "overrides", None) or [])))
    return load_config(GenerationConfig, args.config, overrides)


def run(args: argparse.Namespace) -> Path:
    import torch

    import tessera.model
    from tessera.generate.document import Generator
    from tessera.generate.engine import GenerationError
    from tessera.generate.tokenizers import load_tokenizers
    from tessera.tokenizers.image import load_image

    cfg = _config(args)
    cfg.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts_in = args.parts or []
    chat = getattr(args, "chat", None)
    if chat and parts_in:
        raise GenerationError("--chat takes the whole prompt from the conversation: drop --prompt / --image")
    if not parts_in and not chat:
        raise GenerationError("give a prompt: --prompt TEXT and/or --image FILE, or --chat FILE")
    # Read every image before loading the model, so a bad file fails fast and is named.
    messages = read_conversation(chat) if chat else None
    parts: list = [load_image(v) if kind == "image" else v for kind, v in parts_in]
    device = cfg.device or default_device().type
    cfg.device = device
    model = tessera.model.load(args.checkpoint, device=device, adapters=getattr(args, "adapters", "merge"))
    if getattr(model, "vocab", None) is None:
        raise GenerationError(f"{model.path}: checkpoint has no vocabulary (vocab.json); cannot map ids to text/images")
    has_images = any(kind == "image" for kind, _ in parts_in) or any(
        not isinstance(c, str) for m in messages or [] for c in m["content"])
    tokenizers = load_tokenizers(
        model.path,
        text=args.text_tokenizer, image=args.image_tokenizer,
        need_image=has_images or cfg.mode != "text", device=device,
        also=(model.base.path,) if model.base is not None else (),
    )
    gen = Generator(model, tokenizers, cfg)

    progress = Progress("generate", total=cfg.max_new_tokens, unit="tok")
    on_token = None
    if args.stream:
        on_token = _Streamer(gen.vocab, tokenizers.text).on_token
    if messages is not None:
        doc = gen.chat([messages], cfg, on_token=on_token, progress=progress.update)[0]
    else:
        doc = gen.generate([parts], cfg, on_token=on_token, progress=progress.update)[0]
    progress.close()
    if args.stream:
        sys.stdout.write("\n")
    out = doc.save(args.out, extra={"checkpoint": str(args.checkpoint), "config": _plain(cfg)})
    s = doc.stats
    print(
        f"wrote {out}/document.json, document.html and {len(doc.images)} image(s): "
        f"{len(doc.new_ids)} new tokens ({doc.finish_reason}), {s['tokens_per_s']:.1f} tokens/s, "
        f"first token after {s['time_to_first_token_s'] * 1000:.0f} ms"
    )
    return out


def read_conversation(path: str | Path) -> list[dict]:
    """``--chat FILE``: a JSON list of messages or ``{"messages": [...]}`` (the training format's record);
    image parts (``{"type": "image", "image": PATH}``, ``"path"`` also read) are loaded from paths relative
    to the file. Errors name the file."""
    import json

    from tessera.data.chat import ChatError, normalise_messages
    from tessera.generate.engine import GenerationError
    from tessera.tokenizers.image import load_image

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerationError(f"{path}: cannot read the conversation: {exc}") from exc
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise GenerationError(f"{path}: expected a non-empty list of messages or {{\"messages\": [...]}}")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        parts = [content] if isinstance(content, str) else list(content or [])
        items = []
        for j, p in enumerate(parts):
            if isinstance(p, dict) and p.get("type") == "image":
                ref = p.get("image") or p.get("path")
                if not isinstance(ref, str):
                    raise GenerationError(f"{path}: messages[{i}].content[{j}]: an image part needs a file path")
                items.append({"type": "image", "image": load_image(path.parent / ref)})
            else:
                items.append(p)
        out.append({"role": m.get("role") if isinstance(m, dict) else None, "content": items})
    try:
        normalise_messages(out)  # roles and part types checked here, with the message index
    except ChatError as exc:
        raise GenerationError(f"{path}: {exc}") from exc
    return out


def _plain(cfg: GenerationConfig) -> dict:
    from tessera.config import to_dict

    return to_dict(cfg)


class _Streamer:
    """Print generated text as it grows (decoded whole each time: byte-fallback pieces join correctly)."""

    def __init__(self, vocab, text_tokenizer) -> None:  # noqa: ANN001
        self.vocab, self.tok = vocab, text_tokenizer
        self.pieces: list[int] = []
        self.shown = ""

    def on_token(self, seq: int, token: int) -> None:
        v = self.vocab
        if v.text_offset <= token < v.image_offset:
            self.pieces.append(token - v.text_offset)
            text = self.tok.decode(self.pieces)
            sys.stdout.write(text[len(self.shown) :] if text.startswith(self.shown) else text)
            self.shown = text
        elif token == v.boi_id:
            self.pieces, self.shown = [], ""
            sys.stdout.write(" [image ")
        elif token == v.eoi_id:
            sys.stdout.write("] ")
        sys.stdout.flush()


def main(args: argparse.Namespace) -> int:
    from tessera.convert.errors import ConvertError
    from tessera.generate.engine import GenerationError
    from tessera.model.checkpoint import CheckpointError
    from tessera.tokenizers.image import ImageTokenizerError
    from tessera.tokenizers.text import TextTokenizerError
    from tessera.tokenizers.vocab import VocabularyError

    errors = (GenerationError, VocabularyError, CheckpointError, ImageTokenizerError, TextTokenizerError, ConvertError)
    return expected_errors("tessera generate", *errors)(run_command)(args)


def run_command(args: argparse.Namespace) -> int:
    run(args)
    return 0
