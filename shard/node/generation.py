"""What a front (the gRPC servicer today, an HTTP front tomorrow) asks the coordinator for
and what it gets back: plain values, no wire format. Fronts translate to and from these."""

from __future__ import annotations

from dataclasses import dataclass

from shard.decode.sampling import TokenLogprob
from shard.decode.speculative import DecodeStats


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. The defaults are greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of prompt, chat and prompt_ids. None for spec_k, in_flight or an empty
    draft: the coordinator's default."""

    max_tokens: int
    prompt: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    spec_k: int | None = None
    in_flight: int | None = None
    stop_at_eos: bool = True
    draft: str = ""
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives reported with each token's logprob; None: no logprobs
    receipt: bool = False  # sign a receipt of the run (GenerationResult.receipt)
    receipt_private: bool = False  # the receipt holds hashes of the prompt and output, not their ids


@dataclass(frozen=True)
class TokenDelta:
    """Tokens committed since the previous delta and the text they add."""

    ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per id when the request asked


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation; the last event of its stream."""

    session_id: str
    prompt_ids: list[int]
    text: str
    spec_k: int
    in_flight: int
    stats: DecodeStats
    receipt: str = ""  # the signed receipt (JSON) when the request asked for one
    seed: int | None = None  # the sampler's seed, None when greedy

