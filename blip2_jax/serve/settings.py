"""What a server compiles and what it accepts: the shape buckets, the static decoding settings and the
input limits (plain Python; no jax).

A request is padded up to the smallest bucket that holds it: its batch (the requests served together)
to one of `batch_sizes`, its prompt to one of `prompt_lens` tokens. Every bucket is compiled before the
server reports ready, so no request compiles anything.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

VQA_PROMPT = "Question: {} Short answer:"  # LAVIS's zero-shot VQA prompt


@dataclasses.dataclass(frozen=True)
class Settings:
    """Server-wide settings (the CLI's flags). Tuples are bucket sets; see `buckets`."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)  # batch buckets; the largest is the max batch
    prompt_lens: tuple[int, ...] = (16, 32)      # generation prompt buckets (tokens, special tokens included)
    num_beams: tuple[int, ...] = (5, 1)          # compiled beam counts; the first is a request's default
    max_new_tokens: tuple[int, ...] = (30,)      # compiled token budgets; the largest is a request's default
    repetition_penalty: float = 1.0              # static: 1.0 and any other value compile different programs
    text_len: int = 35                           # retrieval text length (LAVIS max_length), one bucket
    max_wait_ms: float = 10.0                    # how long the oldest queued request waits for company
    queue_size: int = 64                         # queued requests beyond which a request is answered 503 busy
    max_body_bytes: int = 20 * 2**20             # request body limit (413 above)
    max_image_pixels: int = 4096 * 4096          # decoded image limit, width * height (413 above)
    max_prompt_chars: int = 2000                 # text limit before tokenising (400 above)
    vqa_prompt: str = VQA_PROMPT

    def __post_init__(self):
        for name in ("batch_sizes", "prompt_lens", "num_beams", "max_new_tokens"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has repeated values: {values!r}")
        if self.text_len < 3 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise ValueError(f"need text_len >= 3, queue_size >= 1, max_wait_ms >= 0; got {self.text_len}, "
                             f"{self.queue_size}, {self.max_wait_ms}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if "{}" not in self.vqa_prompt:
            raise ValueError(f"vqa_prompt must hold '{{}}' for the question, got {self.vqa_prompt!r}")

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)


def batch_sizes_up_to(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch` itself: (1, 2, 4, 8) for 8, (1, 2, 4, 6) for 6."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) < max_batch]
    return tuple(sizes + [max_batch])


def bucket(value: int, sizes: Sequence[int]) -> Optional[int]:
    """The smallest of `sizes` that is >= `value` (None when none is)."""
    fits = [s for s in sizes if s >= value]
    return min(fits) if fits else None


def int_list(text: str, flag: str) -> tuple[int, ...]:
    """`"1,5"` -> (1, 5), order kept; a ValueError naming `flag` otherwise."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag}={text}: expected comma-separated integers, e.g. 1,5") from None
    return values
