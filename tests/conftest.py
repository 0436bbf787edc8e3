"""Test session setup.

TRITON_INTERPRET=1 is set before anything imports triton, so the Triton kernels run on CPU tensors
through the interpreter (Triton decides interpret mode when a kernel is decorated). The model itself
still uses the fp32 reference ops on CPU unless a test asks for kernel_impl="triton".
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
