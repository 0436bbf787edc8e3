"""The `fastgrow plan` and `fastgrow grow` subcommands (wired into fastgrow.cli by `add_growth_commands`).

fastgrow plan --params 7B --tokens 300B [--factor 4] [--preset 7B] [--layers 32] [--json]
fastgrow grow IN_CKPT OUT_RUN_DIR --op stack --factor 4 [--optimizer copy|reset] [--schedule ...]

`--op` takes the names of the `growth.op` config key and maps to a GrowPlan the same way
(`fastgrow.grow.plan_from_config`), so the offline and the in-run growth agree. Nothing here imports
torch until a command runs (`fastgrow --help` and `fastgrow plan` stay fast).
"""

from __future__ import annotations

import argparse
import json

from fastgrow.config import GROWTH_OPS, OPTIMIZER_POLICIES, SCHEDULE_POLICIES, WIDTH_OPS, GrowthConfig


def cmd_plan(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from fastgrow.plan import plan_growth

    if args.params is None and args.preset is None:
        raise ValueError("fastgrow plan needs --params N or --preset NAME")
    plan = plan_growth(args.params, args.tokens, factor=args.factor, preset=args.preset, layers=args.layers)
    d = plan.to_dict()
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    rows = [
        ("target params N", f"{plan.params:,}"),
        ("token budget D", f"{plan.tokens:,}"),
        ("compute C = 6ND", f"{plan.flops:.3e} FLOPs"),
        ("growth factor g", f"{plan.factor}"),
        ("grow after d (Eq. 10)", f"{plan.growth_tokens:,} tokens ({plan.growth_fraction:.1%} of D)"),
        ("layers base -> target", f"{plan.base_layers} -> {plan.target_layers}"),
        ("base params", f"{plan.params_small:,}" + ("" if plan.params_small_exact else " (estimated)")),
        ("FLOPs small phase", f"{plan.flops_small:.3e}"),
        ("FLOPs large phase", f"{plan.flops_large:.3e}"),
        ("FLOPs from scratch", f"{plan.flops_scratch:.3e}"),
    ]
    if not plan.in_fit_range:
        rows.append(("note", "outside the paper's fitted compute range: treat d with suspicion"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_grow(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    import dataclasses

    from fastgrow.checkpoint import read_meta
    from fastgrow.config import ModelConfig
    from fastgrow.grow import grow_checkpoint, plan_from_config
    from fastgrow.state import resolve_device

    op = "width" if args.op == "none" else args.op  # "none" (no depth change) is the old name of "width"
    growth = GrowthConfig(
        op=op,
        factor=args.factor,
        target_layers=args.target_layers,
        spec=args.spec,
        noise=args.noise,
        target_dim=args.target_dim,
        target_ffn_dim=args.target_ffn_dim,
        target_heads=args.target_heads,
        width_op=args.width_op,
        optimizer=args.optimizer,
        schedule=args.schedule,
        rewarm_steps=args.rewarm_steps,
    )
    model = ModelConfig(**read_meta(args.input)["model_config"])
    plan = dataclasses.replace(plan_from_config(growth, model), seed=args.seed)
    device = resolve_device(args.device, what="--device")
    out = grow_checkpoint(args.input, args.output, plan, device=device)

    rec = read_meta(out)["growth_history"][-1]
    print(
        json.dumps(
            {
                "checkpoint": str(out),
                **{k: rec[k] for k in ("op", "params_before", "params_after")},
                "layers": len(rec["sources"]),
            },
            indent=2,
        )
    )
    return 0


def add_growth_commands(sub: argparse._SubParsersAction) -> None:
    """Add `plan` and `grow` to fastgrow's subcommand parser (handlers take (args, rest))."""
    p = sub.add_parser("plan", help="growth timing (Eq. 10), base config and FLOPs for a stacking run")
    p.add_argument("--params", help="target parameters, e.g. 410M, 1.1B, 7e9 (default: the preset's)")
    p.add_argument("--tokens", required=True, help="training tokens of the whole run, e.g. 300B, 2e12")
    p.add_argument("--factor", type=int, default=4, help="growth factor g (default 4, the paper's)")
    p.add_argument("--preset", help="target architecture preset (e.g. 410M, 7B)")
    p.add_argument("--layers", type=int, help="target depth, when no preset is given")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("grow", help="grow a checkpoint into a new run directory (same grow() as in-run)")
    p.add_argument("input", help="checkpoint step directory, or a run directory (its newest checkpoint)")
    p.add_argument("output", help="run directory to write the grown step-N checkpoint into")
    p.add_argument(
        "--op",
        default="stack",
        choices=(*GROWTH_OPS, "none"),
        help="growth operator, as growth.op: a depth operator, or width (width only; none is an alias) (default stack)",
    )
    p.add_argument(
        "--factor",
        type=int,
        default=4,
        help="depth growth factor g (default 4, the paper's; partial/sources ignore it)",
    )
    p.add_argument("--target-layers", type=int, default=0, help="target depth (instead of --factor)")
    p.add_argument("--spec", default="", help="stacking spec, e.g. 1-234*7-56 or 1,2,3,1,2,3")
    p.add_argument("--noise", type=float, default=0.0, help="W <- (1-a) W + a eps on copied blocks")
    p.add_argument("--width-op", default="direct", choices=WIDTH_OPS)
    p.add_argument("--target-dim", type=int, default=0)
    p.add_argument("--target-ffn-dim", type=int, default=0)
    p.add_argument("--target-heads", type=int, default=0)
    p.add_argument("--optimizer", default="copy", choices=OPTIMIZER_POLICIES)
    p.add_argument("--schedule", default="continue", choices=SCHEDULE_POLICIES)
    p.add_argument("--rewarm-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="seed of random init / noise (default: run seed)")
    p.add_argument("--device", default="cpu", help="device to grow on: cpu, cuda, cuda:N (default cpu)")
    p.set_defaults(func=cmd_grow)
