"""`alloy merge`, `alloy eval`, `alloy methods`, `alloy plan`, `alloy extract-lora`: on this machine,
no service needed."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_HUB_ROOT = Path(os.environ.get("ALLOY_HUB_ROOT", Path.home() / ".cache" / "alloy" / "hub"))
DEFAULT_EVAL_CACHE = Path.home() / ".cache" / "alloy" / "evaluation"


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
    m.add_argument("--eval-cache", type=Path, default=DEFAULT_EVAL_CACHE,
                   help=f"cache of base/expert evaluation results per commit (default {DEFAULT_EVAL_CACHE})")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_merge)

    ev = sub.add_parser("eval", help="score a model on evaluation sets (the same code as a job's evaluate stage)",
                        description="Score MODEL (a local folder or org/name@revision) on evaluation sets: "
                        "perplexity ({text}), exact match ({prompt, answer}) or a task head's accuracy "
                        "({text, label}) and print the table.")
    ev.add_argument("model", help="local folder or org/name@revision")
    ev.add_argument("--sets", nargs="+", required=True, metavar="NAME=PATH", help="evaluation sets (JSONL)")
    ev.add_argument("--kind", choices=("perplexity", "exact_match", "accuracy"), default=None,
                    help="kind every set must have (default: inferred from the rows)")
    ev.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    ev.add_argument("--max-length", type=int, default=512, help="token cap per row")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ev.set_defaults(func=cmd_eval)

    ls = sub.add_parser("methods", help="list merge methods with their parameters and defaults",
                        description="List the merge methods, or describe one in detail.")
    ls.add_argument("name", nargs="?", help="show only this method")
    ls.set_defaults(func=cmd_methods)

    xl = sub.add_parser(
        "extract-lora", help="write the difference MERGED - BASE as a PEFT LoRA adapter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Extract a LoRA adapter from MERGED - BASE.\n\n"
        "For every Linear, Conv1D and Embedding weight that differs, the difference D is factored by SVD and\n"
        "truncated to --rank (the best approximation of that rank), and written as a PEFT adapter\n"
        "(adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained(model, OUT)\n"
        "loads. OUT/alloy_extract.json lists each module's rank and truncation error ||D - BA||_F, and the\n"
        "changed tensors a LoRA cannot hold (norms, biases), which are left out with a warning.\n"
        "Tensors are read one at a time; bad input exits with status 2.",
        epilog="example:\n  alloy extract-lora ./merged --base meta-llama/Llama-3.2-1B --rank 32 --out ./merged-lora\n"
        "models: local folders or hub ids org/name@revision; either may be model+adapter",
    )
    xl.add_argument("model", metavar="MERGED", help="the fine-tuned or merged model")
    xl.add_argument("--base", required=True, help="the model the adapter will be applied to")
    xl.add_argument("--rank", type=int, required=True, help="LoRA rank r (a smaller module keeps its own rank)")
    xl.add_argument("--out", type=Path, default=None,
                    help="output folder, created; must be empty (default: ./<MERGED name>-lora-r<RANK>)")
    xl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    xl.set_defaults(func=cmd_extract_lora)

    ma = sub.add_parser(
        "merge-adapters", help="merge LoRA adapters of one base into one adapter (PEFT's svd, cat, ties_svd)",
        description="Combine PEFT LoRA adapters of one base model into a new adapter, as PEFT's "
        "add_weighted_adapter does, without loading the model: cat (exact, rank = sum of ranks), svd (the "
        "weighted sum of the deltas truncated to --rank) or ties_svd (TIES of the deltas with --density, then "
        "svd). The result loads with peft.PeftModel.from_pretrained.",
    )
    ma.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders or hub ids (two or more)")
    ma.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter (may be negative)")
    ma.add_argument("--method", choices=("svd", "cat", "ties_svd"), default="svd", help="combination (default svd)")
    ma.add_argument("--rank", type=int, default=None, help="svd rank (default: the largest adapter rank)")
    ma.add_argument("--density", type=float, default=None, help="ties_svd: fraction of each delta's entries kept")
    ma.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                    help="ties_svd: elect the sign from the sum (total) or the count (frequency) of the entries")
    ma.add_argument("--out", type=Path, required=True, help="output folder, created; must be empty")
    ma.set_defaults(func=cmd_merge_adapters)

    pl = sub.add_parser("plan", help="predict the peak memory of a learned merge (no weights are read)",
                        description="Print the memory plan of the learned merge in SPEC: peak device and "
                        "host memory from the base's shapes and dtypes, the number of experts, batch and "
                        "sequence length (merge_ops/learned/plan.py).")
    pl.add_argument("spec", help="YAML file: Alloy MergeSpec or mergekit config")
    pl.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="compute device")
    pl.add_argument("--mode", choices=("streamed", "in_memory"), default=None,
                    help="learning mode (default: ALLOY_LEARNED_MODE or auto: in memory if it fits, else streamed)")
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
    from merge_ops.runner import publish_result, raise_if_rejected, run_merge
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
    publisher = published = None
    if spec.publish:
        from merge_ops.publish import make_publisher
        from merge_ops.runner import published_evaluation

        # hf: endpoint and token come from HF_ENDPOINT / HF_TOKEN
        publisher = make_publisher(spec.publish.hub, root=args.hub_root, private=spec.publish.private)
        target = spec.publish
        published = lambda: published_evaluation(publisher, target.repo, target.branch)  # noqa: E731
    bars = _Bars(args.quiet)
    try:
        outcome = run_merge(spec, Path(args.out), device=args.device, channel=bars,
                            eval_cache_dir=args.eval_cache, published_evaluation=published)
    finally:
        bars.close()
    print(f"merged {spec.method} of {len(spec.experts)} expert(s) into {outcome.out_dir} "
          f"in {outcome.seconds:.1f}s")
    if outcome.evaluation is not None:
        from merge_ops.evaluation import EvalResult

        print(EvalResult.from_dict(outcome.evaluation["results"]).table())
        gates = outcome.evaluation.get("gates")
        if gates:
            print(gates["table"])
        if outcome.rejected:
            from merge_ops.runner import REJECTED_EXIT, Rejected

            try:
                raise_if_rejected(outcome)
            except Rejected as e:
                print(f"alloy: rejected: {e.message}", file=sys.stderr)
            return REJECTED_EXIT
    if publisher is not None:
        ref = publish_result(outcome, spec, publisher)
        print(f"published {ref.repo}@{ref.revision} commit {ref.commit} {ref.url or ''}".rstrip())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from merge_ops.errors import InputError
    from merge_ops.evaluation import EvaluateSpec
    from merge_ops.evaluation.evaluate import load_sets, run_evaluation
    from merge_ops.sources import resolve

    paths: dict[str, str] = {}
    for item in args.sets:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--sets {item!r}: write NAME=PATH")
        paths[name] = path
    sets_doc = {n: {"set": p, **({"kind": args.kind} if args.kind else {})} for n, p in paths.items()}
    try:
        spec = EvaluateSpec(sets=sets_doc, max_length=args.max_length, batch_size=args.batch_size, baselines=False)
    except ValueError as e:
        raise InputError(f"--sets: {e}") from None
    model = resolve(args.model)
    bars = _Bars(args.json)
    try:  # a model with a LoRA adapter is scored as base + adapter, applied in memory
        merged, _ = run_evaluation(model if model.adapter is not None else model.path, spec, load_sets(paths, spec), device=args.device,
                                   merged_commit=model.commit, channel=bars)
    finally:
        bars.close()
    print(json.dumps(merged.to_dict(), indent=2) if args.json else merged.table())
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from merge_ops.errors import InputError
    from merge_ops.lora.extract import SUMMARY, extract_lora
    from merge_ops.sources import resolve
    from merge_ops.spec import _default_name

    if args.rank < 1:
        raise InputError(f"--rank must be at least 1, got {args.rank}", param="rank")
    out = args.out or Path(f"{_default_name(args.model)}-lora-r{args.rank}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: the folder is not empty; choose a new one", param="out")
    base = resolve(args.base)
    merged = resolve(args.model)
    bars = _Bars(args.quiet)
    try:
        res = extract_lora(merged, base, args.rank, out, base_name=args.base, channel=bars)
    finally:
        bars.close()
    print(f"extracted {len(res.modules)} module(s) at rank <= {args.rank} into {out} "
          f"(largest relative truncation error {res.max_relative_error():.3g}; details in {out / SUMMARY})")
    if res.left_out:
        worst = max(res.left_out.values())
        print(f"warning: {len(res.left_out)} changed tensor(s) a LoRA cannot hold were left out (norms, biases; "
              f"largest change {worst:.3g}): listed in {SUMMARY}", file=sys.stderr)
    return 0


def cmd_merge_adapters(args: argparse.Namespace) -> int:
    from merge_ops.errors import InputError
    from merge_ops.lora.combine import merge_adapters
    from merge_ops.lora.config import is_adapter_folder
    from merge_ops.sources import resolve

    folders = []
    for ref in args.adapters:
        m = resolve(ref, adapter_alone=True)
        if m.adapter is not None or not is_adapter_folder(m.path):
            raise InputError(f"{ref!r} is not a LoRA adapter folder (adapter_config.json + adapter_model.safetensors)",
                             param="adapters")
        folders.append(m.path)
    cfg = merge_adapters(folders, args.weights, args.out, method=args.method, rank=args.rank, density=args.density,
                         sign_method=args.majority_sign)
    print(f"merged {len(folders)} adapters ({args.method}) into {args.out}: rank {cfg['r']}")
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
    budget = device_budget_mib(args.device)
    mode = args.mode or driver.learned_mode()
    p = driver.job_plan(ctx, ctx.params, "in_memory" if mode == "auto" else mode, learns)
    if mode == "auto" and plan.check_fits(p, budget) is not None:  # as the worker: stream when only that fits
        p = driver.job_plan(ctx, ctx.params, "streamed", learns)
    print(p.text())
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
        width = max((len(p.name) for p in m.params), default=0)
        dwidth = max((len(f"default {p.default!r}") for p in m.params), default=0)
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
            print(f"      {p.name:<{width}}  {default:<{dwidth}}  {scope:<20}  {p.help}"
                  + (f" ({'; '.join(extra)})" if extra else ""))
        print()
    return 0
