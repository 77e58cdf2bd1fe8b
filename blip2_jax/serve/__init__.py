"""A caption / VQA / retrieval server: `python -m blip2_jax.serve --model=PATH` (JSON over HTTP).

Routes (README.md, "Serving"):
- `GET /health`: 200 `{"ready": true, "buckets_ready": n, "buckets": n, ...}` once every bucket is
  compiled, 503 `{"ready": false, ...}` before;
- generation models (BLIP-2 OPT / FlanT5): `POST /caption` `{"image": base64, "prompt"?: str}` ->
  `{"caption": str}`; `POST /vqa` `{"image", "question"}` -> `{"answer": str}` (prompt
  "Question: {} Short answer:"); both take `num_beams`, `max_new_tokens`, `min_new_tokens`,
  `length_penalty` within what the server compiled;
- retrieval models (stage 1, `Blip2ForImageTextRetrieval`): `POST /itm` `{"image", "text"}` ->
  `{"score", "itm_logits", "itc_similarity"}`; `POST /embed` `{"image"?, "text"?}` ->
  `{"image_embedding"?: [Q][E], "text_embedding"?: [E], "similarity"?}`.

Modules: `settings` (buckets and limits), `inputs` (reading and checking a request), `batcher` (the
bounded queue and dynamic batching), `engine` (the model side: padding to buckets, warm-up, one call per
batch), `app` (the Starlette app and running it), `cli` (the command line).
"""
