"""Batched decoding for the stage-2 models (`Blip2DecoderOnly`, `Blip2T5`): greedy, beam search, nucleus sampling.

`generate(model, params, pixel_values, input_ids, attention_mask, *, max_new_tokens, ...)` returns the
new tokens `[B, max_new_tokens]` (int32; T5 without its decoder start token; after a row's first EOS
the values are `pad_token_id`). Greedy and beam search follow Hugging Face transformers 5.x `generate`
token for token:

- logits processors in HF's order: repetition penalty (every id HF has in its sequence: for a
  decoder-only LLM (OPT, LLaMA, ...) the image placeholder id, the prompt where its mask has started,
  and the generated ids; for T5 the decoder start id and the generated ids), then the min-new-tokens
  EOS mask; with sampling, temperature, top-k, then top-p (HF's `TopKLogitsWarper` and
  `TopPLogitsWarper`, keeping at least 1 token, or `n_eos + 1` in beam sampling);
- greedy runs on the raw logits, beam search on log-softmax scores;
- beam search is HF's static-shape `_beam_search`: `max(2, 1 + n_eos) * num_beams` candidates a step,
  finished hypotheses scored `sum_logprobs / generated_len ** length_penalty` (the generated length
  counts the EOS and excludes the prompt, as `cur_len + 1 - decoder_prompt_len` in 5.x), and the
  `early_stopping=False` heuristic that stops a row once its best running beam can no longer beat the
  worst kept hypothesis at the current length.

Two `jax.jit` programs: the visual prompt (ViT, Q-Former, projection; compiled once per image batch
shape), then the decoder: a prefill pass through the LLM with a fixed-size key/value cache and a
`lax.while_loop` of one-token steps that ends when every row is done. The decoder compiles once per
(model, batch shape, prompt length, max_new_tokens, num_beams, number of EOS ids, which processors are
on, top_k); the EOS and pad ids and the float knobs (penalties, temperature, top_p, length penalty)
are traced values and do not recompile.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from blip2_jax.models import t5
from blip2_jax.models.blip2 import Blip2DecoderOnly, Blip2T5
from blip2_jax.models.layers import map_batch, take_batch_rows
from blip2_jax.models.opt import OPTConfig

NEG = -1.0e9  # HF's "impossible" score in beam search (added, not assigned, so it stays float32-exact)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What changes the program's structure (one compilation per distinct value)."""

    max_new_tokens: int
    num_beams: int
    do_sample: bool
    n_eos: int  # the EOS ids themselves and the pad id are traced (`knobs`)
    use_repetition_penalty: bool
    use_min_new_tokens: bool
    use_top_p: bool
    top_k: int  # 0 = off; static: `lax.top_k` needs a static k
    use_temperature: bool


# ---------------------------------------------------------------------------------------------------------
# The language-model side: prefill and one-token step, for a decoder-only LLM and for T5.
# ---------------------------------------------------------------------------------------------------------
def _visual_prompt(model, params, pixel_values, qformer_input_ids, qformer_attention_mask):
    """Projected query outputs `[B, Q, D_llm]`: compiled apart, once per image batch shape (and InstructBLIP
    instruction length), for all settings."""
    return model.apply({"params": params}, pixel_values, qformer_input_ids, qformer_attention_mask,
                       method=lambda m, px, q_ids, q_mask: m.visual_prompt(px, True, q_ids, q_mask))


_compiled_visual_prompt = jax.jit(_visual_prompt, static_argnums=0)


def _prefill_decoder_only(model, params, prompt, input_ids, mask, max_new_tokens):
    """[visual prompt; text] through the decoder-only LLM once: `(last logits [B, V], cache, step_fn)`."""
    variables = {"params": params}

    def run(m, prompt, ids, msk):
        embeds, full_mask = m.prompt_inputs(prompt, ids, msk)
        cache = m.init_cache(ids.shape[0], embeds.shape[1] + max_new_tokens)
        return m.language_model(embeds, full_mask, cache=cache, logits_to_keep=1)

    logits, cache = model.apply(variables, prompt, input_ids, mask, method=run)

    def step(tokens, cache):
        ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
        lg, cache = model.apply(variables, method=lambda m: m.language_model(
            attention_mask=ones, input_ids=tokens[:, None], cache=cache))
        return lg[:, -1], cache

    return logits[:, -1], cache, step


def _prefill_t5(model, params, prompt, input_ids, mask, max_new_tokens):
    """Encoder over [visual prompt; text], then the decoder start token: `(logits [B, V], cache, step_fn)`."""
    variables = {"params": params}
    text = model.config.text
    start = jnp.full((input_ids.shape[0], 1), text.decoder_start_token_id, jnp.int32)

    def run(m, prompt, ids, msk):
        embeds, enc_mask = m.prompt_inputs(prompt, ids, msk)
        encoded = m.language_model.encode(embeds, enc_mask)
        cache = t5.init_cache(text, ids.shape[0], max_new_tokens + 1)
        return m.language_model.decode(start, encoded, enc_mask, cache=cache)

    logits, cache = model.apply(variables, prompt, input_ids, mask, method=run)

    def step(tokens, cache):
        lg, cache = model.apply(variables, method=lambda m: m.language_model.decode(
            tokens[:, None], None, None, cache=cache))
        return lg[:, -1], cache

    return logits[:, -1], cache, step


# ---------------------------------------------------------------------------------------------------------
# Logits processing (HF's processors, same order and float32 arithmetic).
# ---------------------------------------------------------------------------------------------------------
def _initial_seen(model, input_ids, mask, vocab: int) -> jax.Array:
    """`[B, V]` bool: the ids HF's repetition penalty counts before anything is generated."""
    b = input_ids.shape[0]
    seen = jnp.zeros((b, vocab + 1), bool)  # column `vocab` absorbs ids outside the head (HF clamps)
    if isinstance(model, Blip2T5):
        return seen.at[:, model.config.text.decoder_start_token_id].set(True)[:, :vocab]
    image_id = model.config.image_token_index
    if image_id is not None:
        seen = seen.at[:, min(image_id, vocab)].set(True)
    # HF ignores only the leading padding (`prompt_ignore_length`): positions from the first 1 on count.
    counted = jnp.cumsum(mask, axis=1) > 0
    ids = jnp.where(counted, jnp.minimum(input_ids, vocab), vocab)
    seen = seen.at[jnp.arange(b)[:, None], ids].set(True)
    return seen[:, :vocab]


def _mark_seen(seen, tokens):
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)


def _top_p_mask(scores, top_p, min_keep: int):
    """HF `TopPLogitsWarper`: drop the low tail whose total probability is at most `1 - top_p`."""
    order = jnp.argsort(scores, axis=-1)  # ascending
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted = remove_sorted.at[..., -min_keep:].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(scores.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


def _top_k_mask(scores, top_k: int, min_keep: int):
    """HF `TopKLogitsWarper`: keep the `max(top_k, min_keep)` highest scores (ties with the k-th kept)."""
    k = min(max(top_k, min_keep), scores.shape[-1])
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return jnp.where(scores < kth, -jnp.inf, scores)


def _process(st: _Static, knobs: dict, scores, seen, t):
    """All processors for new-token index `t` on `scores [N, V]` (float32)."""
    if st.use_repetition_penalty:
        p = knobs["repetition_penalty"]
        scores = jnp.where(seen, jnp.where(scores < 0, scores * p, scores / p), scores)
    if st.use_min_new_tokens:
        is_eos = jnp.isin(jnp.arange(scores.shape[-1]), knobs["eos"])
        scores = jnp.where(is_eos & (t < knobs["min_new_tokens"]), -jnp.inf, scores)
    if st.do_sample:
        if st.use_temperature:
            scores = scores / knobs["temperature"]
        # HF keeps one token more than the EOS ids in beam sampling (a continuation to explore).
        min_keep = st.n_eos + 1 if st.num_beams > 1 else 1
        if st.top_k:
            scores = _top_k_mask(scores, st.top_k, min_keep)
        if st.use_top_p:
            scores = _top_p_mask(scores, knobs["top_p"], min_keep)
    return scores


# ---------------------------------------------------------------------------------------------------------
# Greedy / sampling.
# ---------------------------------------------------------------------------------------------------------
def _greedy(st: _Static, knobs, logits, cache, step, seen, rng):
    b, n = logits.shape[0], st.max_new_tokens
    eos, pad = knobs["eos"], knobs["pad"]

    def select(state, logits):
        t, out, done, seen, cache = state
        scores = _process(st, knobs, logits, seen, t)
        if st.do_sample:
            tok = jax.random.categorical(jax.random.fold_in(rng, t), scores, axis=-1)
        else:
            tok = jnp.argmax(scores, axis=-1)
        tok = jnp.where(done, pad, tok).astype(jnp.int32)
        out = out.at[:, t].set(tok)
        done = done | jnp.isin(tok, eos)
        if st.use_repetition_penalty:
            seen = _mark_seen(seen, tok)
        return (t + 1, out, done, seen, cache)

    def cond(state):
        t, _, done, _, _ = state
        return (t < n) & ~jnp.all(done)

    def body(state):
        t, out, done, seen, cache = state
        logits, cache = step(out[:, t - 1], cache)
        return select((t, out, done, seen, cache), logits)

    state = (jnp.int32(0), jnp.full((b, n), pad, jnp.int32), jnp.zeros((b,), bool), seen, cache)
    state = select(state, logits)
    return jax.lax.while_loop(cond, body, state)[1]


# ---------------------------------------------------------------------------------------------------------
# Beam search (HF 5.x `_beam_search`, vectorised with static shapes exactly as HF does it).
# ---------------------------------------------------------------------------------------------------------
def _gather(x, idx):
    """`x [B, M, ...]` rows `idx [B, k]` along axis 1."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


class _Beams(NamedTuple):
    """The beam search's loop state (B batch rows, k beams, n new tokens, keep = candidates per step)."""

    t: jax.Array            # int32 []: index of the token being chosen
    run_seq: jax.Array      # int32 [B, k, n]: the running hypotheses
    run_scores: jax.Array   # float32 [B, k]: their summed log-probabilities
    seqs: jax.Array         # int32 [B, k, n]: the kept (finished) hypotheses
    scores: jax.Array       # float32 [B, k]: their length-normalised scores
    finished: jax.Array     # bool [B, k]: which kept slots hold a finished hypothesis
    unsatisfied: jax.Array  # bool [B, 1]: a running hypothesis may still beat the worst kept one
    hits: jax.Array         # bool [B, keep]: which of this step's candidates stopped
    seen: Any               # bool [B * k, V] token sets for the repetition penalty, or None
    cache: Any              # the LLM's KV cache, rows = B * k


def _beam_search(st: _Static, knobs, logits, cache, step, seen, rng):
    k, n = st.num_beams, st.max_new_tokens
    b, vocab = logits.shape
    keep = max(2, 1 + st.n_eos) * k
    eos = knobs["eos"]
    denoms = knobs["length_denominators"]  # [n]: float32((t + 1) ** length_penalty), computed on the host
    expand = lambda x, axis=0: jnp.repeat(x, k, axis=axis)  # noqa: E731
    cache = map_batch(expand, cache)  # the batch axis of a scanned decoder's stacked cache is 1
    logits = expand(logits)
    seen = None if seen is None else expand(seen)

    def select(state: _Beams, logits) -> _Beams:
        t, run_seq, run_scores, seqs, scores, finished, unsatisfied, _, seen, cache = state
        logp = _process(st, knobs, jax.nn.log_softmax(logits, axis=-1), seen, t)
        logp = (logp.reshape(b, k, vocab) + run_scores[:, :, None]).reshape(b, k * vocab)
        if st.do_sample:  # k draws without replacement in proportion to softmax(logp): Gumbel top-k
            gumbel = jax.random.gumbel(jax.random.fold_in(rng, t), logp.shape)
            idx = jax.lax.top_k(logp + gumbel, keep)[1]
            top_lp = jnp.take_along_axis(logp, idx, axis=1)
            order = jnp.argsort(-top_lp, axis=1)
            top_lp, idx = jnp.take_along_axis(top_lp, order, 1), jnp.take_along_axis(idx, order, 1)
        else:
            top_lp, idx = jax.lax.top_k(logp, keep)
        src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        cand = _gather(run_seq, src).at[:, :, t].set(tok)
        hits = jnp.isin(tok, eos) | (t + 1 >= n)

        # e. the best `k` candidates that did not stop keep running.
        run_lp = top_lp + hits.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_lp, k)[1]
        run_seq, run_scores, run_src = _gather(cand, nxt), _gather(run_lp, nxt), _gather(src, nxt)

        # f. stopped candidates among the top `k` may enter the kept hypotheses.
        just = hits & (jnp.arange(keep) < k)[None]
        fin_lp = top_lp / denoms[t]
        fin_lp = fin_lp + (~unsatisfied).astype(jnp.float32) * NEG
        fin_lp = fin_lp + (~just).astype(jnp.float32) * NEG
        top = jax.lax.top_k(jnp.concatenate([scores, fin_lp], 1), k)[1]
        seqs = _gather(jnp.concatenate([seqs, cand], 1), top)
        scores = _gather(jnp.concatenate([scores, fin_lp], 1), top)
        finished = _gather(jnp.concatenate([finished, just], 1), top)

        # g. the running rows' caches and seen-sets follow their source beams.
        rows = (run_src + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = take_batch_rows(cache, rows)  # the LLM modules' reorder_cache
        if st.use_repetition_penalty:
            seen = _mark_seen(jnp.take(seen, rows, axis=0), run_seq[:, :, t].reshape(-1))
        best_running = run_scores[:, :1] / denoms[t]
        worst_kept = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        unsatisfied = unsatisfied & jnp.any(best_running > worst_kept, axis=-1, keepdims=True)
        return _Beams(t + 1, run_seq, run_scores, seqs, scores, finished, unsatisfied, hits, seen, cache)

    def cond(state: _Beams):
        return (state.t < n) & jnp.any(state.unsatisfied) & ~jnp.all(state.hits)

    def body(state: _Beams) -> _Beams:
        logits, cache = step(state.run_seq[:, :, state.t - 1].reshape(-1), state.cache)
        return select(state._replace(cache=cache), logits)

    seq0 = jnp.full((b, k, n), knobs["pad"], jnp.int32)
    state = _Beams(t=jnp.int32(0), run_seq=seq0, run_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
                   seqs=seq0, scores=jnp.full((b, k), NEG, jnp.float32), finished=jnp.zeros((b, k), bool),
                   unsatisfied=jnp.ones((b, 1), bool), hits=jnp.zeros((b, keep), bool), seen=seen, cache=cache)
    state = select(state, logits)
    return jax.lax.while_loop(cond, body, state).seqs[:, 0]


# ---------------------------------------------------------------------------------------------------------
# The compiled program and the public function.
# ---------------------------------------------------------------------------------------------------------
def _program(model, st: _Static, params, prompt, input_ids, mask, knobs, rng):
    prefill = _prefill_t5 if isinstance(model, Blip2T5) else _prefill_decoder_only
    logits, cache, step = prefill(model, params, prompt, input_ids, mask, st.max_new_tokens)
    vocab = logits.shape[-1]
    seen = _initial_seen(model, input_ids, mask, vocab) if st.use_repetition_penalty else None
    decode = _beam_search if st.num_beams > 1 else _greedy
    out = decode(st, knobs, logits, cache, step, seen, rng)
    # Padding after each row's first EOS (beam hypotheses carry fill values there).
    is_eos = jnp.isin(out, knobs["eos"])
    after = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    return jnp.where(after, knobs["pad"], out)


_compiled = jax.jit(_program, static_argnums=(0, 1))


def _ids_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple, np.ndarray)) else (int(x),)


def generate(model, params, pixel_values, input_ids=None, attention_mask=None, *, max_new_tokens: int,
             num_beams: int = 1, do_sample: bool = False, top_k: int = 0, top_p: float = 1.0,
             temperature: float = 1.0,
             min_new_tokens: int = 0, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
             eos_token_id: Any = None, pad_token_id: Optional[int] = None,
             rng: Optional[jax.Array] = None, qformer_input_ids=None, qformer_attention_mask=None) -> jax.Array:
    """New token ids `[B, max_new_tokens]` (int32) for images `pixel_values [B, H, W, 3]` (NHWC, normalised).

    `input_ids` / `attention_mask` `[B, T]`: text prompt ids only (no image placeholders); prompts of a
    decoder-only LLM (OPT, LLaMA, ...) left-padded. Without `input_ids`, a decoder-only LLM starts from its
    BOS (as HF does) and T5 encodes the visual prompt alone. `eos_token_id` (an id or several) and
    `pad_token_id` default to the text config's.
    `rng` (a `jax.random.key`/`PRNGKey`) seeds sampling; required when `do_sample`. Sampling applies
    HF's warpers in HF's order: temperature, then `top_k` (0 = off), then `top_p`. Note that HF's
    GenerationConfig samples with top_k=50 unless told otherwise: pass `top_k=50` for HF's default.
    InstructBLIP: `qformer_input_ids` / `qformer_attention_mask` `[B, T_q]`, the instruction in the
    Q-Former's BERT vocabulary (required there, refused by a BLIP-2 model).
    """
    if not isinstance(model, (Blip2DecoderOnly, Blip2T5)):
        raise TypeError(f"generate: model must be Blip2DecoderOnly (e.g. Blip2OPT) or Blip2T5, got {type(model).__name__}")
    text = model.config.text
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"generate: num_beams must be >= 1, got {num_beams}")
    if repetition_penalty <= 0 or temperature <= 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: need repetition_penalty > 0, temperature > 0 and 0 < top_p <= 1, got "
                         f"{repetition_penalty}, {temperature}, {top_p}")
    if top_k < 0:
        raise ValueError(f"generate: top_k must be >= 0 (0 = off), got {top_k}")
    if do_sample and rng is None:
        raise ValueError("generate: do_sample=True needs rng (e.g. jax.random.key(0))")
    eos = _ids_tuple(text.eos_token_id if eos_token_id is None else eos_token_id)
    if not eos:
        raise ValueError("generate: no eos_token_id given and the text config has none")
    pad = text.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos[0]

    pixel_values = jnp.asarray(pixel_values, jnp.float32)
    b = pixel_values.shape[0]
    if input_ids is None:
        if attention_mask is not None:
            raise ValueError("generate: attention_mask given without input_ids")
        if isinstance(model, Blip2DecoderOnly):
            if text.bos_token_id is None:
                raise ValueError("generate: a decoder-only LLM without a prompt starts from BOS, but the text "
                                 "config has none: pass input_ids")
            input_ids = np.full((b, 1), text.bos_token_id, np.int32)
        else:
            input_ids = np.zeros((b, 0), np.int32)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[0] != b:
        raise ValueError(f"generate: input_ids must be [B={b}, T], got shape {input_ids.shape}")
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")

    if isinstance(text, OPTConfig):  # learned positions: no row beyond the table (RoPE has no table)
        total = model.config.num_query_tokens + input_ids.shape[1] + max_new_tokens
        if total > text.max_position_embeddings:
            raise ValueError(f"generate: {model.config.num_query_tokens} queries + {input_ids.shape[1]} prompt + "
                             f"{max_new_tokens} new tokens exceed OPT's max_position_embeddings "
                             f"{text.max_position_embeddings}")

    st = _Static(max_new_tokens=int(max_new_tokens), num_beams=int(num_beams), do_sample=bool(do_sample),
                 n_eos=len(eos), use_repetition_penalty=repetition_penalty != 1.0,
                 use_min_new_tokens=min_new_tokens > 0, use_top_p=do_sample and top_p < 1.0,
                 top_k=int(top_k) if do_sample else 0,
                 use_temperature=do_sample and temperature != 1.0)
    # HF divides float32 scores by the Python float `len ** length_penalty`: the same numbers, host-side.
    denoms = np.arange(1, max_new_tokens + 1, dtype=np.float64) ** float(length_penalty)
    knobs = {"eos": jnp.asarray(eos, jnp.int32), "pad": jnp.int32(pad),
             "repetition_penalty": jnp.float32(repetition_penalty), "min_new_tokens": jnp.int32(min_new_tokens),
             "temperature": jnp.float32(temperature), "top_p": jnp.float32(top_p),
             "length_denominators": jnp.asarray(denoms.astype(np.float32))}
    if rng is None:
        rng = jax.random.PRNGKey(0)  # unused: decoding is deterministic
    elif jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    rng = jnp.asarray(rng, jnp.uint32)
    prompt = _compiled_visual_prompt(model, params, pixel_values, qformer_input_ids, qformer_attention_mask)
    return _compiled(model, st, params, prompt, input_ids, mask, knobs, rng)
