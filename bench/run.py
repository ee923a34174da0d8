"""Benchmark: plain llama-cpp-python vs llama_mtp.generate() vs the native upstream loop.

    python bench/run.py [--size bench|fast] [--ftype f16|q8_0] [--accepts 1.0,0.8,0.6,0.3,0.0]
                        [--n-drafts 1,2,3,4] [--repeats 5] [--max-tokens 128] [--threads 2] [--no-native]

For each oracle model (known acceptance) the contenders run interleaved in one
process: plain greedy ``llama_cpp.Llama``, ``generate()`` with each fixed
n_draft and with ``n_draft="auto"``, and ``llama-speculative-simple`` built from
the same llama.cpp sources (bench/native.py). Best and median are recorded;
ratios use the best of each (interference on a shared machine only slows runs
down). Also: the theoretical bound for the measured acceptance and costs, the
time split, RSS of the draft context vs the target alone, import and shim build
time, and match vs rejection verification at temperature 0.7 and 1.0.

Writes bench/results/<date>-<machine>-<size>-<ftype>.{json,md,png}.
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import native  # noqa: E402

import llama_mtp  # noqa: E402
from llama_mtp import _compat  # noqa: E402  (the one seam onto llama-cpp-python internals)
from llama_mtp import testing  # noqa: E402
from llama_mtp.generation import tokenize_prompt  # noqa: E402
from llama_mtp.loading import MtpDraftLlama, MtpTargetLlama, PlainLlama  # noqa: E402

PROMPT = "Speculative decoding drafts tokens with a cheap head and verifies them in one batch. " * 2
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plain_run(plain: llama_cpp.Llama, prompt: List[int], n: int) -> float:
    """Tokens/s of plain greedy generation, timed like generate(): after all but the last prompt token."""
    plain.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(_compat.native_context(plain)), True)
    plain.eval(prompt[:-1])
    t0 = time.perf_counter()
    got = 0
    for _ in plain.generate(prompt[-1:], temp=0.0, reset=False):
        got += 1
        if got == n:
            break
    return got / (time.perf_counter() - t0)


def theory(a: float, k: int, cost_ratio: float) -> float:
    """Speedup bound: expected tokens per step (1-a^(k+1))/(1-a) over the step's cost in plain steps."""
    tokens = k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / cost_ratio


def best_and_median(xs: List[float]) -> Dict[str, float]:
    return {"best": max(xs), "median": statistics.median(xs), "runs": xs}


def model_path(args: argparse.Namespace, accept: float) -> str:
    """The oracle model for one acceptance (generated and cached on first use)."""
    return str(testing.cached_test_model(size=args.size, recipe="oracle", accept=accept, ftype=args.ftype,
                                         accept_pattern=args.pattern))


def bench_model(args: argparse.Namespace, accept: float) -> Dict[str, Any]:
    path = str(model_path(args, accept))
    kw = dict(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    if args.ftype in ("q8_0", "q4_k_m"):
        # ggml's AMX kernels (q8_0, and the q8_0/q4 tensors of a Q4_K_M file) crash this CPU on
        # multi-token batches (SIGILL; plain llama-cpp-python too): plain and MTP both go without
        kw["use_extra_bufts"] = False
    rss0 = rss_mb()
    target = MtpTargetLlama(path, n_draft_max=max(args.n_drafts), **kw)
    rss1 = rss_mb()
    draft = MtpDraftLlama(target, **{k: v for k, v in kw.items() if k != "n_ctx"})
    rss2 = rss_mb()
    draft_state_mb = llama_cpp.llama_state_get_size(_compat.native_context(draft)) / 2**20
    plain = PlainLlama(path, **kw)
    prompt = tokenize_prompt(plain, PROMPT)
    contenders = ["plain", *[f"k{k}" for k in args.n_drafts], "auto"]
    if not args.no_native:
        contenders += [f"native_k{k}" for k in args.n_drafts]
    runs: Dict[str, List[float]] = {c: [] for c in contenders}
    best_stats: Dict[str, Any] = {}
    native_acc: Dict[str, float] = {}
    try:
        for _ in range(args.repeats):
            for c in contenders:
                if c == "plain":
                    runs[c].append(plain_run(plain, prompt, args.max_tokens))
                elif c.startswith("native_"):
                    r = native.run(path, PROMPT, int(c[len("native_k"):]), args.max_tokens, args.threads,
                                   no_repack=args.ftype in ("q8_0", "q4_k_m"))
                    if r is not None:
                        runs[c].append(r["tokens_per_second"])
                        native_acc[c] = r["acceptance"]
                else:
                    n_draft: Any = "auto" if c == "auto" else int(c[1:])
                    res = llama_mtp.generate(target, draft, prompt, max_tokens=args.max_tokens, n_draft=n_draft,
                                              drafter="auto" if c == "auto" else "upstream")
                    tps = res.stats.tokens_per_second
                    runs[c].append(tps)
                    if c not in best_stats or tps > best_stats[c]["tokens_per_second"]:
                        best_stats[c] = res.stats.as_dict()
        temps = sampling_rows(target, draft, prompt, args) if accept == args.sampling_accept else None
    finally:
        plain.close()
        draft.close()
        target.close()

    plain_best = max(runs["plain"])
    out: Dict[str, Any] = {
        "accept": accept, "model": os.path.basename(path),
        "rss_target_mb": round(rss1 - rss0, 1), "rss_draft_delta_mb": round(rss2 - rss1, 1),
        "draft_state_mb": round(draft_state_mb, 1), "plain": best_and_median(runs["plain"]),
    }
    for c in contenders[1:]:
        if not runs[c]:
            out[c] = None
            continue
        row: Dict[str, Any] = best_and_median(runs[c])
        row["speedup"] = row["best"] / plain_best
        if c in best_stats:
            st = best_stats[c]
            row.update(acceptance=st["acceptance_rate"], tokens_per_step=st["tokens_per_step"],
                       draft_len_hist=st["draft_len_hist"],
                       python_share=st["t_python"] / st["generation_seconds"],
                       split_s={key: st[key] for key in ("t_decode", "t_draft", "t_process", "t_sample", "t_python")})
            if c != "auto":
                k = int(c[1:])
                a = st["per_pos_acceptance"][0] if st["per_pos_acceptance"] else 0.0
                step_cost = (st["t_decode"] + st["t_draft"] + st["t_process"] + st["t_sample"]) / max(1, st["steps"])
                row["theory"] = theory(a, k, step_cost * plain_best)
                row["of_theory"] = row["speedup"] / row["theory"]
        if c.startswith("native_"):
            row["acceptance"] = native_acc.get(c)
        out[c] = row
    for k in args.n_drafts:
        mine, nat = out.get(f"k{k}"), out.get(f"native_k{k}")
        if mine and nat:
            mine["of_native"] = mine["best"] / nat["best"]
    fixed = [out[f"k{k}"]["best"] for k in args.n_drafts if out.get(f"k{k}")]
    out["auto"]["of_best_fixed"] = out["auto"]["best"] / max(fixed + [plain_best])
    if temps:
        out["sampling"] = temps
    summary = ", ".join(f"{c} {out[c]['speedup']:.2f}x" for c in contenders[1:] if out.get(c))
    print(f"accept={accept}: plain {plain_best:.1f} tok/s; {summary}", flush=True)
    return out


def sampling_rows(target: Any, draft: Any, prompt: List[int], args: argparse.Namespace) -> Dict[str, Any]:
    """Match vs rejection verification at temperature > 0 (same seeds for both)."""
    rows: Dict[str, Any] = {}
    for temp in (0.7, 1.0):
        for verify in ("match", "rejection"):
            acc, tps, tok_step = [], [], []
            for seed in range(args.sampling_seeds):
                res = llama_mtp.generate(target, draft, prompt, max_tokens=args.max_tokens // 2, n_draft=3,
                                         temperature=temp, seed=seed, verify=verify)
                acc.append(res.stats.acceptance_rate)
                tps.append(res.stats.tokens_per_second)
                tok_step.append(res.stats.tokens_per_step)
            rows[f"T{temp}-{verify}"] = {"acceptance": statistics.mean(acc), "tokens_per_step": statistics.mean(tok_step),
                                         "tokens_per_second_best": max(tps)}
    return rows


def plot(rows: List[Dict[str, Any]], n_drafts: List[int], path: pathlib.Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r["accept"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(n_drafts):
        color = f"C{i}"
        ax.plot(xs, [r[f"k{k}"]["speedup"] for r in rows], "o-", color=color, label=f"generate() k={k}")
        if rows[0].get(f"native_k{k}"):
            ax.plot(xs, [r[f"native_k{k}"]["speedup"] if r.get(f"native_k{k}") else float("nan") for r in rows],
                    "x:", color=color, label=f"native k={k}")
        ax.plot(xs, [r[f"k{k}"].get("theory", float("nan")) for r in rows], "--", color=color, alpha=0.4,
                label=f"bound k={k}")
    ax.plot(xs, [r["auto"]["speedup"] for r in rows], "s-", color="black", label="generate() auto")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("MTP acceptance (oracle model)")
    ax.set_ylabel("tokens/s relative to plain llama-cpp-python")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def rss_only(args: argparse.Namespace, accept: float) -> None:
    path = str(model_path(args, accept))
    kw = dict(n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    rss0 = rss_mb()
    target = MtpTargetLlama(path, n_draft_max=max(args.n_drafts), **kw)
    rss1 = rss_mb()
    draft = MtpDraftLlama(target, **{k: v for k, v in kw.items() if k != "n_ctx"})
    rss2 = rss_mb()
    res = llama_mtp.generate(target, draft, PROMPT, max_tokens=16, n_draft=3)
    rss3 = rss_mb()
    out = {"model": os.path.basename(path), "rss_target_mb": round(rss1 - rss0, 1),
           "rss_draft_delta_mb": round(rss2 - rss1, 1), "rss_after_generate_delta_mb": round(rss3 - rss1, 1),
           "draft_state_mb_after_generate": round(llama_cpp.llama_state_get_size(_compat.native_context(draft)) / 2**20, 2),
           "generated": len(res.tokens)}
    draft.close()
    target.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{datetime.date.today().isoformat()}-{platform.machine()}-{os.cpu_count()}cpu-{args.size}-{args.ftype}-rss"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="bench")
    p.add_argument("--ftype", default="f16")
    p.add_argument("--accepts", default="1.0,0.8,0.6,0.3,0.0")
    p.add_argument("--pattern", default="random", choices=["random", "spread"],
                   help="where the MTP head is wrong: iid per token (random, as the bound assumes) or evenly spread")
    p.add_argument("--n-drafts", default="1,2,3,4")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--sampling-accept", type=float, default=0.8, help="model used for the temperature rows")
    p.add_argument("--sampling-seeds", type=int, default=5)
    p.add_argument("--rss-only", action="store_true", help="only measure the draft context's RSS cost")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    args = p.parse_args()
    args.n_drafts = [int(x) for x in args.n_drafts.split(",")]
    accepts = [float(x) for x in args.accepts.split(",")]
    if args.rss_only:
        rss_only(args, accepts[0])
        return

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import llama_mtp"], check=True)
    import_s = time.perf_counter() - t0
    out_dir = llama_mtp._loader.build_module().build(quiet=True)
    build = json.loads((out_dir / "build.json").read_text()) if (out_dir / "build.json").is_file() else {}
    if not args.no_native:
        native.binary()

    rows = [bench_model(args, a) for a in accepts]
    machine = f"{platform.machine()}-{os.cpu_count()}cpu"
    date = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    # a tag may hold dots ("a0.3"): no with_suffix on this stem
    stem = RESULTS / f"{date}-{machine}-{args.size}-{args.ftype}{'-' + args.tag.replace('.', '') if args.tag else ''}"
    result = {"date": date, "machine": machine, "args": vars(args), "import_llama_mtp_subprocess_s": round(import_s, 3),
              "shim_build_s": build.get("seconds"), "shim_bytes": build.get("lib_bytes"),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    title = f"{args.size} {args.ftype}, {args.threads} threads, best of {args.repeats}"
    has_plot = plot(rows, args.n_drafts, stem.with_suffix(".png"), title)
    md = [f"# {title}, {args.max_tokens} tokens", "",
          "tok/s (speedup vs plain; generate() / native; generate() / bound)", ""]
    head = ["accept", "plain"] + [f"k={k}" for k in args.n_drafts] + ["auto (/best fixed)"]
    if not args.no_native:
        head += [f"native k={k}" for k in args.n_drafts]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["accept"]), f"{r['plain']['best']:.1f}"]
        for k in args.n_drafts:
            c = r[f"k{k}"]
            extra = f", {c['of_native']:.2f} nat" if c.get("of_native") else ""
            cells.append(f"{c['best']:.1f} ({c['speedup']:.2f}x{extra}, {c.get('of_theory', float('nan')):.2f} bound)")
        cells.append(f"{r['auto']['best']:.1f} ({r['auto']['speedup']:.2f}x, {r['auto']['of_best_fixed']:.2f})")
        if not args.no_native:
            cells += [f"{r[f'native_k{k}']['best']:.1f} ({r[f'native_k{k}']['speedup']:.2f}x)" if r.get(f"native_k{k}") else "n/a"
                      for k in args.n_drafts]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", f"RSS: target {rows[0]['rss_target_mb']} MB; draft context adds {rows[0]['rss_draft_delta_mb']} MB "
           f"(its state: {rows[0]['draft_state_mb']} MB). Peak RSS {result['peak_rss_mb']:.0f} MB. "
           f"`import llama_mtp` (fresh interpreter, incl. startup): {import_s:.2f} s. Shim build: {build.get('seconds')} s."]
    samp = next((r["sampling"] for r in rows if r.get("sampling")), None)
    if samp:
        md += ["", f"Temperature sampling, accept={args.sampling_accept} model, n_draft=3, {args.sampling_seeds} seeds:", "",
               "| setting | acceptance | tokens/step | best tok/s |", "|---|---|---|---|"]
        md += [f"| {k} | {v['acceptance']:.3f} | {v['tokens_per_step']:.2f} | {v['tokens_per_second_best']:.1f} |"
               for k, v in samp.items()]
    if has_plot:
        md += ["", f"![speedup vs acceptance]({stem.with_suffix('.png').name})"]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
