"""Tiny Chameleon checkpoints for tests and benchmarks, built locally (nothing downloaded).

``make_chameleon_tokenizer`` writes a Chameleon-shaped tokenizer.json: ``<s> <pad> </s> <unk>``, the
image codes ``IMGIMG..Z`` at ids 4.., then ``<eoss> <racm3:break> <image>`` and BPE text pieces,
i.e. image codes *inside* the text id range as in the real 65536-id vocabulary.
``make_hf_chameleon`` saves a random transformers ``ChameleonForConditionalGeneration``;
``write_meta_layout`` writes the same weights in Meta's release layout (the inverse of
transformers' convert_chameleon_weights_to_hf.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tessera.convert.hf_vocab import HF_BOI, HF_EOI, HF_IMAGE, image_token_name
from tessera.convert.layout import half_to_interleaved

CORPUS = [
    "A red circle sits above a blue square.",
    "Two green triangles and one yellow star, drawn on a white canvas!",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Tessera converts Chameleon checkpoints both ways; nothing is lost.",
] * 8


def make_chameleon_tokenizer(out_dir: Path, num_image_codes: int, text_vocab: int = 200) -> dict[str, int]:
    """Train a tiny byte-level BPE with Chameleon's special/image token layout; returns its vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(num_image_codes)]
    specials += [HF_EOI, HF_BOI, HF_IMAGE, "<reserved08706>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + text_vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "sep_token": "<reserved08706>",
                "model_max_length": 4096,
            }
        )
    )
    return tok.get_vocab()


def tiny_vq_config(num_codes: int = 32) -> dict[str, Any]:
    """A transformers vq_config small enough for CPU tests: 32 px -> 8 x 8 codes."""
    return {
        "embed_dim": 8,
        "num_embeddings": num_codes,
        "latent_channels": 8,
        "resolution": 32,
        "in_channels": 3,
        "base_channels": 32,
        "channel_multiplier": [1, 1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [16],
        "dropout": 0.0,
        "attn_type": "vanilla",
    }


def make_hf_chameleon(
    out_dir: Path,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 192,
    swin_norm: bool = False,
    num_image_codes: int = 32,
    seed: int = 0,
    max_shard_size: str | None = None,
    per_rank_qk_norm: int = 0,
):
    """Save a random ``ChameleonForConditionalGeneration`` (+ tokenizer) to ``out_dir``; return the model.

    Norm weights and QK-norm affine params are randomised too (they are ones/zeros at init, which would
    hide a wrong mapping). ``per_rank_qk_norm=N`` makes the QK-norm params constant across the heads of
    each of N model-parallel ranks, the only QK-norm that Meta's layout can express."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    vocab = make_chameleon_tokenizer(out_dir, num_image_codes)
    cfg = ChameleonConfig(
        vocab_size=len(vocab) + 3,  # a few ids the tokenizer never produces, as in the real model
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=256,
        swin_norm=swin_norm,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        vq_config=tiny_vq_config(num_image_codes),
        vocabulary_map=vocab,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "_norm." in name or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
        if per_rank_qk_norm:
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    for p in (norm.weight, norm.bias):
                        per = p.shape[0] // per_rank_qk_norm
                        p.copy_(p[::per].repeat_interleave(per, 0))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    return model


def _multiple_of(dim: int, ffn: int) -> int:
    """Meta's params.json stores no FFN size: it is ``multiple_of``-rounded 8/3 x dim."""
    from tessera.convert.meta import meta_ffn_size

    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_size(dim, 1.0, m) == ffn:
            return m
    raise ValueError(f"intermediate_size {ffn} is not Meta's rounded 8/3 x {dim}; pick another size")


def write_meta_layout(model, meta_dir: Path, num_shards: int = 1, hf_tokenizer_dir: Path | None = None) -> None:
    """Write ``model`` (a transformers Chameleon) in Meta's release layout (see ``write_meta_from_state``)."""
    tok = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text()) if hf_tokenizer_dir is not None else None
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_meta_from_state(sd, model.config.to_dict(), meta_dir, num_shards, tok)


def write_meta_from_state(
    sd: dict[str, torch.Tensor], cfg: dict, meta_dir: Path, num_shards: int = 1, tokenizer_json: dict | None = None
) -> None:
    """transformers-named tensors + config dict -> ``models/7b/{params.json, consolidated.NN.pth}`` and
    ``tokenizer/{text_tokenizer.json, vqgan.ckpt, vqgan.yaml}``; QK-norm as one [head_dim] vector per
    rank in Meta's interleaved RoPE order (the inverse of transformers' conversion script)."""
    import yaml

    n_heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    mdir = meta_dir / "models" / "7b"
    mdir.mkdir(parents=True, exist_ok=True)
    params = {
        "model_parallel_size": num_shards,
        "model": {
            "dim": dim, "n_layers": cfg["num_hidden_layers"], "n_heads": n_heads,
            "n_kv_heads": n_kv if n_kv != n_heads else None, "vocab_size": cfg["vocab_size"],
            "norm_eps": cfg.get("rms_norm_eps", 1e-5), "rope_theta": cfg["rope_parameters"]["rope_theta"],
            "qk_normalization": True, "swin_norm": bool(cfg.get("swin_norm")),
            "ffn_dim_multiplier": 1.0, "multiple_of": _multiple_of(dim, cfg["intermediate_size"]),
        },
    }
    (mdir / "params.json").write_text(json.dumps(params))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]

    def split(t: torch.Tensor, d: int) -> list[torch.Tensor]:
        return [c.clone() for c in t.chunk(num_shards, dim=d)]

    def put(key: str, parts: list[torch.Tensor]) -> None:
        for s, p in zip(shards, parts, strict=True):
            s[key] = p

    put("tok_embeddings.weight", split(sd["model.embed_tokens.weight"], 1))
    put("output.weight", split(sd["lm_head.weight"], 0))
    put("norm.weight", [sd["model.norm.weight"]] * num_shards)
    for i in range(cfg["num_hidden_layers"]):
        h, m = f"model.layers.{i}.", f"layers.{i}."
        put(m + "attention.wq.weight", split(half_to_interleaved(sd[h + "self_attn.q_proj.weight"], n_heads), 0))
        put(m + "attention.wk.weight", split(half_to_interleaved(sd[h + "self_attn.k_proj.weight"], n_kv), 0))
        put(m + "attention.wv.weight", split(sd[h + "self_attn.v_proj.weight"], 0))
        put(m + "attention.wo.weight", split(sd[h + "self_attn.o_proj.weight"], 1))
        put(m + "feed_forward.w1.weight", split(sd[h + "mlp.gate_proj.weight"], 0))
        put(m + "feed_forward.w3.weight", split(sd[h + "mlp.up_proj.weight"], 0))
        put(m + "feed_forward.w2.weight", split(sd[h + "mlp.down_proj.weight"], 1))
        put(m + "attention_norm.weight", [sd[h + "input_layernorm.weight"]] * num_shards)
        put(m + "ffn_norm.weight", [sd[h + "post_attention_layernorm.weight"]] * num_shards)
        for hf_name, meta_name in (("q_norm", "q_normalization"), ("k_norm", "k_normalization")):
            for kind in ("weight", "bias"):
                w = sd[h + f"self_attn.{hf_name}.{kind}"]  # [heads, hd], constant within each rank
                per_rank = w[:: w.shape[0] // num_shards]  # [num_shards, hd]
                if not torch.equal(per_rank.repeat_interleave(w.shape[0] // num_shards, 0), w):
                    raise ValueError(f"{h}self_attn.{hf_name}.{kind} differs within a rank: Meta's layout cannot hold "
                                     f"it (build the model with per_rank_qk_norm={num_shards})")
                put(m + f"attention.{meta_name}.{kind}", [half_to_interleaved(r, 1) for r in per_rank])
    for r, s in enumerate(shards):
        torch.save(s, mdir / f"consolidated.{r:02d}.pth")

    tdir = meta_dir / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    vq = {k[len("model.vqmodel.") :]: v for k, v in sd.items() if k.startswith("model.vqmodel.")}
    torch.save({"state_dict": vq}, tdir / "vqgan.ckpt")
    v = cfg["vq_config"]
    vq_yaml = {
        "model": {
            "params": {
                "embed_dim": v["embed_dim"],
                "n_embed": v["num_embeddings"],
                "ddconfig": {
                    "double_z": v.get("double_latent", False), "z_channels": v["latent_channels"],
                    "resolution": v["resolution"], "in_channels": v.get("in_channels", 3), "out_ch": 3,
                    "ch": v["base_channels"], "ch_mult": list(v["channel_multiplier"]),
                    "num_res_blocks": v["num_res_blocks"], "attn_resolutions": list(v.get("attn_resolutions") or []),
                    "dropout": v.get("dropout", 0.0),
                },
                "lossconfig": {"target": "none"},
                "ckpt_path": "none",
            }
        }
    }
    (tdir / "vqgan.yaml").write_text(yaml.safe_dump(vq_yaml))
    if tokenizer_json is not None:
        tok = json.loads(json.dumps(tokenizer_json))
        # Meta's file names the placeholder <reserved08707>; transformers renames it to <image>.
        tok["model"]["vocab"]["<reserved08707>"] = tok["model"]["vocab"].pop(HF_IMAGE)
        for t in tok.get("added_tokens", []):
            if t["content"] == HF_IMAGE:
                t["content"] = "<reserved08707>"
        (tdir / "text_tokenizer.json").write_text(json.dumps(tok))
