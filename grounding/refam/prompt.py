"""The RefAM prompt: the expression, then the attention magnets; a role for every text position.

Magnets are words appended after the expression (".", "a", "with" by default,
optionally a colour word) whose only job is to absorb the text attention of image
regions the expression does not describe; their maps are never read. Every text
position the transformer sees gets one role:

- ``content`` / ``stop``: a sub-token of a content word / a stop word of the expression
  (``vlmtools.text`` decides which, and maps sub-tokens back to words);
- ``magnet``: a sub-token of an appended magnet;
- ``special``: a tokenizer-added token (BOS/EOS, CLIP's start and end);
- ``padding``: a pad token. FLUX pads to 512 (SD3 to 77 + 256) and passes no text
  mask, so pad keys take part in attention and absorb a share of it like magnets do.
  Their maps are never read; whether their mass stays in each image query's text
  budget is RefAM's ``padding`` setting.

The *head noun phrase* (:func:`head_phrase`, read with ``words="head"``) is the part of the
expression that names the referent itself ("the red mug on the left of the plate" ->
"the red mug"), without the phrases that relate it to other objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vlmtools.adapters.dit_source import Segment
from vlmtools.text import Words, content_words, word_ids_for_tokens

Role = Literal["content", "stop", "magnet", "special", "padding"]
DEFAULT_MAGNETS = (".", "a", "with")


@dataclass(frozen=True)
class PromptTokens:
    """The prompt string and, per text position of the transformer, its role and word."""

    text: str
    expression: str
    words: Words
    roles: list[Role]
    word_of: list[int | None]  # index into ``words`` for expression sub-tokens, else None
    head: tuple[int, ...] | None = None  # indices into ``words`` of the head noun phrase (:func:`head_phrase`)

    def positions(self, *roles: Role) -> list[int]:
        return [i for i, role in enumerate(self.roles) if role in roles]


def build_prompt(expression: str, magnets: Sequence[str] = DEFAULT_MAGNETS, colour: str | None = None) -> str:
    """``expression`` followed by the magnets (and the optional colour word), space-separated.

    >>> build_prompt("the red circle")
    'the red circle . a with'
    """
    return " ".join([expression.strip(), *magnets, *([colour] if colour else [])])


def check_expression(expression: str, tagger: str = "auto") -> Words:
    """The expression's words; raises ``ValueError`` when it is empty or has no content word."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("RefAM: the referring expression is empty; describe the object, e.g. 'the red circle'")
    words = content_words(expression.strip(), tagger=tagger)
    if not any(w.is_content for w in words):
        raise ValueError(
            f"RefAM: {expression!r} has no content word (tagger {words.tagger}): only stop words and "
            "punctuation, whose attention maps carry no location; name the object or its attributes"
        )
    return words


def head_phrase(expression: str, words: Words) -> tuple[int, ...]:
    """Indices into ``words`` (``content_words(expression)``) of the expression's head noun phrase.

    With spaCy (``words.tagger`` is ``"spacy:<model>"``): the noun chunk of spaCy's parse that
    holds the root of the expression ("the red mug on the left of the plate" -> "the red mug",
    "the circle left of the square" -> "the circle"); when the root is in no noun chunk
    (spaCy parsed the expression around a verb or an adjective), the first noun chunk.
    Without spaCy (``tagger="stopwords"``, or ``"auto"`` with no English pipeline installed):
    the expression's leading words up to the first stop word that follows a content word
    ("the red mug on the left" -> "the red mug"; "the circle left of the square" -> "the circle
    left", since the stop-word list cannot tell that "left" starts a relation).
    When the phrase found has no content word (no noun chunk, or a pronoun's: "it on the left"),
    every word: RefAM then reads all content words, as ``words="content"``.
    """
    expression = expression.strip()
    everything = tuple(range(len(words)))
    if words.tagger.startswith("spacy"):
        from vlmtools.text import _load_spacy

        nlp, _ = _load_spacy()
        doc = nlp(expression)
        chunks = list(doc.noun_chunks)
        root = next((t for t in doc if t.dep_ == "ROOT"), None)
        chunk = next((c for c in chunks if root is not None and c.start <= root.i < c.end), None)
        chunk = chunk or (chunks[0] if chunks else None)
        if chunk is None:
            return everything
        span = range(chunk.start_char, chunk.end_char)
        phrase = tuple(i for i, w in enumerate(words) if w.start in span)
    else:
        phrase, seen_content = [], False
        for i, w in enumerate(words):
            if seen_content and not w.is_content and any(c.isalnum() for c in w.word):
                break
            phrase.append(i)
            seen_content = seen_content or w.is_content
        phrase = tuple(phrase)
    return phrase if any(words[i].is_content for i in phrase) else everything


def token_roles(expression: str, prompt: str, segments: Sequence[Segment], words: Words) -> PromptTokens:
    """Roles of the concatenated ``segments`` (offsets into ``prompt``, which starts with the expression)."""
    expression = expression.strip()
    if not prompt.startswith(expression):
        raise ValueError("the prompt must start with the expression")
    roles: list[Role] = []
    word_of: list[int | None] = []
    for segment in segments:
        ids = word_ids_for_tokens(expression, segment.offsets, words)
        for (start, end), real, word in zip(segment.offsets, segment.real, ids):
            if not real:
                role = "padding"
            elif end <= start:
                role = "special"
            elif start >= len(expression):
                role = "magnet"
            elif word is not None and words[word].is_content:
                role = "content"
            else:
                role = "stop"
            roles.append(role)
            word_of.append(word if role in ("content", "stop") else None)
    return PromptTokens(prompt, expression, words, roles, word_of, head_phrase(expression, words))
