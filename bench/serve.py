"""Benchmark of the servers: plain llama_cpp.server vs native llama-server (MTP) vs llama_mtp.server.

    python bench/serve.py [--size bench|fast|tiny] [--accept 0.8] [--model PATH] [--clients 1,2,4]
                          [--requests 4] [--max-tokens 128] [--threads 2] [--n-ctx 4096] [--n-parallel 4]
                          [--n-draft-max 3] [--servers plain,native,mtp] [--tag TAG]

Each server is started on the same model with the same threads and context,
then for each client count C, C clients each send the same fixed list of
greedy completion requests (``max_tokens`` each, one at a time per client).
Recorded per server and C: aggregate output tokens/s (all completion tokens
over the wall time of the level), p50/p95 request latency, and for the MTP
servers the acceptance they report. Contenders:

- ``plain``: ``python -m llama_cpp.server`` (one sequence at a time);
- ``native``: llama.cpp's ``llama-server --spec-type draft-mtp --spec-draft-n-max K -np N``, built
  from the sdist of the installed llama-cpp-python (bench/native.py; a one-off build);
- ``mtp``: ``python -m llama_mtp.server --n_parallel N --n_draft auto --n_draft_max K``.

``--n-ctx`` is the whole context: the parallel servers split it into N slots,
plain llama_cpp.server gives it to its one sequence.
Writes bench/results/<date>-<machine>-serve-<size>[-tag].{json,md} (--results-dir elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import native  # noqa: E402

from llama_mtp import testing  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
PROMPTS = [
    "Speculative decoding drafts tokens with a cheap head and verifies them in one batch.",
    "Once upon a time, in a city of servers, every request waited for a free slot.",
    "The quick brown fox jumps over the lazy dog, again and again, until the context is full.",
    "Multi-token prediction heads guess the next few tokens; the target model checks them.",
]
STARTUP_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; ``ready_path`` is polled until it answers 200."""

    def __init__(self, name: str, cmd: List[str], port: int, ready_path: str, log_dir: pathlib.Path) -> None:
        self.name = name
        self.base = f"http://{HOST}:{port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {STARTUP_S} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start(kind: str, model: str, args: argparse.Namespace, log_dir: pathlib.Path) -> Server:
    port = _free_port()
    t = str(args.threads)
    if kind == "plain":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", HOST, "--port", str(port),
               "--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(args.n_ctx), "--verbose", "false"]
        return Server(kind, cmd, port, "/v1/models", log_dir)
    if kind == "mtp":
        cmd = [sys.executable, "-m", "llama_mtp.server", "--model", model, "--host", HOST, "--port", str(port),
               "--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(args.n_ctx), "--verbose", "false",
               "--n_parallel", str(args.n_parallel), "--n_draft", args.n_draft, "--n_draft_max", str(args.n_draft_max)]
        return Server(kind, cmd, port, "/health", log_dir)
    if kind == "native":
        exe = native.server_binary()
        cmd = [str(exe), "-m", model, "--host", HOST, "--port", str(port), "-t", t, "-tb", t, "-c", str(args.n_ctx),
               "-np", str(args.n_parallel), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(args.n_draft_max)]
        return Server(kind, cmd, port, "/health", log_dir)
    raise ValueError(f"unknown server {kind!r}")


def request_body(prompt: str, args: argparse.Namespace) -> Dict[str, Any]:
    # every sampling field explicit: the servers' defaults differ (llama_cpp.server: repeat_penalty 1.1)
    return {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0, "top_k": 40, "top_p": 0.95,
            "min_p": 0.05, "repeat_penalty": 1.0, "stream": False}


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
    lines = [f"# Server benchmark: {result['model_desc']}", "",
             f"{result['date']}, {result['machine']}; {a['threads']} threads, n_ctx {a['n_ctx']}, "
             f"{a['n_parallel']} slots (parallel servers), n_draft_max {a['n_draft_max']}; each client sends "
             f"{a['requests']} greedy {a['max_tokens']}-token completions one after the other.", "",
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


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="bench", help="generated oracle model size (llama_mtp.testing.SIZES)")
    p.add_argument("--accept", type=float, default=0.8, help="the oracle model's MTP acceptance")
    p.add_argument("--ftype", default="f16")
    p.add_argument("--model", help="a GGUF with MTP heads instead of a generated oracle model")
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--requests", type=int, default=4, help="requests per client (the same list for every client)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-parallel", type=int, default=4)
    p.add_argument("--n-draft-max", type=int, default=3)
    p.add_argument("--n-draft", default="auto", help="llama_mtp.server's --n_draft (auto or K)")
    p.add_argument("--servers", default="plain,native,mtp")
    p.add_argument("--tag", default="")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the .json/.md go (default bench/results)")
    args = p.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",") if x]
    servers = [s for s in args.servers.split(",") if s]
    if args.model:
        model, desc = args.model, os.path.basename(args.model)
    else:
        model = str(testing.cached_test_model(size=args.size, recipe="oracle", accept=args.accept, ftype=args.ftype,
                                              accept_pattern="random"))
        desc = f"oracle model, size {args.size}, {args.ftype}, accept {args.accept}"
    date = datetime.date.today().isoformat()
    machine = f"{platform.machine()}-{os.cpu_count()}cpu"
    result: Dict[str, Any] = {"date": date, "machine": machine, "model": model, "model_desc": desc,
                              "args": {k: v for k, v in vars(args).items()}, "servers": servers, "results": {}}
    with tempfile.TemporaryDirectory(prefix="llama_mtp-serve-bench-") as tmp:
        for name in servers:
            print(f"[{name}] starting...", file=sys.stderr, flush=True)
            try:
                srv = start(name, model, args, pathlib.Path(tmp))
            except Exception as e:  # e.g. llama-server could not be built
                result["results"][name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[{name}] skipped: {e}", file=sys.stderr)
                continue
            try:
                srv.wait_ready()
                # one warm-up request: first-use costs (page faults, thread pools) are not the server's speed
                httpx.post(srv.base + "/v1/completions", json=request_body(PROMPTS[0], args), timeout=3600)
                levels = []
                for c in args.clients:
                    lvl = run_level(srv, c, args)
                    levels.append(lvl)
                    acc = f", acceptance {lvl['acceptance']}" if "acceptance" in lvl else ""
                    errs = f", errors {len(lvl['errors'])}" if lvl["errors"] else ""
                    print(f"[{name}] clients={c}: {lvl['tokens_per_second']} tok/s, p50 {lvl['latency_p50_s']} s, "
                          f"p95 {lvl['latency_p95_s']} s{acc}{errs}", file=sys.stderr, flush=True)
                result["results"][name] = {"levels": levels}
            except Exception as e:
                log_tail = srv.log_path.read_text(errors="replace")[-2000:] if srv.log_path.exists() else ""
                result["results"][name] = {"error": f"{type(e).__name__}: {e}", "log_tail": log_tail}
                print(f"[{name}] failed: {e}\n{log_tail}", file=sys.stderr)
            finally:
                srv.stop()
    out_dir = pathlib.Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = "model" if args.model else args.size
    stem = out_dir / f"{date}-{machine}-serve-{size}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, stem.with_suffix(".md"))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
