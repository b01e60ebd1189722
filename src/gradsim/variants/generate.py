"""Text generation backends for building the variant datasets, and the degenerate-output check.

Two backends share one call, ``generate(conversations, params, seeds) -> [Generation]``:
- ``LocalBackend``: a transformers causal LM, batched with left padding, greedy or sampled;
- ``OpenAIBackend``: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp servers), with
  retries, exponential backoff and a request-rate limit.
Both apply the model's own chat template (the server applies it for the openai backend).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
import zlib
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
from typing import Optional

import torch

from gradsim.core.model import LoadedModel
from gradsim.credentials import redact
from gradsim.errors import GradsimError

log = logging.getLogger("gradsim")

Message = dict[str, str]


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (hit max_new_tokens)


class LocalBackend:
    """Batched generation with a transformers model. Left padding keeps every prompt flush against its
    first generated token, which right padding would break for decoder-only models."""

    name = "local"

    def __init__(self, lm: LoadedModel, batch_size: int = 8):
        self.lm = lm
        self.batch_size = batch_size
        self.tokenizer = copy.deepcopy(lm.tokenizer)  # the shared tokenizer pads right for gradients
        self.tokenizer.padding_side = "left"

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": self.lm.model_id,
            "model_revision": self.lm.revision,
            "chat_template_sha256": self.lm.chat_template_sha256,
            "batch_size": self.batch_size,
        }

    def generate(self, conversations: list[list[Message]], params: GenParams, seeds: list[int]) -> list[Generation]:
        out: list[Generation] = []
        for b in range(0, len(conversations), self.batch_size):
            out += self._batch(conversations[b : b + self.batch_size], params, seeds[b])
        return out

    def _render(self, conversation: list[Message]) -> str:
        try:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates (Gemma's, for one) reject a system turn: fold it into the user message.
            if conversation[0]["role"] != "system":
                raise
            system, user = conversation[0]["content"], conversation[1]
            merged = [{"role": "user", "content": f"{system}\n\n{user['content']}"}] + conversation[2:]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def _batch(self, conversations: list[list[Message]], params: GenParams, seed: int) -> list[Generation]:
        tok = self.tokenizer
        # Rendered exactly as gradsim.data.encode renders a prompt, so a generated answer is scored under the
        # same context it was produced in.
        texts = [self._render(c) for c in conversations]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.lm.device)
        sampled = params.temperature > 0
        kwargs = dict(
            do_sample=sampled,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if sampled:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed)
        ids = self.lm.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
        gens = []
        for row in ids:
            row = row.tolist()
            stopped = tok.eos_token_id in row
            if stopped:
                row = row[: row.index(tok.eos_token_id)]
            gens.append(Generation(tok.decode(row, skip_special_tokens=True).strip(), "stop" if stopped else "length"))
        return gens


class RateLimiter:
    """At most ``rate`` request starts per second (0: unlimited)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.interval


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY).

    Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; other 4xx (a prompt
    over the context, a bad model name) mean the request itself is wrong, so they fail at once."""

    name = "openai"

    def __init__(
        self,
        model: str,
        rate_limit: float = 0.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 120.0,
        batch_size: int = 8,
    ):
        import openai

        self.base_url = os.environ.get("OPENAI_BASE_URL", "").strip() or None
        api_key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not api_key:
            if self.base_url is None:
                raise GradsimError(
                    "the openai backend needs OPENAI_API_KEY (and OPENAI_BASE_URL for a self-hosted "
                    "server such as vLLM or llama.cpp): set them in the environment or .env"
                )
            api_key = "not-needed"  # local servers accept any key, but the client insists on one
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.batch_size = batch_size
        self.limiter = RateLimiter(rate_limit)
        self.rate_limit = rate_limit
        # Retries are ours (they must see every error kind and honour the rate limit), not the client's.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout)
        self._openai = openai

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": self.model,
            "base_url": redact(self.base_url or "https://api.openai.com/v1"),
            "rate_limit": self.rate_limit,
            "max_retries": self.max_retries,
        }

    def generate(self, conversations: list[list[Message]], params: GenParams, seeds: list[int]) -> list[Generation]:
        return [self._one(c, params, s) for c, s in zip(conversations, seeds)]

    def _retryable(self, e: Exception) -> bool:
        o = self._openai
        if isinstance(e, o.APIConnectionError):  # includes APITimeoutError
            return True
        if isinstance(e, o.APIStatusError):
            return e.status_code == 429 or e.status_code >= 500
        return False

    def _one(self, messages: list[Message], params: GenParams, seed: int) -> Generation:
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            try:
                resp = self.client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=params.max_new_tokens,
                    seed=seed,
                )
            except Exception as e:
                if not isinstance(e, self._openai.OpenAIError):
                    raise
                msg = redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                where = redact(self.base_url or "the OpenAI API")
                if not self._retryable(e):
                    raise GradsimError(
                        f"the endpoint {where} rejected a request ({msg}): check the model name "
                        "and --max-new-tokens against the server's context"
                    ) from None
                if attempt == self.max_retries:
                    raise GradsimError(
                        f"no answer from {where} after {attempt + 1} attempts ({msg}): check that the "
                        "server is running and OPENAI_BASE_URL; rerun to resume"
                    ) from None
                delay = min(self.backoff * 2**attempt, 60.0)
                log.warning("request failed (%s); retry %d/%d in %.1f s", msg, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
                continue
            choice = resp.choices[0]
            return Generation((choice.message.content or "").strip(), choice.finish_reason or "stop")
        raise AssertionError("unreachable")


# --- degenerate outputs -------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _WS.sub(" ", text).strip().casefold()


def copied_fraction(output: str, source: str) -> float:
    """Share of ``output`` (whitespace and case normalised) made of runs of 8+ characters taken from ``source``."""
    out, src = _norm(output), _norm(source)
    if not out:
        return 0.0
    blocks = SequenceMatcher(None, out, src, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= 8) / len(out)


def degenerate_reason(output: str, source: str, partial_copies: bool = True) -> Optional[str]:
    """Why ``output`` (generated from ``source``) is unusable as a variant, or None if it is fine.

    - empty: nothing but whitespace;
    - unchanged copy: at least 90% of the output is copied text from the source. With
      ``partial_copies`` (paraphrases) a copied fragment counts too, since a paraphraser cut off at
      max_new_tokens often echoes the start of its input; without it (answers) the copy must also be
      at least half as long as the source, since answers legitimately quote parts of their prompt
      (extraction, translation);
    - runaway repetition: a loop of the same words or characters, the usual failure of greedy decoding
      in small models (most word 4-grams repeated, or text that compresses far better than prose).
    """
    if not output.strip():
        return "empty"
    if copied_fraction(output, source) >= 0.9 and (partial_copies or len(_norm(output)) >= 0.5 * len(_norm(source))):
        return "unchanged copy"
    words = output.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    if len(grams) >= 20 and len(set(grams)) / len(grams) < 0.5:
        return "runaway repetition"
    raw = output.encode()
    if len(raw) >= 200 and len(zlib.compress(raw, 9)) / len(raw) < 0.12:
        return "runaway repetition"
    return None
