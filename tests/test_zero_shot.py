"""Zero-shot classification (`blip2_jax.evaluate.zero_shot`, `python -m blip2_jax.classify`) against a
torch reference on the HF `Blip2ForImageTextRetrieval`: template-averaged ITC class features, ITM
re-ranking of the top k, accuracy and the confusion matrix."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast

from blip2_jax import classify
from blip2_jax.data.image_ops import CLIP_MEAN, CLIP_STD
from tests.helpers import image_bytes

CLASSES = ["red square", "blue circle", "green triangle"]
TEMPLATES = ("a {}.", "two {} objects.")


@pytest.fixture(scope="module")
def folder(hf_retrieval, tmp_path_factory):
    """A labelled folder (2 images a class, one corrupt file) at the tiny model's image size."""
    hf, model_dir = hf_retrieval("freq2")
    size = hf.config.vision_config.image_size
    root = tmp_path_factory.mktemp("zero_shot")
    rng = np.random.default_rng(0)
    arrays, labels = [], []
    for name in sorted(CLASSES):  # the order the folder is read in
        c = CLASSES.index(name)
        os.makedirs(root / name)
        for j in range(2):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            (root / name / f"{j}.png").write_bytes(image_bytes(arr))
            arrays.append(arr)
            labels.append(c)
    (root / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG not really")
    return hf, model_dir, str(root), arrays, np.asarray(labels)


def _reference(hf, vocab_dir, arrays, k):
    """Torch: class features = normalised mean of HF's text embeds over the templates; ITC = max over
    queries; with k > 0 the top k classes get mean-over-templates ITM logit + ITC, the rest -100."""
    tok = BertTokenizerFast(vocab=os.path.join(vocab_dir, "vocab.txt"), do_lower_case=True)
    texts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    enc = tok(texts, padding="max_length", max_length=35, return_tensors="pt")
    x = (np.stack(arrays).astype(np.float32) / 255.0 - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    px = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 use_image_text_matching_head=False)
        text = out.text_embeds.reshape(len(CLASSES), len(TEMPLATES), -1).mean(1)
        text = torch.nn.functional.normalize(text, dim=-1)
        sims = torch.einsum("iqe,ce->icq", out.image_embeds, text).amax(-1).numpy()
        if k == 0:
            return sims
        n, m = len(arrays), len(texts)
        ii, tt = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
        itm = hf(pixel_values=px[ii], input_ids=enc.input_ids[tt], attention_mask=enc.attention_mask[tt],
                 use_image_text_matching_head=True).logits_per_image[:, 1].numpy()
    itm = itm.reshape(n, len(CLASSES), len(TEMPLATES)).mean(-1)
    scores = np.full_like(sims, -100.0)
    for i in range(n):
        top = np.argsort(-sims[i], kind="stable")[:k]
        scores[i, top] = itm[i, top] + sims[i, top]
    return scores


@pytest.mark.parametrize("k", [0, 2])
def test_scores_and_accuracy_match_the_torch_reference(folder, k):
    from blip2_jax.evaluate import load, retrieval_eval, zero_shot

    hf, model_dir, root, arrays, labels = folder
    want = _reference(hf, model_dir, arrays, k)
    loaded = load.load_model(model_dir)
    scorer = retrieval_eval.RetrievalScorer(loaded.model)
    paths, names = zero_shot.read_labelled_images(root, CLASSES)
    assert len(paths) == 7 and names.count(CLASSES[0]) == 3  # the corrupt file is listed, then skipped
    scores, ids = zero_shot.classify(scorer, loaded.params, loaded.tokenizer,
                                     zero_shot.image_batches(paths, arrays[0].shape[0], 4), CLASSES, TEMPLATES,
                                     itm_top_k=k, batch_size=4)
    good = [i for i, p in enumerate(paths) if not p.endswith("broken.png")]
    assert list(ids) == good
    np.testing.assert_allclose(scores, want, atol=1e-4, rtol=1e-4)
    assert zero_shot.accuracy(scores, labels) == zero_shot.accuracy(want, labels)
    assert zero_shot.accuracy(np.eye(3)[labels] + 0.0, labels) == {"top1": 1.0, "top5": 1.0}


def test_confusion_matrix_by_hand():
    from blip2_jax.evaluate import zero_shot

    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.0, 0.2, 0.8]])
    labels = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(zero_shot.confusion_matrix(scores, labels, 3),
                                  [[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    assert zero_shot.accuracy(scores, labels, ks=(1, 2)) == {"top1": 0.75, "top2": 1.0}


def test_cli_prints_accuracy_and_writes_the_confusion_png(folder, tmp_path, capsys):
    hf, model_dir, root, arrays, labels = folder
    png = tmp_path / "confusion.png"
    argv = [f"--model={model_dir}", f"--data={root}", f"--classes={','.join(CLASSES)}",
            *[f"--template={t}" for t in TEMPLATES], "--batch_size=4", f"--confusion={png}"]
    assert classify.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = _reference(hf, model_dir, arrays, 0)
    assert out["num_images"] == 6 and out["num_skipped"] == 1 and out["chance_top1"] == pytest.approx(1 / 3)
    assert out["metrics"]["top1"] == pytest.approx(float(np.mean(want.argmax(1) == labels)))
    assert np.asarray(out["confusion"]).sum() == 6 and png.stat().st_size > 0
    from PIL import Image
    assert Image.open(png).size[0] > 3 * 28
    # bad input: one line naming the problem, exit 2
    assert classify.main([f"--model={model_dir}", f"--data={tmp_path / 'nowhere'}"]) == 2
    assert "neither an image folder" in capsys.readouterr().err


def test_training_evaluator_reads_the_eval_section(folder):
    """`config.eval.zero_shot` (what stage 1 runs after training and every eval_every) gives the
    same accuracy as the CLI path, under `zero_shot_` names."""
    from blip2_jax.evaluate import load, zero_shot
    from tests import tiny_configs

    hf, model_dir, root, arrays, labels = folder
    c = tiny_configs.stage1()
    c.eval.zero_shot.update(path=root, classes=",".join(CLASSES), templates=TEMPLATES)
    c.eval.batch_size = 4
    c.data.image_size = arrays[0].shape[0]
    c.data.max_text_len = 35
    loaded = load.load_model(model_dir)
    got = zero_shot.evaluator(c, loaded.model, loaded.tokenizer)(loaded.params, 0)
    want = _reference(hf, model_dir, arrays, 0)
    assert got == pytest.approx({f"zero_shot_{k}": v for k, v in zero_shot.accuracy(want, labels).items()})


def test_shapes_zero_shot_sets_label_what_both_objects_share(tmp_path):
    """`data.shapes.write_zero_shot`: per class `num_per_class` scenes whose two objects both have the
    labelled colour (every non-background pixel is it: PIL draws without anti-aliasing); byte-identical
    on re-run; readable by the classifier."""
    from PIL import Image

    from blip2_jax.data import shapes
    from blip2_jax.evaluate import zero_shot

    written = shapes.write_zero_shot(str(tmp_path / "a"), num_per_class=3)
    again = shapes.write_zero_shot(str(tmp_path / "b"), num_per_class=3)
    for attribute, path in written.items():
        paths, labels = zero_shot.read_labelled_images(path)
        values = shapes.SHAPES if attribute == "shape" else tuple(shapes.COLORS)
        assert sorted(labels) == sorted(v for v in values for _ in range(3))
        for p in paths:
            assert open(p, "rb").read() == open(p.replace(str(tmp_path / "a"), str(tmp_path / "b")), "rb").read()
    assert set(again) == set(written)
    paths, labels = zero_shot.read_labelled_images(written["colour"])
    for p, label in zip(paths, labels):
        pixels = {tuple(c) for c in np.asarray(Image.open(p)).reshape(-1, 3)}
        assert pixels == {shapes.BACKGROUND, shapes.COLORS[label]}, (p, label)


def test_image_batches_normalise_with_the_models_mean_and_std(tmp_path):
    from blip2_jax.config_sections import LITE_MEAN, LITE_STD
    from blip2_jax.evaluate import zero_shot

    arr = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(image_bytes(arr))
    batch = next(zero_shot.image_batches([str(tmp_path / "x.png")], 8, 1, mean=LITE_MEAN, std=LITE_STD))
    np.testing.assert_allclose(batch["image"][0], (arr.astype(np.float32) - 127.0) / 128.0, atol=1e-5)


def test_cli_prompts_never_outrun_the_qformer_positions():
    """A demo workdir's Q-Former has 32 positions: a 35-token prompt would read past them (NaN scores)."""
    from types import SimpleNamespace

    from ml_collections import ConfigDict

    def loaded(max_positions, max_text_len=None):
        config = None if max_text_len is None else ConfigDict({"data": {"max_text_len": max_text_len}})
        qformer = SimpleNamespace(max_position_embeddings=max_positions)
        return SimpleNamespace(config=config, model=SimpleNamespace(config=SimpleNamespace(qformer=qformer)))

    assert classify._max_len(loaded(32)) == 32
    assert classify._max_len(loaded(512)) == 35
    assert classify._max_len(loaded(32, max_text_len=16)) == 16
