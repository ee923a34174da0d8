"""Per-architecture acceptance and speed on the generated models.

    python bench/archs.py [--accept 0.8] [--bench-archs glm4moe] [--repeats 3] [--max-tokens 128]

For every registered arch of ``llama_mtp.testing`` (its tiny oracle model at ``--accept``, iid
misses): fixed-k ``generate()`` (k = 3, or one token per head for chained heads) and ``auto``,
with the measured per-position acceptance against the configured rate, and tokens/s against
plain llama-cpp-python on the same file (tiny models are overhead-bound: their speed shows the
loop's cost, not MTP's gain). Then the same on the bench size of ``--bench-archs``, where a
decode's weights dominate. Runs interleave; best of ``--repeats``.

Writes bench/results/<date>-<machine>-archs.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from run import plain_run  # noqa: E402

import llama_mtp  # noqa: E402
from llama_mtp import testing  # noqa: E402
from llama_mtp.generation import tokenize_prompt  # noqa: E402
from llama_mtp.loading import PlainLlama  # noqa: E402
from llama_mtp.session import draft_mode_of  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog."
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def bench_arch(arch: str, size: str, args: argparse.Namespace) -> Dict[str, Any]:
    spec = dict(size=size, arch=arch, recipe="oracle", accept=args.accept, accept_pattern="random",
                ftype="f32" if size == "tiny" else "f16")
    t0 = time.perf_counter()
    path = str(testing.cached_test_model(**spec))
    build_s = time.perf_counter() - t0
    kw = dict(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    target, draft = llama_mtp.load(path, n_draft_max=4, **kw)
    plain = PlainLlama(path, **kw)
    mode = draft_mode_of(target, draft)
    k = min(3, mode.n_heads) if mode.mode == "chain_heads" else 3
    prompt = tokenize_prompt(target, PROMPT)
    runs: Dict[str, List[float]] = {"plain": [], f"k={k}": [], "auto": []}
    stats: Dict[str, Any] = {}
    try:
        for _ in range(args.repeats):
            runs["plain"].append(plain_run(plain, prompt, args.max_tokens))
            for name, nd in ((f"k={k}", k), ("auto", "auto")):
                res = llama_mtp.generate(target, draft, prompt, max_tokens=args.max_tokens, n_draft=nd)
                runs[name].append(res.stats.n_generated / res.stats.generation_seconds)
                stats[name] = res.stats
    finally:
        plain.close()
        draft.close()
        target.close()
    best = {name: max(xs) for name, xs in runs.items()}
    fixed = stats[f"k={k}"]
    return {
        "arch": arch, "size": size, "file_mb": round(os.path.getsize(path) / 2**20, 1), "build_s": round(build_s, 1),
        "drafter": mode.mode, "k": k, "configured_accept": args.accept,
        "per_pos_acceptance": [round(a, 3) for a in fixed.per_pos_acceptance],
        "tok_s": {name: round(v, 1) for name, v in best.items()},
        "speedup": {name: round(v / best["plain"], 2) for name, v in best.items() if name != "plain"},
        "auto_draft_len_hist": list(stats["auto"].draft_len_hist),
    }


def markdown(rows: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# Per-arch acceptance and speed (oracle accept {args.accept}, iid misses, {args.max_tokens} tokens, "
             f"{args.threads} threads, best of {args.repeats})", "",
             "| arch | size | drafter | k | per-position acceptance at k | plain tok/s | k speedup | auto speedup | auto k=0..4 steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = f"k={r['k']}"
        lines.append(f"| {r['arch']} | {r['size']} ({r['file_mb']} MB) | {r['drafter']} | {r['k']} | "
                     f"{', '.join(f'{a:.2f}' for a in r['per_pos_acceptance'])} | {r['tok_s']['plain']} | "
                     f"{r['speedup'][k]:.2f}x | {r['speedup']['auto']:.2f}x | {'/'.join(map(str, r['auto_draft_len_hist']))} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--accept", type=float, default=0.8)
    p.add_argument("--archs", default=",".join(a for a in sorted(testing.ARCHS) if testing.ARCHS[a].has_mtp_heads))
    p.add_argument("--bench-archs", default="glm4moe", help="archs also run at the bench size ('' for none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = [bench_arch(a, "tiny", args) for a in args.archs.split(",") if a]
    for a in args.bench_archs.split(","):
        if a:
            rows.append(bench_arch(a, "bench", args))
    for r in rows:
        print(json.dumps(r), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{datetime.date.today().isoformat()}-{platform.machine()}-{os.cpu_count()}cpu-archs"
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
