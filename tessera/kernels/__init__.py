"""tessera.kernels: fused Triton kernels with plain-PyTorch references (docs/kernels.md)."""

from ._backend import BACKENDS, resolve_backend, use_triton_interpreter
from .cross_entropy import (
    CrossEntropyZOutput,
    cross_entropy_z,
    cross_entropy_z_reference,
    cross_entropy_z_triton,
)
from .sampling import (
    DecodeState,
    ModalitySampling,
    SamplingParams,
    TokenRules,
    sample_step,
    sample_step_reference,
    sample_step_triton,
    sampling_uniforms,
)

__all__ = [
    "BACKENDS",
    "CrossEntropyZOutput",
    "DecodeState",
    "ModalitySampling",
    "SamplingParams",
    "TokenRules",
    "cross_entropy_z",
    "cross_entropy_z_reference",
    "cross_entropy_z_triton",
    "resolve_backend",
    "sample_step",
    "sample_step_reference",
    "sample_step_triton",
    "sampling_uniforms",
    "use_triton_interpreter",
]
