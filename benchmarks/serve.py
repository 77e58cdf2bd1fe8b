"""Load benchmark of the caption server: latency and captions/s with 1, 8 and 32 concurrent clients,
against calling `blip2_jax.generate` directly, one request at a time.

    python benchmarks/serve.py [--model PATH] [--size demo|tiny] [--clients 1,8,32] [--requests 128]
        [--seconds 60] [--max_new_tokens 20] [--max_batch 8] [--max_wait_ms 10] [--direct 16] [--json OUT]

Without `--model` it builds a random BLIP-2 OPT in Hugging Face (torch, CPU) with a tiny byte-level BPE
tokenizer and saves it to a temporary directory: `--size demo` is benchmarks/generate.py's model (ViT
4x192 at 112 px, Q-Former 2x192 with 16 queries, OPT 6x256), `--size tiny` the test suite's (2 layers
of width 32, 28 px). Every request captions one of 8 random 160x120 PNGs with the prompt "a photo of",
greedily, and decodes exactly `--max_new_tokens` tokens (`min_new_tokens` = `max_new_tokens`), so that
every caption costs the same on both sides.

1. Direct: `from_pretrained` + `load_processor` in this process; each request decoded from its PNG,
   preprocessed, tokenised and generated alone (batch 1); the first call (compilation) is left out.
2. Server: `python -m blip2_jax.serve` started on a free loopback port (greedy only, one budget, the
   batch buckets up to `--max_batch`); after /health says ready, each level runs `clients` threads, each
   with its own keep-alive connection posting requests one after the other, until `--requests` requests
   are answered or `--seconds` have passed. A 503 (busy) counts as refused, not answered.

Prints one markdown table (latency p50 / p99 per request, captions/s = answered / wall time, mean batch
= requests per model call from /health, compilations after the warm-up) and, with `--json`, writes it.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PROMPT = "a photo of"

SIZES = {  # Hugging Face config fields of the random model
    "demo": dict(vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                             image_size=112, patch_size=14, layer_norm_eps=1e-6),
                 qformer=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                              cross_attention_frequency=2, encoder_hidden_size=192),
                 text=dict(hidden_size=256, num_hidden_layers=6, ffn_dim=1024, num_attention_heads=4,
                           word_embed_proj_dim=256), queries=16),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                             image_size=28, patch_size=14, layer_norm_eps=1e-6),
                 qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=68,
                              cross_attention_frequency=2, encoder_hidden_size=32),
                 text=dict(hidden_size=32, num_hidden_layers=2, ffn_dim=68, num_attention_heads=4,
                           word_embed_proj_dim=32), queries=4),
}


# -- the model --------------------------------------------------------------------------------------------
def build_model(size: str, out_dir: str) -> None:
    """A random BLIP-2 OPT of `size` with a tiny BPE tokenizer ("\\n" as EOS, as BLIP-2 OPT), saved to `out_dir`."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from benchmarks.harness import spread_weights_
    from blip2_jax.data.testing import make_tiny_opt_tokenizer

    tok = make_tiny_opt_tokenizer(out_dir)
    eos = tok("\n", add_special_tokens=False)["input_ids"][0]
    s, vocab = SIZES[size], len(tok) + 1  # one more id: the image placeholder
    text = OPTConfig(vocab_size=vocab, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=eos, **s["text"])
    cfg = Blip2Config(vision_config=s["vision"], qformer_config={**s["qformer"], "vocab_size": vocab},
                      text_config=text.to_dict(), num_query_tokens=s["queries"], image_token_index=vocab - 1)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg)
    spread_weights_(model, 0)
    model.eval().save_pretrained(out_dir)


def images(n: int = 8) -> list[bytes]:
    """`n` random 160x120 RGB PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def summary(latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "captions_per_s": len(latencies) / wall if wall > 0 else None}


# -- direct generate ---------------------------------------------------------------------------------------
def direct(model_dir: str, pngs: list[bytes], n: int, max_new_tokens: int) -> dict:
    """`n` requests through `generate` one at a time (after one untimed call that compiles)."""
    from PIL import Image

    import blip2_jax

    model, params = blip2_jax.from_pretrained(model_dir)
    processor = blip2_jax.load_processor(model_dir)

    def one(png: bytes) -> str:
        pixels = processor.preprocess([Image.open(io.BytesIO(png))])
        ids, mask = processor.tokenize([PROMPT])
        out = blip2_jax.generate(model, params, pixels, ids, mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens)
        return processor.decode(np.asarray(out))[0]

    one(pngs[0])
    latencies, captions, start = [], {}, time.perf_counter()
    for k in range(n):
        t0 = time.perf_counter()
        captions[k % len(pngs)] = one(pngs[k % len(pngs)])
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    captions.update({i: one(png) for i, png in enumerate(pngs) if i not in captions})  # untimed
    return {"mode": "direct generate, one request at a time", "clients": 1, **summary(latencies, wall),
            "captions": captions}


# -- the server --------------------------------------------------------------------------------------------
def start_server(model_dir: str, args, log_file) -> tuple[subprocess.Popen, str]:
    """`python -m blip2_jax.serve` on a free port; returns once /health answers 200."""
    cmd = [sys.executable, "-m", "blip2_jax.serve", f"--model={model_dir}", "--port=0",
           f"--max_batch={args.max_batch}", f"--max_wait_ms={args.max_wait_ms}", "--num_beams=1",
           f"--max_new_tokens={args.max_new_tokens}", f"--prompt_lens={args.prompt_len}",
           f"--queue_size={2 * max(args.clients)}", "--log_level=warning"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=REPO, env=env)
    line = proc.stdout.readline()
    found = re.search(r"listening on (http://\S+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"the server did not start (exit {proc.wait()}):\n{_tail(log_file)}")
    url = found.group(1)
    deadline = time.monotonic() + args.startup_timeout
    while get_json(url, "/health")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not become ready:\n{_tail(log_file)}")
        time.sleep(0.5)
    return proc, url


def _tail(log_file, chars: int = 4000) -> str:
    log_file.flush()
    with open(log_file.name) as f:
        return f.read()[-chars:]


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)


def get_json(url: str, path: str) -> tuple[int, dict]:
    conn = _connection(url)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    except (OSError, ValueError):
        return 0, {}
    finally:
        conn.close()


def load_level(url: str, bodies: list[bytes], clients: int, total: int, seconds: float, expected: dict) -> dict:
    """`clients` threads posting /caption until `total` requests are answered or `seconds` pass;
    `mismatches` counts the captions that differ from `expected` (image index -> direct caption)."""
    lock = threading.Lock()
    state = {"sent": 0, "busy": 0, "errors": 0, "mismatches": 0}
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = _connection(url)
        while True:
            with lock:
                if state["sent"] >= total or time.monotonic() > deadline:
                    break
                k = state["sent"]
                state["sent"] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/caption", body=bodies[k % len(bodies)],
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                status, answer = resp.status, json.loads(resp.read())
            except (OSError, ValueError, http.client.HTTPException):
                conn.close()
                conn, status, answer = _connection(url), 0, {}
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                    state["mismatches"] += answer["caption"] != expected[k % len(bodies)]
                else:
                    state["busy" if status == 503 else "errors"] += 1
        conn.close()

    before = get_json(url, "/health")[1]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = get_json(url, "/health")[1]
    calls = after["model_calls"] - before["model_calls"]
    return {"mode": "server", "clients": clients, **summary(latencies, wall), "busy": state["busy"],
            "errors": state["errors"], "mismatches": state["mismatches"],
            "mean_batch": (after["requests_served"] - before["requests_served"]) / max(1, calls),
            "compiles_after_warmup": after["compiles_after_warmup"]}


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| mode | clients | requests | p50 ms | p99 ms | captions/s | mean batch | busy (503) | "
             "same caption as direct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {_num(r['p50_ms'], 0)} | "
                     f"{_num(r['p99_ms'], 0)} | {_num(r['captions_per_s'], 1)} | {_num(r.get('mean_batch', 1.0), 1)} | "
                     f"{r.get('busy', 0)} | {r['requests'] - r.get('mismatches', 0)}/{r['requests']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="a BLIP-2 OPT directory (default: build a random one)")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=128, help="answered requests per level (at most)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time per level (at most)")
    ap.add_argument("--max_new_tokens", type=int, default=20)
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--max_wait_ms", type=float, default=10.0)
    ap.add_argument("--prompt_len", type=int, default=8, help="the server's one prompt bucket (tokens)")
    ap.add_argument("--direct", type=int, default=16, help="requests through generate directly")
    ap.add_argument("--startup_timeout", type=float, default=600.0)
    ap.add_argument("--json", default="", help="write the rows here")
    args = ap.parse_args(argv)

    pngs = images()
    body_of = lambda png: json.dumps({"image": base64.b64encode(png).decode(), "prompt": PROMPT,  # noqa: E731
                                      "num_beams": 1, "max_new_tokens": args.max_new_tokens,
                                      "min_new_tokens": args.max_new_tokens}).encode()
    bodies = [body_of(p) for p in pngs]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or os.path.join(tmp, "model")
        if not args.model:
            build_model(args.size, model_dir)
        rows = [direct(model_dir, pngs, args.direct, args.max_new_tokens)]
        with open(os.path.join(tmp, "server.log"), "w") as log_file:
            t0 = time.perf_counter()
            proc, url = start_server(model_dir, args, log_file)
            startup = time.perf_counter() - t0
            try:
                health = get_json(url, "/health")[1]
                for clients in args.clients:
                    rows.append(load_level(url, bodies, clients, args.requests, args.seconds, rows[0]["captions"]))
            finally:
                proc.terminate()
                proc.wait(60)
    print(f"model: {args.model or args.size}; {args.max_new_tokens} new tokens per caption, greedy, prompt "
          f"{PROMPT!r}; server: max_batch {args.max_batch}, max_wait_ms {args.max_wait_ms}, "
          f"{health['buckets']} buckets compiled in {health['warmup_s']:.1f} s (start to ready {startup:.1f} s)")
    print(table(rows))
    result = {"rows": rows, "buckets": health["buckets"], "warmup_s": health["warmup_s"], "startup_s": startup,
              "server_exit": proc.returncode}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
