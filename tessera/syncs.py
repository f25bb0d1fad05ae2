"""Count blocking device-to-host transfers (host syncs) inside a region of code.

A training step should read the device once per optimizer step (the packed step reduction). Each extra
``.item()`` / ``.tolist()`` / ``float(t)`` / ``if t:`` on a GPU tensor stalls the host until the GPU
catches up, and stops it from queueing the next kernels.

* On CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` makes PyTorch warn at every synchronising CUDA
  call; the warnings raised inside the region are counted.
* On the CPU there is no device to wait for, so the calls that WOULD synchronise are counted instead:
  ``Tensor.item``, ``tolist``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``, ``__index__`` and
  ``__complex__`` (whatever the tensor), except reads of state that lives on the host on every device:
  torch.optim's step counters (``torch.optim.optimizer._get_value``; host tensors unless the optimizer
  is capturable or fused), megatron's RNG tracker comparing the CPU generator state around a fork
  (``CudaRNGStatesTracker.fork``: dropout under sequence parallelism, recomputation) and megatron's
  selective recomputation reading back the attention-mask type it packed into a host tensor
  (``Attention._checkpointed_attention_forward``). Keep host-side work (data loading) outside the region.

``with HostSyncCounter(device) as syncs: ...`` then ``syncs.count``. The trainer counts each step's
device region when the environment variable ``TESSERA_COUNT_SYNCS=1`` is set and writes ``host_syncs``
per step to metrics.jsonl (``tessera bench gpu-check`` reads it on a GPU).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import warnings

import torch

ENV_VAR = "TESSERA_COUNT_SYNCS"
# the Tensor methods through which a value leaves the device for Python
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")
_CUDA_WARNING = "synchroniz"  # "called a synchronizing CUDA operation"
# code that reads host-side state on every device (module docstring)
_HOST_STATE_READERS = {importlib.import_module("torch.optim.optimizer")._get_value.__code__}


def _add_megatron_readers() -> None:
    try:
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
        from megatron.core.transformer.attention import Attention
    except ImportError:
        return
    fork = CudaRNGStatesTracker.fork
    _HOST_STATE_READERS.add(getattr(fork, "__wrapped__", fork).__code__)
    # the nested custom_forward of the selective recompute: AttnMaskType(attn_mask_type.item())
    _HOST_STATE_READERS.update(c for c in Attention._checkpointed_attention_forward.__code__.co_consts
                               if getattr(c, "co_name", "") == "custom_forward")


def counting_enabled() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


class HostSyncCounter:
    """Context manager counting host syncs in its body (see the module docstring); re-entrant use is not
    supported. ``calls`` (CPU mode) records which method each counted read went through."""

    _active_cpu: HostSyncCounter | None = None  # the CPU patches dispatch to the counter of this region
    _lock = threading.Lock()

    def __init__(self, device: torch.device | str | None = None) -> None:
        dev = torch.device(device) if device is not None else None
        self.cuda = dev is not None and dev.type == "cuda"
        self.count = 0
        self.calls: list[str] = []
        self._originals: dict[str, object] = {}
        self._catcher = None
        self._records: list[warnings.WarningMessage] = []
        self._mode = 0

    # ---- CPU: wrap the Tensor methods that read a value out ----------------------------------------
    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def counted(t, *args, **kwargs):
            counter = HostSyncCounter._active_cpu
            if (counter is not None and threading.current_thread() is threading.main_thread()
                    and sys._getframe(1).f_code not in _HOST_STATE_READERS):
                counter.count += 1
                counter.calls.append(name)
            return original(t, *args, **kwargs)

        return counted

    def __enter__(self) -> HostSyncCounter:
        self.count, self.calls = 0, []
        if self.cuda:
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            return self
        _add_megatron_readers()
        with HostSyncCounter._lock:
            if HostSyncCounter._active_cpu is not None:
                raise RuntimeError("HostSyncCounter regions do not nest")
            HostSyncCounter._active_cpu = self
            for name in HOST_READS:
                self._originals[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase
                setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._mode)
            self.count = sum(_CUDA_WARNING in str(w.message) for w in self._records)
            self.calls = [str(w.message) for w in self._records if _CUDA_WARNING in str(w.message)]
            self._catcher.__exit__(*exc)
            return
        with HostSyncCounter._lock:
            for name, original in self._originals.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)
            self._originals.clear()
            HostSyncCounter._active_cpu = None


class NullCounter:
    """Stands in for ``HostSyncCounter`` when counting is off: no patching, ``count`` stays None."""

    count = None

    def __enter__(self) -> NullCounter:
        return self

    def __exit__(self, *exc) -> None:
        return None
