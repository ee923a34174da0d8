"""Benchmark of the servers: plain llama_cpp.server vs native llama-server (MTP) vs llama_mtp.server.

    python bench/serve.py [--size bench|fast|tiny] [--accept 0.8] [--model PATH] [--clients 1,2,4]
                          [--requests 4] [--max-tokens 128] [--threads 2] [--n-ctx 4096] [--n-parallel 4]
                          [--n-draft-max 3] [--servers plain,native,mtp] [--mtp-args '...'] [--tag TAG]

Each server is started on the same model with the same threads and context,
then for each client count C, C clients each send the same fixed list of
greedy completion requests (``max_tokens`` each, one at a time per client).
Recorded per server and C: aggregate output tokens/s (all completion tokens
over the wall time of the level), p50/p95 request latency, and for the MTP
servers the acceptance they report. Contenders (how each is launched: bench/servers.py):
``plain`` (llama_cpp.server, one sequence at a time), ``native`` (llama.cpp's llama-server with
MTP drafting) and ``mtp`` (llama_mtp.server).

``--n-ctx`` is the whole context: the parallel servers split it into N slots,
plain llama_cpp.server gives it to its one sequence.
Writes bench/results/<date>-<machine>-serve-<size>[-tag].{json,md} (--results-dir elsewhere).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import servers  # noqa: E402
from servers import Server  # noqa: E402

PROMPTS = [
    "Speculative decoding drafts tokens with a cheap head and verifies them in one batch.",
    "Once upon a time, in a city of servers, every request waited for a free slot.",
    "The quick brown fox jumps over the lazy dog, again and again, until the context is full.",
    "Multi-token prediction heads guess the next few tokens; the target model checks them.",
]


def request_body(prompt: str, args: argparse.Namespace) -> Dict[str, Any]:
    return {"prompt": prompt, "max_tokens": args.max_tokens, **servers.SAMPLING, "stream": False}


def run_level(srv: Server, clients: int, args: argparse.Namespace) -> Dict[str, Any]:
    """``clients`` clients each send the fixed request list once; aggregate tok/s and latency percentiles."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    latencies: List[float] = []
    tokens: List[int] = []
    accepted: List[int] = []
    rejected: List[int] = []
    errors: List[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client() -> None:
        with httpx.Client(base_url=srv.base, timeout=3600) as c:
            barrier.wait()
            for p in prompts:
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json=request_body(p, args))
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    body = r.json()
                    usage = body.get("usage", {})
                    latencies.append(dt)
                    tokens.append(int(usage.get("completion_tokens", 0)))
                    details = usage.get("completion_tokens_details") or {}
                    timings = body.get("timings") or {}
                    if "accepted_prediction_tokens" in details:  # llama_mtp.server
                        accepted.append(int(details["accepted_prediction_tokens"] or 0))
                        rejected.append(int(details.get("rejected_prediction_tokens") or 0))
                    elif "draft_n" in timings:  # llama-server reports its drafts in the timings
                        accepted.append(int(timings.get("draft_n_accepted", 0)))
                        rejected.append(int(timings["draft_n"]) - int(timings.get("draft_n_accepted", 0)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    out: Dict[str, Any] = {
        "clients": clients, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
        "completion_tokens": sum(tokens), "tokens_per_second": round(sum(tokens) / wall, 2) if wall > 0 else 0.0,
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(_percentile(lat, 0.95), 3) if lat else None,
    }
    if accepted:
        drafted = sum(accepted) + sum(rejected)
        out["acceptance"] = round(sum(accepted) / drafted, 4) if drafted else 0.0
    return out


def _percentile(sorted_xs: List[float], q: float) -> float:
    """Linear-interpolated percentile of a sorted list."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def write_markdown(result: Dict[str, Any], path: pathlib.Path) -> None:
    a = result["args"]
    setup = (f"n_ctx {a['n_ctx']}, {a['n_parallel']} slots (parallel servers), n_draft_max {a['n_draft_max']}; "
             f"each client sends {a['requests']} greedy {a['max_tokens']}-token completions one after the other.")
    lines = servers.markdown_head(result, "Server benchmark", setup) + [
        "Each cell: aggregate output tok/s (p50 / p95 latency in s; acceptance where reported).", "",
        "| clients | " + " | ".join(result["servers"]) + " |",
        "|---|" + "---|" * len(result["servers"])]
    for c in a["clients"]:
        cells = []
        for name in result["servers"]:
            lvl = next((x for x in result["results"].get(name, {}).get("levels", []) if x["clients"] == c), None)
            if lvl is None:
                cells.append(result["results"].get(name, {}).get("error", "n/a"))
                continue
            acc = f"; acc {lvl['acceptance']:.2f}" if "acceptance" in lvl else ""
            err = f"; {len(lvl['errors'])} errors" if lvl["errors"] else ""
            cells.append(f"{lvl['tokens_per_second']:.1f} ({lvl['latency_p50_s']} / {lvl['latency_p95_s']}{acc}{err})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def measure(srv: Server, args: argparse.Namespace) -> Dict[str, Any]:
    """The client levels on a ready server, after one warm-up request."""
    # first-use costs (page faults, thread pools) are not the server's speed
    httpx.post(srv.base + "/v1/completions", json=request_body(PROMPTS[0], args), timeout=3600)
    levels = []
    for c in args.clients:
        lvl = run_level(srv, c, args)
        levels.append(lvl)
        acc = f", acceptance {lvl['acceptance']}" if "acceptance" in lvl else ""
        errs = f", errors {len(lvl['errors'])}" if lvl["errors"] else ""
        print(f"[{srv.name}] clients={c}: {lvl['tokens_per_second']} tok/s, p50 {lvl['latency_p50_s']} s, "
              f"p95 {lvl['latency_p95_s']} s{acc}{errs}", file=sys.stderr, flush=True)
    return {"levels": levels}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    servers.add_common_args(p, servers="plain,native,mtp", n_ctx=4096)
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--requests", type=int, default=4, help="requests per client (the same list for every client)")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",") if x]
    names = [s for s in args.servers.split(",") if s]
    model, desc = servers.model_of(args)
    launch = servers.Launch.from_args(args)
    result = {**servers.result_head(args, model, desc, names), "results": {}}
    with tempfile.TemporaryDirectory(prefix="llama_mtp-serve-bench-") as tmp:
        for name in names:
            result["results"][name] = servers.measured(name, model, launch, pathlib.Path(tmp),
                                                       lambda srv: measure(srv, args))
    servers.write_results("serve", args, result, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
