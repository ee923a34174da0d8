"""Benchmark: plain llama-cpp-python greedy vs llama_mtp.generate() on generated oracle models.

    python bench/run.py [--size fast|bench] [--ftype f16] [--accepts 1.0,0.8,0.6,0.3,0.0]
                        [--n-drafts 1,2,3,4] [--repeats 5] [--max-tokens 128] [--threads 2]

Runs are interleaved (plain, k=1, k=2, ... per repeat) in one process; best and
median are reported and ratios use the best of each, since interference on a
shared machine only slows runs down. Results: bench/results/<date>-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

import llama_cpp

import llama_mtp
from llama_mtp import testing
from llama_mtp.generation import tokenize_prompt

PROMPT = "Speculative decoding drafts tokens with a cheap head and verifies them in one batch. " * 2
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plain_run(plain: llama_cpp.Llama, prompt: List[int], n: int) -> float:
    """Tokens/s of plain greedy generation (prompt excluded)."""
    plain.reset()
    plain._ctx.kv_cache_clear()
    plain.eval(prompt[:-1])
    t0 = time.perf_counter()
    got = 0
    for _ in plain.generate(prompt[-1:], temp=0.0, reset=False):
        got += 1
        if got == n:
            break
    return got / (time.perf_counter() - t0)


def theory(a: float, k: int, cost_ratio: float) -> float:
    """Speedup bound: expected tokens per step over the step's cost in plain steps."""
    tokens = k + 1 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / cost_ratio


def bench_model(args: argparse.Namespace, accept: float) -> Dict[str, Any]:
    path = str(testing.cached_test_model(size=args.size, recipe="oracle", accept=accept, ftype=args.ftype))
    kw = dict(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    rss0 = rss_mb()
    target, draft = llama_mtp.load(path, n_draft_max=max(args.n_drafts), **kw)
    rss_pair = rss_mb() - rss0
    plain = llama_cpp.Llama(path, **kw)
    prompt = tokenize_prompt(plain, PROMPT)
    runs: Dict[str, List[float]] = {"plain": []}
    stats: Dict[str, Any] = {}
    try:
        for _ in range(args.repeats):
            runs["plain"].append(plain_run(plain, prompt, args.max_tokens))
            for k in args.n_drafts:
                res = llama_mtp.generate(target, draft, prompt, max_tokens=args.max_tokens, n_draft=k)
                runs.setdefault(f"k{k}", []).append(res.stats.tokens_per_second)
                best = stats.get(f"k{k}")
                if best is None or res.stats.tokens_per_second > best["tokens_per_second"]:
                    stats[f"k{k}"] = res.stats.as_dict()
    finally:
        plain.close()
        draft.close()
        target.close()
    plain_best = max(runs["plain"])
    out: Dict[str, Any] = {"accept": accept, "model": os.path.basename(path), "rss_target_plus_draft_mb": round(rss_pair, 1),
                           "plain": {"best": plain_best, "median": statistics.median(runs["plain"])}}
    for k in args.n_drafts:
        st = stats[f"k{k}"]
        a = st["per_pos_acceptance"][0] if st["per_pos_acceptance"] else 0.0
        steps = max(1, st["steps"])
        step_cost = (st["t_decode"] + st["t_draft"] + st["t_process"]) / steps
        bound = theory(a, k, step_cost * plain_best)
        best = max(runs[f"k{k}"])
        out[f"k{k}"] = {
            "best": best, "median": statistics.median(runs[f"k{k}"]), "speedup": best / plain_best,
            "theory": bound, "of_theory": (best / plain_best) / bound if bound else None,
            "acceptance": st["acceptance_rate"], "tokens_per_step": st["mean_accepted_length"],
            "python_share": st["t_python"] / st["generation_seconds"] if st["generation_seconds"] else None,
            "split_s": {key: st[key] for key in ("t_decode", "t_draft", "t_process", "t_sample", "t_python")},
        }
        print(f"accept={accept} k={k}: {best:.1f} tok/s vs plain {plain_best:.1f} = {best / plain_best:.2f}x "
              f"(theory {bound:.2f}x, acceptance {st['acceptance_rate']:.2f}, "
              f"python {out[f'k{k}']['python_share']:.1%})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="fast")
    p.add_argument("--ftype", default="f16")
    p.add_argument("--accepts", default="1.0,0.8,0.6,0.3,0.0")
    p.add_argument("--n-drafts", default="1,2,3,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    args.n_drafts = [int(x) for x in args.n_drafts.split(",")]
    accepts = [float(x) for x in args.accepts.split(",")]

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import llama_mtp"], check=True)
    import_s = time.perf_counter() - t0
    build_json = llama_mtp._loader.build_module().build(quiet=True) / "build.json"
    build = json.loads(build_json.read_text()) if build_json.is_file() else {}

    rows = [bench_model(args, a) for a in accepts]
    machine = f"{platform.machine()}-{os.cpu_count()}cpu"
    date = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"date": date, "machine": machine, "args": vars(args), "import_llama_mtp_s_subprocess": import_s,
              "shim_build_s": build.get("seconds"), "shim_bytes": build.get("lib_bytes"),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    stem = RESULTS / f"{date}-{machine}-{args.size}-{args.ftype}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# {args.size} {args.ftype}, {args.max_tokens} tokens, {args.threads} threads, best of {args.repeats}",
             "", "| accept | plain tok/s | " + " | ".join(f"k={k} tok/s (x plain, x theory)" for k in args.n_drafts) + " |",
             "|---|---|" + "---|" * len(args.n_drafts)]
    for r in rows:
        cells = [f"{r[f'k{k}']['best']:.1f} ({r[f'k{k}']['speedup']:.2f}x, {r[f'k{k}']['of_theory']:.2f})" for k in args.n_drafts]
        lines.append(f"| {r['accept']} | {r['plain']['best']:.1f} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
