"""`python -m blip2_jax.serve --model=PATH [--host 127.0.0.1] [--port 8000] [--max_batch 8] ...`

Loads the model (a Hugging Face BLIP-2 directory or a workdir of this project), starts listening at
once, compiles every bucket (GET /health answers 503 until then, 200 after), and serves until SIGINT or
SIGTERM (a graceful shutdown: requests in progress are answered first). Prints
`blip2_jax.serve: listening on http://HOST:PORT` on stdout once the port is bound. Exit status: 0 after
SIGINT or SIGTERM, 1 when the warm-up failed, 2 for bad flags or a model that cannot be loaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from blip2_jax import checkpoint, compilation_cache
from blip2_jax.serve import settings as settings_lib
from blip2_jax.serve.app import Service, bind, url_of, uvicorn_server
from blip2_jax.serve.engine import load_engine
from blip2_jax.spec import model as spec

log = logging.getLogger("blip2_jax.serve")


def parser() -> argparse.ArgumentParser:
    d = settings_lib.Settings()
    p = argparse.ArgumentParser(prog="python -m blip2_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face BLIP-2 directory or a workdir of this project")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the model's)")
    p.add_argument("--frozen_dtype", choices=spec.FROZEN_DTYPES, default="",
                   help="dtype of the frozen ViT and LLM (int8: weight-only int8 storage, bfloat16 compute; "
                        "default: float32 for a directory, the run's for a workdir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    p.add_argument("--max_batch", type=int, default=d.max_batch, help="largest batch (requests per model call)")
    p.add_argument("--batch_sizes", default="", help="batch buckets, e.g. 1,4,8 (default: powers of two up to "
                                                     "--max_batch, and it)")
    p.add_argument("--max_wait_ms", type=float, default=d.max_wait_ms,
                   help="how long a request waits for others to batch with")
    p.add_argument("--queue_size", type=int, default=d.queue_size, help="queued requests before answering 503 busy")
    p.add_argument("--prompt_lens", default=",".join(map(str, d.prompt_lens)), help="prompt buckets (tokens)")
    p.add_argument("--num_beams", default=",".join(map(str, d.num_beams)),
                   help="compiled beam counts; the first is a request's default")
    p.add_argument("--max_new_tokens", default=",".join(map(str, d.max_new_tokens)),
                   help="compiled token budgets; a request may ask for fewer (greedy) or one of them (beams)")
    p.add_argument("--repetition_penalty", type=float, default=d.repetition_penalty, help="static, for all requests")
    p.add_argument("--text_len", type=int, default=d.text_len, help="retrieval text length (tokens)")
    p.add_argument("--vqa_prompt", default=d.vqa_prompt)
    p.add_argument("--max_body_mb", type=float, default=d.max_body_bytes / 2**20)
    p.add_argument("--max_image_pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--compilation_cache", default=None,
                   help="persistent XLA cache directory: a restart loads its buckets instead of compiling them "
                        f"(default: $BLIP2_JAX_COMPILATION_CACHE or {compilation_cache.DEFAULT_DIRECTORY}; empty = off)")
    return p


def settings_from(args: argparse.Namespace) -> settings_lib.Settings:
    """The `Settings` the flags describe (ValueError naming the flag when they do not make sense)."""
    batch_sizes = (settings_lib.int_list(args.batch_sizes, "--batch_sizes") if args.batch_sizes
                   else settings_lib.batch_sizes_up_to(args.max_batch))
    if args.batch_sizes and max(batch_sizes) != args.max_batch:
        raise ValueError(f"--batch_sizes={args.batch_sizes}: the largest must be --max_batch={args.max_batch}")
    return settings_lib.Settings(
        batch_sizes=tuple(sorted(batch_sizes)), prompt_lens=settings_lib.int_list(args.prompt_lens, "--prompt_lens"),
        num_beams=settings_lib.int_list(args.num_beams, "--num_beams"),
        max_new_tokens=settings_lib.int_list(args.max_new_tokens, "--max_new_tokens"),
        repetition_penalty=args.repetition_penalty, text_len=args.text_len, max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size, max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels, vqa_prompt=args.vqa_prompt)


def model_error(path: str):
    """Why `path` cannot be served (None when it looks like a BLIP-2 directory or a workdir)."""
    if not os.path.isdir(path):
        return f"--model={path}: {'not a directory' if os.path.exists(path) else 'no such directory'}"
    if checkpoint.is_workdir(path):
        return None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        return f"--model={path}: no readable config.json and no checkpoints/ ({type(e).__name__})"
    if kind != "blip-2":
        return f"--model={path}: config.json describes a {kind!r} model, not BLIP-2 (model_type 'blip-2')"
    return None


def _log_to_stderr(level: str) -> None:
    """The server's own log lines (warm-up progress, failed batches) on stderr at `level`, whatever the
    libraries did to the root logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _log_to_stderr(args.log_level)
    try:
        settings = settings_from(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = model_error(args.model)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    compilation_cache.enable(args.compilation_cache)
    try:
        engine = load_engine(args.model, settings, tokenizer=args.tokenizer, frozen_dtype=args.frozen_dtype)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: cannot serve {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    failed = []
    service = Service(engine, settings)
    server = uvicorn_server(service, log_level="warning" if args.log_level == "info" else args.log_level)

    def stop_on_failure(error: BaseException) -> None:  # the warm-up failed: stop serving, exit 1
        failed.append(error)
        server.should_exit = True

    service.on_failure = stop_on_failure
    print(f"blip2_jax.serve: listening on {url_of(sock)} ({engine.kind} model, {len(service.buckets)} buckets to "
          f"compile; GET /health says when ready)", flush=True)
    signal.signal(signal.SIGTERM, _exit_zero)  # uvicorn shuts down gracefully, then re-raises the signal here
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # SIGINT, re-raised the same way
        pass
    return 1 if failed else 0


def _exit_zero(signum, frame) -> None:
    raise SystemExit(0)
