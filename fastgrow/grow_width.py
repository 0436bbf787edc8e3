"""Widthwise growth of one tensor (a parameter or one of its Adam moments), on the device.

Head dim is kept (RoPE unchanged), so a wider `dim` means more heads: with k = dim'/dim, the q heads
and the kv heads both grow k-fold (so the q-head -> kv-head grouping of GQA is the same for every old
head). Every weight is a stack of row *sections* over axes with a *role*:

    axis role   size                    tok_embeddings [vocab | resid]     (output axis: columns)
    resid       dim                     output         [vocab | resid]
    q           n_heads * head_dim      norms          [resid]
    kv          n_kv_heads * head_dim   attn.wqkv      [q | resid], [kv | resid], [kv | resid]
    ffn         ffn_dim                 attn.wo        [resid | q]
    vocab       vocab_size              mlp.w13        [ffn | resid], [ffn | resid]
                                        mlp.w2         [resid | ffn]

`direct` (function preserving, G_direct): every axis is tiled r = new/old times (channel j' copies
old channel j' mod old; requires integer multiples). The residual stream becomes k copies of itself,
so RMSNorm's mean(x^2) -- and hence every norm output -- is unchanged, eps included. A weight reading
a tiled input axis is divided by that axis's multiplicity, so every sum sees r copies of w/r: each new
unit computes exactly its old unit's value, and the logits are unchanged.
Gradients: by the symmetry between copies, each copy of an output unit receives 1/r of the old unit's
gradient (the r copies together carry it), so a tensor's gradient is the old one gathered and scaled by
s = 1 / (multiplicity of its output axis). Adam moments are those of a run that had always been the
grown model: exp_avg * s and exp_avg_sq * s^2, so every element's m / sqrt(v) -- its Adam update -- is
unchanged (Staged Training's rule, Shen et al. 2022; for width doubling s = 1/2).

`zero`: the old tensor fills the leading block of each section, the rest is zero: new heads have zero
q/k/v (output 0), new FFN channels zero gate/up (SwiGLU output 0), new residual channels are never
written (zero embedding columns and wo/w2 rows). The residual stream is [x, 0], so mean(x^2) shrinks by
dim/dim'; the norm gains are multiplied by c = sqrt(dim/dim') to compensate, which is exact except for
RMSNorm's eps (sqrt(mean + eps) vs sqrt(mean + eps * dim'/dim)). Gradients of the old entries are
unchanged except the gains' (1/c), so old moments are copied (gains: m/c, v/c^2), new ones zero.

`random`: old block copied unchanged, new entries drawn from the target's init distribution (norm gains
1); the function changes (G_random without the masks of the original method). New moments are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastgrow.config import WIDTH_OPS, ModelConfig


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    hd = cfg.head_dim
    return {
        "resid": cfg.dim,
        "q": cfg.n_heads * hd,
        "kv": cfg.n_kv_heads * hd,
        "ffn": cfg.ffn_dim,
        "vocab": cfg.vocab_size,
    }


def param_layout(name: str) -> tuple[int, list[tuple[str, str | None]]]:
    """(output axis, row sections [(row role, column role or None)]) of a parameter by its name."""
    if name == "tok_embeddings.weight":
        return 1, [("vocab", "resid")]
    if name == "output.weight":
        return 0, [("vocab", "resid")]
    if name.endswith("norm.weight"):
        return 0, [("resid", None)]
    if name.endswith("attn.wqkv.weight"):
        return 0, [("q", "resid"), ("kv", "resid"), ("kv", "resid")]
    if name.endswith("attn.wo.weight"):
        return 0, [("resid", "q")]
    if name.endswith("mlp.w13.weight"):
        return 0, [("ffn", "resid"), ("ffn", "resid")]
    if name.endswith("mlp.w2.weight"):
        return 0, [("resid", "ffn")]
    raise ValueError(f"width growth does not know parameter {name!r}")


@dataclass(frozen=True)
class WidthMap:
    """Old and new sizes of every axis role, and the operator."""

    op: str
    old: dict[str, int]
    new: dict[str, int]

    @classmethod
    def between(cls, op: str, src: ModelConfig, dst: ModelConfig) -> WidthMap:
        if op not in WIDTH_OPS:
            raise ValueError(f"unknown width op {op!r} (one of {WIDTH_OPS})")
        return cls(op=op, old=axis_sizes(src), new=axis_sizes(dst))

    @property
    def identity(self) -> bool:
        return self.old == self.new

    def mult(self, role: str | None) -> int:
        if role is None:
            return 1
        return self.new[role] // self.old[role]

    def _sections(self, name: str):
        out_axis, secs = param_layout(name)
        o_row = n_row = 0
        for row, col in secs:
            yield out_axis, row, col, o_row, n_row
            o_row += self.old[row]
            n_row += self.new[row]

    def out_mult(self, name: str) -> int:
        """Multiplicity of a parameter's output axis (all its row sections share one)."""
        out_axis, secs = param_layout(name)
        return self.mult(secs[0][0] if out_axis == 0 else secs[0][1])

    def grad_scale(self, name: str) -> float:
        """Factor s with grad(new) = s * gathered grad(old) (direct) -- 1/multiplicity of the output axis."""
        if self.op == "direct":
            return 1.0 / self.out_mult(name)
        if self.op == "zero" and name.endswith("norm.weight"):
            return 1.0 / self.norm_gain_scale
        return 1.0

    @property
    def norm_gain_scale(self) -> float:
        """zero op: gains * sqrt(dim/dim') keep the old channels' norm output (see module doc)."""
        return math.sqrt(self.old["resid"] / self.new["resid"]) if self.op == "zero" else 1.0

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

        kind: "param", "exp_avg" (scaled by s) or "exp_avg_sq" (scaled by s^2). init_std/generator:
        the random op's distribution for new parameter entries (norm gains get 1).
        """
        if kind not in ("param", "exp_avg", "exp_avg_sq"):
            raise ValueError(f"unknown tensor kind {kind!r}")
        if self.identity:
            dst.copy_(src)
            return
        s = self.grad_scale(name)
        moment_scale = s if kind == "exp_avg" else s * s
        is_norm = name.endswith("norm.weight")
        if self.op != "direct" and kind == "param":
            # New entries first, then the old block on top of them.
            if self.op == "zero":
                dst.fill_(self.norm_gain_scale if is_norm else 0.0)
            elif is_norm:
                dst.fill_(1.0)
            else:
                dst.normal_(0.0, init_std, generator=generator)
        elif self.op != "direct":
            dst.zero_()
        for out_axis, row, col, o_row, n_row in self._sections(name):
            ro, rn = self.old[row], self.new[row]
            s_sec = src.narrow(0, o_row, ro)
            d_sec = dst.narrow(0, n_row, rn)
            if self.op == "direct":
                rr = rn // ro
                if col is None:
                    d_sec.view(rr, ro).copy_(s_sec.unsqueeze(0))
                else:
                    co, cn = self.old[col], self.new[col]
                    rc = cn // co
                    d_sec.view(rr, ro, rc, co).copy_(s_sec.view(1, ro, 1, co))
                # Divide (by integers, so x/3 rounds like the oracle's x/3) by the multiplicity of the
                # axis the weight reads (parameters) or by 1/s, 1/s^2 (moments).
                if kind == "param":
                    in_role = None if col is None else (col if out_axis == 0 else row)
                    div = self.mult(in_role)
                else:
                    div = self.out_mult(name) ** (1 if kind == "exp_avg" else 2)
                if div != 1:
                    d_sec.div_(div)
            else:
                block = d_sec if col is None else d_sec.narrow(1, 0, self.old[col])
                block = block.narrow(0, 0, ro)
                block.copy_(s_sec)
                if kind == "param" and is_norm and self.op == "zero":
                    block.mul_(self.norm_gain_scale)
                elif kind != "param" and moment_scale != 1.0:
                    block.mul_(moment_scale)


def check_direct(src: ModelConfig, dst: ModelConfig) -> None:
    """direct needs every axis to grow by an integer multiple (uniform duplication keeps RMS stats)."""
    old, new = axis_sizes(src), axis_sizes(dst)
    for role, o in old.items():
        n = new[role]
        if n % o:
            raise ValueError(
                f"direct width growth needs integer multiples: {role} size {o} -> {n} is not one "
                "(use width op zero or random for other sizes)"
            )
