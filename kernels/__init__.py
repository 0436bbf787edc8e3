"""fastgrow.kernels: Triton kernels for LLaMA-style training, usable as drop-in modules.

    from fastgrow.kernels import RMSNorm, rms_norm, add_rms_norm, swiglu, SwiGLU, attention, linear_cross_entropy

Each op runs its Triton kernel on CUDA tensors (and on CPU tensors when TRITON_INTERPRET=1), and its
fp32 torch reference (`*_ref`) otherwise; `impl="triton" | "ref"` forces one. This package depends on
torch and triton only and never imports the rest of fastgrow.
"""

from .attention import attention, attention_ref
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .rmsnorm import RMSNorm, add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from .swiglu import SwiGLU, swiglu, swiglu_ref

__all__ = [
    "RMSNorm",
    "SwiGLU",
    "add_rms_norm",
    "add_rms_norm_ref",
    "attention",
    "attention_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "rms_norm",
    "rms_norm_ref",
    "swiglu",
    "swiglu_ref",
]
