"""fastgrow: a lean LLaMA-style pre-training trainer that grows models in place, on the device.

`fastgrow.kernels` (the Triton kernels) is loaded on first use, so `import fastgrow` and the command line's
`--help` / `plan` do not pay for importing torch and triton (about 2 s and 300 MB).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "kernels"]


def __getattr__(name: str) -> Any:
    # PEP 562: `fastgrow.kernels` as an attribute imports the subpackage the first time it is asked for
    # (`from fastgrow.kernels import X` and `import fastgrow.kernels` work without this hook).
    if name == "kernels":
        return importlib.import_module("fastgrow.kernels")
    raise AttributeError(f"module 'fastgrow' has no attribute {name!r}")
