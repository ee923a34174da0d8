"""Per-position draft acceptance after a prompt cache hit, against a cold prefill.

    PYTHONPATH=. python bench/cache_acceptance.py [--size tiny] [--conversations 4] [--max-tokens 32] > out.md

On the generated models of a hybrid (qwen35: recurrent checkpoints) and an attention-only arch
(glm4moe: KV trim), each with the oracle recipe (accept 0.5, half the misses from the fed hidden
state) and the history-dependent "context" recipe: ``--conversations`` two-turn conversations over
an Engine of 2 slots, n_draft=3, greedy. Each second turn is decoded

- cold: ``cache_prompt=False``, the whole prompt prefilled;
- hit: right after its first turn, in the slot that holds it;
- RAM restore: after every conversation's first turn (more conversations than slots), its slot
  saved to and restored from the host-memory cache (``cache_ram_mib``);
- regenerate: the same second-turn prompt once more, a full hit (nothing left to prefill).

Prints a markdown table of accepted / drafted drafts per draft position, summed over the
conversations.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import servers  # noqa: E402

import llama_mtp  # noqa: E402
from llama_mtp import testing  # noqa: E402
from llama_mtp.results import GenerationResult  # noqa: E402

ARCHS = ("qwen35", "glm4moe")
RECIPES: Dict[str, Dict[str, float]] = {"oracle": dict(accept=0.5, h_miss_fraction=0.5), "context": dict(accept=0.5)}
STARTS = ("Once upon a time", "In a hole in the ground", "Call me Ishmael", "It was the best of times",
          "All happy families", "The sky above the port", "Far out in the uncharted", "A screaming comes")
NEXT = (" jumps over", " and then", " the lazy dog", " again", " said the king", " in the end", " so", " why")
CASES = ("cold", "hit", "RAM restore", "regenerate")
Counts = Tuple[List[int], List[int], int]  # drafted and accepted per draft position, prompt tokens cached


def tokens(llm: llama_mtp.MtpTargetLlama, text: str) -> List[int]:
    return llm.tokenize(text.encode(), add_bos=False)


def add(total: Optional[Counts], r: GenerationResult) -> Counts:
    mine = (list(r.stats.drafted_per_pos), list(r.stats.accepted_per_pos), r.stats.n_cached_tokens)
    if total is None:
        return mine
    return [x + y for x, y in zip(total[0], mine[0])], [x + y for x, y in zip(total[1], mine[1])], total[2] + mine[2]


def measure(path: str, args: argparse.Namespace) -> Dict[str, Counts]:
    target, draft = llama_mtp.load(path, n_draft_max=3, n_seq=2, n_ctx=2048, n_threads=args.threads,
                                   n_threads_batch=args.threads)
    out: Dict[str, Optional[Counts]] = dict.fromkeys(CASES)
    firsts = [tokens(target, s) for s in STARTS[:args.conversations]]
    seconds: List[List[int]] = []
    try:
        with llama_mtp.Engine(target, draft, n_draft=3) as engine:
            for prompt, text in zip(firsts, NEXT):
                reply = engine.submit(prompt, max_tokens=args.max_tokens).result().tokens
                seconds.append(prompt + reply + tokens(target, text))
                out["hit"] = add(out["hit"], engine.submit(seconds[-1], max_tokens=args.max_tokens).result())
                out["regenerate"] = add(out["regenerate"], engine.submit(seconds[-1], max_tokens=args.max_tokens).result())
            for second in seconds:
                out["cold"] = add(out["cold"], engine.submit(second, max_tokens=args.max_tokens, cache_prompt=False).result())
        with llama_mtp.Engine(target, draft, n_draft=3, cache_ram_mib=64) as engine:
            for prompt in firsts:
                engine.submit(prompt, max_tokens=args.max_tokens).result()
            for second in seconds:
                out["RAM restore"] = add(out["RAM restore"], engine.submit(second, max_tokens=args.max_tokens).result())
            if engine._core.cache.stats.ram_restores != len(seconds):
                raise RuntimeError(f"expected {len(seconds)} RAM restores, got {engine._core.cache.stats}")
    finally:
        draft.close()
        target.close()
    return {k: v for k, v in out.items() if v is not None}


def cell(counts: Counts, i: int) -> str:
    d, a = counts[0][i], counts[1][i]
    return f"{a}/{d} ({a / d:.2f})" if d else "-"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", help="generated model size (llama_mtp.testing.SIZES)")
    p.add_argument("--conversations", type=int, default=4, choices=range(3, len(STARTS) + 1))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    print(f"# Draft acceptance per position after a prompt cache hit: size {args.size}\n\n"
          f"{servers.today()}, {servers.machine()}; {args.conversations} two-turn conversations, 2 slots, "
          f"n_draft=3, greedy, {args.max_tokens} tokens a reply; accepted/drafted (rate) and cached prompt tokens summed over the second turns\n\n"
          "| arch | recipe | case | cached tokens | pos 1 | pos 2 | pos 3 |\n|---|---|---|---|---|---|---|")
    for arch in ARCHS:
        for recipe, knobs in RECIPES.items():
            path = str(testing.cached_test_model(size=args.size, arch=arch, recipe=recipe, **knobs))
            for case, counts in measure(path, args).items():
                print(f"| {arch} | {recipe} | {case} | {counts[2]} | " + " | ".join(cell(counts, i) for i in range(3)) + " |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
