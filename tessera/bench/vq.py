"""``tessera bench vq``: images/s of our VQ tokenizer's encode and decode against transformers'
``ChameleonVQVAE`` encoder, both built at the same shape with random weights.

transformers ships only the Chameleon VQ ENCODER (image -> codes), so decode has no baseline. Its
GroupNorm has 32 groups hard-coded, so the benchmark shape uses 32 groups (and >= 32 base channels)
on both sides. Both sides include the quantizer (nearest-code search) in encode; no_grad, eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from tessera.bench.machine import interleaved_best_times
from tessera.utils import default_device


def bench_vq_config(preset: str):
    from tessera.tokenizers.image import VQConfig

    cfg = VQConfig.preset(preset)
    base = max(32, cfg.base_channels)
    # random codebook (no k-means on first use), GroupNorm(32) like transformers
    return dataclasses.replace(cfg, base_channels=base, num_groups=32, kmeans_init=False)


def hf_vq_encoder(cfg):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    hf_cfg = ChameleonVQVAEConfig(
        embed_dim=cfg.embed_dim,
        num_embeddings=cfg.codebook_size,
        latent_channels=cfg.z_channels,
        resolution=cfg.image_size,
        in_channels=cfg.in_channels,
        base_channels=cfg.base_channels,
        channel_multiplier=list(cfg.channel_mults),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=list(cfg.attn_resolutions) or None,
        attn_type="vanilla" if cfg.mid_attention else "none",
        dropout=0.0,
    )
    return ChameleonVQVAE(hf_cfg).eval()


def benchmark_vq(
    preset: str = "demo",
    batch: int = 8,
    steps: int = 3,
    dtype: str = "fp32",
    baseline: bool = True,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    from tessera.tokenizers.image import ImageTokenizer

    dev = default_device(device or None)
    cfg = bench_vq_config(preset)
    torch.manual_seed(seed)
    ours = ImageTokenizer.from_config(cfg, batch_size=batch, device=dev)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x = x.to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def ours_encode():
        with amp:
            return ours.encode(x)

    codes = ours_encode()

    def ours_decode():
        with amp:
            return ours.decode_tensor(codes)

    fns = {"encode": ours_encode, "decode": ours_decode}
    hf = None
    if baseline:
        hf = hf_vq_encoder(cfg).to(dev)

        @torch.no_grad()
        def hf_encode():
            with amp:
                return hf.encode(x).image_tokens

        fns["hf_encode"] = hf_encode
    times = interleaved_best_times(fns, dev, repeats=steps)
    n_ours = sum(p.numel() for p in ours.model.encoder.parameters()) + sum(
        p.numel() for p in ours.model.quant_conv.parameters())
    rows = []
    for key, name, op, n in (("encode", "tessera VQ", "encode", n_ours), ("decode", "tessera VQ", "decode", None),
                             ("hf_encode", "transformers ChameleonVQVAE", "encode", None)):
        if key not in times:
            continue
        if key == "hf_encode":
            n = sum(p.numel() for p in hf.encoder.parameters()) + sum(p.numel() for p in hf.quant_conv.parameters())
        best, med = min(times[key]), sorted(times[key])[len(times[key]) // 2]
        rows.append({"implementation": name, "op": op, "encoder_params": n, "batch": batch, "s_best": best,
                     "s_median": med, "images_per_s": batch / best})
    res: dict = {"preset": preset, "config": dataclasses.asdict(cfg), "dtype": dtype, "device": str(dev),
                 "tokens_per_image": cfg.tokens_per_image, "rows": rows}
    if baseline:
        res["encode_speedup_vs_transformers"] = min(times["hf_encode"]) / min(times["encode"])
    return res
