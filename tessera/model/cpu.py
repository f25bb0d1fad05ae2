"""The one place that lets megatron-core 0.16.1 run without CUDA (gloo backend, CPU tensors).

megatron-core assumes CUDA in a handful of places. ``enable_cpu_compat()`` fixes each of them, only when
CUDA is absent, and is idempotent. Nothing in ``torch`` itself is modified: megatron's modules get a thin
``torch`` proxy instead, so every other library still sees the real ``torch.cuda``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types

import torch

_ENABLED = False
_PROXY = None

# megatron modules with a CUDA assumption we hit; each is handed the proxy below.
_MEGATRON_MODULES = (
    "megatron.core.tensor_parallel.layers",  # weight/buffer allocation on torch.cuda.current_device()
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.random",  # RNG tracker (its state functions are replaced below too)
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.schedules",  # torch.zeros(..., device="cuda") token counters
    "megatron.core.pipeline_parallel.p2p_communication",  # shape buffers on current_device, cuda.synchronize
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.parallel_state",  # torch.cuda.synchronize / device_ids on barriers
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.transformer.utils",  # default causal mask built with device="cuda"
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.fusions.fused_bias_dropout",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)

_CPU = torch.device("cpu")


def cuda_missing() -> bool:
    return not torch.cuda.is_available()


def _cpu_device(device):
    """Map "cuda", "cuda:N", torch.device("cuda") and integer GPU indices to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if str(device).startswith("cuda"):
        return _CPU
    return device


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CudaProxy(types.SimpleNamespace):
    """``torch.cuda`` as megatron sees it on a CPU machine."""

    def __getattr__(self, name):  # everything not overridden is the real torch.cuda
        return getattr(torch.cuda, name)


def _make_cuda_proxy() -> _CudaProxy:
    return _CudaProxy(
        current_device=lambda: _CPU,  # megatron allocates on current_device(): make that the CPU
        synchronize=lambda *a, **k: None,  # p2p / barriers sync the GPU stream; CPU ops are synchronous
        device_count=lambda: 0,
        empty_cache=lambda: None,
        manual_seed=lambda seed: None,  # the CPU generator is seeded by initialize_parallel
        get_rng_state=lambda *a, **k: torch.get_rng_state(),  # megatron's RNG tracker keeps CPU states
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        reset_peak_memory_stats=lambda *a, **k: None,
        nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None),
        # DDP waits on CUDA-graph events on the current stream: CPU ops are synchronous, nothing to wait for
        current_stream=lambda *a, **k: types.SimpleNamespace(wait_event=lambda *a, **k: None,
                                                              wait_stream=lambda *a, **k: None,
                                                              synchronize=lambda *a, **k: None),
    )


class _TorchProxy(types.ModuleType):
    """``torch`` for megatron modules: factory functions map device="cuda" to the CPU; ``.cuda`` is the proxy."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _make_cuda_proxy()
        for name in self._FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name):
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: later lookups skip __getattr__
        return value


class _RNGWarningFilter(logging.Filter):
    # On the CPU the "CUDA" RNG states ARE the CPU generator, so dropout inside a tracker fork always
    # changes it; megatron's warning about that is expected noise here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_rng() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    # The tracker's "CUDA" generator states become CPU generator states.
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def add(self, name, seed):  # CudaRNGStatesTracker.add without torch.cuda: a seeded CPU generator state
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    random.CudaRNGStatesTracker.add = add
    logging.getLogger(random.__name__).addFilter(_RNGWarningFilter())


_CPU_TYPE_NAMES = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"}
_real_tensor_type = torch.Tensor.type


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    name = _real_tensor_type(self, dtype, non_blocking, **kwargs)
    if dtype is None and name in _CPU_TYPE_NAMES:
        return name.replace("torch.", "torch.cuda.", 1)
    return name


@contextlib.contextmanager
def _cuda_type_names():
    """Inside: ``tensor.type()`` of a CPU float tensor reads "torch.cuda.FloatTensor" etc."""
    torch.Tensor.type = _cuda_named_type
    try:
        yield
    finally:
        torch.Tensor.type = _real_tensor_type


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    wrapper._tessera_cpu_compat = True
    return wrapper


def _patch_type_checks() -> None:
    # megatron's optimizers accept only parameters whose tensor.type() is a "torch.cuda.*Tensor" string;
    # only these functions see CPU tensors under their CUDA type names, and only while they run.
    targets = [
        ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32"),
        ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
        ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
        ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "_build_model_and_main_param_groups"),
    ]
    for module_name, cls_name, attr in targets:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner = getattr(module, cls_name) if cls_name else module
        fn = owner.__dict__[attr] if cls_name else getattr(owner, attr)
        if isinstance(fn, staticmethod):
            fn = fn.__func__
            wrapped = staticmethod(_with_cuda_type_names(fn))
        elif isinstance(fn, classmethod):
            wrapped = classmethod(_with_cuda_type_names(fn.__func__))
        else:
            wrapped = _with_cuda_type_names(fn)
        if getattr(fn, "_tessera_cpu_compat", False):
            continue
        setattr(owner, attr, wrapped)
        if cls_name is None:  # re-bind names imported elsewhere (optimizer.py imports the clip function)
            for other in list(sys.modules.values()):
                if getattr(other, "__name__", "").startswith("megatron.core") and getattr(other, attr, None) is fn:
                    setattr(other, attr, wrapped)


def enable_cpu_compat() -> bool:
    """Make megatron-core usable without CUDA. Returns True if the compat layer is (now) active.

    A no-op on a machine with CUDA. Idempotent; each call also hands the proxy to megatron modules
    imported since the last call (``initialize_parallel`` and ``build_model`` call it).
    """
    global _ENABLED, _PROXY
    if not cuda_missing():
        return False
    if _PROXY is None:
        _PROXY = _TorchProxy()
        for name in _MEGATRON_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:  # a module this megatron version does not have
                continue
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _PROXY
    if not _ENABLED:
        _patch_rng()
        _patch_type_checks()
        _ENABLED = True
    return True


def is_cpu_compat_enabled() -> bool:
    return _ENABLED
