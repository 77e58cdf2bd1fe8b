"""Instruction tuning (InstructBLIP) in the stage-2 task: a config that starts from a BLIP-2 stage-2
checkpoint (query path + projection) with the Q-Former's text path from a stage-1 checkpoint, the
instruction data encoding, and gradients reaching the text path while the LLM stays frozen."""
import os

import jax
import numpy as np
import pytest

from flax.traverse_util import flatten_dict as flatten

from blip2_jax import sharding as sharding_lib
from blip2_jax.data import instructions, testing, text
from blip2_jax.train import stage2
from tests import tiny_configs
from tests.test_stage2 import _batch, _hf_projection, _init_params


def _bert(path):
    from tests import hf_tiny
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(hf_tiny.BERT_SPECIALS + hf_tiny.WORDS + "short image caption photo what colour is the right how many ?".split()) + "\n")
    return text.load_bert_tokenizer(path)


def test_instruct_text_draws_an_instruction_as_prompt_and_qformer_text(tmp_path):
    bert = _bert(str(tmp_path))
    opt = text.InstructText(text.OPTText(testing.make_tiny_opt_tokenizer(str(tmp_path / "opt")), 40), bert, max_len=12)
    rng = np.random.default_rng(0)
    out = opt("a red square", rng)
    instruction = instructions.instruction("caption", np.random.default_rng(0))  # the same draw
    tok = opt.llm_text.tokenizer
    want = tok.encode(instruction + " a red square\n", add_special_tokens=True)
    assert out["input_ids"][:len(want)].tolist() == want
    n_prompt = len(tok.encode(instruction, add_special_tokens=True))
    assert (out["labels"][:n_prompt] == -100).all() and (out["labels"][n_prompt:len(want)] != -100).all()
    q = bert(instruction, padding="max_length", truncation=True, max_length=12)
    assert out["qformer_input_ids"].tolist() == q["input_ids"] and out["qformer_input_ids"][0] == bert.cls_token_id
    assert out["qformer_attention_mask"].tolist() == q["attention_mask"]

    t5_tok = testing.make_tiny_t5_tokenizer(str(tmp_path / "t5"))
    t5 = text.InstructText(text.T5Text(t5_tok, 160, mode="prompt"), bert, max_len=12)  # a tiny vocabulary: long
    out = t5("a red square", np.random.default_rng(0))
    enc = t5_tok.encode(instruction, add_special_tokens=True)  # the instruction + </s> to the encoder
    assert out["input_ids"][:len(enc)].tolist() == enc and out["attention_mask"].sum() == len(enc)
    with pytest.raises(ValueError, match="per-caption prompt needs T5 text mode 'prompt'"):
        text.InstructText(text.T5Text(t5_tok, 40, mode="prefix"), bert)("a red square", rng)


def test_instruction_tuning_from_blip2_stage2_and_stage1_checkpoints(hf_blip2, hf_retrieval, tmp_path):
    hf, blip2_dir, llm_dir = hf_blip2("opt")
    hf_stage1, stage1_dir = hf_retrieval("freq2")
    c = tiny_configs.stage2("opt", batch_size=4)
    c.model.instruction_aware = True
    c.model.qformer_text.update(tiny_configs.QFORMER_TEXT)
    c.init.update(vision_checkpoint=blip2_dir, llm_checkpoint=llm_dir, stage2_checkpoint=blip2_dir,
                  stage1_checkpoint=stage1_dir)
    _bert(str(tmp_path))
    c.data.update(text_mode="opt", max_text_len=7, instruction_task="caption", qformer_tokenizer_path=str(tmp_path))
    mesh = sharding_lib.make_mesh(c.mesh, jax.devices()[:1])
    task = stage2.make_task(c, mesh)
    trainable, frozen, fresh = _init_params(task, c, mesh)
    got = flatten(jax.tree.map(np.asarray, trainable))
    # The query path and the projection from the BLIP-2 stage-2 model ...
    np.testing.assert_array_equal(got[("query_tokens",)], hf.query_tokens.detach().numpy())
    np.testing.assert_array_equal(got[("language_projection", "kernel")], _hf_projection(hf)["kernel"])
    query = hf.qformer.encoder.layer[0].attention.attention.query.weight.detach().numpy().T
    np.testing.assert_array_equal(got[("qformer", "layer_0", "attention", "query", "kernel")], query)
    # ... and the text path (which a BLIP-2 stage-2 model lacks) from the stage-1 one.
    np.testing.assert_array_equal(got[("qformer", "word_embeddings", "embedding")],
                                  hf_stage1.embeddings.word_embeddings.weight.detach().numpy())
    text_ffn = hf_stage1.qformer.encoder.layer[1].intermediate.dense.weight.detach().numpy().T
    np.testing.assert_array_equal(got[("qformer", "layer_1", "text_ffn", "intermediate", "kernel")], text_ffn)

    # One step's gradient reaches the Q-Former's text path (the instruction shapes the queries).
    batch = _batch("opt", hf, np.random.default_rng(0))
    batch["qformer_input_ids"] = np.array([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0], [2, 8, 11, 12, 3], [2, 3, 0, 0, 0]],
                                          np.int32)
    batch["qformer_attention_mask"] = (batch["qformer_input_ids"] > 0).astype(np.int32)
    loss, grads = jax.value_and_grad(lambda t: task.loss_fn(t, frozen, batch, jax.random.PRNGKey(0), True)[0])(trainable)
    grads = flatten(jax.tree.map(np.asarray, grads))
    assert np.isfinite(loss)
    for path in [("qformer", "word_embeddings", "embedding"), ("qformer", "layer_0", "text_ffn", "intermediate", "kernel"),
                 ("language_projection", "kernel")]:
        assert np.abs(grads[path]).max() > 0, path

    c.data.instruction_task = ""
    with pytest.raises(ValueError, match="instruction_aware=True needs config.data.instruction_task"):
        stage2.make_task(c, mesh)


def test_instruction_records_from_jsonl_through_the_pipeline(tmp_path):
    """`data.build table --question_key`: image / question / answer rows -> instruction records; the pipeline
    with `data.instruction_task = "vqa"` wraps each question in a VQA instruction (LLM prompt and Q-Former
    text) and trains on the answer."""
    import json

    from blip2_jax import config_sections
    from blip2_jax.data import build, pipeline, records
    from tests.helpers import image_bytes

    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes(i, "JPEG"))
    rows = [{"image": "0.jpg", "question": "What colour is the left square?", "answer": "red"},
            {"image": "1.jpg", "question": "How many squares?", "answer": "two"},
            {"image": "0.jpg", "question": "What colour is the right square?", "answer": "blue"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build.main(["table", "--input", str(tmp_path / "qa.jsonl"), "--images", str(tmp_path / "img"), "--out",
                str(tmp_path / "out"), "--caption_key", "answer", "--question_key", "question", "--workers", "1"])
    recs = [r for f in records.find_shards(str(tmp_path / "out"), "train") for r in records.read_shard(f)]
    assert [(r.image_id, r.captions, r.questions) for r in recs] == [
        ("0.jpg", ("red", "blue"), ("What colour is the left square?", "What colour is the right square?")),
        ("1.jpg", ("two",), ("How many squares?",))]
    assert b"questions" not in records.encode_record(records.ImageText(b"x", ("a",), "i", "s"))  # as before

    bert_dir = tmp_path / "bert"
    bert_dir.mkdir()
    bert = _bert(str(bert_dir))
    tok = testing.make_tiny_opt_tokenizer(str(tmp_path / "opt"))
    c = config_sections.data_config()
    c.train_sources.qa = config_sections.source_config(str(tmp_path / "out"))
    c.update(global_batch_size=4, image_size=28, text_mode="opt", tokenizer_path=str(tmp_path / "opt"),
             max_text_len=96, instruction_task="vqa", qformer_tokenizer_path=str(bert_dir), max_instruction_len=40,
             read_threads=1, read_buffer_size=4)
    batch = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
    for i in range(4):
        instruction = bert.decode(batch["qformer_input_ids"][i], skip_special_tokens=True)
        question = next(q for q in ("left square", "right square", "how many") if q in instruction)
        answer = {"left square": "red", "right square": "blue", "how many": "two"}[question]
        target = tok.decode([t for t in batch["labels"][i] if t != -100])
        assert target == f" {answer}\n", (instruction, target)
        prompt = tok.decode(batch["input_ids"][i][batch["labels"][i] == -100][:int(np.argmax(batch["labels"][i] != -100))],
                            skip_special_tokens=True)
        assert question in prompt.lower(), prompt

    # Visual question generation on the same records (InstructBLIP's third held-in task): the instruction
    # holds the answer, the target is the question.
    c.instruction_task = "vqg"
    batch = next(pipeline.make_train_iterator(c, seed=0, process_index=0, process_count=1))
    questions = {"red": "what colour is the left square?", "blue": "what colour is the right square?",
                 "two": "how many squares?"}
    for i in range(4):
        labels = batch["labels"][i]
        prompt = tok.decode(batch["input_ids"][i][:int(np.argmax(labels != -100))], skip_special_tokens=True)
        answer = next(a for a in questions if f"{a}" in prompt.split("answer")[-1])
        target = tok.decode([t for t in labels if t != -100])
        assert target == f" {text.blip_question(questions[answer])}\n", (prompt, target)
        assert any(t.format(answer=answer) == prompt.strip() for t in instructions.TEMPLATES["vqg"]), prompt
