"""G_learn's maps (LiGO, Wang et al. ICLR 2023): the learnable linear operator from small to large weights.

Every tensor of the small model goes through the same two steps (width first, then depth, as LiGO
composes them):

width   W  ->  write[row axis] @ W @ read[col axis]^T        (per axis, see fastgrow.grow_width for axes)
depth   W'_t = sum_l depth[kind][t, l] * W_l                  (per target layer t and weight kind)

Width maps. Each width axis (resid, q, kv, ffn) has a *write* map, applied where a tensor's output lives
on the axis (rows of wq/wk/wv/wo/w13/w2, the columns of the token embedding, the norm gains), and a *read*
map, applied where a weight reads the axis (columns of wqkv/w13/w2/wo and of the output head); kv has no
learned read map (no weight reads it; attention does). A map is `diag(1 / div) @ matrix`, matrix
[new, old] learned and div a fixed vector (absent by default: an initial map whose weights divide, e.g.
an even split x / 3, keeps its division a division, so step 0 stays bitwise; x * (1/3) is not x / 3 in
floating point). The q and kv maps act on whole heads: matrix is
[new_heads, old_heads] and the channel-level map is kron(matrix, I_head_dim), so a q/k head stays one
RoPE-rotated head and RoPE stays valid. Maps of axes that do not grow are learned too (initialised to the
identity), as in the paper's reference code (prts `ligo.py`, whose width maps are learned at any size).

Depth coefficients. One [T, L] matrix per weight kind (attn_norm, q, k, v, wo, mlp_norm, gate, up, w2),
initialised one-hot at the source layer of each target layer (G_stack: layer t <- t mod L). The token
embedding, final norm and head have no depth.

Initialisation. The maps start from an explicit linear map per axis (`direct_width_maps`: width `direct`
from fastgrow.grow_width's `AxisMap`s, duplicate E for the writes and the uneven split S for the reads)
and the depth sources of a copy operator (G_stack by default), so the expanded model at learn step 0 is,
bit for bit on the CPU, the model grow() makes with that plan (every sum in these matrix products has
one non-zero term, a product with 1 or with a dyadic split fraction, so it is exact).

Cost. Width is applied to the L small layers, then depth mixes them into T layers (L expansions instead
of T: 4x fewer FLOPs at the paper's g = 4, at the price of holding L/T of a large model's weights for the
backward pass). `expansion_flops` counts the matmuls exactly (tests check it against torch's FLOP counter).

Adam moments through the maps (`map_moments`): depth mixes exp_avg with the coefficients c and exp_avg_sq
with c^2 (the mean and second moment of sum_l c_l g_l for independent g_l; one-hot c copies, as G_stack's
copy does). Width maps each moment as the gradient it averages: a grown unit's output gradient is the
small unit's weighted by how much the grown model reads the unit (its axis's read map), and a weight's
input column sees the activation the write map produced, so G' = read[out axis] G write[in axis]^T (the
maps' roles swapped), exp_avg through those maps and exp_avg_sq through their elementwise squares (>= 0).
For width direct (W' = E W S^T) that is G' = S G E^T, the exact gradient of the grown model at growth:
each copy's share a of its unit's gradient, which is grow()'s rule (m a, v a^2), bit for bit at step 0.
The kv axis, which no weight reads, uses its initial read map (direct's split), kept as a fixed buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastgrow.config import ModelConfig
from fastgrow.grow_depth import NEW_BLOCK
from fastgrow.grow_width import WidthMap, axis_sizes

__all__ = [
    "AXIS_SIDES",
    "DEPTH_KINDS",
    "SideMap",
    "GrowthMaps",
    "direct_width_maps",
    "exact_matmuls",
    "expand_tensors",
    "expansion_flops",
    "head_level",
    "map_moments",
    "map_params",
]

DEPTH_KINDS = ("attn_norm", "q", "k", "v", "wo", "mlp_norm", "gate", "up", "w2")
# The sides each width axis has: write (a tensor's output lives on the axis) and read (a weight reads it).
AXIS_SIDES = (
    ("resid", "write"),
    ("resid", "read"),
    ("q", "write"),
    ("q", "read"),
    ("kv", "write"),
    ("ffn", "write"),
    ("ffn", "read"),
)
# Maps that are not learned but that the Adam moments need: kv's read side (see the module doc).
MOMENT_SIDES = (("kv", "read"),)
_HEAD_AXES = ("q", "kv")


@dataclass(frozen=True)
class SideMap:
    """One side of one width axis as a linear map: x_new = (matrix @ x_old) / div.

    matrix: [new, old] float; div: [new] or None (no division). For the q and kv axes, channel level
    ([new_heads * head_dim, old_heads * head_dim]); `GrowthMaps` reduces them to head level.
    """

    matrix: torch.Tensor
    div: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The map as one [new, old] matrix (float64, for pseudo-inverses and tests)."""
        m = self.matrix.double()
        return m if self.div is None else m / self.div.double()[:, None]


def direct_width_maps(src: ModelConfig, dst: ModelConfig) -> dict[tuple[str, str], SideMap]:
    """Width `direct` (fastgrow.grow_width) as explicit channel-level maps per (axis, side): write =
    duplicate E (new channel j' copies old channel j' mod old), read = the uneven split S (the fraction
    of the old column that copy reads). Axes that keep their size get the identity. ("kv", "read")
    is included for the Adam moments (see the module doc)."""
    width = WidthMap.between("direct", src, dst)
    out: dict[tuple[str, str], SideMap] = {}
    for axis, side in (*AXIS_SIDES, *MOMENT_SIDES):
        out[(axis, side)] = SideMap(width.axis(axis).matrix("duplicate" if side == "write" else "split"))
    return out


def head_level(m: SideMap, head_dim: int, what: str = "map") -> SideMap:
    """Reduce a channel-level q/kv map to head level: matrix must be kron(M, I_head_dim) and div constant
    within each head (else ValueError: such a map mixes channels inside a head and would break RoPE)."""
    mat = m.matrix
    n, o = mat.shape
    if n % head_dim or o % head_dim:
        raise ValueError(f"{what}: shape {tuple(mat.shape)} is not a whole number of heads of {head_dim}")
    heads = mat.reshape(n // head_dim, head_dim, o // head_dim, head_dim)[:, 0, :, 0]
    if not torch.equal(torch.kron(heads, torch.eye(head_dim, dtype=mat.dtype, device=mat.device)), mat):
        raise ValueError(f"{what}: a q/k/v width map must act on whole heads (kron(M, I_{head_dim}))")
    div = None
    if m.div is not None:
        d = m.div.reshape(n // head_dim, head_dim)
        if not torch.equal(d, d[:, :1].expand_as(d)):
            raise ValueError(f"{what}: the divisor of a q/k/v width map must be constant within a head")
        div = d[:, 0].clone()
    return SideMap(heads.clone(), div)


def _one_hot_sources(sources: Sequence[int], n_src: int) -> torch.Tensor:
    if any(s == NEW_BLOCK for s in sources):
        raise ValueError("G_learn mixes existing layers: its depth initialisation cannot contain new blocks")
    c = torch.zeros(len(sources), n_src)
    c[torch.arange(len(sources)), torch.as_tensor(list(sources))] = 1.0
    return c


def _apply(x: torch.Tensor, matrix: torch.Tensor, div: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Contract dimension `dim` of x (old size) with matrix [new, old], then divide by div along it."""
    y = torch.matmul(x.movedim(dim, -1), matrix.t())
    if div is not None:
        y = y / div
    return y.movedim(-1, dim)


def _mix(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Depth: [T, L] coefficients times x [L, ...] -> [T, ...]."""
    return (c @ x.reshape(x.shape[0], -1)).reshape(c.shape[0], *x.shape[1:])


class GrowthMaps(nn.Module):
    """The learnable operator: depth coefficients and width maps (see the module doc).

    Parameters: `depth.<kind>` [T, L] and `<axis>_<side>` [new, old] (head level for q and kv). The
    divisors are persistent buffers `<axis>_<side>_div` (absent where a map has none).
    """

    def __init__(
        self,
        src: ModelConfig,
        dst: ModelConfig,
        sources: Sequence[int],
        width: Mapping[tuple[str, str], SideMap],
    ) -> None:
        super().__init__()
        if len(sources) != dst.n_layers:
            raise ValueError(f"{len(sources)} depth sources for a {dst.n_layers}-layer target")
        if src.head_dim != dst.head_dim:
            raise ValueError(f"G_learn keeps the head dim (RoPE): {src.head_dim} -> {dst.head_dim}")
        self.src, self.dst = src, dst
        c = _one_hot_sources(sources, src.n_layers)
        self.depth = nn.ParameterDict({k: nn.Parameter(c.clone()) for k in DEPTH_KINDS})
        old, new = axis_sizes(src), axis_sizes(dst)
        hd = src.head_dim
        for axis, side in (*AXIS_SIDES, *MOMENT_SIDES):
            if (axis, side) not in width:
                raise ValueError(f"no initial width map for axis {axis!r} ({side} side)")
            m = width[(axis, side)]
            want = (new[axis], old[axis])
            if tuple(m.matrix.shape) != want or (m.div is not None and tuple(m.div.shape) != want[:1]):
                raise ValueError(f"width map {axis}/{side}: shape {tuple(m.matrix.shape)}, expected {want}")
            if axis in _HEAD_AXES:
                m = head_level(m, hd, f"width map {axis}/{side}")
            matrix = m.matrix.detach().float().clone()
            if (axis, side) in MOMENT_SIDES:
                self.register_buffer(f"{axis}_{side}", matrix)  # fixed: used by map_moments only
            else:
                self.register_parameter(f"{axis}_{side}", nn.Parameter(matrix))
            if m.div is not None:
                self.register_buffer(f"{axis}_{side}_div", m.div.detach().float().clone())

    def width_map(self, axis: str, side: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return getattr(self, f"{axis}_{side}"), getattr(self, f"{axis}_{side}_div", None)

    def expand(self, small: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The grown model's parameters (by name) from the small model's (differentiable in the maps)."""
        maps = {key: self.width_map(*key) for key in AXIS_SIDES}
        depth = {k: self.depth[k] for k in DEPTH_KINDS}
        return expand_tensors(self.src, self.dst, small, depth, maps)


def expand_tensors(
    src: ModelConfig,
    dst: ModelConfig,
    small: Mapping[str, torch.Tensor],
    depth: Mapping[str, torch.Tensor],
    maps: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]],
) -> dict[str, torch.Tensor]:
    """Apply width maps (per layer of the small model) then depth coefficients to a dict of tensors laid
    out like the small model's parameters (its parameters, or one of their Adam moments)."""
    L, T, hd = src.n_layers, dst.n_layers, src.head_dim
    h, hk, H, HK = src.n_heads, src.n_kv_heads, dst.n_heads, dst.n_kv_heads
    dtype = maps[("resid", "write")][0].dtype

    def w(axis: str, side: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        m, div = maps[(axis, side)]
        return _apply(x, m, div, dim)

    def stack(suffix: str) -> torch.Tensor:
        return torch.stack([small[f"layers.{i}.{suffix}"].to(dtype) for i in range(L)])

    out: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": w("resid", "write", small["tok_embeddings.weight"].to(dtype), 1),
        "norm.weight": w("resid", "write", small["norm.weight"].to(dtype), 0),
        "output.weight": w("resid", "read", small["output.weight"].to(dtype), 1),
    }
    layers: dict[str, torch.Tensor] = {}
    for norm in ("attn_norm", "mlp_norm"):
        layers[f"{norm}.weight"] = _mix(depth[norm], w("resid", "write", stack(f"{norm}.weight"), 1))
    qkv = stack("attn.wqkv.weight").reshape(L, h + 2 * hk, hd, -1)
    q, k, v = qkv.split([h, hk, hk], dim=1)
    sections = []
    for kind, x, axis in (("q", q, "q"), ("k", k, "kv"), ("v", v, "kv")):
        x = w("resid", "read", w(axis, "write", x, 1), 3)
        sections.append(_mix(depth[kind], x).reshape(T, -1, dst.dim))
    layers["attn.wqkv.weight"] = torch.cat(sections, dim=1)
    wo = stack("attn.wo.weight").reshape(L, src.dim, h, hd)
    wo = w("q", "read", w("resid", "write", wo, 1), 2)
    layers["attn.wo.weight"] = _mix(depth["wo"], wo).reshape(T, dst.dim, H * hd)
    gate, up = stack("mlp.w13.weight").split([src.ffn_dim, src.ffn_dim], dim=1)
    ffn = [
        _mix(depth[kind], w("resid", "read", w("ffn", "write", x, 1), 2)) for kind, x in (("gate", gate), ("up", up))
    ]
    layers["mlp.w13.weight"] = torch.cat(ffn, dim=1)
    w2 = w("ffn", "read", w("resid", "write", stack("mlp.w2.weight"), 1), 2)
    layers["mlp.w2.weight"] = _mix(depth["w2"], w2)
    for suffix, t in layers.items():
        for i, ti in enumerate(t.unbind(0)):
            out[f"layers.{i}.{suffix}"] = ti
    assert HK * hd == axis_sizes(dst)["kv"]
    return out


def map_params(src: ModelConfig, dst: ModelConfig) -> int:
    """Number of learned parameters of `GrowthMaps` between these configs (without building them)."""
    old, new = axis_sizes(src), axis_sizes(dst)
    heads = {"q": (src.n_heads, dst.n_heads), "kv": (src.n_kv_heads, dst.n_kv_heads)}
    n = len(DEPTH_KINDS) * dst.n_layers * src.n_layers
    for axis, _ in AXIS_SIDES:
        o, w = heads.get(axis, (old[axis], new[axis]))
        n += o * w
    return n


def expansion_flops(src: ModelConfig, dst: ModelConfig) -> tuple[float, float]:
    """(forward, backward) FLOPs (2 per multiply-add) of `GrowthMaps.expand`, counted matmul by matmul as
    implemented. Backward: every matmul computes its map's gradient; those whose other operand comes from
    the maps (a read after a write, the depth mix) also compute that operand's gradient, the first map
    applied to a small-model tensor does not (the small model is frozen)."""
    L, T, hd = src.n_layers, dst.n_layers, src.head_dim
    d, D, f, F, V = src.dim, dst.dim, src.ffn_dim, dst.ffn_dim, src.vocab_size
    h, hk, H, HK = src.n_heads, src.n_kv_heads, dst.n_heads, dst.n_kv_heads

    def mm(rows: int, inner: int, cols: int) -> float:
        return 2.0 * rows * inner * cols

    # First matmuls (their input is a small-model tensor): embedding (write), head (read), the final norm
    # and per layer the two norm gains, the write of every weight.
    first = mm(V, d, D) * 2 + mm(1, d, D)
    first += L * (2 * mm(1, d, D) + mm(hd * d, h, H) + 2 * mm(hd * d, hk, HK) + mm(h * hd, d, D))
    first += L * (2 * mm(d, f, F) + mm(f, d, D))
    # Second matmuls (the read after a write) and the depth mix.
    second = L * (mm(H * hd, d, D) + 2 * mm(HK * hd, d, D) + mm(D * hd, h, H) + 2 * mm(F, d, D) + mm(D, f, F))
    large_layer = 2 * D + (H + 2 * HK) * hd * D + D * H * hd + 3 * D * F
    second += mm(T, L, large_layer)
    return first + second, first + 2 * second


@contextlib.contextmanager
def exact_matmuls():
    """fp32 matmuls without TF32 (CUDA), so the expansion of one-hot / 0-1 maps is exact."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def map_moments(maps: GrowthMaps, moments: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Adam moments of the grown model from the small model's, through the (learned) maps (module doc).

    kind: "exp_avg" (depth c; width: read map on a tensor's output axis, write map on its input axis) or
    "exp_avg_sq" (the same maps squared elementwise).
    """
    if kind not in ("exp_avg", "exp_avg_sq"):
        raise ValueError(f"kind must be exp_avg or exp_avg_sq, got {kind!r}")
    square = kind == "exp_avg_sq"
    # expand_tensors applies the (axis, "write") map to output axes and (axis, "read") to input axes: swap.
    swapped = {(axis, side): (axis, "read" if side == "write" else "write") for axis, side in AXIS_SIDES}
    gmaps = {}
    for key, (axis, side) in swapped.items():
        m, div = maps.width_map(axis, side)
        gmaps[key] = (m * m, None if div is None else div * div) if square else (m, div)
    depth = {k: (c * c if square else c).detach() for k, c in maps.depth.items()}
    with exact_matmuls():
        return expand_tensors(maps.src, maps.dst, moments, depth, gmaps)
