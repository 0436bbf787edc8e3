"""fastgrow: a lean LLaMA-style pre-training trainer that grows models in place, on the device."""

from fastgrow import kernels

__version__ = "0.1.0"
__all__ = ["__version__", "kernels"]
