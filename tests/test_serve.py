"""The server (`blip2_jax.serve`) on a loopback port with tiny random BLIP-2 models saved by Hugging Face.

References: `blip2_jax.generate` called directly on the same images and prompts (captions, answers), and
`model.apply(..., method="itm" | "itc")` (retrieval). Checks readiness (503 until every bucket is
compiled), dynamic batching (concurrent requests share model calls), no compilation after the warm-up,
every kind of bad input (4xx JSON, the server goes on serving) and the bounded queue (503 busy).
"""
import base64
import dataclasses
import http.client
import io
import json
import threading
import time
import urllib.parse

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

import blip2_jax
from blip2_jax.data.testing import bert_vocab_dir, make_tiny_opt_tokenizer, make_tiny_t5_tokenizer
from blip2_jax.data.text import blip_question, clean_caption
from blip2_jax.serve import cli
from blip2_jax.serve.app import Service, start_in_thread
from blip2_jax.serve.engine import load_engine
from blip2_jax.serve.settings import VQA_PROMPT, Settings
from tests import hf_tiny

# 1 batch size x 2 prompt lengths x 2 beam counts x 1 budget = 4 generation buckets (few: each compiles).
SETTINGS = Settings(batch_sizes=(4,), prompt_lens=(8, 48), num_beams=(1, 2), max_new_tokens=(8,),
                    max_wait_ms=150, queue_size=16, max_body_bytes=2**20, max_image_pixels=256 * 256,
                    max_prompt_chars=400, text_len=16)


# -- fixtures and helpers ---------------------------------------------------------------------------------
def png(seed: int, size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=size[::-1] + (3,), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    """A tiny BLIP-2 OPT with a byte-level BPE tokenizer and "\\n" as EOS (as tests/test_caption.py)."""
    path = tmp_path_factory.mktemp("serve_opt")
    tok = make_tiny_opt_tokenizer(str(path))
    cfg = hf_tiny.blip2_opt_config(vocab=len(tok) + 1)
    cfg.text_config.eos_token_id = tok("\n", add_special_tokens=False)["input_ids"][0]
    torch.manual_seed(0)
    hf_tiny.redraw_(Blip2ForConditionalGeneration(cfg), seed=7).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def engine(opt_dir):
    return load_engine(opt_dir, SETTINGS)


def wait_ready(url: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body, _ = call(url, "GET", "/health")
        if status == 200:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(engine):
    running = start_in_thread(Service(engine, SETTINGS))
    wait_ready(running.url)
    yield running.url
    running.stop()


def call(url: str, method: str, path: str, body=None, *, raw: bytes = None, headers=None):
    """`(status, JSON body, headers)` of one request on a fresh connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, json.loads(payload), resp.headers


def post(url, path, body=None, **kw):
    return call(url, "POST", path, body, **kw)


def concurrently(url: str, path: str, bodies: list) -> list:
    """Post every body at once (one thread each, released together): their `(status, body, headers)`."""
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(i):
        barrier.wait()
        results[i] = post(url, path, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def direct_text(opt_dir: str, image: bytes, prompt=None, **kw) -> str:
    """What `blip2_jax.generate` says for one image and prompt, called directly (batch 1, unpadded prompt)."""
    model, params = blip2_jax.from_pretrained(opt_dir)
    processor = blip2_jax.load_processor(opt_dir)
    ids = mask = None
    if prompt is not None:
        ids, mask = processor.tokenize([prompt])
    out = blip2_jax.generate(model, params, processor.preprocess([Image.open(io.BytesIO(image))]), ids, mask, **kw)
    return processor.decode(np.asarray(out))[0]


class Gated:
    """An engine whose warm-up (or batches) wait for an event: to look at the server in between."""

    def __init__(self, inner, *, warm: threading.Event = None, run: threading.Event = None):
        self.inner, self.warm_gate, self.run_gate = inner, warm, run
        self.running = threading.Event()

    def warm(self, shape):
        if self.warm_gate is not None:
            assert self.warm_gate.wait(120)
        self.inner.warm(shape)

    def run(self, key, payloads):
        self.running.set()
        if self.run_gate is not None:
            assert self.run_gate.wait(120)
        return self.inner.run(key, payloads)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# -- readiness ---------------------------------------------------------------------------------------------
def test_health_is_503_until_every_bucket_is_compiled(engine):
    gate = threading.Event()
    running = start_in_thread(Service(Gated(engine, warm=gate), SETTINGS))
    try:
        status, body, _ = call(running.url, "GET", "/health")
        assert status == 503 and body["ready"] is False
        assert body["buckets_ready"] == 0 and body["buckets"] == 4
        status, body, headers = post(running.url, "/caption", {"image": b64(png(0))})
        assert status == 503 and "warming up: 0/4 buckets" in body["error"] and headers["Retry-After"]
        gate.set()
        body = wait_ready(running.url)
        assert body["ready"] is True and body["buckets_ready"] == body["buckets"] == 4
        assert body["routes"] == ["/caption", "/vqa"] and body["num_beams"] == [1, 2]
    finally:
        gate.set()
        running.stop()


# -- answers equal generate --------------------------------------------------------------------------------
@pytest.mark.parametrize("request_fields, generate_kw", [
    ({}, dict(max_new_tokens=8, num_beams=1, min_new_tokens=1)),
    ({"prompt": "a photo of", "num_beams": 2}, dict(prompt="a photo of", max_new_tokens=8, num_beams=2,
                                                    min_new_tokens=1, length_penalty=1.0)),
    ({"prompt": "a photo of", "max_new_tokens": 5, "min_new_tokens": 3},
     dict(prompt="a photo of", max_new_tokens=5, num_beams=1, min_new_tokens=3)),
])
def test_caption_equals_generate(server, opt_dir, request_fields, generate_kw):
    image = png(1)
    status, body, _ = post(server, "/caption", {"image": b64(image), **request_fields})
    assert status == 200, body
    assert body["caption"] == direct_text(opt_dir, image, **generate_kw)


def test_vqa_equals_generate_with_the_lavis_prompt(server, opt_dir):
    image, question = png(2), "What colour is the square?"
    status, body, _ = post(server, "/vqa", {"image": b64(image), "question": question, "num_beams": 2})
    assert status == 200, body
    prompt = VQA_PROMPT.format(blip_question(question))
    want = direct_text(opt_dir, image, prompt, max_new_tokens=8, num_beams=2, min_new_tokens=1, length_penalty=0.0)
    assert body["answer"] == want


def test_multipart_upload_equals_json(server):
    image = png(3)
    boundary = "----blip2jaxtest"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n",
             f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na photo of\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="num_beams"\r\n\r\n2\r\n'.encode(),
             f"--{boundary}--\r\n".encode()]
    status, body, _ = post(server, "/caption", raw=b"".join(parts),
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, body
    want = post(server, "/caption", {"image": b64(image), "prompt": "a photo of", "num_beams": 2})[1]
    assert body == want


# -- dynamic batching, no compilation after warm-up -------------------------------------------------------
def test_concurrent_requests_share_model_calls_and_compile_nothing(server):
    bodies = [{"image": b64(png(10 + i, (20 + 7 * i, 50 - 3 * i))), **({"prompt": "a photo of"} if i % 2 else {})}
              for i in range(8)]
    start = call(server, "GET", "/health")[1]
    alone = [post(server, "/caption", b)[1]["caption"] for b in bodies]  # one after the other
    before = call(server, "GET", "/health")[1]
    assert before["model_calls"] - start["model_calls"] == len(bodies)  # one model call each
    results = concurrently(server, "/caption", bodies)
    after = call(server, "GET", "/health")[1]
    assert [r[0] for r in results] == [200] * len(bodies)
    assert any(alone)  # a model that only says nothing would not test decoding
    assert [r[1]["caption"] for r in results] == alone  # padding to a batch / prompt bucket changes nothing
    assert after["requests_served"] - before["requests_served"] == len(bodies)
    calls = after["model_calls"] - before["model_calls"]
    assert 2 <= calls < len(bodies)  # batches of at most 4
    assert after["compiles_after_warmup"] == start["compiles_after_warmup"]  # nothing compiled for any of them


# -- bad input ---------------------------------------------------------------------------------------------
GOOD = b64(png(4))
BIG = b64(png(5, (300, 300)))  # 90,000 pixels > the 65,536 limit
TRUNCATED = b64(png(6, (64, 64))[:2000])


@pytest.mark.parametrize("path, body, status, message", [
    ("/caption", b"{not json", 400, "not valid JSON"),
    ("/caption", [1, 2], 400, "must be a JSON object"),
    ("/caption", {"image": GOOD, "colour": "red"}, 400, "unknown field(s) 'colour'"),
    ("/caption", {"image": GOOD, "num_beams": "2"}, 400, "'num_beams' must be an integer, got str"),
    ("/caption", {"image": GOOD, "max_new_tokens": True}, 400, "'max_new_tokens' must be an integer, got bool"),
    ("/caption", {"image": GOOD, "length_penalty": "1"}, 400, "'length_penalty' must be a number"),
    ("/caption", {"image": 5}, 400, "'image' must be a base64 string, got int"),
    ("/caption", {"prompt": "a photo of"}, 400, "missing field(s) 'image'"),
    ("/caption", {"image": "%%% not base64"}, 400, "'image' is not valid base64"),
    ("/caption", {"image": b64(b"plain text, not an image")}, 400, "'image' is not an image"),
    ("/caption", {"image": TRUNCATED}, 400, "truncated or corrupt"),
    ("/caption", {"image": BIG}, 413, "300x300 = 90000 pixels"),
    ("/caption", {"image": GOOD, "prompt": "  "}, 400, "'prompt' is empty"),
    ("/caption", {"image": GOOD, "prompt": "a photo of " * 20}, 400, "longest compiled prompt of 48 tokens"),
    ("/caption", {"image": GOOD, "prompt": "a" * 401}, 400, "401 characters"),
    ("/caption", {"image": GOOD, "num_beams": 3}, 400, "num_beams=3 is not compiled"),
    ("/caption", {"image": GOOD, "max_new_tokens": 9}, 400, "max_new_tokens must be between 1 and 8"),
    ("/caption", {"image": GOOD, "num_beams": 2, "max_new_tokens": 5}, 400, "beam search is compiled for"),
    ("/caption", {"image": GOOD, "min_new_tokens": 0}, 400, "min_new_tokens must be between 1"),
    ("/caption", b'{"length_penalty": NaN, "image": "x"}', 400, "must be a finite number"),
    ("/vqa", {"image": GOOD}, 400, "missing field(s) 'question'"),
    ("/vqa", {"image": GOOD, "question": ""}, 400, "'question' is empty"),
    ("/itm", {"image": GOOD, "text": "a square"}, 404, "/itm is not served for this model"),
    ("/nowhere", {}, 404, "Not Found"),
])
def test_bad_requests_get_a_json_error(server, path, body, status, message):
    got, answer, _ = post(server, path, None if isinstance(body, bytes) else body,
                          raw=body if isinstance(body, bytes) else None)
    assert got == status and message in answer["error"], answer


def test_bad_requests_outside_the_json(server):
    assert call(server, "GET", "/caption")[:2] == (405, {"error": "Method Not Allowed"})
    status, body, _ = post(server, "/caption", raw=b"x", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]
    parts = urllib.parse.urlsplit(server)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.putrequest("POST", "/caption")  # a body announced as too large is refused before it is read
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2**20 + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "more than this server's limit" in json.loads(resp.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/caption", body=iter([b'{"image": "', GOOD.encode(), b'"}']), encode_chunked=True,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 411 and "Content-Length" in json.loads(resp.read())["error"]
    conn.close()


def test_still_serving_after_bad_requests(server):
    status, body, _ = post(server, "/caption", {"image": GOOD})
    assert status == 200 and isinstance(body["caption"], str)


def test_a_full_queue_answers_busy(engine):
    """With the model busy and `queue_size` requests queued, the next request is refused at once (503)."""
    gate = threading.Event()
    gated = Gated(engine, run=gate)
    running = start_in_thread(Service(gated, dataclasses.replace(SETTINGS, queue_size=2, max_wait_ms=0)))
    try:
        wait_ready(running.url)
        results = {}

        def client(name, seed):
            results[name] = post(running.url, "/caption", {"image": b64(png(seed))})

        first = threading.Thread(target=client, args=("first", 20))
        first.start()
        assert gated.running.wait(60)  # the worker holds the first request
        queued = [threading.Thread(target=client, args=(f"queued{i}", 21 + i)) for i in range(2)]
        for t in queued:
            t.start()
        deadline = time.monotonic() + 60
        while call(running.url, "GET", "/health")[1]["queued"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, body, headers = post(running.url, "/caption", {"image": GOOD})
        assert status == 503 and body["error"].startswith("busy: 2 requests are queued") and headers["Retry-After"]
        gate.set()
        for t in [first] + queued:
            t.join(120)
        assert [results[k][0] for k in ("first", "queued0", "queued1")] == [200, 200, 200]
    finally:
        gate.set()
        running.stop()


# -- retrieval ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    """A tiny `Blip2ForImageTextRetrieval` with the BERT uncased tokenizer, served; and the model itself."""
    path = tmp_path_factory.mktemp("serve_itm")
    tok = AutoTokenizer.from_pretrained(bert_vocab_dir(), local_files_only=True)
    tok.save_pretrained(str(path))
    torch.manual_seed(0)
    hf_tiny.redraw_(Blip2ForImageTextRetrieval(hf_tiny.blip2_retrieval_config(vocab=len(tok))), seed=3) \
        .save_pretrained(str(path))
    running = start_in_thread(Service(load_engine(str(path), SETTINGS), SETTINGS))
    wait_ready(running.url)
    yield running.url, str(path), tok
    running.stop()


def _reference(path, tok, image: bytes, text: str):
    """ITM match probability and ITC similarity of one pair, from `model.apply` directly."""
    model, params = blip2_jax.from_pretrained(path)
    pixels = blip2_jax.processor.Blip2Processor(tok, 28, eos_token_id=None).preprocess([Image.open(io.BytesIO(image))])
    enc = tok(clean_caption(text), padding="max_length", max_length=SETTINGS.text_len)
    ids, mask = np.asarray([enc["input_ids"]], np.int32), np.asarray([enc["attention_mask"]], np.int32)
    apply = jax.jit(model.apply, static_argnames="method")  # one compilation, not one per operation
    itm = np.asarray(apply({"params": params}, pixels, ids, mask, method="itm"))[0]
    itc = np.asarray(apply({"params": params}, pixels, ids, mask, method="itc"))[0, 0]
    return float(np.exp(itm[1]) / np.exp(itm).sum()), float(itc), itm


def test_itm_and_embed_equal_the_model(retrieval):
    url, path, tok = retrieval
    image, text = png(7), "A small red square, left of a circle."
    score, itc, itm = _reference(path, tok, image, text)
    status, body, _ = post(url, "/itm", {"image": b64(image), "text": text})
    assert status == 200, body
    np.testing.assert_allclose(body["itm_logits"], itm, atol=1e-5)
    assert body["score"] == pytest.approx(score, abs=1e-5) and body["itc_similarity"] == pytest.approx(itc, abs=1e-5)

    status, both, _ = post(url, "/embed", {"image": b64(image), "text": text})
    assert status == 200 and both["similarity"] == pytest.approx(itc, abs=1e-5)
    queries, width = np.asarray(both["image_embedding"]).shape
    assert (queries, width) == (4, 16) and np.asarray(both["text_embedding"]).shape == (16,)
    np.testing.assert_allclose(np.linalg.norm(both["text_embedding"]), 1.0, atol=1e-5)  # normalised
    image_only = post(url, "/embed", {"image": b64(image)})[1]
    text_only = post(url, "/embed", {"text": text})[1]
    assert set(image_only) == {"image_embedding"} and set(text_only) == {"text_embedding"}
    np.testing.assert_allclose(image_only["image_embedding"], both["image_embedding"], atol=1e-6)
    np.testing.assert_allclose(text_only["text_embedding"], both["text_embedding"], atol=1e-6)


@pytest.mark.parametrize("path, body, status, message", [
    ("/embed", {}, 400, "give 'image', 'text' or both"),
    ("/itm", {"image": GOOD}, 400, "missing field(s) 'text'"),
    ("/itm", {"image": GOOD, "text": "..."}, 400, "'text' is empty"),
    ("/itm", {"image": GOOD, "text": "square " * 20}, 400, "'text' is too long: 22 tokens"),
    ("/caption", {"image": GOOD}, 404, "/caption is not served for this model (a retrieval model"),
])
def test_retrieval_bad_requests(retrieval, path, body, status, message):
    got, answer, _ = post(retrieval[0], path, body)
    assert got == status and message in answer["error"], answer


# -- the command line --------------------------------------------------------------------------------------
def test_cli_refuses_bad_flags_and_models(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    for argv, why in [([f"--model={tmp_path}", "--num_beams=1,x"], "--num_beams=1,x: expected comma-separated"),
                      ([f"--model={tmp_path}", "--max_batch=4", "--batch_sizes=1,2"], "the largest must be"),
                      (["--model=/nonexistent_dir"], "no such directory"),
                      ([f"--model={tmp_path}"], "describes a 'bert' model, not BLIP-2")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], err


# -- FlanT5 ------------------------------------------------------------------------------------------------
def test_t5_captions_equal_generate_alone_and_batched(tmp_path):
    """A BLIP-2 FlanT5: prompts padded on the right, and no prompt = the visual prompt alone (as `generate`)."""
    tok = make_tiny_t5_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    hf_tiny.redraw_(Blip2ForConditionalGeneration(hf_tiny.blip2_t5_config(vocab=len(tok) + 1)), seed=7) \
        .save_pretrained(str(tmp_path))
    settings = dataclasses.replace(SETTINGS, batch_sizes=(2,), prompt_lens=(8,), num_beams=(1,))
    running = start_in_thread(Service(load_engine(str(tmp_path), settings), settings))
    try:
        assert wait_ready(running.url)["llm"] == "t5"
        bodies = [{"image": b64(png(30))}, {"image": b64(png(31)), "prompt": "a photo of"}]
        results = concurrently(running.url, "/caption", bodies)
        assert [r[0] for r in results] == [200, 200], results
        want = [direct_text(str(tmp_path), png(30), max_new_tokens=8, min_new_tokens=1),
                direct_text(str(tmp_path), png(31), "a photo of", max_new_tokens=8, min_new_tokens=1)]
        assert [r[1]["caption"] for r in results] == want
    finally:
        running.stop()


# -- InstructBLIP ------------------------------------------------------------------------------------------
def test_instructblip_captions_and_answers_equal_generate_with_the_instruction(tmp_path):
    """An InstructBLIP (LLaMA): the prompt (or the VQA prompt) is also the Q-Former's instruction, `[CLS] [SEP]`
    without one, as the caption CLI; results equal `generate` called directly with those instructions."""
    from tests.test_caption_kinds import PROMPT, _save

    path = str(tmp_path / "model")
    _save("instructblip-llama", path)
    settings = dataclasses.replace(SETTINGS, batch_sizes=(2,), prompt_lens=(48,), num_beams=(1,))
    running = start_in_thread(Service(load_engine(path, settings), settings))
    try:
        assert wait_ready(running.url)["instruction_aware"] is True
        captions = concurrently(running.url, "/caption", [{"image": b64(png(40)), "prompt": PROMPT},
                                                          {"image": b64(png(41))}])
        answer = post(running.url, "/vqa", {"image": b64(png(42)), "question": "what colour is the square"})
    finally:
        running.stop()
    model, params = blip2_jax.from_pretrained(path)
    processor = blip2_jax.load_processor(path)

    def direct(image, text):
        ids = mask = None
        if text is not None:
            ids, mask = processor.tokenize([text])
        q_ids, q_mask = processor.tokenize_instruction([text or ""])
        out = blip2_jax.generate(model, params, processor.preprocess([Image.open(io.BytesIO(image))]), ids, mask,
                                 max_new_tokens=8, min_new_tokens=1, qformer_input_ids=q_ids,
                                 qformer_attention_mask=q_mask)
        return processor.decode(np.asarray(out))[0]

    assert [c[0] for c in captions] == [200, 200], captions
    assert [c[1]["caption"] for c in captions] == [direct(png(40), PROMPT), direct(png(41), None)]
    question = VQA_PROMPT.format(blip_question("what colour is the square"))
    assert answer[:2] == (200, {"answer": direct(png(42), question)})
