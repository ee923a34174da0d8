"""Command line: ``python -m llama_mtp`` / ``llama-mtp``.

  generate [-m MODEL] [--draft-model DRAFTER] -p PROMPT [--n-draft N] [--max-tokens N] [--temp T] [--seed S] [--compare]
      Streams MTP-accelerated text, then prints stats. Without -m, runs on a
      generated demo model (cached) that recites a fixed English text: the
      default prompt is its first sentence (other prompts continue with arbitrary
      tokens, unless they end in a newline). --draft-model: an external MTP drafter GGUF
      for a model without MTP heads (a gemma4-assistant for a gemma4 -m).
      --compare also runs plain llama-cpp-python decoding and prints the speedup
      and whether the outputs match.
  build [--force]
      (Re)builds the native shim for the installed llama-cpp-python.
  serve ARGS
      The OpenAI-compatible server: runs ``python -m llama_mtp.server ARGS``
      (llama_cpp.server's flags plus --n_parallel/--n_draft/...; serve --help).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

WARMUP_TOKENS = 16  # --compare: untimed tokens each side generates first


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-mtp", description="MTP speculative decoding for llama-cpp-python")
    p.add_argument("--verbose", action="store_true", help="show tracebacks and llama.cpp logs")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with MTP speculative decoding")
    g.add_argument("-m", "--model", help="GGUF model with MTP heads (default: a generated demo model)")
    g.add_argument("--draft-model", help="external MTP drafter GGUF for a -m without MTP heads (a gemma4-assistant "
                   "for its gemma4 target); its context shares the model's KV")
    g.add_argument("-p", "--prompt", default=None, help="default: the demo model's opening words")
    g.add_argument("--n-draft", default="auto", help="tokens drafted per step, or 'auto' (default)")
    g.add_argument("--n-draft-max", type=int, default=3, help="upper bound for --n-draft auto")
    g.add_argument("--verify", choices=("match", "rejection"), default="match",
                   help="verification at --temp > 0 (default: upstream's sample-and-match)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temp", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n-ctx", type=int, default=2048)
    g.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    g.add_argument("--compare", action="store_true", help="also run plain decoding: speedup and output match")
    g.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS)
    # listed for --help only: main() hands "serve ..." to the server's own parser before parsing
    sub.add_parser("serve", help="OpenAI-compatible server (llama_mtp.server; serve --help)", add_help=False)
    b = sub.add_parser("build", help="(re)build the native shim")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    b.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS)
    return p


def _int_arg(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer or 'auto', got {value!r}") from None


def _cmd_build(args: argparse.Namespace) -> int:
    from . import _loader

    builder = _loader.build_module()
    out = builder.build(force=args.force)
    print(out)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import llama_cpp

    from .generation import generate
    from .loading import load
    from .testing import demo

    if args.prompt is None:
        args.prompt = demo.DEMO_PROMPT
    n_draft = args.n_draft if args.n_draft == "auto" else _int_arg(args.n_draft, "--n-draft")
    n_draft_max = args.n_draft_max if n_draft == "auto" else max(1, n_draft)
    path = args.model or demo.demo_model()
    kwargs = dict(n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=args.verbose)
    target, draft = load(path, n_draft_max=n_draft_max, draft_model_path=args.draft_model, **kwargs)
    plain = None
    try:
        sampling = dict(max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed)
        if args.compare:
            # both sides warmed up alike before timing: the first decodes of each batch shape set up
            # graphs and caches, and auto measures this machine's step costs (kept per target)
            plain = llama_cpp.Llama(path, **kwargs)
            plain.create_completion(args.prompt, max_tokens=WARMUP_TOKENS, temperature=args.temp, seed=args.seed)
            generate(target, draft, args.prompt, n_draft=n_draft, verify=args.verify,
                     **dict(sampling, max_tokens=WARMUP_TOKENS))
        stream = generate(target, draft, args.prompt, n_draft=n_draft, stream=True, verify=args.verify, **sampling)
        print(args.prompt, end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        res = stream.result
        assert res is not None
        st = res.stats
        print(f"\n[mtp] {st.n_generated} tokens in {st.generation_seconds:.2f} s = {st.tokens_per_second:.1f} tok/s "
              f"(prompt {st.n_prompt_tokens} tokens in {st.prompt_seconds:.2f} s); finish: {res.finish_reason}")
        hist = ", ".join(f"k={k}: {n}" for k, n in enumerate(st.draft_len_hist) if n)
        print(f"[mtp] n_draft={args.n_draft} ({hist}): {st.steps} steps, drafted {st.drafted}, accepted {st.accepted} "
              f"(acceptance {st.acceptance_rate:.1%}, per position "
              f"{', '.join(f'{a:.2f}' for a in st.per_pos_acceptance)}), "
              f"{st.tokens_per_step:.2f} tokens/step")
        if plain is not None:
            t0 = time.perf_counter()
            ref = plain.create_completion(args.prompt, max_tokens=args.max_tokens, temperature=args.temp,
                                          seed=args.seed)
            t_plain = time.perf_counter() - t0
            n_plain = ref["usage"]["completion_tokens"]
            # create_completion's time includes its prompt: compare against MTP's prompt + generation
            t_mtp = st.prompt_seconds + st.generation_seconds
            same = ref["choices"][0]["text"] == res.text
            print(f"[plain] {n_plain} tokens in {t_plain:.2f} s (prompt included); "
                  f"MTP {res.stats.n_generated} tokens in {t_mtp:.2f} s (each after a {WARMUP_TOKENS}-token warm-up)")
            print(f"[compare] speedup {(res.stats.n_generated / t_mtp) / (n_plain / t_plain):.2f}x, "
                  f"outputs {'match' if same else 'DIFFER'}")
    finally:
        if plain is not None:
            plain.close()
        draft.close()
        target.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from .server.main import main as serve_main

        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    from .errors import MtpError

    try:
        if args.command == "build":
            return _cmd_build(args)
        return _cmd_generate(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (MtpError, ValueError, OSError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
