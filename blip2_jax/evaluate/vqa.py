"""VQAv2 accuracy with the official answer normalisation (re-implemented, pure Python).

Accuracy of one answer against the 10 human answers: for each of the 10 leave-one-out subsets of
9 humans, `min(#humans in the subset who gave the answer / 3, 1)`, averaged over the 10 subsets.

Bookkeeping as the official `vqaEval.py` (GT-Vision-Lab/VQA, copied unchanged into
`lavis/common/vqa_tools/vqa_eval.py`): the prediction is stripped and fully normalised
(punctuation, then digits/articles/contractions); the human answers get ONLY the punctuation step,
and only when they are not all identical (annotation answers are already normalised upstream).
"""
from __future__ import annotations

import re
from typing import Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Kept verbatim from the official code, including its "(?!<=" typo (a lookahead, not a
# lookbehind): a period not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a punctuation mark is deleted when it touches a space (or the
    text has a digit,digit comma), else replaced by a space; then periods not before a digit go."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (= 32) as `count`: at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words -> digits, drop articles, restore
    apostrophes of known contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer (whitespace, punctuation, digits/articles)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers (10 in VQAv2).

    Args:
      prediction: the model's answer, raw.
      gt_answers: the human answers as in the annotation file (`answers[*].answer`).
    """
    if len(gt_answers) < 2:
        raise ValueError(f"vqa_accuracy: need at least 2 human answers, got {len(gt_answers)}")
    pred = normalize_answer(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for leave_out in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != leave_out and a == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy_corpus(
    predictions: Sequence[str],
    gt_answers: Sequence[Sequence[str]],
) -> float:
    """Mean `vqa_accuracy` over questions, a fraction (the official number is 100x, rounded)."""
    if len(predictions) != len(gt_answers):
        raise ValueError(
            f"vqa_accuracy_corpus: {len(predictions)} predictions for {len(gt_answers)} questions")
    if not predictions:
        raise ValueError("vqa_accuracy_corpus: no questions")
    return sum(vqa_accuracy(p, g) for p, g in zip(predictions, gt_answers)) / len(predictions)
