"""Fine-tuning in the trainer (tessera.pretrain.finetune): what trains and what holds optimizer state.

In one process with megatron's DDP and optimizer (plain Adam and the distributed optimizer), a real update:
LoRA changes only the adapters, which alone have gradient buffers and Adam state; freezing leaves the frozen
groups bitwise unchanged and stateless, and the image-code rows of the embedding and output layer unchanged
while their text rows move."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from tessera.config import ConfigError

IMAGE_ROWS = (150, 230)  # stand-in vocabulary: ids [150, 230) are image codes


def _cfg(**finetune):
    from tessera.model.config import get_preset
    from tessera.pretrain.config import FinetuneConfig, LoRAConfig, TrainConfig

    lora = finetune.pop("lora", None)
    cfg = TrainConfig(model=get_preset("tiny"))
    cfg.finetune = FinetuneConfig(lora=LoRAConfig(**lora) if lora else LoRAConfig(), **finetune)
    cfg.parallel.micro_batch_size, cfg.parallel.global_batch_size = 2, 4
    cfg.data.seq_length, cfg.train.seed = 16, 3
    cfg.optim.weight_decay = 0.1  # decay on: frozen rows must not shrink
    cfg.train.init_from = "unused-here" if lora else ""
    return cfg


def _step(cfg, distributed: bool):
    """Build (with the finetune section applied before DDP), take one real optimizer step; returns the
    chunk, its parameters before, and the optimizer."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tessera.pretrain.finetune import Finetune
    from tessera.pretrain.mock import train_mock_batch
    from tessera.pretrain.optimizer import apply_update, get_optimizer
    from tessera.pretrain.scale import ddp_config, transformer_overrides, wire_schedule
    from tessera.pretrain.step import BatchMover, ForwardStep
    from tessera.pretrain.trainer import _build_model_chunks, get_scheduler

    ft = Finetune.from_config(cfg)
    vocab = SimpleNamespace(image_offset=IMAGE_ROWS[0], num_image_codes=IMAGE_ROWS[1] - IMAGE_ROWS[0])

    def prepare(chunks):
        ft.prepare(chunks, vocab, cfg.train.seed)

    cfg.parallel.distributed_optimizer = distributed
    overrides = transformer_overrides(cfg, deterministic=True, cuda=False)
    chunks, ddps = _build_model_chunks(cfg, False, cfg.model, ddp_config(cfg, 1), prepare=prepare, **overrides)
    if ft.lora is not None:  # B away from 0 so that A gets a gradient too
        from tessera.model.lora import lora_linears

        with torch.no_grad():
            for _, m in lora_linears(chunks[0]):
                m.lora_b.normal_(0, 0.05)
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    opt = get_optimizer(cfg.optim, ddps, False, distributed=distributed)
    wire_schedule(chunks, ddps, opt, cfg)
    cfg.optim.lr, cfg.optim.warmup = 1e-2, 0
    get_scheduler(cfg, opt)  # sets each group's lr and weight decay (wd_mult), as in the trainer
    micro = BatchMover("cpu").all([train_mock_batch(cfg, 1, i) for i in range(2)])
    for d in ddps:
        d.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=ForwardStep(z_loss_weight=1e-4, per_token_loss=True),
                                data_iterator=iter(micro), model=ddps, num_microbatches=2, seq_length=16,
                                micro_batch_size=2, forward_only=False)
    ft.mask_gradients()
    opt.prepare_grads()
    apply_update(opt, 1.0)
    return chunks[0], before, opt, vocab


def _state_params(opt) -> set:
    """The parameters (model tensors) that own optimizer state or main params."""
    from tessera.pretrain.optimizer import sub_optimizers

    owned = set()
    for o in sub_optimizers(opt):
        for group in getattr(o, "model_float16_groups", []) + getattr(o, "model_fp32_groups", []):
            owned |= {id(p) for p in group}
        if not owned:
            owned |= {id(p) for g in o.optimizer.param_groups for p in g["params"]}
    return owned


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distopt"])
def test_lora_trains_only_adapters(megatron_1proc, distributed):
    cfg = _cfg(lora={"rank": 4, "alpha": 8.0, "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
                                                           "output_layer"]})
    chunk, before, opt, _ = _step(cfg, distributed)
    changed = {n for n, p in chunk.named_parameters() if not torch.equal(p, before[n])}
    adapters = {n for n, p in chunk.named_parameters() if n.endswith(("lora_a", "lora_b"))}
    assert len(adapters) == 2 * 9 and changed == adapters
    assert all(not p.requires_grad and getattr(p, "main_grad", None) is None
               for n, p in chunk.named_parameters() if n not in adapters)
    owned = _state_params(opt)
    assert owned == {id(p) for n, p in chunk.named_parameters() if n in adapters}


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distopt"])
def test_freeze_groups_and_image_rows(megatron_1proc, distributed):
    cfg = _cfg(freeze=["norms", "layers:1", "image_rows"])
    chunk, before, opt, _ = _step(cfg, distributed)
    frozen = {n for n in before if "norm" in n or n.startswith("decoder.layers.0.")}
    assert frozen and all(not p.requires_grad for n, p in chunk.named_parameters() if n in frozen)
    owned = _state_params(opt)
    for n, p in chunk.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), n
            assert id(p) not in owned, n
        else:
            assert not torch.equal(p, before[n]), f"{n} did not train"
    lo, hi = IMAGE_ROWS
    for n in ("embedding.word_embeddings.weight", "output_layer.weight"):
        p = dict(chunk.named_parameters())[n]
        assert torch.equal(p[lo:hi], before[n][lo:hi]), f"{n}: image rows moved"  # no gradient, no decay
        assert not torch.equal(p[:lo], before[n][:lo]) and not torch.equal(p[hi:], before[n][hi:])


def test_finetune_settings_are_checked():
    from tessera.model.freeze import FreezeSpec
    from tessera.pretrain.finetune import validate_finetune

    assert FreezeSpec.parse(["embedding", "layers:3", "image_rows"]) == FreezeSpec(embedding=True, first_layers=3,
                                                                                    image_rows=True)
    with pytest.raises(ConfigError, match="unknown group 'attention'"):
        validate_finetune(_cfg(freeze=["attention"]))
    cfg = _cfg(lora={"rank": 4})
    cfg.train.init_from = ""
    with pytest.raises(ConfigError, match="needs train.init_from"):
        validate_finetune(cfg)
    with pytest.raises(ConfigError, match="choose one"):
        validate_finetune(dataclasses.replace(_cfg(lora={"rank": 4}, freeze=["norms"])))
    with pytest.raises(ConfigError, match="finetune.lora: .*targets"):
        validate_finetune(_cfg(lora={"rank": 4, "targets": ["q_proj"]}))
    with pytest.raises(ConfigError, match="has 2 layers"):
        validate_finetune(_cfg(freeze=["layers:3"]))
