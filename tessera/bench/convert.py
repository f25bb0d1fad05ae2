"""Measure conversion cost (peak host RSS, time, disk) on a synthetic Chameleon of any shape.

    python -m tessera.bench.convert --hidden 2048 --layers 8 --workdir /tmp/conv-measure

writes a bf16 transformers-format checkpoint with random weights (no transformers model is built,
so this scales to shapes the test suite never touches), then runs ``from-hf`` and ``to-hf`` each in
a fresh subprocess and reports peak RSS (``ru_maxrss`` of the child) relative to the weight bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tessera.convert.hf_vocab import image_token_name


def write_synthetic_hf(out: Path, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                       codes: int = 8192, dtype: torch.dtype = torch.bfloat16) -> int:
    out.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    vmap = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vmap.update({image_token_name(c): 4 + c for c in range(codes)})
    vmap.update({"<eoss>": 4 + codes, "<racm3:break>": 5 + codes, "<image>": 6 + codes})
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    shard, n_shard, index, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            for k in shard:
                index[k] = name
            n_shard += 1
            shard = {}

    def put(k, t):
        nonlocal total
        shard[k] = t
        total += t.numel()

    put("model.embed_tokens.weight", r(vocab, hidden))
    put("lm_head.weight", r(vocab, hidden))
    put("model.norm.weight", torch.ones(hidden, dtype=dtype))
    flush()
    for i in range(layers):
        p = f"model.layers.{i}."
        put(p + "self_attn.q_proj.weight", r(heads * hd, hidden))
        put(p + "self_attn.k_proj.weight", r(kv_heads * hd, hidden))
        put(p + "self_attn.v_proj.weight", r(kv_heads * hd, hidden))
        put(p + "self_attn.o_proj.weight", r(hidden, hidden))
        for n, h in (("q_norm", heads), ("k_norm", kv_heads)):
            put(p + f"self_attn.{n}.weight", torch.ones(h, hd, dtype=dtype))
            put(p + f"self_attn.{n}.bias", torch.zeros(h, hd, dtype=dtype))
        put(p + "mlp.gate_proj.weight", r(ffn, hidden))
        put(p + "mlp.up_proj.weight", r(ffn, hidden))
        put(p + "mlp.down_proj.weight", r(hidden, ffn))
        put(p + "input_layernorm.weight", torch.ones(hidden, dtype=dtype))
        put(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=dtype))
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg = {
        "model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "swin_norm": False, "vocabulary_map": vmap,
        "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(cfg))
    return total


def write_synthetic_meta(hf_dir: Path, meta_dir: Path, num_shards: int) -> None:
    """The same weights in Meta's release layout (plus a small random VQGAN with 8192 codes, decoder included)."""
    from safetensors.torch import load_file

    from tessera.convert.vq import hf_vq_config, tessera_to_taming
    from tessera.testing.checkpoints import write_meta_from_state
    from tessera.tokenizers.image import VQConfig, VQModel

    cfg = json.loads((hf_dir / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    vq = VQConfig(image_size=32, base_channels=32, channel_mults=(1, 1, 2), num_res_blocks=1, num_groups=32,
                  z_channels=8, embed_dim=8, codebook_size=8192, kmeans_init=False)
    for k, v in tessera_to_taming(VQModel(vq).state_dict(), vq, decoder=True).items():
        state["model.vqmodel." + k] = v
    cfg["vq_config"] = hf_vq_config(vq)
    from tokenizers import Tokenizer, models

    tok = json.loads(Tokenizer(models.WordLevel(cfg["vocabulary_map"], unk_token="<unk>")).to_str())
    write_meta_from_state(state, cfg, meta_dir, num_shards, tok)


def _peak_rss_gib() -> float:
    """This process's peak RSS. VmHWM (not ru_maxrss, which Linux carries over fork + exec from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _child(cmd: list[str]) -> tuple[float, float]:
    """Run one conversion in a fresh interpreter; its last stdout line is its own peak RSS in GiB."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return time.perf_counter() - t0, float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tessera-convert-measure"))
    ap.add_argument("--meta-shards", type=int, default=2, help="model-parallel shards of the from-meta source")
    ap.add_argument("--step", choices=["all", "from-hf", "to-hf", "from-meta"], default="all")
    a = ap.parse_args(argv)
    w = a.workdir
    if a.step == "all":
        shutil.rmtree(w, ignore_errors=True)
        n = write_synthetic_hf(w / "hf", a.hidden, a.layers, a.heads, a.kv_heads, a.ffn, a.vocab)
        gib = n * 2 / 2**30
        res = {"params": n, "weights_gib_bf16": round(gib, 3)}
        write_synthetic_meta(w / "hf", w / "meta", a.meta_shards)
        for step, dst in (("from-hf", w / "tessera"), ("to-hf", w / "back"), ("from-meta", w / "from-meta")):
            cmd = [sys.executable, "-m", "tessera.bench.convert", "--workdir", str(w), "--step", step]
            secs, peak = _child(cmd)
            res[step] = {"seconds": round(secs, 1), "peak_rss_gib": round(peak, 3),
                         "peak_over_weights": round(peak / gib, 2), "out_disk_gib": round(_du(dst) / 2**30, 3)}
        print(json.dumps(res, indent=1))
        return 0
    from tessera.convert.hf import from_hf, from_meta, to_hf

    if a.step == "from-hf":
        r = from_hf(w / "hf", w / "tessera", overwrite=True)
    elif a.step == "from-meta":
        r = from_meta(w / "meta", w / "from-meta", overwrite=True)
    else:
        # the synthetic source has no VQ model: export needs an image tokenizer, so skip it
        r = to_hf(w / "tessera", w / "back", overwrite=True, allow_missing_vq=True)
    print(r.summary(), file=sys.stderr)
    print(_peak_rss_gib())
    return 0


if __name__ == "__main__":
    sys.exit(main())
