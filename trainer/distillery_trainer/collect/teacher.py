"""One teacher request and its answer: the body sent, the call through the official ``openai`` client, and
the OpenAI chat-completions shape parsed into answers, usage and top-k arrays.

The call goes through ``AsyncOpenAI.post`` (the client's documented way to reach an endpoint directly)
and the JSON is parsed here rather than into the client's pydantic models: a white-box answer carries
k alternatives for every token, and building objects for them costs more CPU than the request itself.
The client's own retries are off: :mod:`.verdict` and :mod:`distillery_trainer.retry` decide.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import openai

from ..data.topk import TopK
from .verdict import LogprobsUnsupported, MalformedResponse, Refusal, TokenIdsUnavailable

try:  # the HTTP library the installed openai client is built on
    import httpx2 as _http
except ImportError:  # pragma: no cover - older openai releases
    import httpx as _http  # type: ignore[no-redef]

TOKEN_ID_PREFIX = "token_id:"


@dataclass(frozen=True)
class RequestSpec:
    """Everything that shapes an answer besides the messages (and so keys the cache with them)."""

    model: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    token_ids: bool = False  # vLLM's return_tokens_as_token_ids: tokens come back as "token_id:<id>"

    def body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        if self.n > 1:
            body["n"] = self.n
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = self.top_logprobs
            if self.token_ids:
                body["return_tokens_as_token_ids"] = True
        return body

    def estimated_tokens(self, messages: list[dict[str, Any]]) -> int:
        """What the request counts against a tokens-per-minute limit before its usage is known."""
        chars = sum(
            len(m["content"]) if isinstance(m["content"], str) else len(json.dumps(m["content"]))
            for m in messages
        )
        return chars // 4 + 8 * len(messages) + self.max_tokens * self.n


def wants_token_ids(base_url: str) -> bool:
    """vLLM (and most self-hosted servers) accept return_tokens_as_token_ids; OpenAI and Azure reject it."""
    host = urlparse(base_url).hostname or ""
    return not (host.endswith("openai.com") or host.endswith("azure.com"))


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class Choice:
    text: str
    finish_reason: str
    mean_logprob: float | None = None
    topk: TopK | None = None
    tokens: int | None = None  # answer length in tokens, when logprobs tell


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unmapped_tokens: int = 0  # tokens returned as text that the tokenizer could not map (white-box only)
    meta: dict[str, Any] = field(default_factory=dict)


class TokenIds:
    """Token → id: vLLM's ``token_id:<id>`` directly; tokens returned as text through the teacher's
    tokenizer (the token's ``bytes`` in byte-level BPE form, or SentencePiece's ``▁``); -1 when unknown."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.vocab: dict[str, int] | None = tokenizer.get_vocab() if tokenizer is not None else None
        self._byte_map = _bytes_to_unicode()

    def __call__(self, entry: dict[str, Any]) -> int:
        token = str(entry.get("token", ""))
        if token.startswith(TOKEN_ID_PREFIX):
            try:
                return int(token[len(TOKEN_ID_PREFIX) :])
            except ValueError:
                raise MalformedResponse(f"bad token id {token!r}") from None
        if self.vocab is None:
            raise TokenIdsUnavailable(
                "the endpoint returns tokens as text and the teacher's tokenizer is not loaded: serve the "
                "teacher with vLLM (tokens as ids) or pass --tokenizer NAME_OR_DIR"
            )
        candidates = [token]
        raw = entry.get("bytes")
        if raw:
            candidates.append("".join(self._byte_map[b] for b in bytes(raw)))
        candidates.append(token.replace(" ", "\u2581"))
        for c in candidates:
            tid = self.vocab.get(c)
            if tid is not None:
                return tid
        return -1


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map that byte-level BPE vocabularies are written in."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def parse_completion(data: Any, *, top_k: int | None, token_ids: TokenIds | None = None) -> Completion:
    """A chat-completions JSON body → :class:`Completion`. ``top_k`` set: build top-k arrays (needs
    ``token_ids``); the mean logprob of each answer is taken whenever logprobs are present."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise MalformedResponse("no choices in the response")
    choices: list[Choice] = []
    unmapped = 0
    for raw in sorted(data["choices"], key=lambda c: int(c.get("index", 0))):
        message = raw.get("message") or {}
        text = message.get("content")
        if text is None:
            if message.get("refusal"):
                raise Refusal(f"the teacher refused: {message['refusal']}")
            raise MalformedResponse("a choice without message.content")
        choice = Choice(text=str(text), finish_reason=str(raw.get("finish_reason") or "unknown"))
        content = (raw.get("logprobs") or {}).get("content")
        if content is not None:
            choice.tokens = len(content)
            lps = [float(t["logprob"]) for t in content]
            choice.mean_logprob = sum(lps) / len(lps) if lps else 0.0
            if top_k:
                if token_ids is None:
                    raise ValueError("top-k parsing needs a TokenIds mapper")
                tokens = [token_ids(t) for t in content]
                alts = [
                    [(token_ids(a), float(a["logprob"])) for a in (t.get("top_logprobs") or [])]
                    for t in content
                ]
                unmapped += sum(1 for t in tokens if t < 0)
                choice.topk = TopK.from_lists(tokens, alts, top_k)
        elif top_k:
            raise LogprobsUnsupported(
                "logprobs were asked for and the endpoint answered without them: use an endpoint that returns "
                "logprobs (vLLM, OpenAI chat models) or unset teacher.logprobs"
            )
        choices.append(choice)
    usage = data.get("usage") or {}
    completion_tokens = usage.get("completion_tokens")
    if completion_tokens is None:
        completion_tokens = sum(c.tokens or 0 for c in choices)
    return Completion(
        choices=choices,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(completion_tokens),
        unmapped_tokens=unmapped,
    )


# ---------------------------------------------------------------------------------------------- the client


def http_client(concurrency: int, timeout: float) -> Any:
    """The client's aiohttp transport (``openai[aiohttp]``) when installed: it spends half the CPU per
    request of the default httpx one, which is what bounds a collector at high concurrency."""
    limits = _http.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        import aiohttp  # noqa: F401

        return openai.DefaultAioHttpClient(limits=limits, timeout=timeout)
    except (ImportError, RuntimeError):
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)


class Teacher:
    """The official async client, one connection per request in flight, no client-side retries."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float, concurrency: int) -> None:
        self.base_url = base_url
        self.client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=timeout,
            http_client=http_client(concurrency, timeout),
        )

    async def complete(self, body: dict[str, Any]) -> Any:
        response = await self.client.post("/chat/completions", body=body, cast_to=_http.Response)
        try:
            return json.loads(response.content)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedResponse(f"body is not JSON ({exc})") from None

    async def models(self) -> Sequence[dict[str, Any]]:
        """``GET /models``: vLLM lists each served model with ``root``, the path or id it loaded."""
        response = await self.client.get("/models", cast_to=_http.Response)
        data = json.loads(response.content)
        return [m for m in data.get("data", []) if isinstance(m, dict)]

    async def close(self) -> None:
        await self.client.close()
