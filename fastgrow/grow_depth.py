"""Depthwise growth: which small-model layer each layer of the grown model comes from.

Spec notation (the paper's, 1-based): segments joined by '-', each a run of layers optionally repeated
with '*k'. `1-234*7-56` on a 6-layer model is layer 1, then layers 2,3,4 seven times, then 5,6 (24
layers); `123456*4` is G_stack with g = 4. A segment is a string of single digits (the paper's form, for
models of up to 9 layers) or, for deeper models, comma-separated numbers, optionally in parentheses:
`1,2,3,1,2,3` (an explicit source list), `(1,2)-(3,4,10,11)*2`. Where a spec may create new blocks
(the `zero` and `random` operators), 0 stands for a new block; `partial` and `sources` only copy
layers (a 0 there is an error).

Sources are returned 0-based, with -1 for a new block.
"""

from __future__ import annotations

import re

NEW_BLOCK = -1
_REPEAT = re.compile(r"^(?P<body>.+?)(?:\*(?P<rep>\d+))?$")


def _parse_body(body: str, spec: str) -> list[int]:
    inner = body[1:-1] if body.startswith("(") and body.endswith(")") else body
    if "," in inner or inner != body:
        items = [t.strip() for t in inner.split(",")]
        if not items or any(not t.isdigit() for t in items):
            raise ValueError(f"malformed stacking spec {spec!r}: {body!r} must be comma-separated layer numbers")
        return [int(t) for t in items]
    if not inner.isdigit():
        raise ValueError(
            f"malformed stacking spec {spec!r}: segment {body!r} must be digits (one layer each), "
            "a comma list, optionally followed by *k"
        )
    return [int(ch) for ch in inner]


def parse_spec(spec: str, base_layers: int, allow_new: bool = False) -> list[int]:
    """0-based sources for the spec (see module doc); -1 marks a new block where allow_new."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty stacking spec {spec!r}")
    if base_layers < 0 or (base_layers == 0 and not allow_new):
        raise ValueError(f"base model must have >= 1 layer to copy from, got {base_layers}")
    s = spec.replace(" ", "")
    out: list[int] = []
    # Split on '-' outside parentheses.
    segments, depth, cur = [], 0, ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed stacking spec {spec!r}: unbalanced ')'")
        if ch == "-" and depth == 0:
            segments.append(cur)
            cur = ""
        else:
            cur += ch
    segments.append(cur)
    if depth != 0:
        raise ValueError(f"malformed stacking spec {spec!r}: unbalanced '('")
    for seg in segments:
        if not seg:
            raise ValueError(f"malformed stacking spec {spec!r}: empty segment")
        m = _REPEAT.match(seg)
        body, rep = m.group("body"), m.group("rep")
        if "*" in body:
            raise ValueError(f"malformed stacking spec {spec!r}: segment {seg!r} (repeat must be '*<integer>')")
        layers = _parse_body(body, spec)
        k = int(rep) if rep is not None else 1
        if k < 1:
            raise ValueError(f"malformed stacking spec {spec!r}: repeat count in {seg!r} must be >= 1")
        for layer in layers:
            if layer == 0 and allow_new:
                continue
            if not 1 <= layer <= base_layers:
                lo = 0 if allow_new else 1
                raise ValueError(
                    f"stacking spec {spec!r}: layer {layer} is out of range {lo}..{base_layers} "
                    f"(1-based; the model has {base_layers} layers)"
                )
        out.extend([layer - 1 if layer > 0 else NEW_BLOCK for layer in layers] * k)
    return out


def stack_sources(spec: str, base_layers: int) -> list[int]:
    """0-based source layer of each grown layer for a stacking spec such as `1-234*7-56`.

    Raises ValueError for malformed specs, layers out of range and specs that give fewer layers than
    the model has (growth never shrinks).
    """
    src = parse_spec(spec, base_layers, allow_new=False)
    if len(src) < base_layers:
        raise ValueError(
            f"stacking spec {spec!r} gives {len(src)} layers, fewer than the model's {base_layers}: "
            "growth cannot remove layers"
        )
    return src


def connection_rate(sources: list[int]) -> float:
    """Fraction of adjacent pairs (i, i+1) of the grown stack whose sources are adjacent (s[i+1] == s[i]+1).

    G_stack with g copies of L layers: (g*L - g) / (g*L - 1); interpolation: (L - 1) / (g*L - 1).
    """
    if len(sources) < 2:
        raise ValueError(f"connection rate needs at least 2 layers, got {len(sources)}")
    hits = sum(1 for a, b in zip(sources[:-1], sources[1:]) if a >= 0 and b == a + 1)
    return hits / (len(sources) - 1)


def _target_depth(op: str, base_layers: int, target_layers: int, factor: int) -> int:
    if target_layers < 0 or factor < 0:
        raise ValueError(f"target_layers and factor must be >= 0, got {target_layers}, {factor}")
    t = target_layers or base_layers * factor
    if t <= 0:
        raise ValueError(f"depth op {op!r} needs a growth factor or target_layers")
    if t < base_layers:
        raise ValueError(f"cannot grow {base_layers} layers to fewer ({t}) layers")
    return t


def _need_layers(op: str, base_layers: int) -> None:
    if base_layers < 1:
        raise ValueError(
            f"depth op {op!r} copies layers but the model has none; grow a 0-layer model with zero or random"
        )


def _spec_sources(op: str, base_layers: int, target_layers: int, factor: int, spec: str) -> list[int]:
    if factor:
        raise ValueError(f"depth op {op!r}: the spec {spec!r} sets the depth; give no factor")
    src = parse_spec(spec, base_layers, allow_new=op in ("zero", "random"))
    if len(src) < base_layers:
        raise ValueError(
            f"spec {spec!r} gives {len(src)} layers, fewer than the model's {base_layers}: growth cannot remove layers"
        )
    if target_layers and len(src) != target_layers:
        raise ValueError(f"spec {spec!r} gives {len(src)} layers but target_layers is {target_layers}")
    return src


def _stack(base_layers: int, target_layers: int, factor: int, spec: str) -> list[int]:
    _need_layers("stack", base_layers)
    return [i % base_layers for i in range(_target_depth("stack", base_layers, target_layers, factor))]


def _interpolate(base_layers: int, target_layers: int, factor: int, spec: str) -> list[int]:
    _need_layers("interpolate", base_layers)
    t = _target_depth("interpolate", base_layers, target_layers, factor)
    return [i * base_layers // t for i in range(t)]


def _from_spec(op: str):
    def sources(base_layers: int, target_layers: int, factor: int, spec: str) -> list[int]:
        if not spec:
            raise ValueError(f"depth op {op!r} needs a spec (e.g. '1-234*7-56' or '1,2,3,1,2,3')")
        return _spec_sources(op, base_layers, target_layers, factor, spec)

    return sources


def _new_blocks(op: str):
    def sources(base_layers: int, target_layers: int, factor: int, spec: str) -> list[int]:
        if spec:
            return _spec_sources(op, base_layers, target_layers, factor, spec)
        if base_layers == 0 and factor and not target_layers:
            raise ValueError(f"depth op {op!r} on a 0-layer model: give target_layers (a factor of 0 layers is 0)")
        t = _target_depth(op, base_layers, target_layers, factor)
        return list(range(base_layers)) + [NEW_BLOCK] * (t - base_layers)

    return sources


# Depth operators: op -> sources(base_layers, target_layers, factor, spec). A new operator joins here.
DEPTH_SOURCES = {
    "stack": _stack,
    "interpolate": _interpolate,
    "partial": _from_spec("partial"),
    "sources": _from_spec("sources"),
    "zero": _new_blocks("zero"),
    "random": _new_blocks("random"),
}


def depth_sources(op: str, base_layers: int, target_layers: int = 0, factor: int = 0, spec: str = "") -> list[int]:
    """Sources for a depth operator.

    stack: the whole model repeated (layer i <- i mod L); interpolate: each layer repeated in place
    (layer i <- floor(i * L / T)); partial / sources: the spec; zero / random: the original layers keep
    their positions 0..L-1 and new blocks are appended on top (or placed where a spec puts 0s; from a
    0-layer model every layer is new). Target depth T = target_layers, else base_layers * factor.
    """
    fn = DEPTH_SOURCES.get(op)
    if fn is None:
        raise ValueError(f"unknown depth op {op!r} ({' | '.join(DEPTH_SOURCES)})")
    return fn(base_layers, target_layers, factor, spec)
