"""Regenerate docs/generation.md's example document from a demo run, in one command:

    python -m tessera.generate.example                      # demo_out/train/run -> docs/generation_example/
    python -m tessera.generate.example --run RUN --out DIR  # any run or checkpoint dir with its tokenizers

It is ``tessera generate`` with the example's fixed prompt and settings (interleaved mode, image temperature
0.5, classifier-free guidance 1.5, seed 0, one thread), so the page's files are reproducible from the checkpoint alone:
``tessera demo --out demo_out`` installs the tokenizers into ``demo_out/train/run/tokenizers/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RUN = "demo_out/train/run"
DEFAULT_OUT = "docs/generation_example"
# the first held-out caption of the demo corpus (seed 0), in the corpus grammar (no final period)
PROMPT = "a large red square on the right"
# One thread: the example's tokens do not depend on it, but its reported tokens/s does, and one thread is the
# steadiest on a shared machine.
# interleaved: the model itself decides to open an image after the text, draws it, and ends the document;
# image sampling as in the demo's evaluation (temperature 0.5, guidance 1.5)
SETTINGS = ("--mode", "interleaved", "--image-temperature", "0.5", "--cfg-scale", "1.5", "--seed", "0", "--threads", "1",
            "--max-new-tokens", "200")


def command(run: str | Path, out: str | Path) -> list[str]:
    """The ``tessera generate`` argv that makes the example (docs/generation.md quotes it)."""
    return ["generate", "--checkpoint", str(run), "--prompt", PROMPT, *SETTINGS, "--out", str(out)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tessera.generate.example", description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=DEFAULT_RUN, help=f"run or checkpoint directory (default: {DEFAULT_RUN})")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory, replaced whole (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if not Path(args.run).exists():
        print(f"tessera.generate.example: error: {args.run} does not exist: run `tessera demo --out demo_out` "
              "(make demo) first, or pass --run", file=sys.stderr)
        return 2
    from tessera.cli import main as cli_main

    argv_ = command(args.run, args.out)
    print("tessera " + " ".join(f'"{a}"' if " " in a else a for a in argv_), file=sys.stderr)
    return cli_main(argv_)


if __name__ == "__main__":
    sys.exit(main())
