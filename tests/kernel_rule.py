"""The kernels' tolerance rule (docs/architecture.md, section 8), shared by the kernel tests:

    max |ours - ref| <= 2 * max |torch in the same dtype - ref| + FLOOR[dtype]

with ref computed in fp32 (or fp64), so a kernel may be as inexact as the framework itself, not much more.
"""

import torch

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_rule(name, ours, ref32, lowp, dtype):
    """ours / lowp: our result and torch's, in the test dtype; ref32: the higher-precision oracle."""
    assert ours.shape == ref32.shape, (name, ours.shape, ref32.shape)
    assert torch.isfinite(ours.float()).all(), name
    if ours.numel() == 0:
        return
    err = (ours.float() - ref32.float()).abs().max().item()
    base = (lowp.float() - ref32.float()).abs().max().item()
    assert err <= 2 * base + FLOOR[dtype], f"{name}: err {err:.3g} > 2 * {base:.3g} + {FLOOR[dtype]}"
