"""The `fastgrow plan` and `fastgrow grow` subcommands (wired into fastgrow.cli by `add_growth_commands`),
and offline growth of a checkpoint on disk (`grow_checkpoint`, what `fastgrow grow` runs).

fastgrow plan --params 7B --tokens 300B [--factor 4] [--preset 7B] [--layers 32] [--json]
fastgrow plan --preset 410M --tokens 100B --stages 2 [--grow depth|width|alternate]   # Staged Training
fastgrow grow IN_CKPT OUT_RUN_DIR --op stack --factor 4 [--optimizer copy|reset] [--schedule ...]
fastgrow grow IN_CKPT OUT_RUN_DIR --op learn --factor 4 --data DIR [--learn-steps 100] [--learn-lr 1e-2]

`--op` takes the names of the `growth.op` config key (`width`: width growth only; `none` is an alias),
and `--factor` defaults to the paper's 4 for the operators that read it, as in a run's [growth]. Nothing
here imports torch until a command runs (`fastgrow --help` and `fastgrow plan` stay fast).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from fastgrow.config import DEFAULT_FACTOR, GROWTH_OPS, OPTIMIZER_POLICIES, SCHEDULE_POLICIES, WIDTH_OPS

if TYPE_CHECKING:
    import torch

    from fastgrow.grow import GrowPlan


def grow_checkpoint(
    in_path: str | Path,
    out_path: str | Path,
    plan: GrowPlan,
    device: str | torch.device = "cpu",
    keep: int = 2,
) -> Path:
    """Grow a checkpoint on disk: load_checkpoint -> grow() (the same function a run uses) -> save.

    in_path: a step directory or a run directory (its newest complete checkpoint); out_path: the run
    directory to write `step-N` into. The output carries the input's RNG state, data cursor, step and
    schedule, so `fastgrow train --resume` on it continues exactly as a run that grew at that step
    would (the growth counts as the next stage of the run's growth list). The caller's global RNG state
    is left as it was. Returns the written step directory.
    """
    from fastgrow.checkpoint import load_checkpoint
    from fastgrow.grow import grow

    src, out = checked_paths(in_path, out_path)
    with caller_rng_kept():
        # restore_rng: the process RNG becomes the checkpoint's, so save_checkpoint writes it back out.
        state = load_checkpoint(src, device, restore_rng=True)
        grown = grow(state, plan, consume=True)  # the loaded state is dropped
        grown.growth_history[-1].update(val_loss_before=None, val_loss_after=None)  # no data offline
        return save_grown(grown, src, out, keep)


def checked_paths(in_path: str | Path, out_path: str | Path) -> tuple[Path, Path]:
    """(the input checkpoint's step directory, the output run directory) of an offline growth, or
    ValueError when the output is the input's run directory or already holds checkpoints."""
    from fastgrow.checkpoint import latest_checkpoint, resolve_checkpoint

    src = resolve_checkpoint(in_path)
    out = Path(out_path)
    if out.resolve() == src.parent.resolve():
        # save_checkpoint would replace the source's own step-N directory.
        raise ValueError(f"the grown checkpoint must go to another run directory than its input's ({src.parent})")
    existing = latest_checkpoint(out)
    if existing is not None:
        # Its newer/equal steps would outrank the grown checkpoint on --resume (or prune it away).
        raise ValueError(f"{out} already holds checkpoints ({existing.name}); grow into a new run directory")
    return src, out


@contextlib.contextmanager
def caller_rng_kept():
    """Restore the caller's global CPU (and CUDA) RNG states on exit: an offline growth loads a
    checkpoint's RNG state into the process so that the grown checkpoint carries it."""
    import torch

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def save_grown(grown, src: Path, out: Path, keep: int) -> Path:
    """Save an offline-grown state into run directory `out`, with the source checkpoint's tokenizer."""
    from fastgrow.checkpoint import save_checkpoint
    from fastgrow.runlock import RunLock

    tok = src / "tokenizer.json"
    with RunLock(out):
        return save_checkpoint(grown, out, keep=max(2, keep), tokenizer=tok if tok.is_file() else None)


def cmd_plan(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from fastgrow.plan import plan_growth

    if args.params is None and args.preset is None:
        raise ValueError("fastgrow plan needs --params N or --preset NAME")
    if args.stages:
        return _cmd_plan_stages(args)
    plan = plan_growth(args.params, args.tokens, factor=args.factor, preset=args.preset, layers=args.layers)
    d = plan.to_dict()
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    rows = [
        ("target params N", f"{plan.params:,}"),
        ("target layout", plan.layout),
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
        note = "outside the paper's fitted compute range: treat d with suspicion"
        if plan.growth_tokens_raw > plan.growth_tokens:
            note += f" (Eq. 10 gives {plan.growth_tokens_raw:.3g} tokens; clamped to half the budget, as the trainer)"
        rows.append(("note", note))
    _print_rows(rows)
    return 0


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _cmd_plan_stages(args: argparse.Namespace) -> int:
    """Staged Training's multi-stage schedule, printed as the [[growth]] tables of a run config."""
    from fastgrow.config import parse_count
    from fastgrow.plan import plan_growth
    from fastgrow.plan_stages import ScalingLaw, growth_toml, plan_stages

    if args.factor != 4:
        raise ValueError("--factor is the one-stage plan's; a staged plan grows x2 per stage (--stages, --grow)")
    one = plan_growth(args.params, args.tokens, factor=1, preset=args.preset, layers=args.layers)
    if one.base_model is None:
        raise ValueError(f"--stages needs the target's architecture: {one.layout}")
    from fastgrow.config import ModelConfig

    target = ModelConfig(**one.base_model)  # factor 1: the target itself
    law = ScalingLaw(n_c=args.law_n_c, alpha_n=args.law_alpha_n, d_c=args.law_d_c, alpha_d=args.law_alpha_d)
    plan = plan_stages(
        target,
        parse_count(args.tokens),
        stages=args.stages,
        grow=args.grow,
        tokens_per_step=parse_count(args.tokens_per_step),
        rewarm_steps=args.rewarm_steps,
        law=law,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, sort_keys=True, default=str))
        return 0
    law_text = f"L(N, D) = ({law.n_c:.3g} / N)^{law.alpha_n:g} + ({law.d_c:.3g} / D)^{law.alpha_d:g}"
    rows = [
        ("target", f"{one.layout}; {target.num_params(include_embeddings=False):,} non-embedding params"),
        ("token budget D", f"{plan.budget_tokens:,} ({plan.tokens_per_step:,} tokens per step)"),
        ("scaling law", law_text + " (N non-embedding params, D tokens; fitted elsewhere: a shape, not a promise)"),
    ]
    for i, st in enumerate(plan.stages):
        what = f"{st.model.n_layers} layers x dim {st.model.dim}, {st.params:,} params"
        span = f"tokens {st.tokens_start:,} .. {st.tokens_start + st.tokens:,}"
        loss = (
            f"loss {st.loss_start:.3f} -> {st.loss_end:.3f}"
            if st.loss_start is not None
            else f"loss -> {st.loss_end:.3f}"
        )
        rows.append((f"phase {i}", f"{what}; {span}; predicted {loss}"))
    if plan.dropped:
        rows.append(
            ("note", f"the budget ends before the last {plan.dropped} growth(s): the run does not reach the target")
        )
    else:
        saved = 1.0 - plan.flops / plan.scratch_flops
        rows.append(
            (
                "FLOPs (6ND)",
                f"{plan.flops:.3e} staged vs {plan.scratch_flops:.3e} for the target from scratch to the "
                f"same predicted loss ({saved:+.1%} saved)",
            )
        )
    _print_rows(rows)
    print()
    print(growth_toml(plan), end="")
    return 0


LEARN_KEYS = ("learn_steps", "learn_tokens", "val_loss_before", "val_loss_learn_start", "val_loss_after")


def cmd_grow(args: argparse.Namespace, rest: list[str] | None = None) -> int:
    from fastgrow.grow import GrowPlan
    from fastgrow.grow_plan import depth_and_factor
    from fastgrow.state import resolve_device

    learn = args.op == "learn"
    if not learn and (args.data is not None or args.learn_steps is not None or args.learn_lr is not None):
        raise ValueError("--data, --learn-steps and --learn-lr apply to --op learn only")
    # As a run's [growth]: the paper's g unless the depth comes from elsewhere; G_learn starts from G_stack.
    depth, factor = depth_and_factor(args.op, args.factor, args.target_layers, args.spec)
    device = resolve_device(args.device, what="--device")
    plan = GrowPlan(
        depth=depth,
        factor=factor,
        target_layers=args.target_layers,
        spec=args.spec,
        noise=args.noise,
        width=args.width_op,
        target_dim=args.target_dim,
        target_ffn_dim=args.target_ffn_dim,
        target_heads=args.target_heads,
        optimizer=args.optimizer,
        schedule=args.schedule,
        rewarm_steps=args.rewarm_steps,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        horizon_steps=args.horizon_steps,
        jump_to_step=args.jump_to_step,
        seed=args.seed,
    )
    if learn:
        from fastgrow.grow_learn import DEFAULT_LEARN_LR, DEFAULT_LEARN_STEPS
        from fastgrow.grow_learn_run import learn_checkpoint

        steps = DEFAULT_LEARN_STEPS if args.learn_steps is None else args.learn_steps
        lr = DEFAULT_LEARN_LR if args.learn_lr is None else args.learn_lr
        out = learn_checkpoint(args.input, args.output, plan, args.data, steps=steps, lr=lr, device=device)
    else:
        out = grow_checkpoint(args.input, args.output, plan, device=device)
    from fastgrow.checkpoint import read_meta

    rec = read_meta(out)["growth_history"][-1]
    print(
        json.dumps(
            {
                "checkpoint": str(out),
                **{k: rec[k] for k in ("op", "params_before", "params_after")},
                "layers": len(rec["sources"]),
                **{k: rec[k] for k in LEARN_KEYS if learn},
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
    g = p.add_argument_group("Staged Training (several stages, each x2; prints [[growth]] tables)")
    g.add_argument("--stages", type=int, default=0, help="number of growths (0: the one-stage Eq. 10 plan)")
    g.add_argument("--grow", default="depth", choices=("depth", "width", "alternate"), help="what each stage doubles")
    g.add_argument("--tokens-per-step", default="524288", help="tokens per optimizer step (for jump_to_step)")
    g.add_argument("--rewarm-steps", type=int, default=200, help="linear re-warm after each jump (default 200)")
    g.add_argument("--law-n-c", type=float, default=8.8e13, help="scaling law N_c (default Kaplan's 8.8e13)")
    g.add_argument("--law-alpha-n", type=float, default=0.076, help="scaling law alpha_N (default 0.076)")
    g.add_argument("--law-d-c", type=float, default=4.7e9, help="scaling law D_c in tokens (default 4.7e9)")
    g.add_argument("--law-alpha-d", type=float, default=0.76, help="scaling law alpha_D (default 0.76)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("grow", help="grow a checkpoint into a new run directory (same grow() as in-run)")
    p.add_argument("input", help="checkpoint step directory, or a run directory (its newest checkpoint)")
    p.add_argument("output", help="run directory to write the grown step-N checkpoint into")
    p.add_argument(
        "--op",
        default="stack",
        choices=(*GROWTH_OPS, "none"),
        help="growth operator, as growth.op: a depth operator, width (width only) or learn (G_learn; needs "
        "--data) (default stack)",
    )
    p.add_argument(
        "--factor",
        type=int,
        default=None,
        help=f"depth growth factor g (default {DEFAULT_FACTOR}, the paper's, for stack/interpolate/zero/random "
        "without --target-layers or --spec)",
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
    p.add_argument("--rewarm-steps", type=int, default=0, help="schedule rewarm / jump: linear re-warm steps")
    p.add_argument("--lr", type=float, default=None, help="schedule restart / jump: the grown phase's peak LR")
    p.add_argument("--min-lr", type=float, default=None, help="schedule restart / jump: its final LR")
    p.add_argument("--warmup-steps", type=int, default=None, help="schedule restart: its warmup steps")
    p.add_argument("--horizon-steps", type=int, default=None, help="schedule restart: steps to decay over")
    p.add_argument("--jump-to-step", type=int, default=None, help="schedule jump: step of the target's schedule")
    p.add_argument("--seed", type=int, default=None, help="seed of random init / noise (default: run seed)")
    p.add_argument("--data", default=None, help="op learn: the run's prepared data directory to learn on")
    p.add_argument("--learn-steps", type=int, default=None, help="op learn: the operator's training steps (100)")
    p.add_argument("--learn-lr", type=float, default=None, help="op learn: the operator's Adam LR (1e-2)")
    p.add_argument("--device", default="cpu", help="device to grow on: cpu, cuda, cuda:N (default cpu)")
    p.set_defaults(func=cmd_grow)
