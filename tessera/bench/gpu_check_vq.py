"""The image tokenizer part of ``tessera bench gpu-check`` (tessera/bench/gpu_check.py runs it):

``vq``: the `demo` VQ preset trains on the GPU in bf16 autocast (the trainer of ``tessera tokenizer
train-image``, with the error-weighted dead-code restarts) on rendered synthetic scenes: its loss stays
finite, its reconstructions beat the untrained model's, a step reads back from the device only what the
codebook's upkeep does (``TESSERA_COUNT_SYNCS``), and the tokenizer it saves gives the same codes and
reconstructions on the GPU and on the CPU.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import statistics
from pathlib import Path
from unittest import mock

from tessera import syncs
from tessera.bench.gpu_check_harness import Part, rel_err

# A training step's host reads besides the metrics, which the trainer keeps on the device: the library's
# codebook upkeep (its `initted` flag, the dead-code check, the restart's count and masked writes) and
# tessera.tokenizers.vq_restart's draw count. Four on the CPU's counter (tests/test_tokenizers_image.py);
# CUDA's sync debug mode also sees the masked indexing inside the restart.
MAX_SYNCS_PER_STEP = 8


def _render(folder: Path, n: int, seed: int, size: int) -> list[Path]:
    from tessera.data.synth import random_scene, render_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        render_scene(random_scene(rng), size).save(path)
        paths.append(path)
    return paths


def part_vq(p: Part) -> None:
    import torch

    from tessera.tokenizers.image import ImageTokenizer, VQConfig, load_image, preprocess
    from tessera.tokenizers.image_train import evaluate, load_train_config, train_image_tokenizer

    s, dry, device = p.ctx.sizes, p.ctx.dry_run, p.ctx.device
    work = p.ctx.out / "vq"
    shutil.rmtree(work, ignore_errors=True)
    size = VQConfig.preset("demo").image_size
    _render(work / "train", s.vq_images, seed=0, size=size)
    heldout = torch.stack([preprocess(load_image(f), size) for f in _render(work / "heldout", 64, seed=1, size=size)])

    overrides = {
        "data": str(work / "train"), "out": str(work / "tokenizer"), "train.steps": str(s.vq_steps),
        "train.batch_size": str(s.vq_batch), "train.device": device, "train.bf16": "true",
        "train.log_every": str(max(1, s.vq_steps // 4)), "train.ckpt_every": str(s.vq_steps),
        "train.image_every": str(s.vq_steps), "train.progress": "false", "train.resume": "false",
    }
    cfg = load_train_config(preset="demo", overrides=overrides)
    p.note(vq_steps=s.vq_steps, vq_batch=s.vq_batch, vq_images=s.vq_images, bf16=cfg.train.bf16,
           dead_code_restart=cfg.vq.dead_code_restart)
    torch.manual_seed(cfg.train.seed)
    untrained_psnr, _ = evaluate(ImageTokenizer.from_config(cfg.vq, device=torch.device(device)), heldout)

    p.need(10, "the VQ training")
    with mock.patch.dict(os.environ, {syncs.ENV_VAR: "1"}):  # the trainer counts each step's host reads
        result = train_image_tokenizer(cfg)
    p.note(train_seconds=result.seconds, images_per_s=result.steps * s.vq_batch / max(result.seconds, 1e-9))

    gpu_tok = ImageTokenizer.load(cfg.out, device=device)
    psnr, usage = evaluate(gpu_tok, heldout)
    margin = 0.0 if dry else 3.0  # the dry run's few steps only have to move the right way
    p.check("trained reconstructions beat the untrained model's (held-out PSNR)",
            math.isfinite(psnr) and psnr > untrained_psnr + margin, psnr_db=psnr, untrained_psnr_db=untrained_psnr,
            margin_db=margin, codebook_usage=usage)
    steady = result.host_syncs[1:]  # the first step also runs the codebook's k-means initialisation
    p.check("a step reads back only the codebook upkeep (metrics stay on the device)",
            bool(steady) and max(steady) <= MAX_SYNCS_PER_STEP,
            host_syncs_max=max(steady) if steady else None,
            host_syncs_median=statistics.median(steady) if steady else None, limit=MAX_SYNCS_PER_STEP,
            first_steps=result.host_syncs[:8])

    # the saved tokenizer is device-agnostic: the CPU reads the same codes and draws the same pictures. In
    # full fp32 (cuDNN's default TF32 convolutions would move latents by ~1e-3 and flip near-ties)
    cpu_tok = ImageTokenizer.load(cfg.out, device="cpu")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        codes_gpu, codes_cpu = gpu_tok.encode(heldout), cpu_tok.encode(heldout)
        recon_gpu, recon_cpu = gpu_tok.decode_tensor(codes_cpu), cpu_tok.decode_tensor(codes_cpu)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    agree = (codes_gpu == codes_cpu).float().mean().item()
    p.check("the saved tokenizer gives the same codes on the GPU and the CPU", agree >= 0.99, codes_equal=agree,
            limit=0.99)
    err = rel_err(recon_gpu, recon_cpu)
    p.check("and the same reconstructions from the same codes", err < 1e-2, recon_rel_err=err, limit=1e-2)
