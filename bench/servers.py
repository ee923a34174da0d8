"""What the server benchmarks (serve.py, chat.py) share: the contenders' launch, the model they
serve, the sampling every request spells out, and where the results go.

Contenders (``start``):

- ``plain``: ``python -m llama_cpp.server`` (one sequence at a time);
- ``native``: llama.cpp's ``llama-server --spec-type draft-mtp --spec-draft-n-max K -np N``, built
  from the sdist of the installed llama-cpp-python (bench/native.py; a one-off build);
- ``mtp``: ``python -m llama_mtp.server --n_parallel N --n_draft auto --n_draft_max K`` (+ ``--mtp-args``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import httpx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import native  # noqa: E402

from llama_mtp import testing  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
STARTUP_S = 600
# every sampling field explicit: the servers' defaults differ (llama_cpp.server: repeat_penalty 1.1);
# temperature 0 makes the runs greedy, the rest only has to be the same on every server
SAMPLING: Dict[str, Any] = {"temperature": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


@dataclasses.dataclass(frozen=True)
class Launch:
    """How every contender is started: the same threads, context and slots for all."""

    threads: int
    n_ctx: int  # the whole context: the parallel servers split it into n_parallel slots
    n_parallel: int
    n_draft_max: int
    n_draft: str  # llama_mtp.server's --n_draft (auto or K)
    mtp_args: Tuple[str, ...] = ()  # extra flags for llama_mtp.server only

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Launch":
        return cls(threads=args.threads, n_ctx=args.n_ctx, n_parallel=args.n_parallel, n_draft_max=args.n_draft_max,
                   n_draft=args.n_draft, mtp_args=tuple(shlex.split(args.mtp_args)))


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


def start(kind: str, model: str, launch: Launch, log_dir: pathlib.Path) -> Server:
    port = _free_port()
    t = str(launch.threads)
    if kind == "plain":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", HOST, "--port", str(port),
               "--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(launch.n_ctx), "--verbose", "false"]
        return Server(kind, cmd, port, "/v1/models", log_dir)
    if kind == "mtp":
        cmd = [sys.executable, "-m", "llama_mtp.server", "--model", model, "--host", HOST, "--port", str(port),
               "--n_threads", t, "--n_threads_batch", t, "--n_ctx", str(launch.n_ctx), "--verbose", "false",
               "--n_parallel", str(launch.n_parallel), "--n_draft", launch.n_draft,
               "--n_draft_max", str(launch.n_draft_max), *launch.mtp_args]
        return Server(kind, cmd, port, "/health", log_dir)
    if kind == "native":
        exe = native.server_binary()
        cmd = [str(exe), "-m", model, "--host", HOST, "--port", str(port), "-t", t, "-tb", t, "-c", str(launch.n_ctx),
               "-np", str(launch.n_parallel), "--spec-type", "draft-mtp", "--spec-draft-n-max", str(launch.n_draft_max)]
        return Server(kind, cmd, port, "/health", log_dir)
    raise ValueError(f"unknown server {kind!r}")


def measured(kind: str, model: str, launch: Launch, log_dir: pathlib.Path,
             measure: Callable[[Server], Dict[str, Any]]) -> Dict[str, Any]:
    """``measure`` run on a fresh ``kind`` server, which is stopped after; a failure is the result's ``error``.

    A server that cannot start (e.g. llama-server could not be built) or fails on the way is
    recorded, not raised: the other contenders still run.
    """
    print(f"[{kind}] starting...", file=sys.stderr, flush=True)
    try:
        srv = start(kind, model, launch, log_dir)
    except Exception as e:
        print(f"[{kind}] skipped: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        srv.wait_ready()
        return measure(srv)
    except Exception as e:
        log_tail = srv.log_path.read_text(errors="replace")[-2000:] if srv.log_path.exists() else ""
        print(f"[{kind}] failed: {e}\n{log_tail}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}", "log_tail": log_tail}
    finally:
        srv.stop()


def add_common_args(p: argparse.ArgumentParser, servers: str, n_ctx: int) -> None:
    """The model, launch and output options of every server benchmark."""
    p.add_argument("--size", default="bench", help="generated oracle model size (llama_mtp.testing.SIZES)")
    p.add_argument("--accept", type=float, default=0.8, help="the oracle model's MTP acceptance")
    p.add_argument("--ftype", default="f16")
    p.add_argument("--model", help="a GGUF with MTP heads instead of a generated oracle model")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--n-ctx", type=int, default=n_ctx, help="the whole context (the parallel servers split it)")
    p.add_argument("--n-parallel", type=int, default=4)
    p.add_argument("--n-draft-max", type=int, default=3)
    p.add_argument("--n-draft", default="auto", help="llama_mtp.server's --n_draft (auto or K)")
    p.add_argument("--mtp-args", default="",
                   help="extra flags for llama_mtp.server, given with '=': --mtp-args='--cache_ram_mib 512'")
    p.add_argument("--servers", default=servers)
    p.add_argument("--tag", default="")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the .json/.md go (default bench/results)")


def model_of(args: argparse.Namespace) -> Tuple[str, str]:
    """(path, description) of the model the servers load: ``--model``, else the generated oracle model."""
    if args.model:
        return args.model, os.path.basename(args.model)
    path = testing.cached_test_model(size=args.size, recipe="oracle", accept=args.accept, ftype=args.ftype,
                                     accept_pattern="random")
    return str(path), f"oracle model, size {args.size}, {args.ftype}, accept {args.accept}"


def today() -> str:
    return datetime.date.today().isoformat()


def machine() -> str:
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def result_head(args: argparse.Namespace, model: str, desc: str, names: List[str]) -> Dict[str, Any]:
    """What every result file starts with: when, where, on what, with which options and servers."""
    return {"date": today(), "machine": machine(), "model": model, "model_desc": desc, "args": dict(vars(args)),
            "servers": names}


def markdown_head(result: Dict[str, Any], title: str, setup: str) -> List[str]:
    """A result table's first lines: the title with the model, then when, where and the setup."""
    a = result["args"]
    return [f"# {title}: {result['model_desc']}", "",
            f"{result['date']}, {result['machine']}; {a['threads']} threads, {setup}", ""]


def write_results(bench: str, args: argparse.Namespace, result: Dict[str, Any],
                  write_markdown: Callable[[Dict[str, Any], pathlib.Path], None]) -> None:
    """<results-dir>/<date>-<machine>-<bench>-<size>[-tag].{json,md} (the tag may hold dots: no with_suffix)."""
    out_dir = pathlib.Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = "model" if args.model else args.size
    stem = f"{result['date']}-{result['machine']}-{bench}-{size}{'-' + args.tag if args.tag else ''}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, md_path)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
