"""megatron's optimizer, stepped the way megatron's ``optimizer.step()`` steps it, with the gradient norm read
once per step together with everything else the step reports.

``MegatronOptimizer.step()`` is ``prepare_grads()``; the grad norm (``get_grad_norm_fp32``: an all-reduce
and a ``.item()``); ``clip_grad_by_total_norm_fp32``; ``step_with_ready_grads()``. Its ``.item()`` would
be a second host sync in every step (and megatron's fallback l2-norm, used without Transformer Engine or
apex, reads every parameter's norm to the host). The trainer instead calls ``prepare_grads()``, adds this
rank's sum of squared main gradients (``grad_sumsq``, over ``get_main_grads_for_grad_norm()``, which
already drops TP duplicates and shared weights) to the step's one all-reduce, and then
``apply_update(opt, grad_norm)``: the same clipping and the same update as ``opt.step()``
(tests/test_train_step.py checks they are equal).

Which ranks contribute to the sum: with the distributed optimizer every rank holds a disjoint shard of
the main gradients (megatron reduces its norm over all ranks); without it every data-parallel replica
holds the same full gradients (megatron reduces over the model-parallel group only), so only
data-parallel rank 0 contributes.
"""

from __future__ import annotations

import torch

from tessera.pretrain.config import OptimConfig


def no_weight_decay(param: torch.Tensor, name: str) -> bool:
    """Parameters exempt from weight decay: megatron's default rule (every 1-D parameter and every bias) plus
    every norm weight whatever its shape. Our per-head QK-norm weights and biases are 2-D [heads, head_dim]
    (megatron's one-dimension test would decay them toward 0); Transformer Engine's fused norms are
    ``linear_qkv.layer_norm_weight``-style names. Fine-tuning marks the tensors whose rows it freezes
    (``tessera_no_weight_decay``, tessera.model.freeze): decay would move the frozen rows."""
    parts = name.split(".")
    module, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    return (param.dim() == 1 or leaf == "bias" or "norm" in leaf or "norm" in module
            or getattr(param, "tessera_no_weight_decay", False))


def weight_decay_overrides() -> dict:
    """megatron's ``config_overrides`` (0.16's form of ``no_weight_decay_cond``): ``wd_mult=0`` for
    ``no_weight_decay`` parameters. Passing overrides replaces megatron's default ones, which this rule
    includes."""
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="tessera_no_wd", fn=no_weight_decay))
    return {key: ParamGroupOverride(wd_mult=0.0)}


def get_optimizer(optim: OptimConfig, model_chunks: list, bf16: bool, distributed: bool = False,
                  overlap_param_gather: bool = False):
    """megatron's optimizer (``get_megatron_optimizer``) over the DDP-wrapped chunks: Adam with the run's
    hyper-parameters, no weight decay on norms and biases; under bf16 the fp32 main params and Adam state
    live in the optimizer. ``distributed``: megatron's DistributedOptimizer (main params and Adam state
    sharded over the data-parallel ranks; the chunks' DDP config must say so too)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                             adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_eps=optim.eps,
                             clip_grad=optim.clip_grad, bf16=bf16, fp16=False,
                             use_distributed_optimizer=distributed, overlap_param_gather=overlap_param_gather)
    return get_megatron_optimizer(config, model_chunks, config_overrides=weight_decay_overrides())


def sub_optimizers(opt) -> list:
    """The optimizers inside a megatron ``ChainedOptimizer`` (or ``[opt]``)."""
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def grad_norm_contributes(opt) -> bool:
    """Whether this rank adds its main gradients to the world-summed squared norm (module docstring)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if any(isinstance(o, DistributedOptimizer) for o in sub_optimizers(opt)):
        return True
    return ps.get_data_parallel_rank() == 0


@torch.no_grad()
def grad_sumsq(opt, device: torch.device) -> torch.Tensor:
    """This rank's sum of squared main gradients (fp32, 0-dim, on ``device``), computed as megatron's
    ``get_grad_norm_fp32`` computes its local norm before squaring it, but without reading to the host.
    Call after ``opt.prepare_grads()``; zero on ranks that do not contribute."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    grads = [g for o in sub_optimizers(opt) for g in o.get_main_grads_for_grad_norm()]
    if not grads or not grad_norm_contributes(opt):
        return torch.zeros((), dtype=torch.float32, device=device)
    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        # megatron's fallback without TE / apex: the same norms, kept on the device (it reads each to the host)
        norm = torch.norm(torch.stack([torch.norm(g) for g in grads]))
    else:  # TE's or apex's multi-tensor l2 norm, as get_grad_norm_fp32 calls it
        dummy_overflow_buf = torch.zeros(1, dtype=torch.int, device=device)
        norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, dummy_overflow_buf, [grads], False)
    return (norm ** 2.0).reshape(())


@torch.no_grad()
def apply_update(opt, grad_norm: float) -> bool:
    """What ``opt.step()`` does after computing the norm: clip every sub-optimizer's main gradients by
    ``grad_norm`` (where its ``clip_grad`` > 0) and step. ``grad_norm`` is the global norm (a host float)."""
    from megatron.core.optimizer import clip_grads

    for o in sub_optimizers(opt):
        if getattr(o, "is_stub_optimizer", False) or o.config.clip_grad <= 0.0:
            continue
        params = o.get_parameters()
        if params:
            # looked up on the module: the CPU compatibility layer wraps it (tessera.model.cpu)
            clip_grads.clip_grad_by_total_norm_fp32(
                params, o.config.clip_grad, grad_norm, o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return opt.step_with_ready_grads()
