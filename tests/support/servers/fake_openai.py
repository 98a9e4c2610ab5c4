"""A small OpenAI-shaped HTTP server for tests, with faults injected at configured rates.

Real HTTP on loopback (aiohttp, in its own thread and event loop), so the code under test uses the
official ``openai`` client exactly as against OpenAI or vLLM. It answers ``POST /v1/chat/completions``
(plain and streaming, ``n`` samples, ``logprobs``/``top_logprobs``, ``return_tokens_as_token_ids``),
``GET /v1/models`` and ``GET /health``, and counts everything it saw. With ``prompt_logprobs`` set it also
answers vLLM's scoring request, ``POST /v1/completions`` with token-id prompts and ``prompt_logprobs``
(on-policy distillation), from whatever computes them (a real tiny model: :func:`tests.support.tiny.prompt_logprobs`).

Faults, drawn per request from a seeded generator: 429 with ``Retry-After``, 500, a response slower than
the client's timeout, a dropped connection, malformed JSON. Prompts containing ``TOO_LONG_MARKER`` get a
400 ``context_length_exceeded`` that no retry can fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOO_LONG_MARKER = "<<too-long>>"


@dataclass
class Faults:
    rate_429: float = 0.0
    retry_after: float = 0.05  # seconds, sent as Retry-After (fractional, as OpenAI's retry-after-ms allows)
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    timeout_sleep: float = 5.0  # how long a "timeout" response hangs
    rate_drop: float = 0.0
    rate_malformed: float = 0.0


def default_answer(messages: list[dict[str, Any]], sample: int) -> str:
    """A deterministic answer: the reversed words of the last user message (plus the sample index)."""
    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    text = " ".join(reversed(str(last).split()))
    return text if sample == 0 else f"{text} #{sample}"


def sequence_latency(values: Sequence[float]) -> Callable[[random.Random], float]:
    """A ``latency`` that hands out ``values`` in turn (cycling): a known latency distribution, exactly."""
    it = itertools.cycle(list(values))
    lock = threading.Lock()

    def latency(rng: random.Random) -> float:
        with lock:
            return next(it)

    return latency


@dataclass
class FakeOpenAIConfig:
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    latency: Callable[[random.Random], float] = lambda rng: 0.0  # seconds before answering
    token_delay: float = 0.0  # seconds between streamed tokens
    api_key: str | None = None  # when set, requests must carry it as a Bearer token
    answer: Callable[[list[dict[str, Any]], int], str] = default_answer
    model: str = "fake-teacher"
    vocab_size: int = 1000
    # log-probability of the sampled token at (word, position, sample): lets a test make one sample "best"
    logprob: Callable[[str, int, int], float] = lambda word, pos, sample: -0.1
    # vLLM's prompt_logprobs of a token-id prompt for top-k: one entry per token, None first
    prompt_logprobs: Callable[[list[int], int], list[dict[str, Any] | None]] | None = None
    model_root: str | None = None  # reported as the served model's "root" (vLLM: the directory it loaded)


class FakeOpenAI:
    def __init__(self, config: FakeOpenAIConfig | None = None) -> None:
        self.config = config or FakeOpenAIConfig()
        self.rng = random.Random(self.config.seed)
        self.stats: Counter[str] = Counter()
        self.prompts_answered: Counter[str] = Counter()  # by the last user message
        self.auth_headers: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_get("/v1/models", self._models)
            app.router.add_get("/health", self._health)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, key: str) -> int:
        with self._lock:
            return self.stats[key]

    # ------------------------------------------------------------------------------------------ handlers

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        model: dict[str, Any] = {"id": self.config.model, "object": "model"}
        if self.config.model_root:
            model["root"] = self.config.model_root
        return web.json_response({"object": "list", "data": [model]})

    async def _completions(self, request: web.Request) -> web.Response:
        """vLLM's scoring request: token ids in, their prompt_logprobs out (429/500 faults drawn as for chat)."""
        with self._lock:
            self.stats["completions"] += 1
        body = await request.json()
        prompt, k = body.get("prompt"), body.get("prompt_logprobs")
        if self.config.prompt_logprobs is None or not isinstance(k, int):
            return self._error(400, "prompt_logprobs are not supported here", "invalid_request_error")
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return self._error(400, "this fake scores token-id prompts only", "invalid_request_error")
        fault = self._draw()
        if fault in ("429", "500"):
            with self._lock:
                self.stats[fault] += 1
            return self._error(int(fault), "try again", "server_error")
        entries = await asyncio.to_thread(self.config.prompt_logprobs, prompt, k)
        with self._lock:
            self.stats["scored_tokens"] += len(prompt)
        choice = {"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries}
        if body.get("return_token_ids"):
            choice["prompt_token_ids"] = prompt
        return web.json_response({"id": "cmpl-x", "object": "text_completion", "choices": [choice]})

    def _draw(self) -> str | None:
        f = self.config.faults
        with self._lock:
            x = self.rng.random()
        for name, rate in (
            ("429", f.rate_429),
            ("500", f.rate_500),
            ("timeout", f.rate_timeout),
            ("drop", f.rate_drop),
            ("malformed", f.rate_malformed),
        ):
            if x < rate:
                return name
            x -= rate
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.stats["requests"] += 1
            self.auth_headers.append(request.headers.get("Authorization", ""))
        presented = request.headers.get("Authorization", "")
        if self.config.api_key and presented != f"Bearer {self.config.api_key}":
            # Echoes the key it was given, as careless servers do: what the client logs must scrub it.
            key = presented.removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {key}", "invalid_api_key")
        body = await request.json()
        messages = body.get("messages", [])
        fault = self._draw()
        if fault == "429":
            with self._lock:
                self.stats["429"] += 1
            resp = self._error(429, "rate limited", "rate_limit_exceeded")
            resp.headers["Retry-After"] = f"{self.config.faults.retry_after:g}"
            resp.headers["retry-after-ms"] = str(int(self.config.faults.retry_after * 1000))
            return resp
        if fault == "500":
            with self._lock:
                self.stats["500"] += 1
            return self._error(500, "internal error", "server_error")
        if fault == "timeout":
            with self._lock:
                self.stats["timeout"] += 1
            await asyncio.sleep(self.config.faults.timeout_sleep)
            return self._error(504, "too slow", "timeout")
        if fault == "drop":
            with self._lock:
                self.stats["drop"] += 1
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise ConnectionResetError("dropped by the fake server")
        if any(TOO_LONG_MARKER in str(m.get("content", "")) for m in messages):
            with self._lock:
                self.stats["400"] += 1
            return self._error(
                400, "This model's maximum context length is 8 tokens", "context_length_exceeded"
            )
        delay = self.config.latency(self.rng)
        if delay > 0:
            await asyncio.sleep(delay)
        if fault == "malformed":
            with self._lock:
                self.stats["malformed"] += 1
            return web.Response(status=200, text='{"id": "x", "choices": [', content_type="application/json")

        n = int(body.get("n") or 1)
        answers = [self.config.answer(messages, i) for i in range(n)]
        last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        with self._lock:
            self.stats["ok"] += 1
            self.prompts_answered[str(last)] += 1
        if body.get("stream"):
            return await self._stream(request, body, answers[0])
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages) + 3
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": a},
                "finish_reason": "stop",
                "logprobs": self._logprobs(body, a, i) if body.get("logprobs") else None,
            }
            for i, a in enumerate(answers)
        ]
        completion_tokens = sum(len(a.split()) for a in answers)
        return web.json_response(
            {
                "id": f"chatcmpl-{self.stats['requests']}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.config.model),
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )

    def _token_id(self, token: str) -> int:
        return int(hashlib.sha256(token.encode()).hexdigest(), 16) % self.config.vocab_size

    def _logprobs(self, body: dict[str, Any], answer: str, sample: int = 0) -> dict[str, Any]:
        k = int(body.get("top_logprobs") or 0)
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        content = []
        for pos, word in enumerate(answer.split()):
            tid = self._token_id(word)
            name = f"token_id:{tid}" if as_ids else word
            lp = self.config.logprob(word, pos, sample)
            alts = [{"token": name, "logprob": lp, "bytes": list(word.encode())}]
            for j in range(1, k):
                alt = (tid + j * 7 + pos) % self.config.vocab_size
                alts.append(
                    {
                        "token": f"token_id:{alt}" if as_ids else f"alt{alt}",
                        "logprob": -1.0 - j,
                        "bytes": None,
                    }
                )
            content.append(
                {"token": name, "logprob": lp, "bytes": list(word.encode()), "top_logprobs": alts[:k]}
            )
        return {"content": content}

    async def _stream(self, request: web.Request, body: dict[str, Any], answer: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = answer.split()
        first = time.monotonic()
        for i, word in enumerate(words):
            chunk = {
                "id": "chatcmpl-stream",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", self.config.model),
                "choices": [
                    {"index": 0, "delta": {"content": ("" if i == 0 else " ") + word}, "finish_reason": None}
                ],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.config.token_delay:
                # Paced against the clock, not sleep after sleep: a late wake-up does not add up over tokens.
                await asyncio.sleep(max(0.0, first + (i + 1) * self.config.token_delay - time.monotonic()))
        final: dict[str, Any] = {
            "id": "chatcmpl-stream",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", self.config.model),
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        await resp.write(f"data: {json.dumps(final)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            # As OpenAI does: the usage comes last, in a chunk of its own with no choices.
            usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
            tail = {**final, "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(tail)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @staticmethod
    def _error(status: int, message: str, code: str) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error" if status == 400 else "error",
                    "code": code,
                }
            },
            status=status,
        )


# ---------------------------------------------------------------------------------------------- own process


def fixed_answer(words: int) -> Callable[[list[dict[str, Any]], int], str]:
    text = " ".join(f"w{i}" for i in range(words))
    return lambda messages, sample: text


@contextlib.contextmanager
def fake_openai_process(
    delays: Sequence[float] = (), token_delay: float = 0.0, words: int | None = None
) -> Iterator[str]:
    """The fake server in a process of its own (no GIL shared with the client under test, as a real
    server would be); yields its base URL. ``delays``: the known latency distribution
    (:func:`sequence_latency`); ``words``: a fixed answer of that many words."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    spec = json.dumps({"delays": list(delays), "tokenDelay": token_delay, "words": words})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.servers.fake_openai", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=env,
    )
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port:
            raise RuntimeError("the fake OpenAI server process did not start")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # its cue to stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _main(spec_json: str) -> None:
    import sys

    spec = json.loads(spec_json)
    config = FakeOpenAIConfig(token_delay=float(spec.get("tokenDelay") or 0.0))
    if spec.get("delays"):
        config.latency = sequence_latency(spec["delays"])
    if spec.get("words"):
        config.answer = fixed_answer(int(spec["words"]))
    with FakeOpenAI(config) as server:
        print(server.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    import sys

    _main(sys.argv[1])
