"""Chameleon's VQGAN (taming-transformers names, as in Meta's vqgan.ckpt and transformers'
``model.vqmodel.*``) <-> Tessera's ``ImageTokenizer`` (tessera/tokenizers/image.py).

Same network, different module tree: taming nests ``down[level].block[i] / .attn[i] / .downsample``
and has separate q/k/v 1x1 convs; Tessera flattens each tower into one ``nn.Sequential`` and fuses
q/k/v into one conv. The codebook becomes vector-quantize-pytorch's ``_codebook.embed`` (EMA
statistics set so that further training starts from the imported codebook).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tessera.convert.errors import ConvertError
from tessera.tokenizers.image import ImageTokenizer, VQConfig, VQModel

HF_GROUPS = 32  # transformers and taming hard-code GroupNorm(32)


def vq_config_from_hf(vq: dict, where: str = "vq_config") -> VQConfig:
    if vq.get("double_latent") or vq.get("double_z"):
        raise ConvertError(f"{where}: double_latent=true (a KL-VAE encoder) is not a VQ tokenizer")
    if vq.get("in_channels", 3) != 3:
        raise ConvertError(f"{where}: in_channels={vq.get('in_channels')} (only RGB images are supported)")
    attn_type = vq.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "none", None):
        raise ConvertError(f"{where}: attn_type={attn_type!r} is not supported")
    return VQConfig(
        image_size=int(vq.get("resolution", 512)),
        in_channels=3,
        base_channels=int(vq.get("base_channels", vq.get("ch", 128))),
        channel_mults=tuple(vq.get("channel_multiplier", vq.get("ch_mult", (1, 1, 2, 2, 4)))),
        num_res_blocks=int(vq.get("num_res_blocks", 2)),
        attn_resolutions=tuple(vq.get("attn_resolutions") or ()) if attn_type == "vanilla" else (),
        mid_attention=attn_type == "vanilla",
        num_groups=HF_GROUPS,
        dropout=float(vq.get("dropout", 0.0)),
        z_channels=int(vq.get("latent_channels", vq.get("z_channels", 256))),
        embed_dim=int(vq.get("embed_dim", 256)),
        codebook_size=int(vq.get("num_embeddings", vq.get("n_embed", 8192))),
        kmeans_init=False,  # the codebook is trained already
    )


def hf_vq_config(cfg: VQConfig) -> dict:
    """transformers ``ChameleonVQVAEConfig`` fields for a Tessera VQ config (checks it is expressible)."""
    if cfg.encoder != "conv":
        raise ConvertError(f"image tokenizer uses the {cfg.encoder!r} encoder; transformers has only the conv encoder")
    if cfg.num_groups != HF_GROUPS:
        raise ConvertError(f"image tokenizer uses GroupNorm({cfg.num_groups}); transformers hard-codes GroupNorm(32)")
    if cfg.attn_resolutions and not cfg.mid_attention:
        raise ConvertError("image tokenizer has level attention without middle attention: not expressible in transformers")
    if cfg.use_cosine_sim:
        raise ConvertError("image tokenizer uses a cosine-similarity codebook; transformers' quantizer is Euclidean")
    return {
        "embed_dim": cfg.embed_dim,
        "num_embeddings": cfg.codebook_size,
        "double_latent": False,
        "latent_channels": cfg.z_channels,
        "resolution": cfg.image_size,
        "in_channels": cfg.in_channels,
        "base_channels": cfg.base_channels,
        "channel_multiplier": list(cfg.channel_mults),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_resolutions": list(cfg.attn_resolutions),
        "dropout": cfg.dropout,
        "attn_type": "vanilla" if cfg.mid_attention else "none",
    }


# ---- module-name correspondence ---------------------------------------------------------------
def _tower(cfg: VQConfig, decoder: bool) -> Iterator[tuple[str, str, str]]:
    """(taming prefix, tessera prefix, kind) for every block of one tower, in Tessera's order."""
    side = "decoder" if decoder else "encoder"
    yield f"{side}.conv_in", f"{side}.conv_in", "plain"
    mid = [("mid.block_1", "mid.0", "res"), ("mid.attn_1", "mid.1", "attn"), ("mid.block_2", "mid.2", "res")]
    if decoder:
        for t, s, kind in mid:
            if kind != "attn" or cfg.mid_attention:
                yield f"{side}.{t}", f"{side}.{s}", kind
    idx = 0
    n = len(cfg.channel_mults)
    levels = reversed(range(n)) if decoder else range(n)
    res = cfg.latent_size if decoder else cfg.image_size
    tname = "up" if decoder else "down"
    for level in levels:
        for b in range(cfg.num_res_blocks + (1 if decoder else 0)):
            yield f"{side}.{tname}.{level}.block.{b}", f"{side}.{tname}.{idx}", "res"
            idx += 1
            if res in cfg.attn_resolutions:
                yield f"{side}.{tname}.{level}.attn.{b}", f"{side}.{tname}.{idx}", "attn"
                idx += 1
        last = level == 0 if decoder else level == n - 1
        if not last:
            sample = "upsample" if decoder else "downsample"
            yield f"{side}.{tname}.{level}.{sample}.conv", f"{side}.{tname}.{idx}.conv", "plain"
            idx += 1
            res = res * 2 if decoder else res // 2
    if not decoder:
        for t, s, kind in mid:
            if kind != "attn" or cfg.mid_attention:
                yield f"{side}.{t}", f"{side}.{s}", kind
    yield f"{side}.norm_out", f"{side}.norm_out", "plain"
    yield f"{side}.conv_out", f"{side}.conv_out", "plain"


_RES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("nin_shortcut", "skip"))


def _pop(sd: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    try:
        return sd.pop(key)
    except KeyError:
        raise ConvertError(f"{where}: missing VQ tensor {key!r}") from None


def taming_to_tessera(state: dict[str, torch.Tensor], cfg: VQConfig, where: str) -> tuple[dict, bool]:
    """taming-named tensors -> ``VQModel`` state dict. Returns (state, has_decoder); without a decoder
    (transformers' checkpoints drop it) the decoder keys are absent from the result."""
    sd = dict(state)
    out: dict[str, torch.Tensor] = {}
    has_decoder = any(k.startswith("decoder.") for k in sd)
    towers = [False, True] if has_decoder else [False]
    for decoder in towers:
        for t, s, kind in _tower(cfg, decoder):
            if kind == "plain":
                for p in ("weight", "bias"):
                    out[f"{s}.{p}"] = _pop(sd, f"{t}.{p}", where)
            elif kind == "res":
                for tn, sn in _RES:
                    for p in ("weight", "bias"):
                        if tn == "nin_shortcut" and f"{t}.{tn}.{p}" not in sd:
                            continue  # same channel count: identity skip
                        out[f"{s}.{sn}.{p}"] = _pop(sd, f"{t}.{tn}.{p}", where)
            else:  # attn: separate q/k/v convs -> one fused qkv conv (q, k, v order)
                for p in ("weight", "bias"):
                    out[f"{s}.norm.{p}"] = _pop(sd, f"{t}.norm.{p}", where)
                    out[f"{s}.qkv.{p}"] = torch.cat([_pop(sd, f"{t}.{x}.{p}", where) for x in "qkv"], 0)
                    out[f"{s}.proj.{p}"] = _pop(sd, f"{t}.proj_out.{p}", where)
    for p in ("weight", "bias"):
        out[f"quant_conv.{p}"] = _pop(sd, f"quant_conv.{p}", where)
        out[f"post_quant_conv.{p}"] = _pop(sd, f"post_quant_conv.{p}", where)
    emb = _pop(sd, "quantize.embedding.weight", where)
    if tuple(emb.shape) != (cfg.codebook_size, cfg.embed_dim):
        raise ConvertError(
            f"{where}: quantize.embedding.weight has shape {tuple(emb.shape)}, "
            f"expected ({cfg.codebook_size}, {cfg.embed_dim})"
        )
    out["quantizer._codebook.embed"] = emb[None].clone()
    out["quantizer._codebook.embed_avg"] = emb[None].clone()
    out["quantizer._codebook.cluster_size"] = torch.ones(1, cfg.codebook_size)
    out["quantizer._codebook.initted"] = torch.tensor(True)
    leftover = sorted(sd)
    if leftover:
        raise ConvertError(f"{where}: unexpected VQ tensor {leftover[0]!r} (does vq_config match the weights?)")
    return out, has_decoder


def tessera_to_taming(model_sd: dict[str, torch.Tensor], cfg: VQConfig, decoder: bool) -> dict[str, torch.Tensor]:
    """Inverse of ``taming_to_tessera`` (encoder, codebook, 1x1 convs and optionally the decoder)."""
    sd = model_sd
    out: dict[str, torch.Tensor] = {}
    where = "image tokenizer"
    for dec in [False, True] if decoder else [False]:
        for t, s, kind in _tower(cfg, dec):
            if kind == "plain":
                for p in ("weight", "bias"):
                    out[f"{t}.{p}"] = sd[f"{s}.{p}"]
            elif kind == "res":
                for tn, sn in _RES:
                    for p in ("weight", "bias"):
                        if f"{s}.{sn}.{p}" in sd:
                            out[f"{t}.{tn}.{p}"] = sd[f"{s}.{sn}.{p}"]
            else:
                for p in ("weight", "bias"):
                    out[f"{t}.norm.{p}"] = sd[f"{s}.norm.{p}"]
                    q, k, v = sd[f"{s}.qkv.{p}"].chunk(3, 0)
                    out[f"{t}.q.{p}"], out[f"{t}.k.{p}"], out[f"{t}.v.{p}"] = q.clone(), k.clone(), v.clone()
                    out[f"{t}.proj_out.{p}"] = sd[f"{s}.proj.{p}"]
    for p in ("weight", "bias"):
        out[f"quant_conv.{p}"] = sd[f"quant_conv.{p}"]
        out[f"post_quant_conv.{p}"] = sd[f"post_quant_conv.{p}"]
    emb = sd.get("quantizer._codebook.embed")
    if emb is None or emb.dim() != 3 or emb.shape[0] != 1:
        raise ConvertError(f"{where}: expected a single codebook quantizer._codebook.embed [1, K, D]")
    out["quantize.embedding.weight"] = emb[0]
    return out


def image_tokenizer_from_taming(state: dict[str, torch.Tensor], vq: dict, where: str) -> tuple[ImageTokenizer, bool]:
    cfg = vq_config_from_hf(vq, where)
    sd, has_decoder = taming_to_tessera(state, cfg, where)
    cfg.has_decoder = has_decoder  # decode() refuses rather than draw with an untrained decoder
    model = VQModel(cfg)
    if not has_decoder:
        # transformers' checkpoints carry no decoder: keep the freshly initialised one out of the
        # strict check; the caller records that this tokenizer cannot decode.
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("decoder.")})
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ConvertError(f"{where}: VQ weights do not fit the image tokenizer: {exc}") from None
    return ImageTokenizer(cfg, model), has_decoder
