"""Instruction records for the InstructBLIP demo: questions about the shapes scenes, with their answers.

    python -m blip2_jax.data.shapes_vqa --out demo_data/shapes_vqa --shapes square [--num_train 10000 --num_heldout 100]

The scenes are those of `blip2_jax.data.shapes` (two objects, a size, a colour and a shape each, side by
side or one above the other), drawn by the same code from the same seeds. Each scene gets every question
of `questions_for`, one word each for the answer, naming an object by its position ("left"/"right" when
the objects are side by side, "top"/"bottom" when stacked) or by its size and colour:
- `what colour is the left square?` -> `red`            (each object)
- `what size is the bottom circle?` -> `small`          (each object)
- `what shape is the right object?` -> `diamond`        (each object; only when several shapes are drawn)
- `where is the large blue square?` -> `left`           (each object; size + colour + shape name it uniquely)
The question type, what accuracies are broken down by, is the first two words (`question_type`).
With a random frozen ViT only `--shapes square` makes sense: it reads colour, size and position but not
shape (see shapes.py).

Output (`--out`): `train-*` and `heldout-*` ArrayRecord shards of instruction records (`records.ImageText`
with `questions`: caption i answers question i), what the pipeline reads with `data.instruction_task =
"vqa"`; `tokenizer/vocab.txt`, a WordPiece vocabulary holding every word of the questions and of
InstructBLIP's instruction templates (the Q-Former's instruction tokenizer, no [UNK] on this data); and
`shapes_vqa.json`, the arguments. Held-out scenes are new images (the captioning data's held-out
scenes: pairwise different combinations). Byte-identical on re-run with the same arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence

from blip2_jax.data import instructions, records, shapes

MANIFEST = "shapes_vqa.json"
# Position words of (a, b) in a scene "a <relation> b".
POSITIONS = {"left of": ("left", "right"), "above": ("top", "bottom")}


def questions_for(a: tuple, relation: str, b: tuple, several_shapes: bool) -> list[tuple[str, str]]:
    """`(question, answer)` pairs about the scene "a `relation` b" (objects are (size, colour, shape))."""
    out = []
    for obj, position in zip((a, b), POSITIONS[relation]):
        size, colour, shape = obj
        out.append((f"what colour is the {position} {shape}?", colour))
        out.append((f"what size is the {position} {shape}?", size))
        if several_shapes:
            out.append((f"what shape is the {position} object?", shape))
        out.append((f"where is the {size} {colour} {shape}?", position))
    return out


def question_type(question: str) -> str:
    """The type a question is counted under: its first two words ("what colour", "where is")."""
    return " ".join(question.split()[:2])


def make_split(split: str, num: int, seed: int, canvas: int,
               shape_names: Sequence[str] = shapes.SHAPES) -> list[records.ImageText]:
    """Instruction records of one split; deterministic in the arguments."""
    several = len(set(shape_names)) > 1
    out = []
    for i, (a, rel, b, im) in enumerate(shapes.scenes(split, num, seed, canvas, shape_names)):
        qa = questions_for(a, rel, b, several)
        out.append(records.ImageText(shapes.png_bytes(im), tuple(ans for _, ans in qa), f"{split}-{i:06d}",
                                     "shapes_vqa", "PNG", questions=tuple(q for q, _ in qa)))
    return out


def words(text: str) -> list[str]:
    """BERT's basic tokenisation of ASCII text: lowercased words and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def write_vocab(out_dir: str, questions: Sequence[str]) -> str:
    """A WordPiece `vocab.txt` (BERT's specials first) with every word of `questions`, of the captions and
    of the instruction templates; returns the directory."""
    vocab = set(shapes.caption_words())
    for text in [*questions, *(t for ts in instructions.TEMPLATES.values() for t in ts)]:
        vocab.update(words(text.replace("{question}", " ").replace("{answer}", " ")))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(shapes.BERT_SPECIALS + tuple(sorted(vocab))) + "\n")
    return out_dir


def manifest(num_train, num_heldout, size, seed, train_shards, shape_names) -> dict:
    return {"num_train": num_train, "num_heldout": num_heldout, "size": size, "seed": seed,
            "train_shards": train_shards, "shapes": [s for s in shapes.SHAPES if s in shape_names]}


def generate(out_dir: str, *, num_train: int = 10000, num_heldout: int = 100, size: int = 64, seed: int = 0,
             train_shards: int = 4, shape_names: Sequence[str] = shapes.SHAPES) -> dict[str, list[str]]:
    """Writes the shards, the Q-Former vocabulary and the manifest; returns the shard paths per split."""
    shapes.objects(shape_names)  # a bad shape list fails before anything is written
    os.makedirs(out_dir, exist_ok=True)
    written, questions = {}, set()
    for split, num, shards in (("train", num_train, train_shards), ("heldout", num_heldout, 1)):
        recs = make_split(split, num, seed, size, shape_names)
        questions.update(q for r in recs for q in r.questions)
        bounds = [round(k * len(recs) / shards) for k in range(shards + 1)]
        written[split] = []
        for k in range(shards):
            path = os.path.join(out_dir, records.shard_name(split, k, shards))
            records.write_shard(path, recs[bounds[k]:bounds[k + 1]])
            written[split].append(path)
    write_vocab(os.path.join(out_dir, "tokenizer"), sorted(questions))
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest(num_train, num_heldout, size, seed, train_shards, shape_names), f, indent=1)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m blip2_jax.data.shapes_vqa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num_train", type=int, default=10000)
    p.add_argument("--num_heldout", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_shards", type=int, default=4)
    p.add_argument("--shapes", default=",".join(shapes.SHAPES),
                   help=f"comma-separated subset of {','.join(shapes.SHAPES)} to draw (default: all)")
    p.add_argument("--if_changed", action="store_true",
                   help="do nothing when --out already holds data generated with these arguments")
    a = p.parse_args(argv)
    shape_list = a.shapes.split(",")
    shapes.objects(shape_list)
    wanted = manifest(a.num_train, a.num_heldout, a.size, a.seed, a.train_shards, shape_list)
    try:
        with open(os.path.join(a.out, MANIFEST), encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError):
        have = None
    if a.if_changed and have == wanted:
        print(f"{a.out} already holds the shapes VQA data for these arguments")
        return
    written = generate(a.out, num_train=a.num_train, num_heldout=a.num_heldout, size=a.size, seed=a.seed,
                       train_shards=a.train_shards, shape_names=shape_list)
    for split, paths in written.items():
        print(f"{split}: {len(paths)} shard(s) in {a.out}")
    print(f"Q-Former instruction tokenizer: {os.path.join(a.out, 'tokenizer')}")


if __name__ == "__main__":
    main()
