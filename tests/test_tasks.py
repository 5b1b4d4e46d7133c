"""Passkey and RULER-style needle generators: exact length, one needle, at the asked depth."""

import re

import pytest

from art_runtime.tasks import KINDS, TaskBuilder, spread_depths, split_sentences

SENTENCE_WORDS = 9


class WordTokenizer:
    """One token per whitespace-separated word; ids from a growing vocabulary."""

    chat_template = None

    def __init__(self):
        self.vocab, self.words = {}, []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return ids

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def filler(count=400):
    """Sentences of exactly SENTENCE_WORDS words, each distinguishable."""
    return [" ".join([f"w{i}"] + ["lorem"] * (SENTENCE_WORDS - 2) + ["end."]) for i in range(count)]


@pytest.fixture
def builder():
    return TaskBuilder(WordTokenizer(), filler(), chat=False)


def occurrences(haystack, needle):
    return sum(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("context_tokens", [300, 1000, 1537])
def test_exact_length_and_each_needle_exactly_once(builder, kind, context_tokens):
    sample = builder.build(kind, context_tokens, 0.3, seed=5)
    assert len(sample.input_ids) == context_tokens == sample.context_tokens
    needles = sample.extra["needles"]
    assert len(needles) == (1 if kind in ("passkey", "single") else builder.num_needles)
    for needle, start, end in zip(needles, sample.needle_token_starts, sample.needle_token_ends):
        ids = builder.encode(" " + needle)
        assert sample.input_ids[start:end] == ids
        assert occurrences(sample.input_ids, ids) == 1
    text = builder.tokenizer.decode(sample.input_ids)
    for answer in sample.answers:
        # the passkey needle names its key twice; a magic-number needle once; nowhere else
        assert len(re.findall(rf"\b{answer}\b", text)) == (2 if kind == "passkey" else 1)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("kind", ["passkey", "single", "multikey"])
def test_asked_needle_sits_at_the_depth_within_one_sentence(builder, depth, kind):
    sample = builder.build(kind, 2000, depth, seed=1)
    needle_tokens = sum(e - s for s, e in zip(sample.needle_token_starts, sample.needle_token_ends))
    filler_tokens = sample.haystack_end - sample.haystack_start - needle_tokens
    start = sample.needle_token_starts[0]
    # filler tokens before the asked needle (other needles before it do not count)
    before = start - sample.haystack_start - sum(
        e - s for s, e in zip(sample.needle_token_starts[1:], sample.needle_token_ends[1:]) if s < start)
    assert abs(before - depth * filler_tokens) <= SENTENCE_WORDS
    # ... and at a sentence boundary: the needle follows a sentence's last word (the last
    # sentence of the haystack is cut to make the length exact)
    if 0 < before < filler_tokens:
        assert builder.tokenizer.words[sample.input_ids[start - 1]] == "end."


def test_multi_needle_depths_are_spread(builder):
    sample = builder.build("multikey", 3000, 0.1, seed=2)
    starts = sorted(sample.needle_token_starts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) > 0.15 * (sample.haystack_end - sample.haystack_start)


def test_seeds_change_content_and_are_reproducible(builder):
    a, b, c = (builder.build("single", 800, 0.5, seed=s) for s in (1, 1, 2))
    assert a.input_ids == b.input_ids and a.answers == b.answers
    assert a.answers != c.answers and a.input_ids != c.input_ids


def test_score():
    sample = TaskBuilder(WordTokenizer(), filler(), chat=False).build("multivalue", 900, 0.5)
    assert sample.score(" ".join(sample.answers)) == 1.0
    assert sample.score(sample.answers[0] + "0 and " + sample.answers[1]) == pytest.approx(1 / len(sample.answers))
    assert sample.score("no digits") == 0.0


@pytest.mark.parametrize("kwargs, name", [({"kind": "haystack"}, "kind"), ({"depth": 1.5}, "depth"),
                                          ({"context_tokens": 60}, "context_tokens"),
                                          ({"context_tokens": 512.0}, "context_tokens")])
def test_bad_arguments_raise_naming_them(builder, kwargs, name):
    arguments = {"kind": "passkey", "context_tokens": 512, "depth": 0.5, **kwargs}
    with pytest.raises(ValueError, match=name):
        builder.build(**arguments)


def test_builder_checks():
    with pytest.raises(ValueError, match="chat"):
        TaskBuilder(WordTokenizer(), filler(), chat=True)
    with pytest.raises(ValueError, match="num_needles"):
        TaskBuilder(WordTokenizer(), filler(), chat=False, num_needles=1)
    with pytest.raises(ValueError, match="count"):
        spread_depths(0)
    assert spread_depths(4) == [0.125, 0.375, 0.625, 0.875]


def test_split_sentences():
    text = 'He said "Stop!" Then   he left.\nWas it\nlate? Yes. Mr. Knightley'
    assert split_sentences(text) == ['He said "Stop!"', "Then he left.", "Was it late?", "Yes.", "Mr.", "Knightley"]
