"""InstructBLIP's instruction templates per task, and one instruction drawn for a record.

The templates are those the InstructBLIP paper (Dai et al. 2023, appendix, "instruction templates used
for transforming held-in datasets into instruction tuning data") gives for image captioning, VQA and
visual question generation, without their leading `<Image>` (here the visual prompt always comes
first). During instruction tuning each example gets one template of its task, drawn uniformly; the
same text is the LLM's prompt and the Q-Former's instruction.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "caption": (
        "A short image caption:",
        "A short image description:",
        "A photo of",
        "An image that shows",
        "Write a short description for the image.",
        "Write a description for the photo.",
        "Provide a description of what is presented in the photo.",
        "Briefly describe the content of the image.",
        "Can you briefly explain what you see in the image?",
        "Could you use a few words to describe what you perceive in the photo?",
        "Please provide a short depiction of the picture.",
        "Using language, provide a short account of the image.",
        "Use a few words to illustrate what is happening in the picture.",
    ),
    "vqa": (
        "{question}",
        "Question: {question}",
        "{question} A short answer to the question is",
        "Q: {question} A:",
        "Question: {question} Short answer:",
        "Given the image, answer the following question with no more than three words. {question}",
        "Based on the image, respond to this question with a short answer: {question}. Answer:",
        "Use the provided image to answer the question: {question} Provide your answer as short as possible:",
        'What is the answer to the following question? "{question}"',
        'The question "{question}" can be answered using the image. A short answer is',
    ),
    "vqg": (
        "Given the image, generate a question whose answer is: {answer}. Question:",
        "Based on the image, provide a question with the answer: {answer}. Question:",
        'Given the visual representation, create a question for which the answer is "{answer}".',
        "From the image provided, craft a question that leads to the reply: {answer}. Question:",
        "Considering the picture, come up with a question where the answer is: {answer}.",
        "Taking the image into account, generate an question that has the answer: {answer}. Question:",
    ),
}
# What each task's templates fill in.
FIELDS = {"caption": (), "vqa": ("question",), "vqg": ("answer",)}


def instruction(task: str, rng: np.random.Generator, **fields: str) -> str:
    """One instruction for an example of `task` ("caption", "vqa", "vqg"): a template drawn with `rng`,
    filled with `fields` (vqa: `question`, vqg: `answer`)."""
    if task not in TEMPLATES:
        raise ValueError(f"instruction task {task!r}: expected one of {tuple(TEMPLATES)}")
    if set(fields) != set(FIELDS[task]):
        raise ValueError(f"instruction task {task!r} takes the fields {FIELDS[task]}, got {tuple(sorted(fields))}")
    templates = TEMPLATES[task]
    return templates[int(rng.integers(len(templates)))].format(**fields)
