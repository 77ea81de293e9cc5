"""A small, deterministic synthetic language for training toy language models.

The language has about 200 made-up words in a few classes and a probabilistic grammar with
dependencies a small model can learn (and that metrics can later be tested against):

* **Determiner → noun agreement.** Nouns have a grammatical class (``A`` or ``B``) and a number
  (singular or plural); a determiner encodes both, and the noun that closes the noun phrase
  (after zero to two adjectives) always matches it.
* **Subject → verb agreement.** Verbs have a singular and a plural form; the form follows the
  number of the subject.
* **Verb → object selection.** Every transitive verb takes objects of one semantic category.
* **Name → pronoun coreference.** A document usually has a protagonist (a name with class ``A``
  or ``B``); later sentences refer back to it with the pronoun of its class.
* **Counting.** ``tal`` starts a counting run over the number words in order ("one two three").
* **Bracket and quote matching.** Parentheticals ``( … )`` and quotations ``« … »`` always
  close, in the right order.

The vocabulary is fixed (it does not depend on the corpus seed); :func:`generate_corpus` draws
documents of one to four sentences, words separated by single spaces, from a seeded
:class:`random.Random`, so the same ``(n_docs, seed)`` always gives the same corpus.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

from actscope.errors import InputError

__all__ = [
    "Lexicon",
    "lexicon",
    "vocabulary",
    "generate_corpus",
    "generate_document",
    "unigram_entropy",
    "PUNCTUATION",
]

PUNCTUATION = (".", ",", "(", ")", "«", "»")
# Function words: "sa" = says (introduces a quotation), "en" = and, "tal" = counts (starts a run
# of number words).
SAYS, AND, COUNTS = "sa", "en", "tal"

_CLASSES = ("A", "B")
_NUMBERS = ("sg", "pl")

# Sizes of the word classes (the total vocabulary is 203 words).
_N_NOUN_LEMMAS_PER_CLASS_AND_CATEGORY = 10  # 2 classes x 2 categories x 10 lemmas x 2 numbers = 80
_N_ADJECTIVES = 24
_N_TRANSITIVE_PER_CATEGORY = 7  # x 2 categories
_N_INTRANSITIVE = 6  # verbs: 20 lemmas x 2 numbers = 40
_N_ADVERBS = 8
_N_NAMES_PER_CLASS = 10
_N_NUMBER_WORDS = 12

_LEXICON_SEED = 20240611  # fixes the spelling of the words; never the corpus seed


@dataclass(frozen=True)
class Lexicon:
    """The words of the language and their grammatical features.

    ``word_class`` maps every word to one of ``noun``, ``det``, ``adj``, ``verb``, ``adv``,
    ``name``, ``pron``, ``num``, ``func`` or ``punct``. The feature tables give, per word:
    nouns ``(class, number, category)``, determiners ``(class, number, definite)``, verbs
    ``(lemma index, number, category or None for intransitive)``, names and pronouns their class.
    ``numbers`` lists the number words in counting order.
    """

    words: tuple[str, ...]
    word_class: dict[str, str] = field(repr=False)
    nouns: dict[str, tuple[str, str, int]] = field(repr=False)
    determiners: dict[str, tuple[str, str, bool]] = field(repr=False)
    verbs: dict[str, tuple[int, str, int | None]] = field(repr=False)
    names: dict[str, str] = field(repr=False)
    pronouns: dict[str, str] = field(repr=False)
    adjectives: tuple[str, ...] = field(repr=False)
    adverbs: tuple[str, ...] = field(repr=False)
    numbers: tuple[str, ...] = field(repr=False)

    # Lookup tables for the generator, derived from the above.
    def nouns_for(self, cls: str, category: int | None) -> list[tuple[str, str]]:
        """``(singular, plural)`` pairs of the nouns of class ``cls`` (and ``category``)."""
        sg = [w for w, (c, n, k) in self.nouns.items() if c == cls and n == "sg"
              and (category is None or k == category)]
        by_stem = {w: w + "n" for w in sg}
        return [(s, by_stem[s]) for s in sg]


def _make_stems(rng: random.Random, n: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    onsets = "bdfgklmnprstvz"
    vowels = "aeiou"
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        stem = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(k))
        # Stems and all their inflected forms must be new words.
        forms = {stem + suffix for suffix in
                 ("", "n", "o", "on", "a", "an", "et", "ent", "i", "u", "k")}
        if forms & taken:
            continue
        taken.update(forms)
        out.append(stem)
    return out


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    """The fixed lexicon of the language (the same in every process and on every machine)."""
    rng = random.Random(_LEXICON_SEED)
    taken: set[str] = set(PUNCTUATION) | {SAYS, AND, COUNTS}
    word_class: dict[str, str] = {}

    def add(word: str, cls: str) -> None:
        if word in word_class:  # pragma: no cover - guarded by _make_stems
            raise RuntimeError(f"duplicate word {word!r} in the synthetic lexicon")
        word_class[word] = cls

    # Determiners: class x number x definiteness, short fixed spellings.
    determiners: dict[str, tuple[str, str, bool]] = {}
    det_spelling = {("A", "sg", True): "lo", ("A", "pl", True): "los",
                    ("A", "sg", False): "un", ("A", "pl", False): "uns",
                    ("B", "sg", True): "la", ("B", "pl", True): "las",
                    ("B", "sg", False): "ena", ("B", "pl", False): "enas"}
    for key, w in det_spelling.items():
        determiners[w] = key
        add(w, "det")
    taken.update(det_spelling.values())

    pronouns = {"ze": "A", "shi": "B"}
    for w in pronouns:
        add(w, "pron")
    taken.update(pronouns)

    # Nouns: class A ends in -o, class B in -a; the plural adds -n.
    nouns: dict[str, tuple[str, str, int]] = {}
    for cls, suffix in (("A", "o"), ("B", "a")):
        for category in (0, 1):
            for stem in _make_stems(rng, _N_NOUN_LEMMAS_PER_CLASS_AND_CATEGORY, taken, (1, 2)):
                nouns[stem + suffix] = (cls, "sg", category)
                nouns[stem + suffix + "n"] = (cls, "pl", category)
                add(stem + suffix, "noun")
                add(stem + suffix + "n", "noun")

    adjectives = tuple(s + "i" for s in _make_stems(rng, _N_ADJECTIVES, taken, (1, 2)))
    for w in adjectives:
        add(w, "adj")
    taken.update(adjectives)

    # Verbs: singular -et, plural -ent. Transitive verbs select an object category.
    verbs: dict[str, tuple[int, str, int | None]] = {}
    categories: list[int | None] = ([0] * _N_TRANSITIVE_PER_CATEGORY
                                    + [1] * _N_TRANSITIVE_PER_CATEGORY
                                    + [None] * _N_INTRANSITIVE)
    for lemma, (stem, category) in enumerate(
            zip(_make_stems(rng, len(categories), taken, (1, 2)), categories)):
        verbs[stem + "et"] = (lemma, "sg", category)
        verbs[stem + "ent"] = (lemma, "pl", category)
        add(stem + "et", "verb")
        add(stem + "ent", "verb")

    adverbs = tuple(s + "u" for s in _make_stems(rng, _N_ADVERBS, taken, (2, 2)))
    for w in adverbs:
        add(w, "adv")
    taken.update(adverbs)

    names: dict[str, str] = {}
    for cls in _CLASSES:
        for stem in _make_stems(rng, _N_NAMES_PER_CLASS, taken, (2, 3)):
            w = stem.capitalize()
            names[w] = cls
            add(w, "name")

    numbers = tuple(s + "k" for s in _make_stems(rng, _N_NUMBER_WORDS, taken, (1, 2)))
    for w in numbers:
        add(w, "num")
    taken.update(numbers)

    for w in (SAYS, AND, COUNTS):
        add(w, "func")
    for w in PUNCTUATION:
        add(w, "punct")

    return Lexicon(words=tuple(word_class), word_class=word_class, nouns=nouns,
                   determiners=determiners, verbs=verbs, names=names, pronouns=pronouns,
                   adjectives=adjectives, adverbs=adverbs, numbers=numbers)


def vocabulary() -> list[str]:
    """All words of the language, in a fixed order (no special tokens)."""
    return list(lexicon().words)


# --------------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------------


def _zipf_choice(rng: random.Random, items: list, exponent: float = 0.9):
    weights = [1.0 / (i + 1) ** exponent for i in range(len(items))]
    return rng.choices(items, weights=weights, k=1)[0]


class _Generator:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lex = lexicon()
        lx = self.lex
        self.det = {v: k for k, v in lx.determiners.items()}
        self.nouns = {(cls, cat): lx.nouns_for(cls, cat) for cls in _CLASSES for cat in (0, 1)}
        self.verb_lemmas: dict[int | None, list[tuple[str, str]]] = {}
        by_lemma: dict[int, dict[str, str]] = {}
        cat_of: dict[int, int | None] = {}
        for w, (lemma, num, cat) in lx.verbs.items():
            by_lemma.setdefault(lemma, {})[num] = w
            cat_of[lemma] = cat
        for lemma in sorted(by_lemma):
            self.verb_lemmas.setdefault(cat_of[lemma], []).append(
                (by_lemma[lemma]["sg"], by_lemma[lemma]["pl"]))
        self.names = {cls: [w for w, c in lx.names.items() if c == cls] for cls in _CLASSES}
        self.pronoun = {c: w for w, c in lx.pronouns.items()}

    # Noun phrases ------------------------------------------------------------------------
    def noun_phrase(self, category: int | None = None, depth: int = 0) -> tuple[list[str], str]:
        """Returns the words and the grammatical number of the phrase."""
        rng = self.rng
        cls = rng.choice(_CLASSES)
        if category is None:
            category = rng.randrange(2)
        number = "pl" if rng.random() < 0.35 else "sg"
        definite = rng.random() < 0.6
        words = [self.det[(cls, number, definite)]]
        n_adj = rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0]
        for _ in range(n_adj):
            words.append(_zipf_choice(rng, list(self.lex.adjectives)))
        sg, pl = _zipf_choice(rng, self.nouns[(cls, category)])
        words.append(sg if number == "sg" else pl)
        if depth == 0 and rng.random() < 0.12:  # parenthetical: ( adj ) or ( adj en adj )
            words.append("(")
            words.append(rng.choice(self.lex.adjectives))
            if rng.random() < 0.4:
                words += [AND, rng.choice(self.lex.adjectives)]
            words.append(")")
        return words, number

    def subject(self, doc: dict, first: bool) -> tuple[list[str], str]:
        rng = self.rng
        hero = doc["hero"]
        if hero is not None:
            if first:
                return [hero], "sg"
            if rng.random() < 0.6:
                return [self.pronoun[self.lex.names[hero]]], "sg"
        if rng.random() < 0.2:
            return [rng.choice(self.names[rng.choice(_CLASSES)])], "sg"
        return self.noun_phrase()

    # Verb phrases ------------------------------------------------------------------------
    def verb_phrase(self, number: str, depth: int = 0) -> list[str]:
        rng = self.rng
        if rng.random() < 0.75:
            category = rng.randrange(2)
            sg, pl = _zipf_choice(rng, self.verb_lemmas[category])
            obj, _ = self.noun_phrase(category=category, depth=depth)
            words = [sg if number == "sg" else pl] + obj
        else:
            sg, pl = _zipf_choice(rng, self.verb_lemmas[None])
            words = [sg if number == "sg" else pl]
        if rng.random() < 0.25:
            words.append(_zipf_choice(rng, list(self.lex.adverbs)))
        return words

    def clause(self, doc: dict, first: bool, depth: int = 0) -> list[str]:
        subj, number = self.subject(doc, first)
        return subj + self.verb_phrase(number, depth=depth)

    # Sentences ---------------------------------------------------------------------------
    def sentence(self, doc: dict, first: bool) -> list[str]:
        rng = self.rng
        kind = rng.choices(("simple", "coord", "quote", "count"),
                           weights=(0.45, 0.2, 0.15, 0.2))[0]
        if kind == "simple":
            words = self.clause(doc, first)
        elif kind == "coord":
            words = self.clause(doc, first) + [",", AND] + self.clause(doc, False)
        elif kind == "quote":
            subj, number = self.subject(doc, first)
            if number != "sg":  # "sa" (says) is singular: quote givers are single people
                subj = [rng.choice(self.names[rng.choice(_CLASSES)])]
            inner_doc = {"hero": None}
            words = subj + [SAYS, "«"] + self.clause(inner_doc, False, depth=1) + ["»"]
        else:  # counting run
            subj, _ = self.subject(doc, first)
            n = len(self.lex.numbers)
            length = rng.randint(2, 6)
            start = rng.randrange(0, n - length + 1)
            words = subj + [COUNTS] + list(self.lex.numbers[start:start + length])
        return words + ["."]

    def document(self) -> list[str]:
        rng = self.rng
        doc = {"hero": rng.choice(self.names[rng.choice(_CLASSES)]) if rng.random() < 0.7
               else None}
        n_sentences = rng.randint(1, 4)
        words: list[str] = []
        for i in range(n_sentences):
            words += self.sentence(doc, first=(i == 0))
        return words


def _check_args(n_docs, seed) -> None:
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 0:
        raise InputError(
            f"generate_corpus: n_docs must be a non-negative int, got {n_docs!r}; "
            "pass the number of documents to generate, e.g. n_docs=1000.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(
            f"generate_corpus: seed must be an int, got {seed!r} ({type(seed).__name__}); "
            "pass an integer seed such as seed=0.")


def generate_document(rng: random.Random) -> str:
    """One document (one to four sentences) drawn with ``rng``."""
    return " ".join(_Generator(rng).document())


def generate_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` documents of the synthetic language, deterministic in ``seed``.

    Every document is one to four sentences, its words separated by single spaces.
    """
    _check_args(n_docs, seed)
    gen = _Generator(random.Random(seed))
    return [" ".join(gen.document()) for _ in range(n_docs)]


def unigram_entropy(docs: Iterable[str], *, with_eos: bool = True) -> float:
    """Entropy (nats per token) of the empirical word distribution of ``docs``.

    This is the loss of the best context-free (unigram) predictor of these very tokens, the
    baseline a language model must beat to show it has learnt any structure. With
    ``with_eos`` every document also contributes one end-of-document token, as in training.
    """
    counts: Counter[str] = Counter()
    n_docs = 0
    for doc in docs:
        counts.update(doc.split())
        n_docs += 1
    if with_eos and n_docs:
        counts["<eos>"] += n_docs
    total = sum(counts.values())
    if total == 0:
        raise InputError("unigram_entropy: the documents contain no words; pass a non-empty "
                         "corpus, e.g. generate_corpus(100, seed=0).")
    return -sum(c / total * math.log(c / total) for c in counts.values())
