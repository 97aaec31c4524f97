"""EleutherAI's lm-evaluation-harness as an optional evaluator (`pip install 'alloy-merge[eval]'`).

Each evaluation set becomes a local lm-eval task (a YAML file over a JSONL file, loaded with
`datasets`' packaged `json` builder, so nothing is downloaded) and lm-eval's `hf` model loads the
folder with `use_safetensors=True`, no remote code. It runs in a child process with the Hub and
`datasets` offline and its caches in a temporary folder: lm-eval's imports, logging and global
seeds stay out of the worker, and a cancel kills it.

    perplexity sets   output_type loglikelihood_rolling: bits_per_byte, byte_perplexity and
                      word_perplexity over each whole text (every token predicted, the first from
                      BOS), aggregated over the set as lm-eval does (per byte / per word)
    exact_match sets  output_type generate_until, greedy, `until: ["\\n"]`, max_gen_toks = the
                      longest answer's tokens + answer_margin, whitespace stripped on both sides;
                      the folder's generation_config.json is hidden from lm-eval (as from Alloy's
                      evaluator), so a repetition penalty or sampling in it cannot change the result
Tokenisation is lm-eval's own: with a tokenizer that adds BOS itself, a rolling loglikelihood scores
that BOS too, after lm-eval's prefix token, so its numbers are lm-eval's, not Alloy's token NLL.
Accuracy sets (task heads) and `input_ids` rows have no lm-eval form and are refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merge_ops.errors import AlloyError, InputError
from merge_ops.evaluation.cache import ResultCache, lookup
from merge_ops.evaluation.declarations import KIND_METRICS, EvalSetError, EvalSettings
from merge_ops.evaluation.evaluate import report_progress
from merge_ops.evaluation.results import EvalResult, SetResult
from merge_ops.evaluation.rows import EvalSet

if TYPE_CHECKING:
    from merge_ops.context import Channel

_DRIVER = r"""
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
a = json.load(open(sys.argv[1]))
tm = TaskManager(include_path=a["include_path"], include_defaults=False)
r = simple_evaluate(model="hf", model_args=a["model_args"], tasks=a["tasks"], task_manager=tm,
                    batch_size=a["batch_size"], device=a["device"], log_samples=False, bootstrap_iters=0,
                    random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
json.dump({"results": r["results"], "lm_eval_version": r.get("lm_eval_version")}, open(a["out"], "w"),
          default=str)
"""


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def task_yaml(task: str, data: Path, kind: str, max_gen_toks: int) -> str:
    """An lm-eval task config over a local JSONL file (JSON is valid YAML: no quoting surprises)."""
    doc: dict[str, Any] = {"task": task, "dataset_path": "json",
                           "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    if kind == "perplexity":
        doc |= {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m, "higher_is_better": False} for m in KIND_METRICS["lm_eval"][kind]]}
    else:
        doc |= {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_gen_toks},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "regexes_to_ignore": [r"^\s+", r"\s+$"]}]}
    return json.dumps(doc, indent=1) + "\n"


def evaluate_with_lm_eval(model_dir: str | Path, sets: Mapping[str, EvalSet], *, device: str = "cpu",
                          batch_size: int = 8, max_length: int = 512, answer_margin: int = 4,
                          dtype: str = "float32", model: str | None = None, cache: ResultCache | None = None,
                          channel: Channel | None = None, heads: Mapping[str, Any] | None = None, task_specific: Sequence[str] = (),
                          timeout: float | None = None) -> EvalResult:
    """Same contract as evaluate.evaluate_model (heads and task_specific are not used: lm-eval has
    no task heads)."""
    if getattr(model_dir, "adapter", None) is not None:
        raise InputError(f"evaluate.evaluator lm_eval scores a model folder, and {model_dir.ref!r} has a LoRA adapter: "
                         "use the built-in evaluator, or set evaluate.baselines: false", param="evaluate.evaluator")
    if not available():
        raise InputError("evaluate.evaluator lm_eval needs EleutherAI's lm-eval: pip install "
                         "'alloy-merge[eval]'", param="evaluate.evaluator")
    settings = EvalSettings(max_length=max_length, answer_margin=answer_margin, dtype=dtype, evaluator="lm_eval")
    for name, s in sets.items():
        if s.kind not in KIND_METRICS["lm_eval"]:
            raise EvalSetError(f"set {name!r}: lm-eval cannot score {s.kind} sets (task heads); use the alloy "
                               "evaluator", param=name)
        bad = next((r for r in s.rows if r.input_ids is not None), None)
        if bad is not None:
            raise EvalSetError(f"set {name!r} line {bad.line}: lm-eval reads text, not input_ids", param=name)
    out, keys = lookup(cache, model, {n: s.sha256 for n, s in sets.items()}, settings, {})
    todo = {n: s for n, s in sets.items() if n not in out}
    if todo:
        report_progress(channel, 0, len(todo))
        got = _run(Path(model_dir), todo, device=device, batch_size=batch_size, max_length=max_length,
                   answer_margin=answer_margin, dtype=dtype, channel=channel, timeout=timeout)
        for n, r in got.items():
            out[n] = r
            if n in keys and cache is not None:
                cache.put(keys[n], r)
        report_progress(channel, len(todo), len(todo))
    return EvalResult({n: out[n] for n in sets}, model, {**settings.key(), "batch_size": batch_size},
                      evaluator="lm_eval")


def _max_gen_toks(model_dir: Path, s: EvalSet, answer_margin: int) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    return max(len(tok(r.answer, add_special_tokens=False)["input_ids"]) for r in s.rows) + answer_margin


def _run(model_dir: Path, sets: Mapping[str, EvalSet], *, device: str, batch_size: int, max_length: int,
         answer_margin: int, dtype: str, channel: Channel | None, timeout: float | None
         ) -> dict[str, SetResult]:
    from merge_ops.sources import check_weights

    check_weights(model_dir, str(model_dir))
    with tempfile.TemporaryDirectory(prefix="alloy-lm-eval-") as tmp:
        root = Path(tmp)
        (root / "tasks").mkdir()
        tasks = {}
        for i, (name, s) in enumerate(sets.items()):
            task = f"alloy_eval_{i}"
            data = root / f"{task}.jsonl"
            with data.open("w", encoding="utf-8") as f:
                for r in s.rows:
                    row = {"text": r.text} if s.kind == "perplexity" else {"prompt": r.prompt, "answer": r.answer}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            gen = _max_gen_toks(model_dir, s, answer_margin) if s.kind == "exact_match" else 0
            (root / "tasks" / f"{task}.yaml").write_text(task_yaml(task, data, s.kind, gen))
            tasks[task] = name
        # the folder without its generation_config.json: transformers fills unset generation fields
        # from it (a repetition penalty, sampling), which must not change a greedy exact match
        view = root / "model"
        view.mkdir()
        for f in model_dir.resolve().iterdir():
            if f.is_file() and f.name != "generation_config.json":
                (view / f.name).symlink_to(f)
        args = {"include_path": str(root / "tasks"), "tasks": list(tasks), "batch_size": batch_size,
                "device": device, "out": str(root / "results.json"),
                "model_args": {"pretrained": str(view), "dtype": dtype, "max_length": max_length,
                               "use_safetensors": True, "trust_remote_code": False}}
        (root / "args.json").write_text(json.dumps(args))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HOME": str(root / "hf"), "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
               "TOKENIZERS_PARALLELISM": "false"}
        with (root / "log.txt").open("w+") as log:
            proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(root / "args.json")], env=env, cwd=root,
                                    stdout=log, stderr=subprocess.STDOUT)
            start = time.monotonic()
            try:
                while proc.poll() is None:
                    report_progress(channel, 0, len(sets))
                    if timeout is not None and time.monotonic() - start > timeout:
                        raise AlloyError(f"lm-eval did not finish within {timeout:g}s")
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            log.seek(0)
            tail = log.read()[-3000:]
        if proc.returncode != 0 or not (root / "results.json").is_file():
            raise AlloyError(f"lm-eval failed (exit {proc.returncode}):\n{tail}")
        res = json.loads((root / "results.json").read_text())["results"]
    out = {}
    for task, name in tasks.items():
        s = sets[name]
        r = res.get(task, {})
        metrics = {m: float(r[f"{m},none"]) for m in KIND_METRICS["lm_eval"][s.kind] if f"{m},none" in r}
        out[name] = SetResult(s.kind, metrics, len(s), None, s.sha256)
    return out
