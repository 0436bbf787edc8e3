"""Widthwise growth of one tensor (a parameter or one of its Adam moments), on the device.

Head dim is kept (RoPE unchanged), so a wider `dim` means more heads: the q heads and the kv heads grow
by the same factor, so the q-head -> kv-head grouping of GQA is the same for every old head. Every
weight is a stack of row *sections* over axes with a *role*; one axis of each weight is its output
(the units it writes), the other its input (the units it reads):

    axis role   size                    weight          sections [rows | cols]      output axis
    resid       dim                     tok_embeddings  [vocab | resid]             cols (resid)
    q           n_heads * head_dim      output          [vocab | resid]             rows (vocab)
    kv          n_kv_heads * head_dim   norms           [resid]                     -
    ffn         ffn_dim                 attn.wqkv       [q | resid] [kv | resid] x2 rows
    vocab       vocab_size              attn.wo         [resid | q]                 rows (resid)
                                        mlp.w13         [ffn | resid] x2            rows
                                        mlp.w2          [resid | ffn]               rows (resid)

`direct` (function preserving, G_direct with an uneven split): along every grown axis new channel j'
is a copy of old channel src(j') = j' mod n (the old axis tiled; a non-integer ratio, allowed for
ffn, copies the first n' mod n channels once more). As explicit linear maps per axis (`AxisMap`,
`WidthMap.axis(role)`, also as dense matrices for learned maps to start from):

    duplicate  E[j', j] = 1 if src(j') = j          (the units a weight writes: its output rows)
    split      S[j', j] = a(j') if src(j') = j      (the units a weight reads: its input columns)

and every weight becomes W' = E_out W S_in^T. The copies of a unit compute exactly its value, and a
weight reading them sees the fractions a of the old column, which sum to 1 over the copies: the logits
are unchanged. The residual stream holds every channel k times (k = dim'/dim, an integer for direct),
so RMSNorm's mean(x^2), eps included, is unchanged too (a non-integer dim ratio would change it).

The fractions are uneven so that the copies diverge under training (as bert2BERT / LEMON split fan-out
weights unevenly). With an even split a = 1/k every copy gets the same gradient and the same Adam
update forever and the grown width stays dead: every grown matrix keeps rank n of k*n (measured: the
smallest singular value is 1e-17 of the largest after 20 AdamW steps). Uneven fractions make the
readers' columns a_c W + U (U: the same update for every copy) stop being parallel at the first step,
and the copies' gradients then differ in direction. Copy c of unit u with k copies reads the fraction
f(i) with i = (c + u) mod k: f(i) = 2^-(i+3) for i < k-1 and the rest, 3/4 + 2^-(k+1), for the last
(k=2: 1/8, 7/8; k=3: 1/8, 1/16, 13/16; dyadic, so exact in binary). A unit is a head on the q and kv
axes and a channel elsewhere; rotating the assignment by the unit index makes the q heads that share a
kv head split differently, so that kv head's copies see different mixtures of gradients (without the
rotation some directions of attn.wo stayed within ~1e-6 of singular). Measured on a 2-layer model
grown 16 -> 32 wide, 20 AdamW steps, 5 seeds (tests/test_grow_width.py checks one): the smallest
singular value of every grown matrix is >= 21x the fp32 rank tolerance with 1/8, 7/8 (>= 4.6x with
1/4, 3/4).

Adam moments under `direct` scale by the gradient share g of the element's output unit, m*g and v*g^2,
so each element's first update m/sqrt(v) after growth is exactly its source element's (Staged
Training's rule; with an even split g = 1/k: m/2, v/4 for width doubling). The share is the fraction
of the unit's copy, g = a: exact for the q heads, the FFN channels and the norm gains (a unit's output
is read only through weights that split it by a). Two shares are approximations: a kv head's copy
serves q heads with different fractions (we use the kv axis's own fraction), and on the residual
stream RMSNorm's mean-square term is shared evenly between the copies (a is its leading term). Any
share keeps the first update exact (m*g / sqrt(v*g^2) = m / sqrt(v)); the share only sets how fast new
gradients replace the carried moments.

`zero` (prts's G_zero, made to train): a new unit's *output* is closed (zero) and everything it reads
is drawn from the init distribution, so the function is preserved and every new unit gets a gradient:
new residual channels are never written (zero embedding columns, zero wo / w2 rows in the old input
columns), new heads have zero v rows (output 0; q and k rows random), new FFN channels have zero gate
rows (silu(0) * up = 0; up rows random: with both zero, SwiGLU's gradient at (0, 0) is 0 and the unit
would stay dead, as prts's G_zero leaves new SwiGLU units, whose inputs, new residual channels with zero
gains, stay 0 too), and every weight's new input columns are random. The residual
stream is [x, 0], so mean(x^2) shrinks by dim/dim': the norm gains are multiplied by c = sqrt(dim/dim')
and the model's norm_eps by dim/dim', which makes RMSNorm's output on the old channels exactly the old
one (eps included). Old entries' gradients are unchanged (new units contribute 0 and read 0) except the
gains' (1/c): old moments are copied (gains: m/c, v/c^2), new ones are zero.

`random`: old block copied unchanged, new entries drawn from the target's init distribution (norm gains
1); the function changes (G_random without the masks of the original method). New moments are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastgrow.config import WIDTH_OPS, ModelConfig

__all__ = ["WIDTH_OPS", "AxisMap", "WidthMap", "axis_sizes", "check_direct", "param_layout", "split_fraction"]


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    hd = cfg.head_dim
    return {
        "resid": cfg.dim,
        "q": cfg.n_heads * hd,
        "kv": cfg.n_kv_heads * hd,
        "ffn": cfg.ffn_dim,
        "vocab": cfg.vocab_size,
    }


def param_layout(name: str) -> tuple[int, list[tuple[str, str | None, bool]]]:
    """(output axis, row sections [(row role, column role or None, closes)]) of a parameter by its name.

    closes: under `zero`, the section's new output units are the ones kept at zero (in the old input
    columns) so that they contribute nothing: v rows, gate rows, and the writers of the residual stream.
    """
    if name == "tok_embeddings.weight":
        return 1, [("vocab", "resid", True)]
    if name == "output.weight":
        return 0, [("vocab", "resid", False)]
    if name.endswith("norm.weight"):
        return 0, [("resid", None, False)]
    if name.endswith("attn.wqkv.weight"):
        return 0, [("q", "resid", False), ("kv", "resid", False), ("kv", "resid", True)]
    if name.endswith("attn.wo.weight"):
        return 0, [("resid", "q", True)]
    if name.endswith("mlp.w13.weight"):
        return 0, [("ffn", "resid", True), ("ffn", "resid", False)]
    if name.endswith("mlp.w2.weight"):
        return 0, [("resid", "ffn", True)]
    raise ValueError(f"width growth does not know parameter {name!r}")


def split_fraction(copy: int, copies: int, unit: int = 0) -> float:
    """direct's fraction a of an old input column that copy `copy` (0-based) of unit number `unit` with
    `copies` copies reads: the fractions 2^-(i+3) for i < copies-1 and the rest, 3/4 + 2^-(copies+1),
    for i = copies-1 (exact in binary), rotated by the unit: i = (copy + unit) mod copies."""
    if not 0 <= copy < copies:
        raise ValueError(f"copy {copy} out of range for {copies} copies")
    i = (copy + unit) % copies
    if i < copies - 1:
        return 2.0 ** -(i + 3)
    return 0.75 + 2.0 ** -(copies + 1)  # = 1 - the other copies' fractions


@dataclass(frozen=True)
class AxisMap:
    """direct's map along one axis role of `old` -> `new` channels (see the module doc): new channel j'
    copies old channel j' mod old; `split` gives the fraction of the old column it reads. `unit`: the
    channels that form one unit (head_dim for the head axes q and kv, 1 otherwise)."""

    old: int
    new: int
    unit: int = 1

    def src_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """LongTensor [new]: the old channel each new channel copies."""
        return torch.arange(self.new, device=device) % self.old

    def split(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """Tensor [new]: the split fraction a of each new channel (1 where the channel has one copy), by
        split_fraction(copy, copies, unit index). Computed on the device (no host->device copy)."""
        j = torch.arange(self.new, device=device)
        src = j % self.old
        copies = self.new // self.old + (src < (self.new % self.old)).long()
        i = (j // self.old + src // self.unit) % copies
        one = torch.ones(self.new, dtype=torch.float32, device=device)
        frac = torch.where(i == copies - 1, 0.75 + torch.ldexp(one, -(copies + 1)), torch.ldexp(one, -(i + 3)))
        return frac.to(dtype)

    def matrix(self, kind: str, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The dense map [new, old]: kind "duplicate" (E) or "split" (S); W' = E_out @ W @ S_in.T."""
        if kind not in ("duplicate", "split"):
            raise ValueError(f"kind must be 'duplicate' or 'split', got {kind!r}")
        m = torch.zeros(self.new, self.old, dtype=dtype, device=device)
        vals = torch.ones(self.new, dtype=dtype, device=device) if kind == "duplicate" else self.split(dtype, device)
        m[torch.arange(self.new, device=device), self.src_index(device)] = vals
        return m

    @property
    def grown(self) -> bool:
        return self.new != self.old

    @property
    def integer(self) -> bool:
        return self.new % self.old == 0


@dataclass(frozen=True)
class WidthMap:
    """Old and new sizes of every axis role, and the operator."""

    op: str
    old: dict[str, int]
    new: dict[str, int]
    head_dim: int = 1
    # Per-call cache of the split vectors by (role, dtype, device): computed once per grow().
    _splits: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def between(cls, op: str, src: ModelConfig, dst: ModelConfig) -> WidthMap:
        if op not in WIDTH_OPS:
            raise ValueError(f"unknown width op {op!r} (one of {WIDTH_OPS})")
        return cls(op=op, old=axis_sizes(src), new=axis_sizes(dst), head_dim=src.head_dim)

    @property
    def identity(self) -> bool:
        return self.old == self.new

    def axis(self, role: str) -> AxisMap:
        """direct's map along axis `role` (resid, q, kv, ffn, vocab)."""
        return AxisMap(self.old[role], self.new[role], self.head_dim if role in ("q", "kv") else 1)

    def axes(self) -> dict[str, AxisMap]:
        return {role: self.axis(role) for role in self.old}

    @property
    def norm_gain_scale(self) -> float:
        """zero op: gains * sqrt(dim/dim') keep the old channels' norm output (see module doc)."""
        return math.sqrt(self.old["resid"] / self.new["resid"]) if self.op == "zero" else 1.0

    def _split(self, role: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, dtype, device)
        if key not in self._splits:
            self._splits[key] = self.axis(role).split(dtype, device)
        return self._splits[key]

    def _sections(self, name: str):
        out_axis, secs = param_layout(name)
        o_row = n_row = 0
        for row, col, closes in secs:
            yield out_axis, row, col, closes, o_row, n_row
            o_row += self.old[row]
            n_row += self.new[row]

    @torch.no_grad()
    def fill(
        self,
        dst: torch.Tensor,
        src: torch.Tensor,
        name: str,
        kind: str = "param",
        init_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Write the grown version of `src` (a parameter or a moment of parameter `name`) into `dst`.

        kind: "param", "exp_avg" or "exp_avg_sq" (moments follow the operator's rule, module doc).
        init_std/generator: the distribution of new random entries (zero, random). A pure per-tensor
        operation on dst's device: no host sync, nothing else read or written.
        """
        if kind not in ("param", "exp_avg", "exp_avg_sq"):
            raise ValueError(f"unknown tensor kind {kind!r}")
        if self.identity:
            dst.copy_(src)
        elif self.op == "direct":
            self._fill_direct(dst, src, name, kind)
        else:
            self._fill_new_entries(dst, src, name, kind, init_std, generator)

    def _fill_direct(self, dst: torch.Tensor, src: torch.Tensor, name: str, kind: str) -> None:
        for out_axis, row, col, _, o_row, n_row in self._sections(name):
            ro, rn = self.old[row], self.new[row]
            s_sec = src.narrow(0, o_row, ro)
            d_sec = dst.narrow(0, n_row, rn)
            if col is None:
                _gather(d_sec, s_sec, self.axis(row), None)
            else:
                _gather(d_sec, s_sec, self.axis(row), self.axis(col))
            out_role = row if (col is None or out_axis == 0) else col
            in_role = None if col is None else (col if out_axis == 0 else row)
            out_dim = 0 if (col is None or out_axis == 0) else 1
            if kind == "param":
                # Readers take the fraction a of the old column (an uneven split, module doc).
                if in_role is not None and self.axis(in_role).grown:
                    a = self._split(in_role, d_sec.dtype, d_sec.device)
                    d_sec.mul_(a.view(1, -1) if out_dim == 0 else a.view(-1, 1))
            elif self.axis(out_role).grown:
                g = self._split(out_role, d_sec.dtype, d_sec.device)  # the gradient share of the unit
                g = g if kind == "exp_avg" else g * g
                d_sec.mul_(g if col is None else (g.view(-1, 1) if out_dim == 0 else g.view(1, -1)))

    def _fill_new_entries(
        self, dst: torch.Tensor, src: torch.Tensor, name: str, kind: str, init_std: float, gen
    ) -> None:
        is_norm = name.endswith("norm.weight")
        c = self.norm_gain_scale
        if kind != "param":
            dst.zero_()  # new entries: no history
        elif is_norm:
            dst.fill_(c if self.op == "zero" else 1.0)
        else:
            dst.normal_(0.0, init_std, generator=gen)  # new input columns (and open new rows)
        for out_axis, row, col, closes, o_row, n_row in self._sections(name):
            ro, rn = self.old[row], self.new[row]
            s_sec = src.narrow(0, o_row, ro)
            d_sec = dst.narrow(0, n_row, rn)
            if col is None:
                block = d_sec.narrow(0, 0, ro)
            else:
                block = d_sec.narrow(0, 0, ro).narrow(1, 0, self.old[col])
                if self.op == "zero" and kind == "param" and closes:
                    # Close the new output units: zero where they read old units (their output is 0).
                    if out_axis == 0 and rn > ro:
                        d_sec.narrow(0, ro, rn - ro).narrow(1, 0, self.old[col]).zero_()
                    elif out_axis == 1 and self.new[col] > self.old[col]:
                        d_sec.narrow(1, self.old[col], self.new[col] - self.old[col]).narrow(0, 0, ro).zero_()
            block.copy_(s_sec)
            if is_norm and self.op == "zero":
                # gains * c (param); the gains' gradient is 1/c of the old one: m / c, v / c^2.
                block.mul_(c if kind == "param" else (1.0 / c if kind == "exp_avg" else 1.0 / (c * c)))


def _gather(dst: torch.Tensor, src: torch.Tensor, rows: AxisMap, cols: AxisMap | None) -> None:
    """dst[j', k'] = src[rows.src(j'), cols.src(k')]: broadcast views for integer ratios (one copy
    kernel), index_select otherwise."""
    ro, rn = rows.old, rows.new
    if cols is None:
        if rows.integer:
            dst.view(rn // ro, ro).copy_(src.unsqueeze(0))
        else:
            torch.index_select(src, 0, rows.src_index(src.device), out=dst)
        return
    co, cn = cols.old, cols.new
    if rows.integer and cols.integer and dst.is_contiguous():
        dst.view(rn // ro, ro, cn // co, co).copy_(src.view(1, ro, 1, co))
        return
    t = src if rn == ro else src.index_select(0, rows.src_index(src.device))
    dst.copy_(t if cn == co else t.index_select(1, cols.src_index(src.device)))


def check_direct(src: ModelConfig, dst: ModelConfig) -> None:
    """direct needs the residual width (and so the heads) to grow by an integer multiple: every residual
    channel must appear the same number of times for RMSNorm's mean(x^2) to be unchanged. The FFN
    width may grow by any amount (nothing normalises over it)."""
    old, new = axis_sizes(src), axis_sizes(dst)
    for role in ("resid", "q", "kv"):
        o, n = old[role], new[role]
        if n % o:
            raise ValueError(
                f"direct width growth needs an integer multiple of the {role} width: {o} -> {n} is not one "
                "(RMSNorm's mean over the residual stream changes otherwise); use width op zero or random, "
                "which allow any width"
            )
