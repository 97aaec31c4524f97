"""`alloy merge` and `alloy methods`: merging on this machine, no service needed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_HUB_ROOT = Path(os.environ.get("ALLOY_HUB_ROOT", Path.home() / ".cache" / "alloy" / "hub"))


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "merge",
        help="merge models described by a spec file (ours or mergekit's YAML)",
        description="Merge the experts in SPEC (an Alloy spec or a mergekit config) into --out. "
        "Inputs are local folders or hub ids org/name@revision (HF_ENDPOINT and HF_TOKEN are honoured). "
        "With --publish the result becomes a new revision of REPO on the hub.",
    )
    m.add_argument("spec", help="YAML file: Alloy MergeSpec or mergekit config")
    m.add_argument("--out", required=True, help="output folder (created; must be empty)")
    m.add_argument("--publish", metavar="REPO", help="publish to this repo (org/name) after merging")
    m.add_argument("--hub", choices=("local", "hf"), default=None,
                   help="where --publish goes: local folder hub (default) or a Hugging Face Hub server")
    m.add_argument("--hub-root", type=Path, default=DEFAULT_HUB_ROOT,
                   help=f"local hub folder (default {DEFAULT_HUB_ROOT}, env ALLOY_HUB_ROOT)")
    m.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    m.add_argument("--shard-size", help="output shard size, e.g. 500MB or 2GB (overrides the spec)")
    m.add_argument("--dtype", help="compute dtype (overrides the spec): float32, bfloat16, float16")
    m.add_argument("--out-dtype", help="output dtype (overrides the spec)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)

    ls = sub.add_parser("methods", help="list merge methods with their parameters and defaults",
                        description="List the merge methods, or describe one in detail.")
    ls.add_argument("name", nargs="?", help="show only this method")
    ls.set_defaults(func=cmd_methods)

    pl = sub.add_parser("plan", help="predict the peak memory of a learned merge (no weights are read)",
                        description="Print the memory plan of the learned merge in SPEC: peak device and "
                        "host memory from the base's shapes and dtypes, the number of experts, batch and "
                        "sequence length (merge_ops/learned/plan.py).")
    pl.add_argument("spec", help="YAML file: Alloy MergeSpec or mergekit config")
    pl.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    pl.add_argument("--mode", choices=("streamed", "in_memory"), default=None,
                    help="learning mode (default: ALLOY_LEARNED_MODE or streamed)")
    pl.set_defaults(func=cmd_plan)


class _Bars:
    """The CLI's progress channel: one tqdm bar per stage; learned stages show the loss. Ctrl-C is
    the CLI's cancel, so `cancel_requested` is never true."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.stage: str | None = None

    def cancel_requested(self) -> bool:
        return False

    def progress(self, stage: str, step: int, total: int | None, loss: float | None = None) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None or (total is not None and self.bar.total != total):
            self.close()
            unit = {"learn": "step", "merge": "tensor", "resolve": "model"}.get(stage, "it")
            self.bar = tqdm(total=total, desc=f"{stage:>7}", unit=unit, file=sys.stderr, leave=True,
                            dynamic_ncols=True)
            self.stage = stage
        self.bar.n = step
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_merge(args: argparse.Namespace) -> int:
    from merge_ops.runner import publish_result, run_merge
    from merge_ops.spec import load_spec

    spec = load_spec(args.spec)
    overrides = {k: v for k, v in (("shard_size", args.shard_size), ("dtype", args.dtype),
                                   ("out_dtype", args.out_dtype)) if v}
    if args.publish:
        overrides["publish"] = {**(spec.publish.model_dump() if spec.publish else {}), "repo": args.publish}
        if args.hub:
            overrides["publish"]["hub"] = args.hub
    if overrides:
        from merge_ops.spec import spec_from_dict

        spec = spec_from_dict({**spec.model_dump(exclude_none=True), **overrides})
    bars = _Bars(args.quiet)
    try:
        outcome = run_merge(spec, Path(args.out), device=args.device, channel=bars)
    finally:
        bars.close()
    print(f"merged {spec.method} of {len(spec.experts)} expert(s) into {outcome.out_dir} "
          f"in {outcome.seconds:.1f}s")
    if spec.publish:
        from merge_ops.publish import make_publisher

        # hf: endpoint and token come from HF_ENDPOINT / HF_TOKEN
        publisher = make_publisher(spec.publish.hub, root=args.hub_root, private=spec.publish.private)
        ref = publish_result(outcome, spec, publisher)
        print(f"published {ref.repo}@{ref.revision} commit {ref.commit} {ref.url or ''}".rstrip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from merge_ops.errors import SpecError
    from merge_ops.runner import ResolveOptions, resolve_inputs
    from merge_ops.spec import load_spec

    spec = load_spec(args.spec)
    if spec.method_def().kind != "learned":
        raise SpecError(f"{spec.method} is not a learned method: static merges stream one tensor at a time")
    from merge_ops.context import JobContext
    from merge_ops.learned import driver, plan
    from merge_ops.memory import device_budget_mib
    from merge_ops.methods import implementation

    base, experts = resolve_inputs(spec, ResolveOptions())  # local folders as given; hub: headers + config
    ctx = JobContext(spec=spec, base=base, experts=experts, out_dir=Path("."), device=args.device)
    module = implementation(spec.method_def())
    learns = module.learns(ctx.params) if hasattr(module, "learns") else None
    p = driver.job_plan(ctx, ctx.params, args.mode or driver.learned_mode(), learns)
    print(p.text())
    budget = device_budget_mib(args.device)
    why = plan.check_fits(p, budget)
    print(f"  device budget        {'unknown' if budget is None else round(budget, 1)}"
          f"{' MiB' if budget is not None else ''}: {'does not fit: ' + why if why else 'fits'}")
    return 0 if why is None else 2


def cmd_methods(args: argparse.Namespace) -> int:
    from merge_ops.methods import METHODS, get_method

    methods = [get_method(args.name)] if args.name else sorted(METHODS.values(), key=lambda m: (m.kind, m.name))
    for m in methods:
        base = "needs a base" if m.needs_base else "base optional"
        n = f"{m.min_experts}+" if m.max_experts is None else (
            str(m.min_experts) if m.min_experts == m.max_experts else f"{m.min_experts}-{m.max_experts}")
        print(f"{m.name}  [{m.kind}; {base}; experts: {n}"
              f"{'; needs calibration' if m.needs_calibration else ''}]")
        print(f"    {m.summary}")
        print(f"    paper: {m.paper}")
        print(f"    math: {m.module.replace('.', '/')}.py")
        for p in m.params:
            scope = "per expert or global" if p.scope == "model" else "global"
            extra = []
            if p.gradient:
                extra.append("per-layer list ok")
            if p.choices:
                extra.append("one of " + "|".join(map(str, p.choices)))
            if (r := p.range_text()) is not None:
                extra.append(f"range {r}")
            default = "required" if p.required else f"default {p.default!r}"
            print(f"      {p.name:<14} {default:<18} {scope:<21} {p.help}"
                  + (f" ({'; '.join(extra)})" if extra else ""))
        print()
    return 0
