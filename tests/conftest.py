"""Test session setup.

On a machine without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the Triton
kernels run on CPU tensors through the interpreter (Triton decides interpret mode when a kernel is
decorated; `import torch` does not import triton). The model itself still uses the fp32 reference ops
on CPU unless a test asks for kernel_impl="triton". On a GPU machine the kernels compile for the GPU.
"""

import os
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small token corpus (300 kB of this Python's stdlib, BPE vocab 512), prepared once per session."""
    from fastgrow.data import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib"
    prepare("stdlib", out, vocab_size=512, max_bytes=300_000, progress=False)
    return out


def tiny_run_config(data_dir, out_dir, **train):
    """A RunConfig small enough for CPU tests (2 layers, dim 32, seq 32, batch 4)."""
    from fastgrow.config import RunConfig

    t = {
        "max_steps": 8,
        "warmup_steps": 2,
        "log_every": 1,
        "eval_every": 0,
        "eval_batches": 2,
        "ckpt_every": 4,
        "out_dir": str(out_dir),
        "progress": False,
        "lr": 3e-3,
    }
    t.update(train)
    return RunConfig.from_dict(
        {
            "model": {
                "vocab_size": 512,
                "dim": 32,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "ffn_dim": 64,
                "max_seq_len": 64,
            },
            "data": {"data_dir": str(data_dir), "seq_len": 32, "batch_size": 4},
            "train": t,
        }
    )


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)
