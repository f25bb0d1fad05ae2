"""``tessera model info PRESET``: the shape and exact parameter count of a preset."""

from __future__ import annotations

import argparse

from tessera.cli_common import expected_errors


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("info", help="print a preset's shape and exact parameter count (built on the meta device)")
    p.add_argument("preset", help="tiny, demo, chameleon-7b, chameleon-34b")
    p.set_defaults(func=_info)


@expected_errors("tessera model info")
def _info(args: argparse.Namespace) -> int:
    from tessera.model.config import get_preset
    from tessera.model.params import count_parameters, parameter_breakdown

    cfg = get_preset(args.preset)
    total = count_parameters(cfg)
    parts = parameter_breakdown(cfg)
    print(f"preset            {args.preset}")
    print(f"layers            {cfg.num_layers}")
    print(f"hidden            {cfg.hidden_size}  (ffn {cfg.ffn_hidden_size}, SwiGLU)")
    print(f"heads             {cfg.num_attention_heads} x {cfg.head_dim}  (kv groups {cfg.kv_groups})")
    print(f"vocab (padded)    {cfg.vocab_size}")
    print(f"context           {cfg.seq_length}")
    print(f"qk_norm           {cfg.qk_norm}  swin_norm {cfg.swin_norm}  dropout {cfg.hidden_dropout}/{cfg.attention_dropout}")
    print(f"params_dtype      {cfg.params_dtype}")
    print(f"embedding         {parts['embedding']:,}")
    print(f"per layer         {parts['per_layer']:,}")
    print(f"output layer      {parts['output_layer']:,}")
    print(f"parameters        {total:,}")
    return 0
