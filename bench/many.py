"""Benchmark: generate_many() with 1, 2 and 4 sequences vs the same prompts one after another.

    python bench/many.py [--sizes bench,fast] [--accepts 1.0,0.8] [--n-drafts 3,auto]
                         [--sequences 1,2,4] [--repeats 3] [--max-tokens 128] [--threads 2]

For each oracle model (known acceptance), one process loads the target with
``n_seq = max(--sequences)`` and runs, interleaved per repeat: the N prompts
one after another with ``generate()``, and the same N prompts in one
``generate_many()``; greedy, 2 threads for both. Aggregate tokens/s is all
generated tokens over the wall time from the first prompt to the last token
(prefill included on both sides). Best and median of the repeats are kept;
ratios use the best (interference on a shared machine only slows runs down).
Also recorded: each sequence's acceptance, draft-length histogram and the step
time split. ``--prefill`` also measures where a joining sequence's prompt goes
(shared with the verify decode vs decoded between steps) with long prompts
arriving while others generate.

Writes bench/results/<date>-<machine>-many.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

import llama_mtp
from llama_mtp import testing
from llama_mtp.loading import MtpDraftLlama, MtpTargetLlama

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# distinct last tokens: an oracle model's continuation depends only on where its prompt ends
PROMPTS = [
    "Speculative decoding drafts tokens with a cheap head and verifies them in one batch",
    "Continuous batching lets many requests share every decode of the target model, quickly",
    "A memory-bound decode reads all weights once, whatever the number of rows: why",
    "Multi-token prediction heads are trained next to the model and ship in its file; so",
]


def best_and_median(xs: List[float]) -> Dict[str, Any]:
    return {"best": max(xs), "median": statistics.median(xs), "runs": [round(x, 2) for x in xs]}


def sequential(target: Any, draft: Any, prompts: List[str], n_draft: Any, max_tokens: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    res = [llama_mtp.generate(target, draft, p, max_tokens=max_tokens, n_draft=n_draft) for p in prompts]
    wall = time.perf_counter() - t0
    return {"tps": sum(len(r.tokens) for r in res) / wall, "results": res}


def batched(target: Any, draft: Any, prompts: List[str], n_draft: Any, max_tokens: int,
            prefill: str = "shared") -> Dict[str, Any]:
    t0 = time.perf_counter()
    res = llama_mtp.generate_many(target, draft, prompts, max_tokens=max_tokens, n_draft=n_draft, prefill=prefill)
    wall = time.perf_counter() - t0
    return {"tps": sum(len(r.tokens) for r in res) / wall, "results": res, "wall_s": wall}


def seq_rows(results: List[Any]) -> List[Dict[str, Any]]:
    rows = []
    for r in results:
        st = r.stats
        rows.append({"acceptance": round(st.acceptance_rate, 3), "tokens_per_step": round(st.tokens_per_step, 2),
                     "draft_len_hist": st.draft_len_hist,
                     "split_s": {k: round(getattr(st, k), 3) for k in ("t_decode", "t_draft", "t_process", "t_sample")},
                     "generation_s": round(st.generation_seconds, 3)})
    return rows


def open_pair(args: argparse.Namespace, size: str, accept: float) -> Any:
    """(path, target, draft) on the oracle model, with a slot of 512 tokens per sequence."""
    path = str(testing.cached_test_model(size=size, recipe="oracle", accept=accept, ftype="f16",
                                         accept_pattern="random"))
    n_seq = max(args.sequences)
    kw = dict(n_ctx=n_seq * 512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    target = MtpTargetLlama(path, n_draft_max=3, n_seq=n_seq, **kw)
    return path, target, MtpDraftLlama(target, **{k: v for k, v in kw.items() if k != "n_ctx"})


def bench_model(args: argparse.Namespace, size: str, accept: float) -> Dict[str, Any]:
    path, target, draft = open_pair(args, size, accept)
    cells: Dict[str, Dict[str, List[float]]] = {}
    detail: Dict[str, Any] = {}
    try:
        llama_mtp.generate(target, draft, PROMPTS[0], max_tokens=16, n_draft=3)  # warm-up
        for _ in range(args.repeats):
            for n_draft in args.n_drafts:
                for n in args.sequences:
                    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
                    key = f"{n_draft}/{n}"
                    c = cells.setdefault(key, {"sequential": [], "many": []})
                    s = sequential(target, draft, prompts, n_draft, args.max_tokens) if args.sequential else None
                    m = batched(target, draft, prompts, n_draft, args.max_tokens)
                    c["sequential"].append(s["tps"] if s else float("nan"))
                    c["many"].append(m["tps"])
                    if m["tps"] >= max(c["many"]):
                        detail[key] = {"many": seq_rows(m["results"]), "sequential": seq_rows(s["results"]) if s else None}
        prefill = prefill_rows(target, draft, args) if args.prefill and size == args.sizes[0] else None
    finally:
        draft.close()
        target.close()
    rows: Dict[str, Any] = {}
    for key, c in cells.items():
        seq_b, many_b = best_and_median(c["sequential"]), best_and_median(c["many"])
        rows[key] = {"sequential": seq_b, "many": many_b, "ratio": many_b["best"] / seq_b["best"],
                     "ratio_median": many_b["median"] / seq_b["median"], "detail": detail.get(key)}
        print(f"{size} accept={accept} n_draft={key.split('/')[0]} x{key.split('/')[1]}: sequential "
              f"{seq_b['best']:.1f} tok/s, generate_many {many_b['best']:.1f} tok/s ({rows[key]['ratio']:.2f}x)",
              flush=True)
    return {"size": size, "accept": accept, "model": os.path.basename(path), "cells": rows, "prefill": prefill}


def prefill_rows(target: Any, draft: Any, args: argparse.Namespace) -> Dict[str, Any]:
    """Long prompts joining running sequences: prompt chunks in the verify decode, or between steps."""
    long_prompts = [" ".join(PROMPTS[i % 4:] + PROMPTS[:i % 4]) for i in range(2 * max(args.sequences))]
    out: Dict[str, List[float]] = {"shared": [], "separate": []}
    n_prompt = len(target.tokenize(long_prompts[0].encode(), add_bos=True))
    for _ in range(args.repeats):
        for placement in out:
            m = batched(target, draft, long_prompts, 3, args.max_tokens // 2, prefill=placement)
            out[placement].append(m["wall_s"])
    row = {p: {"best_wall_s": min(v), "median_wall_s": statistics.median(v)} for p, v in out.items()}
    row["n_prompts"], row["prompt_tokens"], row["max_tokens"] = len(long_prompts), n_prompt, args.max_tokens // 2
    print(f"prefill placement: shared {row['shared']['best_wall_s']:.2f} s, separate "
          f"{row['separate']['best_wall_s']:.2f} s", flush=True)
    return row


def prefill_only(args: argparse.Namespace, size: str, accept: float) -> None:
    _, target, draft = open_pair(args, size, accept)
    try:
        llama_mtp.generate(target, draft, PROMPTS[0], max_tokens=16, n_draft=3)  # warm-up
        row = prefill_rows(target, draft, args)
    finally:
        draft.close()
        target.close()
    stem = RESULTS / f"{datetime.date.today().isoformat()}-{platform.machine()}-{os.cpu_count()}cpu-many-prefill-{size}"
    stem.with_suffix(".json").write_text(json.dumps({"size": size, "accept": accept, "args": vars(args),
                                                      "prefill": row}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="bench,fast")
    p.add_argument("--accepts", default="1.0,0.8")
    p.add_argument("--n-drafts", default="3,auto")
    p.add_argument("--sequences", default="1,2,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-prefill", dest="prefill", action="store_false")
    p.add_argument("--prefill-only", action="store_true", help="only the prefill placement rows (first size)")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="only generate_many (for auto vs fixed n_draft at each batch size)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    args.sizes = args.sizes.split(",")
    args.n_drafts = [x if x == "auto" else int(x) for x in args.n_drafts.split(",")]
    args.sequences = [int(x) for x in args.sequences.split(",")]
    accepts = [float(x) for x in args.accepts.split(",")]
    if args.prefill_only:
        prefill_only(args, args.sizes[0], accepts[0])
        return
    rows = [bench_model(args, size, a) for size in args.sizes for a in accepts]
    machine = f"{platform.machine()}-{os.cpu_count()}cpu"
    date = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{date}-{machine}-many{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "machine": machine, "args": vars(args),
                                                      "rows": rows}, indent=1))
    md = [f"# generate_many vs sequential generate(), {args.max_tokens} greedy tokens per prompt, "
          f"{args.threads} threads, best of {args.repeats}", "",
          "Aggregate tok/s: sequential generate() / generate_many (ratio best; ratio of medians)", "",
          "| model | accept | n_draft | " + " | ".join(f"{n} seq" for n in args.sequences) + " |",
          "|---|---|---|" + "---|" * len(args.sequences)]
    for r in rows:
        for n_draft in args.n_drafts:
            cells = []
            for n in args.sequences:
                c = r["cells"][f"{n_draft}/{n}"]
                cells.append(f"{c['sequential']['best']:.1f} / {c['many']['best']:.1f} "
                             f"(**{c['ratio']:.2f}x**; {c['ratio_median']:.2f}x)")
            md.append(f"| {r['size']} | {r['accept']} | {n_draft} | " + " | ".join(cells) + " |")
    if "auto" in args.n_drafts and len(args.n_drafts) > 1:
        md += ["", "generate_many, auto against every fixed n_draft (aggregate tok/s, best): auto / the best fixed", "",
               "| model | accept | sequences | " + " | ".join(f"n_draft {k}" for k in args.n_drafts) + " | auto / best |",
               "|---|---|---|" + "---|" * (len(args.n_drafts) + 1)]
        for r in rows:
            for n in args.sequences:
                tps = {k: r["cells"][f"{k}/{n}"]["many"]["best"] for k in args.n_drafts}
                best = max(v for k, v in tps.items() if k != "auto")
                md.append(f"| {r['size']} | {r['accept']} | {n} | " + " | ".join(f"{tps[k]:.1f}" for k in args.n_drafts)
                          + f" | **{tps['auto'] / best:.2f}** |")
    md += ["", "Per sequence at the largest batch (generate_many, best run): acceptance, tokens/step, draft lengths", ""]
    for r in rows:
        for n_draft in args.n_drafts:
            d = r["cells"][f"{n_draft}/{max(args.sequences)}"]["detail"]
            if d:
                seqs = "; ".join(f"{x['acceptance']:.2f} / {x['tokens_per_step']:.2f} / {x['draft_len_hist']}"
                                 for x in d["many"])
                split = d["many"][0]["split_s"]
                md.append(f"- {r['size']} accept {r['accept']} n_draft {n_draft}: {seqs}; step split of seq 0 "
                          f"(shared by the batch): " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))
    pre = next((r["prefill"] for r in rows if r.get("prefill")), None)
    if pre:
        md += ["", f"Prefill placement ({pre['n_prompts']} prompts of {pre['prompt_tokens']} tokens through "
               f"{max(args.sequences)} slots, {pre['max_tokens']} tokens each, n_draft 3): shared with the verify "
               f"decode {pre['shared']['best_wall_s']:.2f} s (median {pre['shared']['median_wall_s']:.2f}), "
               f"between steps {pre['separate']['best_wall_s']:.2f} s (median {pre['separate']['median_wall_s']:.2f})."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
