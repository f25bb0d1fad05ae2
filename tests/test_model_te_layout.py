"""The Transformer Engine layer spec on the CPU, against megatron's local one: the spec trees, checkpoint
names and shapes, and weights moved both ways (dist checkpoints, plain state dicts, ``tessera.model.load``,
the converters) give the same logits.

TE needs CUDA, so one subprocess installs tests/fake_transformer_engine.py (TE's parameter names, shapes and
``_extra_state`` entries under megatron-core's real TE wrappers and TE spec) before importing megatron, runs
every check, and writes the results; the tests below each assert one of them. fp32 throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "gqa": dict(),  # the tiny preset: 4 heads, 2 K/V groups, QK-norm
    "mha": dict(num_query_groups=None),
    "swin": dict(swin_norm=True),
}


def _spec_diff(ours, theirs, path="spec") -> dict[str, tuple]:
    """Paths where two ModuleSpec trees name different modules / params: {path: (ours, theirs)}."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(ours, ModuleSpec) and isinstance(theirs, ModuleSpec):
        out = {}
        if ours.module is not theirs.module:
            out[path + ".module"] = (ours.module, theirs.module)
        if ours.params != theirs.params:
            out[path + ".params"] = (ours.params, theirs.params)
        if type(ours.submodules) is not type(theirs.submodules):
            out[path + ".submodules"] = (type(ours.submodules), type(theirs.submodules))
        elif dataclasses.is_dataclass(ours.submodules):
            for f in dataclasses.fields(ours.submodules):
                out.update(_spec_diff(getattr(ours.submodules, f.name), getattr(theirs.submodules, f.name),
                                      f"{path}.{f.name}"))
        return out
    return {} if ours is theirs or ours == theirs else {path: (ours, theirs)}


def _sharded_layout(model) -> dict[str, str]:
    """Checkpoint key -> global shape (or kind) of everything a save of ``model`` writes."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from tessera.model.checkpoint import model_sharded_state_dict

    out = {}
    for v in model_sharded_state_dict(model)["model"].values():
        if isinstance(v, ShardedTensor):
            out[v.key] = str(tuple(v.global_shape))
        elif isinstance(v, ShardedTensorFactory):  # SwiGLU fc1, split into gate / up on save; TP=1 here
            out[v.key] = str(tuple(v.data.shape))
        elif isinstance(v, ShardedObject):
            out[v.key] = "object"
    return out


def _randomize(model, seed: int) -> None:
    # every weight, norms included (a norm left at ones would hide a swapped or dropped name)
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _checks(out_path: str, tmp: str) -> None:
    """Runs in the subprocess, with the fake TE installed."""
    import dataclasses
    import traceback

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from torch.distributed.checkpoint.api import CheckpointException

    import tessera.model as tm
    from tessera.convert import model_io
    from tessera.generate.decoder import KVCacheDecoder
    from tessera.model import chameleon, implementations, layer_names, spec
    from tessera.model.checkpoint import model_sharded_state_dict
    from tessera.model.config import get_preset

    results: dict[str, dict] = {}

    def check(name, fn):
        try:
            results[name] = {"ok": True, **(fn() or {})}
        except (Exception, CheckpointException):  # torch.distributed.checkpoint's is a BaseException
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}

    tm.initialize_parallel(1, 1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)

    def logits(model):
        model.eval()
        with torch.no_grad():
            return model(ids, pos, None).float()

    def diff(a, b):
        return float((a - b).abs().max())

    def spec_vs_megatron():
        cfg = get_preset("tiny")
        te = _spec_diff(spec.te_layer_spec(cfg), get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True))
        local = _spec_diff(spec.local_layer_spec(cfg),
                           get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"))
        show = lambda d: {k: [getattr(x, "__name__", repr(x)) for x in v] for k, v in d.items()}  # noqa: E731
        subclass = {k: issubclass(v[0], v[1]) for k, v in local.items() if isinstance(v[0], type) and isinstance(v[1], type)}
        return {"te": show(te), "local": show(local), "local_subclass": subclass}

    check("spec_vs_megatron", spec_vs_megatron)

    def variant_checks(variant, fields):
        cfg = dataclasses.replace(get_preset("tiny"), **fields)
        local = chameleon.build_model(cfg, use_te=False, init_seed=1)
        _randomize(local, 2)
        te = chameleon.build_model(cfg, use_te=True)
        ref = logits(local)

        def modules():
            layer = te.decoder.layers[0]
            names = {"linear_qkv": layer.self_attention.linear_qkv, "core_attention": layer.self_attention.core_attention,
                     "linear_proj": layer.self_attention.linear_proj, "linear_fc1": layer.mlp.linear_fc1,
                     "linear_fc2": layer.mlp.linear_fc2, "final_layernorm": te.decoder.final_layernorm}
            if cfg.swin_norm:
                names["post_mlp_layernorm"] = layer.post_mlp_layernorm
            return {"types": {k: type(v).__name__ for k, v in names.items()}}

        check(f"{variant}/modules", modules)
        check(f"{variant}/banner", lambda: dataclasses.asdict(implementations.describe(te, "why")))
        check(f"{variant}/sharded_layout",
              lambda: {"local": _sharded_layout(local), "te": _sharded_layout(te)})

        def dist_local_to_te():
            ckpt = Path(tmp) / f"{variant}-local"
            tm.save_model_checkpoint(local, cfg, ckpt)
            state = dist_checkpointing.load(model_sharded_state_dict(te), str(ckpt / "dist"))
            te.load_state_dict(state["model"])  # strict: every key, _extra_state included
            return {"diff": diff(logits(te), ref)}

        def dist_te_to_local():
            _randomize(te, 3)
            te_ref = logits(te)
            ckpt = Path(tmp) / f"{variant}-te"
            tm.save_model_checkpoint(te, cfg, ckpt)
            back = chameleon.build_model(cfg, use_te=False, init_seed=4)
            back.load_state_dict(dist_checkpointing.load(model_sharded_state_dict(back), str(ckpt / "dist"))["model"])
            return {"diff": diff(logits(back), te_ref)}

        def load_picks_te():
            # tessera.model.load where te_status() says TE can run: a TE model from a local checkpoint
            status, chameleon.te_status = chameleon.te_status, lambda: spec.TEStatus(True, "fake")
            try:
                loaded = tm.load(Path(tmp) / f"{variant}-local", device="cpu")
            finally:
                chameleon.te_status = status
            qkv = type(loaded.module.decoder.layers[0].self_attention.linear_qkv).__name__
            return {"diff": diff(logits(loaded.module), ref), "linear_qkv": qkv}

        def plain_names():
            local_sd, te_sd = local.state_dict(), te.state_dict()
            as_te = layer_names.to_te_names(local_sd)
            as_local = layer_names.to_local_names(te_sd)
            back = layer_names.to_local_names(as_te)
            return {
                "local_to_te_missing": sorted(set(te_sd) - set(as_te)),
                "local_to_te_unexpected": sorted(set(as_te) - set(te_sd)),
                "te_to_local_missing": sorted(set(local_sd) - set(as_local)),
                "te_to_local_unexpected": sorted(set(as_local) - set(local_sd)),
                "shape_mismatch": sorted(k for k in set(as_te) & set(te_sd) if k.endswith(("weight", "bias"))
                                         and as_te[k].shape != te_sd[k].shape),
                "round_trip_local": list(back) == list(local_sd) and all(back[k] is local_sd[k] for k in local_sd),
                "round_trip_te": layer_names.to_te_names(as_local) == te_sd,
            }

        def load_weights_both_ways():
            te2 = chameleon.build_model(cfg, use_te=True)
            layer_names.load_weights(te2, local.state_dict())
            local2 = chameleon.build_model(cfg, use_te=False, init_seed=5)
            layer_names.load_weights(local2, te2.state_dict())
            return {"te_diff": diff(logits(te2), ref), "local_diff": diff(logits(local2), ref)}

        def converter_builds_te():
            # what `tessera convert from-hf` hands the model: local names, no _extra_state
            weights = {k: v.detach().clone() for k, v in local.state_dict().items() if not k.endswith("_extra_state")}
            out = Path(tmp) / f"{variant}-converted"
            status, chameleon.te_status = chameleon.te_status, lambda: spec.TEStatus(True, "fake")
            try:
                model_io.save_tessera_checkpoint(cfg, weights, out, vocab=None)
            finally:
                chameleon.te_status = status
            back = chameleon.build_model(cfg, use_te=False, init_seed=6)
            back.load_state_dict(dist_checkpointing.load(model_sharded_state_dict(back), str(out / "dist"))["model"])
            return {"diff": diff(logits(back), ref)}

        def decoder_reads_te_layout():
            te3 = chameleon.build_model(cfg, use_te=True)
            layer_names.load_weights(te3, local.state_dict())
            te3.eval()
            dec = KVCacheDecoder(te3, dtype=torch.float32)
            dec.allocate(1, 12)
            last = dec.prefill(ids[:1], torch.tensor([0]))[0]
            return {"diff": diff(last.float(), ref[0, -1])}

        def same_init():  # init_layout_invariant draws by global name: the two layouts start equal
            a = chameleon.build_model(cfg, use_te=False, init_seed=7)
            b = chameleon.build_model(cfg, use_te=True, init_seed=7)
            return {"diff": diff(logits(b), logits(a))}

        check(f"{variant}/same_init", same_init)
        check(f"{variant}/dist_local_to_te", dist_local_to_te)
        check(f"{variant}/dist_te_to_local", dist_te_to_local)
        check(f"{variant}/load_picks_te", load_picks_te)
        check(f"{variant}/plain_names", plain_names)
        check(f"{variant}/load_weights", load_weights_both_ways)
        check(f"{variant}/converter", converter_builds_te)
        check(f"{variant}/decoder", decoder_reads_te_layout)

    for variant, fields in VARIANTS.items():
        variant_checks(variant, fields)
    Path(out_path).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("te_layout")
    out = tmp / "results.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests.fake_transformer_engine as fake; fake.install(); "
            "from tests.test_model_te_layout import _checks; _checks(sys.argv[2], sys.argv[3])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(out), str(tmp)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    return json.loads(out.read_text())


def _ok(results, name) -> dict:
    r = results[name]
    assert r["ok"], r.get("error")
    return r


def test_te_spec_is_megatrons_te_spec_plus_chameleon_parts(results):
    r = _ok(results, "spec_vs_megatron")
    # the only differences from megatron's own trees: QK-norm, the SwiGLU module, the TE spec's
    # TEFusedMLP key map (unused: the MLP is megatron's), and the local linears / attention, which subclass megatron's
    assert set(r["te"]) == {"spec.self_attention.q_layernorm", "spec.self_attention.k_layernorm",
                            "spec.mlp.activation_func", "spec.sharded_state_dict_keys_map"}, r["te"]
    assert r["te"]["spec.mlp.activation_func"] == ["SwiGLU", "None"]
    # the local pre-norms are tessera's RMSNorm (rms_norm.py: a torch.nn.RMSNorm that works under sequence
    # parallelism), where megatron's local spec has WrappedTorchNorm (which refuses sequence parallelism)
    assert set(r["local"]) == {f"spec.{p}" for p in (
        "input_layernorm", "self_attention.linear_qkv", "self_attention.core_attention", "self_attention.linear_proj",
        "self_attention.q_layernorm", "self_attention.k_layernorm", "pre_mlp_layernorm", "mlp.linear_fc1",
        "mlp.activation_func", "mlp.linear_fc2")}, r["local"]
    assert r["local"]["spec.input_layernorm"] == r["local"]["spec.pre_mlp_layernorm"] == ["RMSNorm", "WrappedTorchNorm"]
    subclass = {k: v for k, v in r["local_subclass"].items() if k not in ("spec.input_layernorm", "spec.pre_mlp_layernorm")}
    assert subclass and all(subclass.values()), r["local_subclass"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_te_model_is_built_from_te_modules(results, variant):
    types = _ok(results, f"{variant}/modules")["types"]
    qkv = "TEColumnParallelLinear" if variant == "swin" else "TELayerNormColumnParallelLinear"
    assert types["linear_qkv"] == qkv and types["linear_fc1"] == qkv
    assert types["linear_proj"] == types["linear_fc2"] == "TERowParallelLinear"
    assert types["core_attention"] == "TEDotProductAttention"
    assert types["final_layernorm"] == "RMSNorm"  # TENorm builds TE's RMSNorm
    if variant == "swin":
        assert types["post_mlp_layernorm"] == "RMSNorm"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_banner_names_te_modules(results, variant):
    r = _ok(results, f"{variant}/banner")
    qkv = "TEColumnParallelLinear" if variant == "swin" else "TELayerNormColumnParallelLinear"
    assert r["spec"] == "Transformer Engine"
    assert r["linear"] == f"Transformer Engine ({qkv}, TERowParallelLinear)"
    norm = ("Transformer Engine RMSNorm" if variant == "swin"
            else "fused into TELayerNormColumnParallelLinear (Transformer Engine)")
    assert r["norm"].startswith(norm), r["norm"]
    assert "final norm: Transformer Engine RMSNorm" in r["norm"]
    assert r["core_attention"].startswith("Transformer Engine DotProductAttention")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_keys_and_shapes_are_the_same(results, variant):
    r = _ok(results, f"{variant}/sharded_layout")
    assert r["local"] == r["te"]
    keys = set(r["local"])
    if variant == "swin":
        assert "decoder.layers.post_mlp_layernorm.weight" in keys
        assert not any("layer_norm_weight" in k for k in keys)
    else:
        assert {"decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                "decoder.layers.mlp.linear_fc1.layer_norm_weight"} <= keys
    assert not any(k.endswith("layernorm._extra_state") for k in keys)  # TE's norms' entries stay out


@pytest.mark.parametrize("check", ["same_init", "dist_local_to_te", "dist_te_to_local", "load_picks_te", "converter"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weights_cross_implementations_with_the_same_logits(results, variant, check):
    r = _ok(results, f"{variant}/{check}")
    assert r["diff"] < 1e-4, r
    if check == "load_picks_te":
        assert r["linear_qkv"].startswith("TE")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plain_state_dict_names_round_trip(results, variant):
    r = _ok(results, f"{variant}/plain_names")
    # TE has _extra_state entries where torch has none (its attention, its norms); nothing else differs
    assert r["local_to_te_missing"] and all(k.endswith("_extra_state") for k in r["local_to_te_missing"])
    assert r["local_to_te_unexpected"] == [] and r["te_to_local_missing"] == []
    assert all(k.endswith("_extra_state") for k in r["te_to_local_unexpected"])
    assert r["shape_mismatch"] == []
    assert r["round_trip_local"] and r["round_trip_te"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_weights_both_ways(results, variant):
    r = _ok(results, f"{variant}/load_weights")
    assert r["te_diff"] < 1e-4 and r["local_diff"] < 1e-4, r


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_decoder_reads_megatrons_te_modules(results, variant):
    assert _ok(results, f"{variant}/decoder")["diff"] < 1e-4
