"""Prefix-cache hit rates of llama_mtp.server on Ray Serve: conversation affinity vs Ray Serve's default router.

``python -m llama_mtp.server --replicas R`` is started twice on the same model, with
``--ray_router affinity`` (the default) and ``--ray_router default`` (Serve's power-of-two-choices
router), and driven by the same multi-turn chats through the ``openai`` client: ``clients``
threads, client i running conversations i, i + clients, ... turn by turn. Each conversation has its
own first user message; the system prompt is one shared sentence. For every turn after the
first it records ``usage.prompt_tokens_details.cached_tokens`` and the replica that served it
(``x-llama-mtp-replica``):

- hit rate: later turns with ``cached_tokens > 0``;
- cached share: later turns' cached prompt tokens / their prompt tokens;
- moves: later turns served by another replica than the conversation's previous turn.

Also the start-up time (command to every replica serving). Writes
``bench/results/<date>-<machine>-ray-affinity-<size>[-tag].{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import random
import re
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import httpx
import openai

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import servers  # noqa: E402

from llama_mtp import testing  # noqa: E402

ROUTERS = ("affinity", "default")
SYSTEM = "You are a helpful assistant."
WORDS = ("river stone lantern orchard copper violet meadow harbor ember thistle quartz willow canyon "
         "saffron glacier marble falcon juniper velvet cobalt prairie tundra beacon cedar").split()


def wait_replicas(srv: servers.Server, n: int) -> float:
    """Seconds until ``n`` replicas report to /metrics (the server was started just before)."""
    t0 = time.monotonic()
    deadline = t0 + servers.STARTUP_S
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited with {srv.proc.returncode}; see {srv.log_path}")
        try:
            text = httpx.get(srv.base + "/metrics", timeout=5).text
            if len(re.findall(r"^llama_mtp:replica_info\{", text, re.M)) == n:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{n} replicas not serving after {servers.STARTUP_S} s; see {srv.log_path}")


def start(model: str, router: str, args: argparse.Namespace, log_dir: pathlib.Path) -> servers.Server:
    port = servers._free_port()
    t = str(args.threads)
    cmd = [sys.executable, "-m", "llama_mtp.server", "--model", model, "--host", servers.HOST, "--port", str(port),
           "--replicas", str(args.replicas), "--ray_router", router, "--n_threads", t, "--n_threads_batch", t,
           "--n_parallel", str(args.n_parallel), "--n_ctx", str(args.n_parallel * args.slot_ctx),
           "--chat_format", "chatml", "--verbose", "false"]
    return servers.Server(f"ray-{router}", cmd, port, "/health", log_dir)


def conversation_users(conversations: int, turns: int, seed: int) -> List[List[str]]:
    rng = random.Random(seed)
    return [[f"Conversation {c}, question {t}: " + " ".join(rng.choices(WORDS, k=12)) + "?" for t in range(turns)]
            for c in range(conversations)]


def run_case(srv: servers.Server, conversations: int, clients: int, turns: int, max_tokens: int,
             seed: int) -> Dict[str, Any]:
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    users = conversation_users(conversations, turns, seed)
    history: List[List[Dict[str, str]]] = [[{"role": "system", "content": SYSTEM}] for _ in range(conversations)]
    records: List[Dict[str, Any]] = []

    def one_client(i: int) -> None:
        mine = list(range(i, conversations, clients))
        for turn in range(turns):
            for c in mine:
                history[c].append({"role": "user", "content": users[c][turn]})
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=history[c], max_tokens=max_tokens, temperature=0)
                out = raw.parse()
                history[c].append({"role": "assistant", "content": out.choices[0].message.content})
                records.append({"conversation": c, "turn": turn, "replica": raw.headers["x-llama-mtp-replica"],
                                "prompt_tokens": out.usage.prompt_tokens,
                                "cached_tokens": out.usage.prompt_tokens_details.cached_tokens})

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(one_client, i) for i in range(clients)]:
            f.result()
    wall = time.monotonic() - t0
    return {**summarize(records), "wall_s": round(wall, 2), "records": records}


def summarize(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    by_conv: Dict[int, List[Dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (r["conversation"], r["turn"])):
        by_conv.setdefault(r["conversation"], []).append(r)
    later = [r for r in records if r["turn"] > 0]
    moves = sum(a["replica"] != b["replica"] for turns in by_conv.values() for a, b in zip(turns, turns[1:]))
    return {
        "later_turns": len(later),
        "hit_rate": round(sum(r["cached_tokens"] > 0 for r in later) / len(later), 3),
        "cached_share": round(sum(r["cached_tokens"] for r in later) / sum(r["prompt_tokens"] for r in later), 3),
        "moves": moves,
        "replica_requests": {rep: sum(r["replica"] == rep for r in records) for rep in {r["replica"] for r in records}},
    }


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", help="generated context-recipe model size (llama_mtp.testing.SIZES)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (= Ray CPUs) per replica")
    p.add_argument("--n-parallel", type=int, default=4, help="engine slots per replica")
    p.add_argument("--slot-ctx", type=int, default=1024)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--cases", default="4x2,8x4,8x8,16x8", help="conversations x clients, comma-separated")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--results-dir", default=str(servers.RESULTS))
    return p.parse_args(argv)


def write_markdown(result: Dict[str, Any], path: pathlib.Path) -> None:
    a = result["args"]
    lines = [f"# Prefix-cache hits on Ray Serve, conversation affinity vs Ray's default router: {result['model_desc']}",
             "", f"{result['date']}, {result['machine']}; {a['replicas']} replicas x {a['n_parallel']} slots, "
             f"{a['threads']} thread(s) each; {a['turns']} turns, {a['max_tokens']} tokens a reply; greedy", "",
             "| case | router | hit rate (turns 2+) | cached share of prompt tokens | replica moves | wall (s) |"
             " requests per replica |", "|---|---|---|---|---|---|---|"]
    for case, by_router in result["cases"].items():
        for router, r in by_router.items():
            lines.append(f"| {case} | {router} | {r['hit_rate']:.0%} | {r['cached_share']:.0%} | {r['moves']} / "
                         f"{r['later_turns']} | {r['wall_s']} | {sorted(r['replica_requests'].values())} |")
    lines += ["", "Start-up (command to every replica serving): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in result["startup_s"].items()), ""]
    path.write_text("\n".join(lines))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    model = str(testing.cached_test_model(size=args.size, recipe="context", accept=0.8))
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    result: Dict[str, Any] = {"date": servers.today(), "machine": servers.machine(), "model": model,
                              "model_desc": f"context model, size {args.size}", "args": dict(vars(args)),
                              "cases": {}, "startup_s": {}}
    log_dir = pathlib.Path(tempfile.mkdtemp(prefix="ray-affinity-"))  # the servers' logs, kept for a failure
    for router in ROUTERS:
        srv = start(model, router, args, log_dir)
        try:
            result["startup_s"][router] = round(wait_replicas(srv, args.replicas), 1)
            for i, (conversations, clients) in enumerate(cases):
                name = f"{conversations} conversations, {clients} clients"
                r = run_case(srv, conversations, clients, args.turns, args.max_tokens, args.seed + i)
                result["cases"].setdefault(name, {})[router] = r
                print(f"[{router}] {name}: hit rate {r['hit_rate']:.0%}, cached share {r['cached_share']:.0%}, "
                      f"moves {r['moves']}/{r['later_turns']}", file=sys.stderr, flush=True)
        finally:
            srv.stop()
    args.model = None
    servers.write_results("ray-affinity", args, result, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
