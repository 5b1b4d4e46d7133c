"""Long-context retrieval tasks with real filler text: passkey and RULER-style needles.

No LongBench or RULER data is installable offline (DESIGN §5), so the tasks are generated:
a haystack of real prose (Austen, the Jargon File: ``art-runtime fetch``) with one or more
needles inserted at chosen depths, and a question whose answer is in the needles.

Kinds
-----
``passkey``
    Mohtashami & Jaggi (2023): "The pass key is 68203. Remember it. 68203 is the pass key."
    hidden in the text; asked for the pass key (a 5-digit number).
``single``
    RULER ``niah_single``: "One of the special magic numbers for {key} is: {value}." and
    asked for the number of that key (a 7-digit number).
``multikey``
    RULER ``niah_multikey``: ``num_needles`` needles with different keys; asked for one key's
    number, the others are distractors.
``multivalue``
    RULER ``niah_multivalue``: ``num_needles`` needles with the same key and different
    numbers; asked for all of them (scored by the fraction found, as RULER does).

Construction (:class:`TaskBuilder`)
-----------------------------------
The prompt is token-exact: its token ids are the concatenation of separately tokenized
pieces (chat-template prefix, instruction, filler sentences, needles, question, template
suffix and answer prefix), so ``len(sample.input_ids) == context_tokens`` exactly. The
haystack is consecutive sentences of the filler from a seeded random start; the last
sentence is cut at a token to make the length exact. A needle goes between two sentences,
at the sentence boundary closest to ``depth * haystack tokens``; with several needles, the
depths are spread evenly from ``depth`` on (``depth`` is the asked needle's).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("passkey", "single", "multikey", "multivalue")

# Keys of the RULER-style needles: common nouns, one token-ish each, easy to ask about.
KEYS = ("apple", "river", "candle", "harbor", "violin", "meadow", "lantern", "falcon", "pepper", "glacier",
        "saddle", "orchid", "tunnel", "compass", "marble", "thunder", "basket", "island", "feather", "anchor",
        "cactus", "pillow", "rocket", "walnut", "ribbon", "canyon", "magnet", "oyster", "pebble", "quartz")

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                       "it. I will quiz you about the important information there.")
NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                      "them. I will quiz you about the numbers afterwards.")


@dataclass
class TaskSample:
    """One generated prompt and its answer.

    Attributes
    ----------
    kind : str
        One of ``KINDS``.
    input_ids : list of int
        The prompt's token ids, ``context_tokens`` of them; generation continues from here.
    answers : list of str
        The numbers the answer must contain (one, or all values for ``multivalue``).
    context_tokens : int
    depth : float
        Requested depth of the asked needle, 0 (start of the haystack) .. 1 (end).
    needle_token_starts : list of int
        Where each needle starts in ``input_ids`` (the asked one first).
    needle_token_ends : list of int
        Where each needle ends (exclusive).
    haystack_start, haystack_end : int
        Token range of the haystack (filler and needles) in ``input_ids``.
    question : str
        The question asked.
    """

    kind: str
    input_ids: list[int]
    answers: list[str]
    context_tokens: int
    depth: float
    needle_token_starts: list[int]
    needle_token_ends: list[int]
    haystack_start: int
    haystack_end: int
    question: str
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def score(self, text: str) -> float:
        """Fraction of ``answers`` found in ``text`` as whole numbers (1.0 or 0.0 for one answer)."""
        found = set(re.findall(r"\d+", text))
        return sum(answer in found for answer in self.answers) / len(self.answers)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with whitespace collapsed: split after ``.``, ``!`` or ``?``
    (optionally followed by a closing quote) before whitespace."""
    text = re.sub(r"\s+", " ", text).strip()
    parts = re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019])\s+", text)
    return [part for part in parts if part]


def load_filler(name: str = "austen", cache_dir=None, progress: bool = False) -> list[str]:
    """The sentences of a fetched text (``art_runtime.fetch.fetch_text`` names: ``austen``,
    ``jargon``, ``emma``, ...) or of a plain-text file path."""
    from .fetch import fetch_text

    path = Path(name)
    if not path.is_file():
        try:
            path = fetch_text(name, cache_dir, progress=progress)
        except KeyError as error:
            raise ValueError(f"name: {error.args[0]}") from None
    return split_sentences(path.read_text(encoding="utf-8"))


class TaskBuilder:
    """Builds token-exact task prompts for one tokenizer and filler.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Used for every piece (``tokenizer.encode(piece, add_special_tokens=False)``).
    sentences : list of str
        The filler, e.g. :func:`load_filler`.
    chat : bool
        Wrap the prompt in the tokenizer's chat template (user turn, then the assistant's
        turn opened with the answer prefix). Needs a chat template.
    num_needles : int
        Needles of ``multikey`` and ``multivalue`` (>= 2).
    """

    def __init__(self, tokenizer, sentences: list[str], chat: bool = True, num_needles: int = 4):
        if not sentences:
            raise ValueError("sentences: the filler is empty")
        if not isinstance(num_needles, int) or num_needles < 2:
            raise ValueError(f"num_needles must be an int >= 2, got {num_needles!r}")
        self.tokenizer = tokenizer
        self.sentences = sentences
        self.num_needles = num_needles
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat: the tokenizer has no chat template")
            marker = "\x00CONTENT\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                                 tokenize=False)
            self.template_prefix, self.template_suffix = text.split(marker)
        else:
            self.template_prefix, self.template_suffix = "", "\n"
        self._sentence_ids: dict[int, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _sentence(self, index: int) -> list[int]:
        index %= len(self.sentences)
        if index not in self._sentence_ids:
            self._sentence_ids[index] = self.encode(" " + self.sentences[index])
        return self._sentence_ids[index]

    def build(self, kind: str, context_tokens: int, depth: float, seed: int = 0) -> TaskSample:
        """One sample of ``kind`` with exactly ``context_tokens`` prompt tokens.

        Parameters
        ----------
        kind : {"passkey", "single", "multikey", "multivalue"}
        context_tokens : int
            Prompt length in tokens (the haystack gets what the fixed parts leave, >= 64).
        depth : float
            Where the asked needle goes, 0..1 of the haystack.
        seed : int
            Picks the filler's start, the numbers and the keys.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
            raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
        if not isinstance(context_tokens, int) or isinstance(context_tokens, bool):
            raise ValueError(f"context_tokens must be an int, got {context_tokens!r}")
        rng = random.Random(f"{kind}:{context_tokens}:{depth}:{seed}")
        needles, question, answer_prefix, answers, instruction = self._content(kind, rng)
        head = self.encode(self.template_prefix + instruction)
        tail = self.encode(" " + question + self.template_suffix + answer_prefix)
        needle_ids = [self.encode(" " + needle) for needle in needles]
        budget = context_tokens - len(head) - len(tail) - sum(map(len, needle_ids))
        if budget < 64:
            raise ValueError(f"context_tokens: {context_tokens} leaves {budget} haystack tokens "
                             f"(at least 64 needed; the fixed parts take {context_tokens - budget})")
        filler = self._filler(budget, rng)
        depths = [depth] + [(depth + (i + 1) / len(needles)) % 1.0 for i in range(len(needles) - 1)]
        # Insert at sentence boundaries, deepest first so earlier offsets stay valid.
        boundaries = [0]
        for sentence in filler:
            boundaries.append(boundaries[-1] + len(sentence))
        slots = [min(range(len(boundaries)), key=lambda i: abs(boundaries[i] - d * budget)) for d in depths]
        pieces: list[list[int]] = []
        order = sorted(range(len(needles)), key=lambda n: slots[n])
        cursor = 0
        for n in order:
            pieces += filler[cursor:slots[n]]
            pieces.append((n,))  # a marker for the needle
            cursor = slots[n]
        pieces += filler[cursor:]
        ids, starts, ends = list(head), [0] * len(needles), [0] * len(needles)
        for piece in pieces:
            if isinstance(piece, tuple):
                starts[piece[0]] = len(ids)
                ids += needle_ids[piece[0]]
                ends[piece[0]] = len(ids)
            else:
                ids += piece
        haystack_end = len(ids)
        ids += tail
        return TaskSample(kind, ids, answers, context_tokens, float(depth), starts, ends, len(head), haystack_end,
                          question, seed, {"needles": needles, "answer_prefix": answer_prefix})

    def _filler(self, budget: int, rng: random.Random) -> list[list[int]]:
        """Consecutive sentences' token ids from a random start, exactly ``budget`` tokens."""
        index = rng.randrange(len(self.sentences))
        out, total = [], 0
        while total < budget:
            ids = self._sentence(index)[: budget - total]
            out.append(ids)
            total += len(ids)
            index += 1
        return out

    def _content(self, kind: str, rng: random.Random):
        """``(needles, question, answer prefix, answers, instruction)``; needle 0 is the asked one."""
        if kind == "passkey":
            key = str(rng.randrange(10_000, 100_000))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            return [needle], "What is the pass key?", "The pass key is", [key], PASSKEY_INSTRUCTION
        keys = rng.sample(KEYS, self.num_needles)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(self.num_needles)]
        if kind == "single":
            keys, values = keys[:1], values[:1]
        if kind == "multivalue":
            keys = [keys[0]] * self.num_needles
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        if kind == "multivalue":
            question = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
            prefix = f"The special magic numbers for {keys[0]} mentioned in the provided text are"
            return needles, question, prefix, values, NEEDLE_INSTRUCTION
        question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
        prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        return needles, question, prefix, values[:1], NEEDLE_INSTRUCTION


def spread_depths(count: int) -> list[float]:
    """``count`` depths spread evenly over the context, centred in equal bins:
    ``(i + 0.5) / count``."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    return [(i + 0.5) / count for i in range(count)]
