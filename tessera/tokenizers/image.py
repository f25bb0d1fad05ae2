"""VQ image tokenizer (VQGAN in Chameleon's shape): image -> grid of codebook indices -> image.

Chameleon's defaults: conv encoder/decoder with base 128 channels, multipliers (1, 1, 2, 2, 4),
2 res blocks per level, attention in the middle block, GroupNorm(32) + swish, 16x downsampling,
256-dim latents and an 8192-code codebook: a 512 px image becomes 32 x 32 = 1024 codes. The
quantizer is vector-quantize-pytorch's ``VectorQuantize`` (EMA codebook, commitment loss,
k-means init, dead-code replacement). ``VQConfig.preset("demo"|"tiny")`` are CPU-sized variants.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from tessera.config import ConfigError, from_dict, to_dict
from tessera.tokenizers.preprocess import fit_image, open_image, pixels, to_rgb  # noqa: F401 (to_rgb re-exported)
from tessera.utils import atomic_dir, atomic_path, atomic_write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ImageTokenizerError(ValueError):
    pass


@dataclass
class VQConfig:
    image_size: int = 512
    in_channels: int = 3
    # "conv": taming's VQGAN encoder (every code sees the whole image: 3x3 convolutions and GroupNorm);
    # "patch": each code sees only its own downsample x downsample patch (a strided convolution and
    # per-position MLP blocks), so equal patches get equal codes wherever they are and whatever else
    # the image holds. The decoder is the same for both.
    encoder: str = "conv"
    patch_hidden: int = 256  # "patch" encoder: width of its per-position MLP blocks
    patch_margin: int = 0  # "patch" encoder: pixels beyond its own patch, on each side, that a code sees
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level each; downsampling = 2 ** (levels - 1)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes that get attention besides the middle block
    mid_attention: bool = True
    num_groups: int = 32  # GroupNorm groups; every channel count must divide by it
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256  # codebook vector size
    codebook_size: int = 8192
    # VectorQuantize settings
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    threshold_ema_dead_code: float = 2.0
    # where a dead code restarts: "uniform" (the library: a random batch vector) or "error" (batch vectors
    # drawn by their squared distance to the nearest code, tessera.tokenizers.vq_restart): with a uniform
    # draw, codes for rare patterns (small shapes on a rare background) restart on the common ones and die
    dead_code_restart: str = "uniform"
    use_cosine_sim: bool = False
    learnable_codebook: bool = False  # False: EMA codebook; True: codebook learned by the optimizer
    # False when the weights carry no decoder (a transformers Chameleon import: transformers drops
    # the VQ decoder); decoding then fails clearly instead of drawing with untrained weights.
    has_decoder: bool = True

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if not self.channel_mults:
            raise ConfigError("vq.channel_mults: need at least one level")
        if self.encoder not in ("conv", "patch"):
            raise ConfigError(f"vq.encoder must be 'conv' or 'patch', got {self.encoder!r}")
        if self.dead_code_restart not in ("uniform", "error"):
            raise ConfigError(f"vq.dead_code_restart must be 'uniform' or 'error', got {self.dead_code_restart!r}")
        if self.patch_hidden < 1 or self.patch_margin < 0:
            raise ConfigError(f"vq.patch_hidden must be >= 1 and vq.patch_margin >= 0, got {self.patch_hidden}, "
                              f"{self.patch_margin}")
        if self.image_size % self.downsample:
            raise ConfigError(f"vq.image_size {self.image_size} is not divisible by the downsampling {self.downsample}")
        for c in {self.base_channels * m for m in self.channel_mults}:
            if c % self.num_groups:
                raise ConfigError(f"vq.num_groups {self.num_groups} does not divide channel count {c}")
        if self.codebook_size < 2:
            raise ConfigError("vq.codebook_size must be >= 2")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.latent_size**2

    @staticmethod
    def preset(name: str) -> VQConfig:
        if name not in VQ_PRESETS:
            raise ConfigError(f"unknown VQ preset {name!r}; known: {sorted(VQ_PRESETS)}")
        return VQConfig(**VQ_PRESETS[name])


VQ_PRESETS: dict[str, dict] = {
    "chameleon": {},
    # CPU demo (`tessera demo`): 32 px -> 8 x 8 = 64 codes from a 512-code codebook. Small and without the
    # middle attention block so the CPU demo can train it (its time: docs/benchmarks.md, "The demo"); the
    # synthetic corpus' detector reads shapes and colours back at 32 px as well as at 64 px. The patch
    # encoder gives a background patch one code and a shape's patches codes that vary only with what the
    # patch shows, so the language model learns images with far less to predict than through the conv encoder.
    "demo": dict(
        image_size=32, encoder="patch", patch_hidden=256, base_channels=16, channel_mults=(1, 2, 4),
        num_res_blocks=1, num_groups=8, mid_attention=False, z_channels=32, embed_dim=32, codebook_size=512,
        # most patches are plain background: uniform restarts left shapes on black and gray backgrounds few codes
        dead_code_restart="error",
    ),
    # Unit tests: 32 px -> 8 x 8 codes, 64-code codebook, a few thousand parameters per layer.
    "tiny": dict(
        image_size=32, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, num_groups=8,
        z_channels=16, embed_dim=16, codebook_size=64, kmeans_iters=5,
    ),
}


# ---- preprocessing: the one function lives in tessera.tokenizers.preprocess --------------------


def preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> float [3, size, size] in [-1, 1] through the one preprocessing (``fit_image``:
    RGB, shortest side resized to ``size`` with LANCZOS, centre-cropped)."""
    try:
        img = fit_image(img, size)
    except ValueError as exc:
        raise ImageTokenizerError(str(exc)) from exc
    return torch.from_numpy(pixels(img)).float() / 127.5 - 1.0


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (EXIF orientation applied) or raise naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageTokenizerError(f"{path}: image file not found")
    try:
        return open_image(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageTokenizerError(f"{path}: unreadable image: {exc}") from exc


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[n, 3, H, W] in [-1, 1] (clamped) -> PIL RGB images."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


# ---- network (taming-transformers' VQGAN layout) ---------------------------------------------


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions."""

    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as in taming's VQGAN


class Upsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, cfg: VQConfig) -> nn.Sequential:
    attn = AttnBlock(c, cfg.num_groups) if cfg.mid_attention else nn.Identity()
    return nn.Sequential(ResBlock(c, c, cfg.num_groups, cfg.dropout), attn, ResBlock(c, c, cfg.num_groups, cfg.dropout))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        g, ch = cfg.num_groups, cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        res, cin = cfg.image_size, ch
        for level, mult in enumerate(cfg.channel_mults):
            cout = ch * mult
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, cout, g, cfg.dropout))
                cin = cout
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(cin, g))
            if level != len(cfg.channel_mults) - 1:
                layers.append(Downsample(cin))
                res //= 2
        self.down = nn.Sequential(*layers)
        self.mid = _mid(cin, cfg)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchEncoder(nn.Module):
    """Codes that are functions of their own patch (plus ``patch_margin`` pixels around it) only: a
    ``downsample``-strided patch embedding, then residual per-position MLPs (1x1 convolutions, no
    normalisation across positions). Replicate padding: a border patch sees its own edge, not black."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        d, w = cfg.downsample, cfg.patch_hidden
        m = cfg.patch_margin
        self.embed = nn.Conv2d(cfg.in_channels, w, d + 2 * m, stride=d, padding=m, padding_mode="replicate")
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(w, w, 1), nn.SiLU(), nn.Conv2d(w, w, 1))
            for _ in range(max(cfg.num_res_blocks, 1))
        )
        self.conv_out = nn.Conv2d(w, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        g, ch = cfg.num_groups, cfg.base_channels
        cin = ch * cfg.channel_mults[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, cfg)
        layers: list[nn.Module] = []
        for level in reversed(range(len(cfg.channel_mults))):
            cout = ch * cfg.channel_mults[level]
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(cin, cout, g, cfg.dropout))
                cin = cout
                if res in cfg.attn_resolutions:
                    layers.append(AttnBlock(cin, g))
            if level != 0:
                layers.append(Upsample(cin))
                res *= 2
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Module):
    """Encoder -> 1x1 conv -> VectorQuantize -> 1x1 conv -> decoder."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantizer = VectorQuantize(
            dim=cfg.embed_dim,
            codebook_size=cfg.codebook_size,
            decay=cfg.ema_decay,
            commitment_weight=cfg.commitment_weight,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            threshold_ema_dead_code=cfg.threshold_ema_dead_code,
            use_cosine_sim=cfg.use_cosine_sim,
            learnable_codebook=cfg.learnable_codebook,
            ema_update=not cfg.learnable_codebook,
            accept_image_fmap=True,
        )
        if cfg.dead_code_restart == "error":
            from tessera.tokenizers.vq_restart import error_weighted_sampler

            codebook = self.quantizer._codebook  # the library's codebook: its dead-code draw is a plain attribute
            codebook.replace_sample_fn = error_weighted_sampler(codebook)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (quantized [n, d, h, w], indices [n, h, w], commitment loss)."""
        z = self.quant_conv(self.encoder(x))
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA in fp32
            q, idx, loss = self.quantizer(z.float())
        return q, idx, loss

    def decode_codes(self, idx: torch.Tensor) -> torch.Tensor:
        q = self.quantizer.get_output_from_indices(idx)  # [n, d, h, w] for [n, h, w] indices
        return self.decoder(self.post_quant_conv(q))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (reconstruction, commitment loss, indices)."""
        q, idx, loss = self.encode(x)
        return self.decoder(self.post_quant_conv(q.to(x.dtype))), loss, idx


# ---- the tokenizer -------------------------------------------------------------------------


@dataclass
class ImageTokenizer:
    """Batched image <-> code-grid conversion with a trained ``VQModel`` (always in eval mode)."""

    config: VQConfig
    model: VQModel = field(repr=False)
    batch_size: int = 16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_config(cls, config: VQConfig, **kw: object) -> ImageTokenizer:
        return cls(config, VQModel(config), **kw)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        self.model.to(self.device).eval()
        cb = self.model.quantizer._codebook
        if hasattr(cb, "initted") and not bool(cb.initted):
            # An untrained codebook would be k-means-initialised on whatever batch is encoded first,
            # making codes depend on call order; fix it to random vectors so encode is a pure function.
            with torch.no_grad():
                cb.embed.copy_(torch.randn_like(cb.embed))
                if hasattr(cb, "embed_avg"):
                    cb.embed_avg.copy_(cb.embed)
                cb.initted.fill_(True)

    @property
    def num_codes(self) -> int:
        return self.config.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([preprocess(im, self.image_size) for im in images]) if images else torch.empty(
            0, 3, self.image_size, self.image_size
        )

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images (any mode/size) or a [n, 3, H, W] tensor in [-1, 1] at ``image_size`` ->
        LongTensor [n, tokens_per_image] of codes (row-major over the latent grid)."""
        x = images if isinstance(images, torch.Tensor) else self.preprocess(list(images))
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (s, s):
            raise ImageTokenizerError(f"expected images [n, 3, {s}, {s}], got {tuple(x.shape)}")
        self.model.eval()
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            _, idx, _ = self.model.encode(x[i : i + self.batch_size].to(self.device, torch.float32))
            out.append(idx.reshape(idx.shape[0], -1).long().cpu())
        return torch.cat(out) if out else torch.empty(0, self.tokens_per_image, dtype=torch.long)

    @torch.no_grad()
    def decode_tensor(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Codes [n, tokens_per_image] -> images [n, 3, H, W] clamped to [-1, 1]."""
        if not self.config.has_decoder:
            raise ImageTokenizerError(
                "this image tokenizer has no decoder weights (imported from transformers, which drops the "
                "VQ decoder): it can encode images but not decode codes"
            )
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() == 1:
            codes = codes[None]
        if codes.dim() != 2 or codes.shape[1] != self.tokens_per_image:
            raise ImageTokenizerError(f"expected codes [n, {self.tokens_per_image}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ImageTokenizerError(f"code out of range [0, {self.num_codes})")
        self.model.eval()
        h = self.latent_size
        out = []
        for i in range(0, codes.shape[0], self.batch_size):
            idx = codes[i : i + self.batch_size].reshape(-1, h, h).to(self.device)
            out.append(self.model.decode_codes(idx).float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.empty(0, 3, self.image_size, self.image_size)

    def decode(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> list[Image.Image]:
        return tensor_to_pil(self.decode_tensor(codes))

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors``; a half-written save never replaces a good one."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

        def write(into: Path) -> None:
            # weights first, so config.json (which marks the directory valid) lands last
            with atomic_path(into / WEIGHTS_FILE) as tmp:
                save_file(state, str(tmp))
            atomic_write_json(into / CONFIG_FILE, to_dict(self.config))

        if directory.exists():
            write(directory)  # file by file: files that are not ours (e.g. training checkpoints) stay
        else:
            with atomic_dir(directory) as tmp:
                write(tmp)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> ImageTokenizer:
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise ImageTokenizerError(f"{directory}: not an image tokenizer (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            cfg = from_dict(VQConfig, json.loads(cfg_path.read_text()), str(cfg_path))
        except json.JSONDecodeError as exc:
            raise ImageTokenizerError(f"{cfg_path}: invalid JSON: {exc}") from exc
        model = VQModel(cfg)
        try:
            model.load_state_dict(load_file(str(w_path)))
        except (RuntimeError, OSError) as exc:
            raise ImageTokenizerError(f"{w_path}: weights do not match {cfg_path}: {exc}") from exc
        return cls(cfg, model, batch_size=batch_size, device=torch.device(device))
