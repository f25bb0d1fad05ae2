"""Training the VQ image tokenizer (VQGAN recipe).

Loss = L1 + L2 reconstruction + VectorQuantize's commitment loss (+ optional perceptual loss from a
user-supplied TorchScript feature net) + a PatchGAN hinge-loss adversarial term switched on at
``train.disc_start``. AdamW, gradient clipping, bf16 autocast, DDP under torchrun, TensorBoard,
Progress lines, atomic checkpoints with exact resume (the data order is a pure function of the step
and every RNG state is checkpointed).

Output directory layout::

    OUT/config.json, OUT/model.safetensors   the tokenizer (ImageTokenizer.load(OUT))
    OUT/train_config.yaml                    the resolved config
    OUT/checkpoints/step_XXXXXXXX.pt, latest training state for resume
    OUT/tb/                                  TensorBoard logs
    OUT/reconstructions.png                  inputs (top) and reconstructions (bottom) at the end
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tessera.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    parse_overrides,
    read_yaml_mapping,
    save_config,
    to_dict,
)
from tessera.data.raw import FormatError, ImageRef, index_images, load_image_ref
from tessera.progress import Progress
from tessera.syncs import HostSyncCounter, NullCounter, counting_enabled
from tessera.tokenizers.image import (
    VQ_PRESETS,
    ImageTokenizer,
    ImageTokenizerError,
    VQConfig,
    VQModel,
    preprocess,
)
from tessera.utils import atomic_path, atomic_write_text, launch_env, world_size

log = logging.getLogger(__name__)


@dataclass
class VQTrainConfig:
    steps: int = 1000
    batch_size: int = 16  # per rank
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # > 0: pixels far from the image's background (median border colour) weigh 1 + fg_weight in the
    # reconstruction loss, so small flat-colour objects on a plain background keep their colour
    # (unweighted, the background dominates the loss and objects come back as blurred mean colours)
    fg_weight: float = 0.0
    disc_start: int = 10_000  # step at which the adversarial loss switches on
    disc_weight: float = 0.1
    disc_lr: float = 2e-4
    disc_channels: int = 64
    disc_layers: int = 3
    perceptual_weights: str | None = None  # TorchScript file: images [-1,1] -> feature map(s)
    perceptual_weight: float = 1.0
    bf16: bool = True  # autocast; used on GPU, and on CPU where it is also the fast path
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    num_workers: int = 0
    log_every: int = 25
    image_every: int = 250
    ckpt_every: int = 250
    keep_checkpoints: int = 2
    resume: bool = True  # continue from OUT/checkpoints/latest when it exists
    progress: bool = True


@dataclass
class ImageTokenizerTrainConfig:
    vq: VQConfig = field(default_factory=VQConfig)
    train: VQTrainConfig = field(default_factory=VQTrainConfig)
    data: list[str] = field(default_factory=list)  # image folders, image files, .tar shards, folders of shards
    out: str = "vq_out"


TRAIN_PRESETS: dict[str, dict] = {
    "chameleon": {"vq": VQ_PRESETS["chameleon"], "train": {"batch_size": 8, "steps": 500_000, "lr": 1e-4}},
    # Sized for the CPU demo. fp32: bf16 autocast convolutions measured slower (docs/benchmarks.md, "vq"); no
    # GAN (it needs far more steps to pay off); foreground-weighted loss so the palette colours survive.
    "demo": {
        "vq": VQ_PRESETS["demo"],
        "train": {"batch_size": 16, "steps": 800, "lr": 1e-3, "fg_weight": 8.0, "bf16": False,
                  "disc_start": 1_000_000, "disc_weight": 0.05, "disc_channels": 32, "disc_layers": 2,
                  "log_every": 50, "image_every": 200, "ckpt_every": 200},
    },
    "tiny": {
        "vq": VQ_PRESETS["tiny"],
        "train": {"batch_size": 16, "steps": 200, "lr": 2e-3, "disc_start": 150, "disc_channels": 16,
                  "disc_layers": 2, "bf16": False, "log_every": 50, "image_every": 100, "ckpt_every": 100,
                  "progress": False},
    },
}


def load_train_config(
    path: str | Path | None = None, preset: str | None = None, overrides: list[str] | dict | None = None
) -> ImageTokenizerTrainConfig:
    """Preset (or defaults) <- YAML file <- ``--section.key value`` overrides."""
    import copy


    data: dict = {}
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {sorted(TRAIN_PRESETS)}")
        data = copy.deepcopy(TRAIN_PRESETS[preset])
    source = f"preset {preset}" if preset else "<defaults>"
    if path is not None:
        source = str(path)
        loaded = read_yaml_mapping(path)
        for k, v in loaded.items():
            if isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        data = apply_overrides(data, ImageTokenizerTrainConfig, ov)
    return from_dict(ImageTokenizerTrainConfig, data, source)


# ---- data ------------------------------------------------------------------------------------


def discover_images(inputs: Sequence[str | Path]) -> list[ImageRef]:
    """Every image under the inputs (image files, image folders, .tar shards of any layout, folders of shards),
    through the one reader (``tessera.data.raw.index_images``)."""
    try:
        return index_images([str(i) for i in inputs])
    except FormatError as exc:
        raise ImageTokenizerError(str(exc)) from exc


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images; an unreadable one yields (where, why) (counted and skipped by the collate)."""

    def __init__(self, refs: list[ImageRef], size: int) -> None:
        self.refs, self.size = refs, size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor | tuple[str, str]:
        ref = self.refs[i]
        try:
            return preprocess(load_image_ref(ref), self.size)
        except Exception as exc:  # PIL raises many types for bad bytes
            return (str(ref), f"{type(exc).__name__}: {exc}")


def collate(batch: list) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    good = [b for b in batch if isinstance(b, torch.Tensor)]
    bad = [b for b in batch if not isinstance(b, torch.Tensor)]
    return (torch.stack(good) if good else torch.empty(0)), bad


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches as a pure function of the step: the global stream is a concatenation of seeded
    permutations, step s covers positions [s*G, (s+1)*G) with G = batch*world, rank r its slice.
    Resuming at step s therefore replays exactly the data an uninterrupted run would see."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, steps: int, rank: int = 0, world: int = 1):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.steps, self.rank, self.world = start_step, steps, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, pos: int) -> int:
        epoch, k = divmod(pos, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][k])

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        g = self.bs * self.world
        for s in range(self.start, self.steps):
            base = s * g + self.rank * self.bs
            yield [self._index(base + j) for j in range(self.bs)]


# ---- losses ----------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) discriminator; GroupNorm instead of BatchNorm so DDP needs no buffer sync."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            cout = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, cout, 4, stride, 1, bias=False), nn.GroupNorm(min(32, cout // 4), cout), nn.LeakyReLU(0.2)]
            c = cout
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def foreground_weight(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel loss weight [n, 1, H, W]: 1 on the background (the median border colour of each image),
    rising to 1 + fg_weight on pixels at least half the colour range away from it."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)  # [n, 3, 4*S]
    bg = border.median(dim=-1).values[:, :, None, None]
    dist = (x - bg).pow(2).sum(1, keepdim=True).sqrt()  # 0 .. 2*sqrt(3) in [-1, 1] units
    return 1.0 + fg_weight * (dist / 1.0).clamp(max=1.0)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


class PerceptualLoss(nn.Module):
    """LPIPS-style distance with a user-supplied TorchScript feature net (nothing is downloaded):
    the net maps images in [-1, 1] to one feature map or a list of them; the loss is the mean
    squared difference of channel-normalised features, summed over maps."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ImageTokenizerError(f"{path}: perceptual weights file not found")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise ImageTokenizerError(f"{path}: not a TorchScript module: {exc}") from exc
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # the feature net stays frozen in eval mode

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.net(x), self.net(y)
        if isinstance(fx, torch.Tensor):
            fx, fy = [fx], [fy]
        loss = x.new_zeros(())
        for a, b in zip(fx, fy, strict=True):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            loss = loss + (a - b).pow(2).sum(1).mean()
        return loss


def psnr_tensor(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB between images in [-1, 1] (peak = full range), as a 0-d tensor on their device."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).mean()
    return -10 * torch.log10(mse.clamp_min(1e-12))


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """``psnr_tensor`` read back as a float (a host sync on a GPU)."""
    return psnr_tensor(x, y).item()


def image_grid(top: torch.Tensor, bottom: torch.Tensor, n: int = 8) -> torch.Tensor:
    """[3, 2H, n*W] in [0, 1]: inputs above reconstructions."""
    t, b = top[:n].float().clamp(-1, 1), bottom[:n].float().clamp(-1, 1)
    rows = [torch.cat(list(r), dim=-1) for r in (t, b)]
    return (torch.cat(rows, dim=-2) + 1) / 2


# ---- training loop ---------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    psnr: float  # eval-mode reconstruction PSNR over (up to) the first 64 images
    codebook_usage: float  # fraction of codes used on those images
    corrupt: int
    # host syncs of each training step (forward, backward, optimizer steps, metrics), with TESSERA_COUNT_SYNCS=1
    host_syncs: list[int] = field(default_factory=list)


def _atomic_save(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


@torch.no_grad()
def evaluate(tok: ImageTokenizer, images: torch.Tensor) -> tuple[float, float]:
    """(PSNR, codebook usage) of encode -> decode on ``images`` [n, 3, S, S]."""
    codes = tok.encode(images)
    recon = tok.decode_tensor(codes)
    return psnr(images, recon), codes.unique().numel() / tok.num_codes


def train_image_tokenizer(cfg: ImageTokenizerTrainConfig) -> TrainResult:
    """Train (or resume) a VQ tokenizer into ``cfg.out``; returns final metrics (rank 0's view)."""
    tc, vc = cfg.train, cfg.vq
    out = Path(cfg.out)
    rank, world, local_rank = launch_env()
    distributed = world > 1
    if tc.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(tc.device if tc.device != "cuda" else f"cuda:{local_rank}")
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0

    refs = discover_images(cfg.data)
    ckpt_dir = out / "checkpoints"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_config.yaml")

    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = VQModel(vc).to(device)
    disc = PatchDiscriminator(vc.in_channels, tc.disc_channels, tc.disc_layers).to(device)
    perceptual = PerceptualLoss(tc.perceptual_weights).to(device) if tc.perceptual_weights else None
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=tc.disc_lr, betas=tc.betas, weight_decay=tc.weight_decay)

    start = 0
    latest = ckpt_dir / "latest"
    if tc.resume and latest.is_file():
        ck_path = ckpt_dir / latest.read_text().strip()
        try:
            ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as exc:
            raise ImageTokenizerError(f"{ck_path}: unreadable checkpoint: {exc}") from exc
        model.load_state_dict(ck["model"])
        disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        opt_d.load_state_dict(ck["opt_d"])
        _set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
        start = int(ck["step"])
        if is_main:
            log.info("resuming from %s at step %d", ck_path, start)

    ddp_model: nn.Module = model
    ddp_disc: nn.Module = disc
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        ddp_disc = nn.parallel.DistributedDataParallel(disc, device_ids=ids)

    dataset = ImageDataset(refs, vc.image_size)
    sampler = StepBatchSampler(len(refs), tc.batch_size, tc.seed, start, tc.steps, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=tc.num_workers,
        persistent_workers=False, pin_memory=device.type == "cuda",
        # Own generator: creating the iterator must not draw from the global RNG, or a resumed run
        # (which creates it after restoring the RNG) would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(tc.seed),
    )
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=start if start else None)

    use_bf16 = tc.bf16 and (device.type == "cuda" or device.type == "cpu")

    def autocast():  # noqa: ANN202
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    corrupt, warned = 0, False
    # The step's metrics stay on the device and are read back once per log interval: every read of a
    # device value is a host sync that stalls the queue (the library's codebook upkeep already costs some).
    hist = torch.zeros(vc.codebook_size, dtype=torch.long, device=device)
    sums: dict[str, torch.Tensor] = {}
    nsum = 0
    count_syncs = counting_enabled()
    host_syncs: list[int] = []  # per step, with TESSERA_COUNT_SYNCS=1
    t0 = time.perf_counter()
    progress = Progress("train-image", total=tc.steps, unit="step", enabled=is_main and tc.progress)
    progress.count = start
    model.train()
    disc.train()
    step = start
    for x, bad in loader:
        if bad:
            corrupt += len(bad)
            if not warned:
                log.warning("skipping unreadable image %s: %s", *bad[0])
                warned = True
        if x.numel() == 0:
            step += 1
            continue
        syncs = HostSyncCounter(device) if count_syncs else NullCounter()
        with syncs:
            x = x.to(device, non_blocking=True)
            use_disc = step >= tc.disc_start and tc.disc_weight > 0
            # ---- generator / autoencoder step
            for p in disc.parameters():
                p.requires_grad_(False)
            with autocast():
                recon, commit, idx = ddp_model(x)
                recon = recon.float()
                if tc.fg_weight > 0:
                    w = foreground_weight(x, tc.fg_weight)
                    l1 = ((recon - x).abs() * w).mean()
                    l2 = ((recon - x).pow(2) * w).mean()
                else:
                    l1 = (recon - x).abs().mean()
                    l2 = (recon - x).pow(2).mean()
                loss = tc.l1_weight * l1 + tc.l2_weight * l2 + commit
                p_loss = perceptual(x, recon) if perceptual is not None else None
                if p_loss is not None:
                    loss = loss + tc.perceptual_weight * p_loss
                g_loss = -disc(recon).float().mean() if use_disc else None  # unwrapped: no DDP sync needed
                if g_loss is not None:
                    loss = loss + tc.disc_weight * g_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            for p in disc.parameters():
                p.requires_grad_(True)
            # ---- discriminator step
            d_loss = None
            if use_disc:
                with autocast():
                    d_loss = hinge_d_loss(ddp_disc(x).float(), ddp_disc(recon.detach()).float())
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                torch.nn.utils.clip_grad_norm_(disc.parameters(), tc.grad_clip)
                opt_d.step()
            step += 1

            # ---- metrics, on the device (index_add_, unlike CUDA bincount, needs no host read of the max)
            flat = idx.reshape(-1)
            hist.index_add_(0, flat, torch.ones_like(flat, dtype=hist.dtype))
            vals = {"loss": loss, "l1": l1, "l2": l2, "commit": commit, "psnr": psnr_tensor(x, recon.detach()),
                    "grad_norm": gnorm}
            if p_loss is not None:
                vals["perceptual"] = p_loss
            if g_loss is not None and d_loss is not None:
                vals["g_loss"], vals["d_loss"] = g_loss, d_loss
            for k, v in vals.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            nsum += 1
        if syncs.count is not None:
            host_syncs.append(syncs.count)
        progress.count = step
        if step % tc.log_every == 0 or step == tc.steps:
            counts = hist.cpu()
            probs = counts.float() / max(1, int(counts.sum()))
            nz = probs[probs > 0]
            usage = (counts > 0).float().mean().item()
            perplexity = math.exp(-(nz * nz.log()).sum().item())
            means = dict(zip(sums, (torch.stack(list(sums.values())) / nsum).tolist(), strict=True))
            if writer is not None:
                for k, v in means.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("codebook/usage", usage, step)
                writer.add_scalar("codebook/perplexity", perplexity, step)
                writer.add_scalar("data/corrupt", corrupt, step)
                if host_syncs:
                    writer.add_scalar("perf/host_syncs", host_syncs[-1], step)
            progress.update(0, force=True, loss=means["loss"], psnr=means["psnr"], usage=usage, ppl=perplexity)
            sums, nsum = {}, 0
            hist.zero_()
        if writer is not None and (step % tc.image_every == 0 or step == tc.steps):
            writer.add_image("recon/input_top_recon_bottom", image_grid(x, recon.detach()), step)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            _checkpoint(ckpt_dir, step, model, disc, opt, opt_d, tc.keep_checkpoints, is_main, distributed)
    progress.close()
    if writer is not None:
        writer.close()

    # ---- export the tokenizer and a reconstruction picture
    result = TrainResult(out, step, time.perf_counter() - t0, float("nan"), float("nan"), corrupt, host_syncs)
    if is_main:
        tok = ImageTokenizer(vc, model, batch_size=max(tc.batch_size, 16), device=device)
        tok.save(out)
        n = min(64, len(refs))
        imgs = [dataset[i] for i in range(n)]
        imgs_t = torch.stack([t for t in imgs if isinstance(t, torch.Tensor)])
        result.psnr, result.codebook_usage = evaluate(tok, imgs_t)
        grid = image_grid(imgs_t, tok.decode_tensor(tok.encode(imgs_t)))
        arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with atomic_path(out / "reconstructions.png") as tmp:
            Image.fromarray(arr).save(tmp)
        if corrupt:
            log.warning("skipped %d unreadable image(s)", corrupt)
    if distributed:
        dist.barrier()
    return result


def _checkpoint(
    ckpt_dir: Path, step: int, model: nn.Module, disc: nn.Module, opt: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer, keep: int, is_main: bool, distributed: bool,
) -> None:
    rng = _rng_state()
    if distributed:  # every rank's RNG (dead-code replacement samples from the local batch)
        gathered: list = [None] * world_size()
        dist.all_gather_object(gathered, rng)
        rng = gathered
    if not is_main:
        return
    name = f"step_{step:08d}.pt"
    _atomic_save(
        {"step": step, "model": model.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
         "opt_d": opt_d.state_dict(), "rng": rng, "vq_config": to_dict(model.cfg)},
        ckpt_dir / name,
    )
    atomic_write_text(ckpt_dir / "latest", name)
    old = sorted(ckpt_dir.glob("step_*.pt"))[:-keep] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
