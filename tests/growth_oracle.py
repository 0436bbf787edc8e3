"""Expected grown weights and Adam moments, built from the source state and the documented mappings only.

Nothing here imports fastgrow's growth code: depth sources are written out by the tests, and width
`direct` is rebuilt from the README / grow_width docstring statement of it, with dense matrices:

* channel j' of a grown axis (old size n) copies old channel j' mod n (copy c = j' // n; a channel has
  k = n' // n copies, one more for the first n' mod n channels);
* a weight's output rows are duplicated: E[j', j] = 1; its input columns are split: S[j', j] = f, with
  f(i) = 2^-(i+3) for i < k-1 and 1 - (the others) for i = k-1, where i = (c + u) mod k and u is the
  unit index (the head for the q and kv axes, the channel elsewhere): W' = E_out W S_in^T;
* moments: duplicated along both axes, times the output unit's fraction g (exp_avg) or g^2 (exp_avg_sq).
"""

from __future__ import annotations

import torch


def axis_sizes(cfg) -> dict[str, int]:
    hd = cfg.dim // cfg.n_heads
    return {
        "resid": cfg.dim,
        "q": cfg.n_heads * hd,
        "kv": cfg.n_kv_heads * hd,
        "ffn": cfg.ffn_dim,
        "vocab": cfg.vocab_size,
    }


# name suffix -> (output axis, [(row role, col role)]), as the model's parameter layout documents it
LAYOUT = {
    "tok_embeddings.weight": (1, [("vocab", "resid")]),
    "output.weight": (0, [("vocab", "resid")]),
    "norm.weight": (0, [("resid", None)]),
    "attn.wqkv.weight": (0, [("q", "resid"), ("kv", "resid"), ("kv", "resid")]),
    "attn.wo.weight": (0, [("resid", "q")]),
    "mlp.w13.weight": (0, [("ffn", "resid"), ("ffn", "resid")]),
    "mlp.w2.weight": (0, [("resid", "ffn")]),
}


def layout(name: str):
    for suffix, lay in LAYOUT.items():
        if name.endswith(suffix):
            return lay
    raise KeyError(name)


def fractions(old: int, new: int, unit: int = 1) -> list[float]:
    out = []
    for jp in range(new):
        j, c = jp % old, jp // old
        k = new // old + (1 if j < new % old else 0)
        i = (c + j // unit) % k
        others = [2.0 ** -(t + 3) for t in range(k - 1)]
        out.append(others[i] if i < k - 1 else 1.0 - sum(others))
    return out


def duplicate(old: int, new: int) -> torch.Tensor:
    m = torch.zeros(new, old, dtype=torch.float64)
    for jp in range(new):
        m[jp, jp % old] = 1.0
    return m


def split(old: int, new: int, unit: int = 1) -> torch.Tensor:
    m = torch.zeros(new, old, dtype=torch.float64)
    for jp, f in enumerate(fractions(old, new, unit)):
        m[jp, jp % old] = f
    return m


def _unit(role: str, head_dim: int) -> int:
    return head_dim if role in ("q", "kv") else 1


def direct_width(src_cfg, dst_cfg, name: str, t: torch.Tensor, kind: str = "param") -> torch.Tensor:
    """The documented `direct` image of parameter `name` (kind "param") or of one of its moments."""
    so, sn = axis_sizes(src_cfg), axis_sizes(dst_cfg)
    hd = src_cfg.dim // src_cfg.n_heads
    out_axis, secs = layout(name)
    parts, r0 = [], 0
    x = t.detach().double()
    for row, col in secs:
        piece = x[r0 : r0 + so[row]]
        r0 += so[row]
        e_row = duplicate(so[row], sn[row])
        if col is None:
            y = e_row @ piece
            g = torch.tensor(fractions(so[row], sn[row], _unit(row, hd)), dtype=torch.float64)
            if kind != "param":
                y = y * (g if kind == "exp_avg" else g * g)
            parts.append(y)
            continue
        e_col = duplicate(so[col], sn[col])
        out_role, in_role = (row, col) if out_axis == 0 else (col, row)
        if kind == "param":
            s_in = split(so[in_role], sn[in_role], _unit(in_role, hd))
            y = (e_row @ piece @ s_in.T) if out_axis == 0 else (s_in @ piece @ e_col.T)
        else:
            y = e_row @ piece @ e_col.T
            g = torch.tensor(fractions(so[out_role], sn[out_role], _unit(out_role, hd)), dtype=torch.float64)
            g = g if kind == "exp_avg" else g * g
            y = y * (g.view(-1, 1) if out_axis == 0 else g.view(1, -1))
        parts.append(y)
    return torch.cat(parts, 0).to(t.dtype)


def gathered(src_cfg, dst_cfg, name: str, t: torch.Tensor) -> torch.Tensor:
    """t duplicated along its grown axes, nothing split or scaled (to compare gradients)."""
    so, sn = axis_sizes(src_cfg), axis_sizes(dst_cfg)
    _, secs = layout(name)
    parts, r0 = [], 0
    x = t.detach().double()
    for row, col in secs:
        piece = x[r0 : r0 + so[row]]
        r0 += so[row]
        y = duplicate(so[row], sn[row]) @ piece
        if col is not None:
            y = y @ duplicate(so[col], sn[col]).T
        parts.append(y)
    return torch.cat(parts, 0)


def out_fraction(src_cfg, dst_cfg, name: str) -> torch.Tensor:
    """The output unit's fraction of every element of parameter `name` (its documented gradient share)."""
    so, sn = axis_sizes(src_cfg), axis_sizes(dst_cfg)
    hd = src_cfg.dim // src_cfg.n_heads
    out_axis, secs = layout(name)
    parts = []
    for row, col in secs:
        out_role = row if (col is None or out_axis == 0) else col
        g = torch.tensor(fractions(so[out_role], sn[out_role], _unit(out_role, hd)), dtype=torch.float64)
        if col is None:
            parts.append(g)
        elif out_axis == 0:
            parts.append(g.view(-1, 1).expand(sn[row], sn[col]))
        else:
            parts.append(g.view(1, -1).expand(sn[row], sn[col]))
    return torch.cat(parts, 0)
