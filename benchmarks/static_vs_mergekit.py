"""Static merges, Alloy vs mergekit, side by side: same models, same configs, one run.

    .venv/bin/python benchmarks/static_vs_mergekit.py            # the 302M case, 3 runs each
    .venv/bin/python benchmarks/static_vs_mergekit.py --quick    # tiny models, 1 run (smoke test)

Builds a Llama base + 3 perturbed experts with tests/toy_models.py (cached in benchmarks/.cache),
writes one mergekit YAML per method, and runs it through `mergekit-yaml` (from
benchmarks/.venv-peers, never a project dependency) and through Alloy's static driver, each in a
fresh child process with 2 threads. Wall time is the child's whole life (imports included) and
peak RSS is the child's ru_maxrss from wait4. Runs alternate between the two tools so both see the
same page-cache state. Then every output tensor is compared: max |diff|, the share of elements
that differ, and the largest difference in bf16 units in the last place (ulps).

Writes benchmarks/results/static_vs_mergekit.json (--quick: benchmarks/.cache/...) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / ".venv-peers"
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"

FULL = dict(hidden=1024, layers=16, intermediate=4096, vocab=16384, heads=16, kv_heads=16)
QUICK = dict(hidden=128, layers=4, intermediate=512, vocab=1024, heads=4, kv_heads=4)
WEIGHTS = (0.5, 0.3, 0.2)
METHODS = {  # method -> (uses base, per-model params, global params)
    "task_arithmetic": (True, {}, {}),
    "ties": (True, {"density": 0.5}, {}),
    "dare_ties": (True, {"density": 0.5}, {}),
    "linear": (False, {}, {}),
    "breadcrumbs_ties": (True, {"density": 0.5, "gamma": 0.05}, {}),
    "della": (True, {"density": 0.5, "epsilon": 0.15}, {}),
    "della_linear": (True, {"density": 0.5, "epsilon": 0.15}, {}),
    "sce": (True, {}, {"select_topk": 0.5}),
    "nuslerp": (True, {}, {}),
    "multislerp": (True, {}, {}),
    "karcher": (False, {}, {}),
    "nearswap": (True, {}, {"t": 0.001}),
    "arcee_fusion": (True, {}, {}),
    "passthrough": (False, {"scale": 0.5}, {}),
    "ram": (True, {}, {}),
    "ramplus_tl": (True, {}, {}),
}
N_EXPERTS = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1}  # others: 3
NO_WEIGHT = {"sce", "karcher", "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl"}
# random masks (mergekit draws from torch's global RNG, Alloy per tensor from the spec seed): compared in
# distribution, by the share of entries left at the base and the moments of the change, not entry by entry
RANDOM = {"dare_ties", "della", "della_linear"}
THREADS = os.environ.get("ALLOY_BENCH_THREADS", "2")  # per tool; --threads sets it (children inherit)


def build_models(dims: dict, folder: Path, shard_size: int) -> tuple[Path, list[Path]]:
    sys.path.insert(0, str(ROOT))
    from tests.toy_models import make_experts, write_llama

    stamp = folder / "READY"
    base = folder / "base"
    experts = [folder / f"expert{i}" for i in range(3)]
    if not stamp.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_llama(base, **dims, seed=0, shard_size=shard_size)
        make_experts(base, 3, folder, shard_size=shard_size, scale=0.002)
        stamp.write_text(json.dumps(dims))
    return base, experts


def write_config(method: str, base: Path, experts: list[Path], path: Path) -> Path:
    import yaml

    uses_base, model_params, global_params = METHODS[method]
    doc: dict = {"merge_method": method}
    if uses_base:
        doc["base_model"] = str(base)
    chosen = experts[:N_EXPERTS.get(method, len(experts))]
    doc["models"] = [{"model": str(e), "parameters": ({} if method in NO_WEIGHT else {"weight": w})
                      | model_params} for e, w in zip(chosen, WEIGHTS, strict=False)]
    if global_params:
        doc["parameters"] = global_params
    doc |= {"dtype": "float32", "out_dtype": "bfloat16"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """Run a child to completion: (wall seconds, peak RSS in MB, CPU seconds user+system).

    Peak RSS comes from /usr/bin/time (GNU time -f %M), not from our own wait4: Linux carries the
    high-water RSS of the forking process into a forked child's ru_maxrss, so a child forked from
    this (large, after comparisons) process would report at least our own RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "ALLOY_BENCH_THREADS": THREADS,
           "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{out.decode(errors='replace')[-4000:]}")
        peak_kb = int(rss.read().split()[-1])
    return wall, peak_kb / 1024, usage.ru_utime + usage.ru_stime


def run_mergekit(config: Path, out: Path, shard_params: int) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return timed([str(PEERS / "bin" / "mergekit-yaml"), str(config), str(out), "--quiet",
                  "--out-shard-size", str(shard_params), "--random-seed", "0", "-j", THREADS])


def run_alloy(config: Path, out: Path, shard_bytes: int, device: str) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return timed([sys.executable, str(Path(__file__).resolve()), "--child", str(config), str(out),
                  str(shard_bytes), device])


def alloy_child(config: str, out: str, shard_bytes: str, device: str) -> None:
    """The Alloy side: the static driver on the mergekit YAML, as `alloy merge` would run it."""
    import torch

    torch.set_num_threads(int(THREADS))
    sys.path.insert(0, str(ROOT))
    from merge_ops.context import JobContext, ResolvedModel
    from merge_ops.spec import load_spec
    from merge_ops.static import driver

    spec = load_spec(config).model_copy(update={"shard_size": f"{shard_bytes}B"})
    base = ResolvedModel(spec.base, Path(spec.base)) if spec.base else None
    experts = [ResolvedModel(e.model, Path(e.model)) for e in spec.experts]
    driver.run(JobContext(spec=spec, base=base, experts=experts, out_dir=Path(out), device=device))


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Read every input shard once and write `out_bytes` once, with a reused 64 MB buffer."""
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for folder in inputs:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as h:
                while h.readinto(buf):
                    pass
    with open(scratch, "wb", buffering=0) as h:
        left = out_bytes
        while left:
            left -= h.write(view[: min(left, len(buf))])
    wall = time.perf_counter() - t0
    scratch.unlink()
    return wall


def _tensor(folder: Path, name: str):
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():  # noqa: SIM118
                return h.get_tensor(name)
    raise KeyError(name)


def tie_positions(base: Path, experts: list[Path], name: str, density: float):
    """Elements where TIES has to break a tie, so two correct implementations may differ:
    - trim ties: some expert's |τ| equals its k-th largest magnitude (mergekit keeps the first k of
      an argsort, whose order among equals is unspecified; Alloy keeps them in index order);
    - election ties: Σ wᵢ·τ̂ᵢ is exactly 0 in real arithmetic (e.g. 0.3·(-3u) + 0.2·(4.5u)), so the
      elected sign is whatever fp32 rounding of wᵢ·τ̂ᵢ leaves, and depends on the order of operations."""
    import torch

    b = _tensor(base, name).double().reshape(-1)
    k = max(1, int(density * b.numel()))
    mask = torch.zeros(b.numel(), dtype=torch.bool)
    total = torch.zeros_like(b)
    scale = torch.zeros_like(b)
    for e, w in zip(experts, WEIGHTS, strict=True):
        tau = _tensor(e, name).double().reshape(-1) - b  # exact: bf16 differences fit in fp64
        mag = tau.abs()
        th = torch.kthvalue(mag, mag.numel() - k + 1).values
        mask |= mag == th
        kept = torch.where(mag >= th, tau, 0.0)
        total += w * kept
        scale += (w * kept).abs()
    return mask | ((total.abs() <= 1e-12 * scale) & (scale > 0))


def band_tie_positions(base: Path, experts: list[Path], name: str, density: float, gamma: float):
    """Elements where breadcrumbs_ties has to break a tie, so two correct implementations may differ:
    - band ties: some expert's |τ| equals the magnitude at an edge of its kept band (ascending ranks
      [bot, bot + keep), mergekit's magnitude_outliers counts) and that value also lies on the other
      side of the edge. mergekit keeps the ones its unstable `torch.sort` happens to put inside
      (on the benchmark's tensors its pick agrees with index order no better than chance), Alloy
      ranks them by index;
    - election ties, as in tie_positions, over the band-masked task vectors."""
    import torch

    b = _tensor(base, name).double().reshape(-1)
    n = b.numel()
    keep = int(density * n)
    bot = max(0, n - keep - int(gamma * n))
    mask = torch.zeros(n, dtype=torch.bool)
    total = torch.zeros_like(b)
    scale = torch.zeros_like(b)
    for e, w in zip(experts, WEIGHTS, strict=True):
        tau = _tensor(e, name).double().reshape(-1) - b  # exact: bf16 differences fit in fp64
        mag = tau.abs()
        if density >= 1 or keep == 0:  # nothing trimmed / nothing kept: no edge to tie at
            kept = tau if density >= 1 else torch.zeros_like(tau)
        else:
            s = torch.sort(mag).values
            lo, hi = s[bot], s[bot + keep - 1]
            if bot > 0 and s[bot - 1] == lo:
                mask |= mag == lo
            if bot + keep < n and s[bot + keep] == hi:
                mask |= mag == hi
            kept = torch.where((mag >= lo) & (mag <= hi), tau, 0.0)
        total += w * kept
        scale += (w * kept).abs()
    return mask | ((total.abs() <= 1e-12 * scale) & (scale > 0))


def band_mask_check(base: Path, experts: list[Path], density: float, gamma: float) -> dict:
    """breadcrumbs_ties' trim masks entry by entry, every tensor and expert: mergekit 0.1.5's
    magnitude_outliers beside Alloy's Band, in benchmarks/.venv-peers (Band imports with torch alone).
    Counts the mask entries that differ, those outside band-edge ties (expected 0), and the edge-tie
    magnitudes where the two keep a different number of entries (expected 0)."""
    cmd = [str(PEERS / "bin" / "python"), str(Path(__file__).resolve()), "--band-masks-child", str(base),
           json.dumps([str(e) for e in experts]), str(density), str(gamma)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": THREADS}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def band_masks_child(base: str, experts: str, density: str, gamma: str) -> None:
    import torch
    from mergekit.sparsify import magnitude_outliers

    from merge_ops.methods.breadcrumbs import Band

    dens, gam = float(density), float(gamma)
    folders = [Path(e) for e in json.loads(experts)]
    names = sorted(json.loads((Path(base) / "model.safetensors.index.json").read_text())["weight_map"])
    c = {"mask_entries": 0, "mask_differ": 0, "mask_differ_off_ties": 0, "edge_tie_entries": 0,
         "tie_count_mismatches": 0}
    for name in names:
        b = _tensor(Path(base), name).float().reshape(-1)
        n = b.numel()
        keep = int(dens * n)
        bot = max(0, n - keep - int(gam * n))
        for folder in folders:
            d = _tensor(folder, name).float().reshape(-1) - b  # mergekit's task vector at dtype float32
            mag, nz = d.abs(), d != 0  # a zero τ adds nothing, whichever mask keeps it
            mk = magnitude_outliers(d, dens, gamma=gam) != 0  # kept nonzero entries stay nonzero
            band = Band(dens, gam, n, torch.float32, torch.device("cpu"))
            if band.needs_magnitudes:
                band.observe(0, mag)
                band.finish(lambda idx, mag=mag: mag[idx])
            al = d.clone()
            band.apply(al, 0)
            al = al != 0
            tie = torch.zeros(n, dtype=torch.bool)
            if dens < 1 and keep > 0:
                s = torch.sort(mag).values
                for v, spans_edge in ((s[bot], 0 < bot and s[bot - 1] == s[bot]),
                                      (s[bot + keep - 1], bot + keep < n and s[bot + keep] == s[bot + keep - 1])):
                    if spans_edge and v > 0:
                        at = mag == v
                        tie |= at
                        c["tie_count_mismatches"] += int(int(al[at].sum()) != int(mk[at].sum()))
            differ = (al != mk) & nz
            c["mask_entries"] += n
            c["mask_differ"] += int(differ.sum())
            c["mask_differ_off_ties"] += int((differ & ~tie).sum())
            c["edge_tie_entries"] += int(tie.sum())
    print(json.dumps(c))


def compare(a: Path, b: Path, ties: Callable[[str], Any] | None = None) -> dict:
    """Tensor-by-tensor comparison of two checkpoints (bf16 outputs). With `ties` (tensor name ->
    bool mask of the flat elements at a tie: tie_positions, band_tie_positions), also the share of
    elements differing by more than one bf16 ulp that sit at a tie, and the largest difference in
    ulps away from ties."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out |= {k: (f, k) for k in h.keys()}  # noqa: SIM118
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        raise SystemExit(f"outputs differ in tensor names: {sorted(set(ta) ^ set(tb))[:5]}")
    max_abs, max_ulps, differ, total = 0.0, 0.0, 0, 0
    beyond, beyond_at_tie, ulps_off_ties, tie_elements = 0, 0, 0.0, 0
    worst = ""
    for name in sorted(ta):
        x, y = _tensor(a, name).float(), _tensor(b, name).float()
        d = (x - y).abs()
        # one bf16 ulp at the larger magnitude, 2^(floor(log2|v|) - 7); magnitudes below 2^-20 count
        # as 2^-20, so results that cancel to ~0 (fp32 vs fp64 leftovers) are not scored in tiny ulps
        mag = torch.maximum(x.abs(), y.abs()).clamp_min(2.0**-20)
        ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, worst = m, name
        max_ulps = max(max_ulps, float((d / ulp).max()) if d.numel() else 0.0)
        differ += int((d > 0).sum())
        total += d.numel()
        if ties is not None:
            far = (d > ulp).reshape(-1)
            beyond += int(far.sum())
            if far.any():
                at_tie = ties(name)
                beyond_at_tie += int((far & at_tie).sum())
                tie_elements += int(at_tie.sum())
                off = (d / ulp).reshape(-1)[~at_tie]
                ulps_off_ties = max(ulps_off_ties, float(off.max()) if off.numel() else 0.0)
            else:
                ulps_off_ties = max(ulps_off_ties, float((d / ulp).max()) if d.numel() else 0.0)
    out = {"max_abs_diff": max_abs, "max_bf16_ulps": max_ulps, "frac_elements_differ": differ / total,
           "worst_tensor": worst}
    if ties is not None:
        out |= {"frac_elements_beyond_1ulp": beyond / total,
                "frac_of_those_at_ties": beyond_at_tie / beyond if beyond else None,
                "max_bf16_ulps_off_ties": ulps_off_ties,
                "frac_elements_at_ties_in_differing_tensors": tie_elements / total}
    return out


def change_stats(out: Path, base: Path) -> dict:
    """Distribution of a merge's change to the base: share of entries changed, mean and std of Δ."""

    changed, total, s1, s2 = 0, 0, 0.0, 0.0
    for name in sorted(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]):
        d = _tensor(out, name).double() - _tensor(base, name).double()
        changed += int((d != 0).sum())
        total += d.numel()
        s1 += float(d.sum())
        s2 += float(d.square().sum())
    mean = s1 / total
    return {"frac_changed": changed / total, "mean_delta": mean, "std_delta": (s2 / total - mean**2) ** 0.5}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {THREADS} threads, {platform.system()}"


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 run: a smoke test")
    ap.add_argument("--runs", type=int, default=None, help="runs per tool and method (default 3, quick 1)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--device", default="cpu", help="device of the Alloy side (mergekit stays on CPU)")
    ap.add_argument("--tokenizers", action="store_true",
                    help="tokenizer configs (union, a model's, tokens, padding, chat_template) instead of methods")
    ap.add_argument("--slices", nargs="?", const="", default=None, metavar="FILTER",
                    help="slices/modules configs and mergekit's examples/ on tiny models (benchmarks/slices_cases.py); "
                         "FILTER: only configs whose name holds it")
    ap.add_argument("--threads", default=THREADS, help="threads per tool (default 2; 1 on a shared machine)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--band-masks-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    THREADS = str(args.threads)
    if args.child:
        return alloy_child(*args.child)
    if args.band_masks_child:
        return band_masks_child(*args.band_masks_child)
    if not (PEERS / "bin" / "mergekit-yaml").is_file():
        raise SystemExit(f"mergekit is not installed in {PEERS}: python3.11 -m venv {PEERS} && "
                         f"{PEERS}/bin/pip install torch==2.13.0 && {PEERS}/bin/pip install mergekit")
    if args.tokenizers:
        return tokenizer_main()
    if args.slices is not None:
        return slices_main(args.slices, args.device)
    dims = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    shard = 200_000_000 if not args.quick else 200_000
    base, experts = build_models(dims, CACHE / ("llama-quick" if args.quick else "llama-302m"), shard)
    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    n_params = index["metadata"]["total_size"] // 2  # bf16: two bytes per parameter
    out_shard_bytes = 2_000_000_000

    floors = [io_floor([base, *experts], n_params * 2, work / "floor.bin") for _ in range(max(runs, 2))]
    floor = statistics.median(floors[1:])  # the first pass warms the page cache
    print(f"model: {n_params / 1e6:.0f}M parameters, bf16; I/O floor {floor:.2f} s", flush=True)

    cases = []
    for method in args.methods.split(","):
        cfg = write_config(method, base, experts, work / f"{method}.yaml")
        mk, al = [], []
        for r in range(runs):
            mk.append(run_mergekit(cfg, work / "mergekit", out_shard_bytes // 2))
            al.append(run_alloy(cfg, work / "alloy", out_shard_bytes, args.device))
            print(f"  {method} run {r + 1}: mergekit {mk[-1][0]:.2f} s {mk[-1][1]:.0f} MB "
                  f"(cpu {mk[-1][2]:.1f} s) | alloy {al[-1][0]:.2f} s {al[-1][1]:.0f} MB (cpu {al[-1][2]:.1f} s)"
                  f" | load {os.getloadavg()[0]:.1f}", flush=True)
        ties = None
        if method == "ties":
            ties = partial(tie_positions, base, experts, density=METHODS[method][1]["density"])
        elif method == "breadcrumbs_ties":
            ties = partial(band_tie_positions, base, experts, **METHODS[method][1])
        cmp = compare(work / "alloy", work / "mergekit", ties)
        if method == "breadcrumbs_ties":
            cmp |= band_mask_check(base, experts, **METHODS[method][1])
        if method in RANDOM:  # entry by entry they differ by design: compare the distributions
            sa, sm = change_stats(work / "alloy", base), change_stats(work / "mergekit", base)
            cmp |= {f"alloy_{k}": v for k, v in sa.items()} | {f"mergekit_{k}": v for k, v in sm.items()}
        mw, mr = statistics.median(x[0] for x in mk), statistics.median(x[1] for x in mk)
        aw, ar = statistics.median(x[0] for x in al), statistics.median(x[1] for x in al)
        mc, ac = statistics.median(x[2] for x in mk), statistics.median(x[2] for x in al)
        cases.append({"method": method, "alloy_wall_s": round(aw, 3), "mergekit_wall_s": round(mw, 3),
                      "wall_ratio": round(aw / mw, 3), "alloy_peak_rss_mb": round(ar), "mergekit_peak_rss_mb":
                      round(mr), "rss_ratio": round(ar / mr, 3), "max_abs_diff": cmp["max_abs_diff"],
                      "max_bf16_ulps": round(cmp["max_bf16_ulps"], 3),
                      **{k: v for k, v in cmp.items() if k != "max_abs_diff"},
                      "alloy_cpu_s": round(ac, 2), "mergekit_cpu_s": round(mc, 2), "cpu_ratio": round(ac / mc, 3),
                      "io_floor_s": round(floor, 3), "alloy_over_io_floor": round(aw / floor, 2), "runs": runs,
                      "load_avg_1min": round(os.getloadavg()[0], 1)})
        print(json.dumps(cases[-1]), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    result = {"cases": cases, "io_floor_s": round(floor, 3), "machine": machine(), "device": args.device,
              "model": {**dims, "parameters": n_params, "dtype": "bfloat16", "experts": 3,
                        "input_shard_bytes": shard},
              "command": "python benchmarks/static_vs_mergekit.py" + (" --quick" if args.quick else "")}
    # a --quick smoke run is not a result: it goes to the cache, not to benchmarks/results
    dest = CACHE / "static_vs_mergekit_quick.json" if args.quick else RESULTS / "static_vs_mergekit.json"
    if dest.is_file() and set(args.methods.split(",")) != set(METHODS):
        # a subset run replaces those methods' rows and keeps the others; each row keeps the I/O floor
        # measured in its own run
        old = json.loads(dest.read_text())
        done = {c["method"] for c in cases}
        cases[:0] = [c for c in old["cases"] if c["method"] not in done]
        cases.sort(key=lambda c: list(METHODS).index(c["method"]))
        result |= {"cases": cases, "io_floor_s": old["io_floor_s"]}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| method | Alloy s | mergekit s | wall ratio | CPU-time ratio | Alloy RSS MB | mergekit RSS MB | "
          "RSS ratio | max abs diff | elements differing | Alloy / I/O floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        print(f"| {c['method']} | {c['alloy_wall_s']:.2f} | {c['mergekit_wall_s']:.2f} | {c['wall_ratio']:.2f} | "
              f"{c['cpu_ratio']:.2f} | {c['alloy_peak_rss_mb']} | {c['mergekit_peak_rss_mb']} | {c['rss_ratio']:.2f} | "
              f"{c['max_abs_diff']:.3g} | {c['frac_elements_differ']:.2%} | {c['alloy_over_io_floor']:.1f}x |")
    print(f"\nI/O floor: {floor:.2f} s. Results: {dest}")


def tokenizer_main() -> None:
    """Tokenizer configs through both tools (benchmarks/tokenizer_cases.py): max |diff| by token."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.tokenizer_cases import run_cases

    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    cases = run_cases(work, run_mergekit, run_alloy, "cpu")
    dest = RESULTS / "tokenizer_vs_mergekit.json"
    dest.write_text(json.dumps({"cases": cases, "machine": machine(),
                                "command": "python benchmarks/static_vs_mergekit.py --tokenizers"}, indent=2) + "\n")
    print("\n| config | max abs diff | same vocabulary | same ids | vocab_size (Alloy, mergekit) | same chat template |")
    print("|---|---|---|---|---|---|")
    for c in cases:
        print(f"| {c['config']} | {c['max_abs_diff']:.3g} | {c['same_vocabulary']} | {c['same_ids']} | "
              f"{c['vocab_size']} | {c['same_chat_template']} |")
    print(f"\nResults: {dest}")


def slices_main(only: str, device: str) -> None:
    """Slices, modules and mergekit's examples/ through both tools: max |diff| per config."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.slices_cases import run_cases

    work = CACHE / "runs-slices"  # its own folder: other modes' outputs never mix with these
    work.mkdir(parents=True, exist_ok=True)
    cases = run_cases(work, run_mergekit, run_alloy, device, only or None)
    dest = RESULTS / "slices_vs_mergekit.json"
    if only and dest.is_file():  # a filtered run replaces its rows and keeps the others
        done = {c["config"] for c in cases}
        cases = [c for c in json.loads(dest.read_text())["cases"] if c["config"] not in done] + cases
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"cases": cases, "machine": machine(),
                                "command": "python benchmarks/static_vs_mergekit.py --slices"}, indent=2) + "\n")
    print("\n| config | runs (Alloy, mergekit) | max abs diff | layers (Alloy, mergekit) | output dtype |")
    print("|---|---|---|---|---|")
    for c in cases:
        ran = f"{'no' if 'alloy_error' in c else 'yes'}, {'no' if 'mergekit_error' in c else 'yes'}"
        diff = f"{c['max_abs_diff']:.3g}" if "max_abs_diff" in c else "-"
        dt = ",".join(sorted({a for a, _ in c.get("dtypes", [])})) or "-"
        print(f"| {c['config']} | {ran} | {diff} | {c.get('layers', '-')} | {dt} |")
    print(f"\nResults: {dest}")


if __name__ == "__main__":
    main()
