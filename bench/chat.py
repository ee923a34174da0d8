"""Multi-turn chat benchmark: native llama-server (MTP) vs llama_mtp.server on the same conversations.

    python bench/chat.py [--size bench|fast|tiny] [--cases 1,2,3] [--servers native,mtp] [--turns N]
                         [--max-tokens 32] [--threads 2] [--n-ctx 8192] [--n-parallel 4]
                         [--mtp-args='--cache_ram_mib 512'] [--tag TAG]

Cases (``--turns`` overrides every case's turn count):

1. 4 clients, each one conversation of 4 turns over the same ~800-token system prompt;
2. 16 conversations over 4 slots: 4 clients, each taking its 4 conversations turn by turn (turn 1
   of each, then turn 2 of each, ...), so between two turns of a conversation its slot likely
   served another one: what a conversation cache has to bring back;
3. one long conversation of 8 turns, its system prompt sized so that the last turn nearly fills a
   4k-token slot (``--long-ctx``; for this case the servers get ``n_parallel * long_ctx`` of context).

User turns are ~20 words, replies greedy and ``--max-tokens`` long. The history holds a FIXED
assistant reply per turn (about ``--max-tokens`` tokens of text), not the model's, so every server
gets identical messages. Each case runs on freshly started servers (no cache carried over from
another case), after one unrelated warm-up request. The official ``openai`` client streams every
reply: time to first token (TTFT) is the time to the first chunk with generated text (``content``,
or ``reasoning_content`` where llama-server parses the reply as reasoning).
Recorded per server and case: wall time, output tok/s (all completion tokens over the wall time),
mean TTFT of turn 1 and of the later turns (and per turn), prompt tokens and the cached prompt
tokens the server reports (``usage.prompt_tokens_details.cached_tokens``; None where it reports none).
How the servers are launched: bench/servers.py. Writes
bench/results/<date>-<machine>-chat-<size>[-tag].{json,md} (--results-dir elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import llama_cpp
import openai

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import servers  # noqa: E402
from servers import Server  # noqa: E402

SYSTEM_TOKENS = 800
USER_WORDS = 20
# a chat template's tokens around one message (role markers, separators), and what is kept free of the
# long case's slot besides: the estimate must not make its last turn overflow the slot
MESSAGE_OVERHEAD = 12
LONG_MARGIN = 96
WORDS = ("server slot cache prompt token draft model batch decode verify accept head layer context window "
         "request reply stream client thread queue latency memory weight matrix vector kernel cpu core "
         "speed time turn chat history system user assistant message answer question detail example "
         "reason summary plan step result value number table record field file path line word text").split()


@dataclasses.dataclass(frozen=True)
class Case:
    number: int
    title: str
    conversations: int
    clients: int  # client i runs conversations i, i + clients, ... turn by turn
    turns: int
    long: bool  # the system prompt fills a long_ctx slot by the last turn (else SYSTEM_TOKENS)

    def n_ctx(self, args: argparse.Namespace) -> int:
        """The servers' whole context for this case: the long case needs long_ctx per slot."""
        return max(args.n_ctx, args.n_parallel * args.long_ctx) if self.long else args.n_ctx


CASES = {
    1: Case(1, "4 clients x 4 turns, ~800-token system prompt", conversations=4, clients=4, turns=4, long=False),
    2: Case(2, "16 conversations over 4 slots", conversations=16, clients=4, turns=4, long=False),
    3: Case(3, "one long conversation, 8 turns over a 4k-token context", conversations=1, clients=1, turns=8,
            long=True),
}


@dataclasses.dataclass(frozen=True)
class Script:
    """The case's conversations: one system prompt, user turns per conversation, fixed replies per turn."""

    system: str
    system_tokens: int
    users: Sequence[Sequence[str]]  # [conversation][turn]
    replies: Sequence[str]  # [turn]: what the history holds as the assistant's reply

    @property
    def turns(self) -> int:
        return len(self.replies)

    def messages(self, conversation: int, turn: int) -> List[Dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}]
        for t in range(turn):
            msgs += [{"role": "user", "content": self.users[conversation][t]},
                     {"role": "assistant", "content": self.replies[t]}]
        return msgs + [{"role": "user", "content": self.users[conversation][turn]}]


def token_counter(model: str) -> Callable[[str], int]:
    """How many tokens the model's vocabulary makes of a text (vocabulary only: no weights loaded)."""
    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False))


def text_of(rng: random.Random, count: Callable[[str], int], n_tokens: int) -> str:
    """Words from WORDS until the text has at least ``n_tokens`` tokens (sized by tokens: vocabularies differ)."""
    words: List[str] = []
    while count(" ".join(words)) < n_tokens:
        words += rng.choices(WORDS, k=8)
    return " ".join(words)


def build_script(case: Case, turns: int, count: Callable[[str], int], args: argparse.Namespace) -> Script:
    rng = random.Random(case.number)  # the same script for every server and run
    users = [[" ".join(rng.choices(WORDS, k=USER_WORDS)) + "?" for _ in range(turns)]
             for _ in range(case.conversations)]
    replies = [text_of(rng, count, args.max_tokens) for _ in range(turns)]
    n_system = SYSTEM_TOKENS
    if case.long:
        # what the longest conversation holds besides the system prompt, its last reply included
        rest = max(sum(count(u) for u in conv) for conv in users) + sum(count(r) for r in replies[:-1])
        rest += 2 * turns * MESSAGE_OVERHEAD + args.max_tokens + LONG_MARGIN
        n_system = args.long_ctx - rest
        if n_system < SYSTEM_TOKENS:
            raise ValueError(f"{turns} turns leave {n_system} tokens of the {args.long_ctx}-token slot to the "
                             f"system prompt; use fewer --turns or a larger --long-ctx")
    system = text_of(rng, count, n_system)
    return Script(system=system, system_tokens=count(system), users=users, replies=replies)


@dataclasses.dataclass(frozen=True)
class Turn:
    """One streamed reply as the client saw it."""

    conversation: int
    turn: int
    ttft_s: Optional[float]  # None: no chunk had generated text
    seconds: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: Optional[int]  # None: the server does not report them
    reasoning: str = ""  # the reply as streamed: reasoning_content, then content
    content: str = ""


def _generated_text(delta: Any) -> str:
    """A chunk's generated text: llama-server streams what follows the Qwen templates' opening
    ``<think>`` as ``reasoning_content``, llama_mtp.server all as ``content``; both are the first token."""
    return delta.content or (delta.model_extra or {}).get("reasoning_content") or ""


def one_turn(client: openai.OpenAI, model: str, script: Script, conversation: int, turn: int,
             max_tokens: int) -> Turn:
    t0 = time.perf_counter()
    ttft: Optional[float] = None
    usage = None
    reasoning: List[str] = []
    content: List[str] = []
    stream = client.chat.completions.create(
        model=model, messages=script.messages(conversation, turn), max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, extra_body=servers.SAMPLING)
    for chunk in stream:
        if ttft is None and chunk.choices and _generated_text(chunk.choices[0].delta):
            ttft = time.perf_counter() - t0
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
        if chunk.usage is not None:  # the last chunk (llama-server: one with no choices)
            usage = chunk.usage
    seconds = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the stream reported no usage")
    details = usage.prompt_tokens_details
    return Turn(conversation=conversation, turn=turn, ttft_s=ttft, seconds=seconds,
                completion_tokens=usage.completion_tokens, prompt_tokens=usage.prompt_tokens,
                cached_tokens=details.cached_tokens if details is not None else None,
                reasoning="".join(reasoning), content="".join(content))


def openai_client(srv: Server) -> openai.OpenAI:
    # no retries: a failed request is an error of the run, not something to hide in the timing
    return openai.OpenAI(base_url=srv.base + "/v1", api_key="bench", timeout=3600, max_retries=0)


def run_case(srv: Server, model: str, case: Case, script: Script, max_tokens: int) -> Dict[str, Any]:
    """The case's clients, all at once; each runs its conversations turn by turn."""
    turns: List[Turn] = []
    errors: List[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(case.clients)

    def client(i: int) -> None:
        mine = range(i, case.conversations, case.clients)
        c = openai_client(srv)
        barrier.wait()
        for turn in range(script.turns):
            for conv in mine:
                try:
                    rec = one_turn(c, model, script, conv, turn, max_tokens)
                except (openai.OpenAIError, RuntimeError) as e:
                    with lock:
                        errors.append(f"conversation {conv} turn {turn}: {type(e).__name__}: {e}"[:300])
                    continue
                with lock:
                    turns.append(rec)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(case.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(turns, errors, time.perf_counter() - t0)


def _mean(xs: List[float]) -> Optional[float]:
    return round(statistics.mean(xs), 3) if xs else None


def summary(turns: List[Turn], errors: List[str], wall: float) -> Dict[str, Any]:
    """A case's numbers on one server; TTFT means leave out replies that never had text."""
    ttft: Dict[int, List[float]] = {}
    for t in turns:
        if t.ttft_s is not None:
            ttft.setdefault(t.turn, []).append(t.ttft_s)
    later = [x for turn, xs in ttft.items() if turn > 0 for x in xs]
    cached = [t.cached_tokens for t in turns if t.cached_tokens is not None]
    completion = sum(t.completion_tokens for t in turns)
    return {
        "replies": len(turns), "errors": errors, "wall_s": round(wall, 3), "completion_tokens": completion,
        "tokens_per_second": round(completion / wall, 2) if wall > 0 else 0.0,
        "ttft_turn1_mean_s": _mean(ttft.get(0, [])), "ttft_later_mean_s": _mean(later),
        "ttft_by_turn_mean_s": [_mean(ttft[k]) for k in sorted(ttft)],
        "prompt_tokens": sum(t.prompt_tokens for t in turns), "cached_tokens": sum(cached) if cached else None,
        "turns": [dataclasses.asdict(t) for t in sorted(turns, key=lambda t: (t.turn, t.conversation))],
    }


def measure(srv: Server, case: Case, script: Script, max_tokens: int) -> Dict[str, Any]:
    """One warm-up reply, then the case, on a ready server."""
    client = openai_client(srv)
    model = client.models.list().data[0].id  # llama-server names the model by its path, llama_mtp.server by alias
    # first-use costs (page faults, thread pools) are not the server's speed; unrelated to the
    # script, so that nothing of it is cached
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there."}],
                                   max_tokens=8, extra_body=servers.SAMPLING)
    res = run_case(srv, model, case, script, max_tokens)
    errs = f", errors {len(res['errors'])}" if res["errors"] else ""
    print(f"[{srv.name}] case {case.number}: {res['wall_s']} s, {res['tokens_per_second']} tok/s, TTFT turn 1 "
          f"{res['ttft_turn1_mean_s']} s, later {res['ttft_later_mean_s']} s, cached {res['cached_tokens']} of "
          f"{res['prompt_tokens']} prompt tokens{errs}", file=sys.stderr, flush=True)
    return res


def _cell(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def same_replies(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    """How many of ``b``'s replies are ``a``'s (reasoning and content), of those both have: greedy
    replies to identical prompts are the same on every server, cache hit or not."""
    mine = {(t["conversation"], t["turn"]): (t["reasoning"], t["content"]) for t in a.get("turns", [])}
    pairs = [(mine[k], (t["reasoning"], t["content"])) for t in b.get("turns", [])
             if (k := (t["conversation"], t["turn"])) in mine]
    return f"{sum(x == y for x, y in pairs)} / {len(pairs)}"


def write_markdown(result: Dict[str, Any], path: pathlib.Path) -> None:
    a = result["args"]
    flags = f" llama_mtp.server flags: `{a['mtp_args']}`." if a["mtp_args"] else ""
    setup = (f"{a['n_parallel']} slots, n_draft_max {a['n_draft_max']}; greedy {a['max_tokens']}-token replies, "
             f"fixed assistant history (bench/chat.py).{flags}")
    lines = servers.markdown_head(result, "Chat benchmark", setup) + [
        "| case | server | wall s | out tok/s | TTFT turn 1 s | TTFT later s | cached / prompt tokens | "
        f"replies as {result['servers'][0]}'s |",
        "|---|---|---|---|---|---|---|---|"]
    for case in result["cases"]:
        title = f"{case['number']}. {case['title']} ({case['turns']} turns, n_ctx {case['n_ctx']})"
        for name in result["servers"]:
            r = case["results"].get(name, {})
            if "error" in r:
                lines.append(f"| {title} | {name} | {r['error']} | | | | | |")
                continue
            first = case["results"].get(result["servers"][0], {})
            cached = "n/a" if r["cached_tokens"] is None else str(r["cached_tokens"])
            err = f" ({len(r['errors'])} errors)" if r["errors"] else ""
            lines.append(f"| {title} | {name} | {r['wall_s']:.2f}{err} | {r['tokens_per_second']:.1f} | "
                         f"{_cell(r['ttft_turn1_mean_s'])} | {_cell(r['ttft_later_mean_s'])} | "
                         f"{cached} / {r['prompt_tokens']} | {same_replies(first, r)} |")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    servers.add_common_args(p, servers="native,mtp", n_ctx=8192)
    p.add_argument("--cases", default="1,2,3", help="which of the cases (1, 2, 3) to run")
    p.add_argument("--turns", type=int, help="turns of every conversation (default: each case's own)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply")
    p.add_argument("--long-ctx", type=int, default=4096, help="the slot context case 3's conversation fills")
    args = p.parse_args(argv)
    try:
        args.cases = [int(x) for x in args.cases.split(",") if x]
    except ValueError:
        p.error(f"--cases takes case numbers, got {args.cases!r}")
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; there are {sorted(CASES)}")
    if args.turns is not None and args.turns < 1:
        p.error("--turns must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    names = [s for s in args.servers.split(",") if s]
    model, desc = servers.model_of(args)
    count = token_counter(model)
    launch = servers.Launch.from_args(args)
    result = {**servers.result_head(args, model, desc, names), "cases": []}
    with tempfile.TemporaryDirectory(prefix="llama_mtp-chat-bench-") as tmp:
        for number in args.cases:
            case = CASES[number]
            turns = args.turns or case.turns
            script = build_script(case, turns, count, args)
            case_launch = dataclasses.replace(launch, n_ctx=case.n_ctx(args))
            row: Dict[str, Any] = {**dataclasses.asdict(case), "turns": turns, "n_ctx": case_launch.n_ctx,
                                   "system_tokens": script.system_tokens, "results": {}}
            for name in names:
                row["results"][name] = servers.measured(name, model, case_launch, pathlib.Path(tmp),
                                                        lambda srv: measure(srv, case, script, args.max_tokens))
            result["cases"].append(row)
    servers.write_results("chat", args, result, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
