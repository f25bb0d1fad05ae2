"""The same weights in transformers' ``ChameleonForConditionalGeneration`` (the decode benchmark's peer
and the greedy-equivalence test's reference).

Ids are kept as they are: the HF model gets Tessera's padded vocabulary, with ``vocabulary_map`` naming
Tessera's image-code ids ``IMGIMG...Z`` so transformers masks exactly those ids as image tokens. (The
full interop with Meta's id order lives in ``tessera/convert``; here only an equal model is needed.)
The HF vision tokenizer (``model.vqmodel``) is built tiny and random: decoding never touches it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tessera.tokenizers.vocab import Vocabulary


def _image_token_name(code: int) -> str:
    # transformers' ChameleonImageVocabularyMapping: digits spelled A-J between IMGIMG and a final char.
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's grouped rows ``[q heads of group g..., k_g, v_g]`` per query group -> q, k, v."""
    per = heads // groups
    hd = qkv.shape[0] // (groups * (per + 2))
    g = qkv.reshape(groups, (per + 2) * hd, qkv.shape[1])
    q = g[:, : per * hd].reshape(heads * hd, -1)
    k = g[:, per * hd : (per + 1) * hd].reshape(groups * hd, -1)
    v = g[:, (per + 1) * hd :].reshape(groups * hd, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _norm_weight(module: nn.Module, name: str) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if w is None:
        raise ValueError(f"{name}: expected a norm with an affine weight, got {type(module).__name__}")
    return w.detach()


def hf_state_dict_from_gpt(gpt: nn.Module, swin_norm: bool = False) -> dict[str, torch.Tensor]:
    """transformers Chameleon text-model tensors from a (TP=1, PP=1) GPTModel with the Chameleon spec."""
    cfg = gpt.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": gpt.embedding.word_embeddings.weight.detach(),
        "lm_head.weight": gpt.output_layer.weight.detach(),
        "model.norm.weight": _norm_weight(gpt.decoder.final_layernorm, "final_layernorm"),
    }
    for i, layer in enumerate(gpt.decoder.layers):
        h = f"model.layers.{i}."
        attn = layer.self_attention
        q, k, v = _split_qkv(attn.linear_qkv.weight.detach(), heads, groups)
        sd[h + "self_attn.q_proj.weight"], sd[h + "self_attn.k_proj.weight"] = q, k
        sd[h + "self_attn.v_proj.weight"] = v
        sd[h + "self_attn.o_proj.weight"] = attn.linear_proj.weight.detach()
        for hf_name, mod, n in (("q_norm", attn.q_layernorm, heads), ("k_norm", attn.k_layernorm, groups)):
            w, b = mod.weight.detach(), getattr(mod, "bias", None)
            hd = cfg.kv_channels or cfg.hidden_size // heads
            # A norm shared across heads ([head_dim]) is the same as a per-head one with equal rows.
            sd[h + f"self_attn.{hf_name}.weight"] = w.expand(n, hd).contiguous() if w.dim() == 1 else w
            b = torch.zeros(n, hd) if b is None else b.detach()
            sd[h + f"self_attn.{hf_name}.bias"] = b.expand(n, hd).contiguous() if b.dim() == 1 else b
        attn_norm, mlp_norm = _layer_norms(layer, swin_norm)
        sd[h + "input_layernorm.weight"] = _norm_weight(attn_norm, f"layer {i} attention norm")
        sd[h + "post_attention_layernorm.weight"] = _norm_weight(mlp_norm, f"layer {i} mlp norm")
        gate, up = layer.mlp.linear_fc1.weight.detach().chunk(2, dim=0)
        sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        sd[h + "mlp.down_proj.weight"] = layer.mlp.linear_fc2.weight.detach()
    return sd


def _layer_norms(layer: nn.Module, swin_norm: bool) -> tuple[nn.Module, nn.Module]:
    """(attention-branch norm, MLP-branch norm) wherever the layer spec put them."""
    from tessera.generate.norms import is_identity

    post_attn = getattr(layer, "post_self_attn_layernorm", None)
    post_mlp = getattr(layer, "post_mlp_layernorm", None)
    if swin_norm and post_attn is not None and not is_identity(post_attn):
        return post_attn, post_mlp
    return layer.input_layernorm, layer.pre_mlp_layernorm


def rotary_base_of(gpt: nn.Module) -> float:
    """Recover RoPE theta from the model's inverse frequencies (inv_freq[1] = theta^(-2/dim))."""
    inv = gpt.rotary_pos_emb.inv_freq.detach().double().cpu()
    dim = 2 * inv.numel()
    return float(math.exp(-math.log(inv[1].item()) * dim / 2)) if inv.numel() > 1 else 10000.0


def build_hf_chameleon(
    gpt: nn.Module,
    vocab: Vocabulary | None = None,
    swin_norm: bool = False,
    max_position_embeddings: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A ``ChameleonForConditionalGeneration`` holding exactly ``gpt``'s weights (eval mode)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    cfg = gpt.config
    sd = hf_state_dict_from_gpt(gpt, swin_norm=swin_norm)
    vocab_size = sd["lm_head.weight"].shape[0]
    vocabulary_map: dict[str, int] = {"<pad>": 0}
    if vocab is not None:
        vocabulary_map = {name: i for i, name in enumerate(vocab.special_tokens)}
        for code in range(vocab.num_image_codes):
            vocabulary_map[_image_token_name(code)] = vocab.image_offset + code
        vocabulary_map["<image>"] = vocab.special_id("<reserved0>") if "<reserved0>" in vocab.special_tokens else 0
    hf_cfg = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads,
        max_position_embeddings=max_position_embeddings or getattr(gpt, "max_sequence_length", 4096),
        rms_norm_eps=cfg.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": rotary_base_of(gpt)},
        swin_norm=swin_norm,
        tie_word_embeddings=False,
        pad_token_id=vocab.pad_id if vocab else 0,
        bos_token_id=vocab.bos_id if vocab else 1,
        eos_token_id=vocab.eos_id if vocab else 2,
        vocabulary_map=vocabulary_map,
        # Smallest valid VQ-VAE: the decode path never runs it.
        vq_config={
            "embed_dim": 4, "num_embeddings": 16, "latent_channels": 4, "resolution": 16, "base_channels": 32,
            "channel_multiplier": [1], "num_res_blocks": 1, "attn_resolutions": [],
        },
        attn_implementation="sdpa",
    )
    model = ChameleonForConditionalGeneration(hf_cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("model.vqmodel.")]
    if missing or unexpected:
        raise ValueError(f"weight mapping to transformers Chameleon failed: missing {missing}, unexpected {unexpected}")
    # Use the model's own frequencies bit for bit (theta recovered from them may differ in the last ulp).
    with torch.no_grad():
        inv = gpt.rotary_pos_emb.inv_freq.detach().float().cpu()
        model.model.rotary_emb.inv_freq.copy_(inv)
        model.model.rotary_emb.original_inv_freq.copy_(inv)
    return model.to(dtype).eval()
