"""Benchmark session setup: without CUDA, run Triton kernels through the interpreter (tiny sizes only,
to keep the harness tested); this must happen before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
