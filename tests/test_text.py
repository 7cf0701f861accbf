import doctest
import sys

import pytest

from vlmtools import text
from vlmtools.text import Word, content_words, word_ids_for_tokens


@pytest.fixture
def no_spacy(monkeypatch):
    """Make `import spacy` fail, as on an install without it."""
    text._load_spacy.cache_clear()
    monkeypatch.setitem(sys.modules, "spacy", None)
    yield
    text._load_spacy.cache_clear()


def _content(ws):
    return [w.word for w in ws if w.is_content]


def test_stopwords_tagger_without_spacy(no_spacy):
    ws = content_words("Is there a red car to the left of the man with glasses?")
    assert ws.tagger == "stopwords"
    assert _content(ws) == ["red", "car", "left", "man", "glasses"]
    assert all(w.pos is None for w in ws)


def test_spans_index_the_text(no_spacy):
    s = "The dog's  ball, isn't it blue?"
    ws = content_words(s)
    assert all(s[w.start : w.end] == w.word for w in ws)
    assert _content(ws) == ["dog's", "ball", "blue"]
    assert [w.word for w in ws if not w.is_content] == ["The", ",", "isn't", "it", "?"]


def test_spacy_requested_but_missing_names_the_fix(no_spacy):
    with pytest.raises(RuntimeError, match="pip install spacy"):
        content_words("a dog", tagger="spacy")


def test_unknown_tagger_rejected():
    with pytest.raises(ValueError, match="tagger"):
        content_words("a dog", tagger="nltk")


def test_spacy_tagger_when_installed():
    pytest.importorskip("spacy")
    text._load_spacy.cache_clear()
    if text._load_spacy() is None:
        pytest.skip("no English spaCy pipeline installed")
    s = "the woman on the left wearing blue, 2 dogs running quickly"
    ws = content_words(s, tagger="spacy")
    assert ws.tagger.startswith("spacy:en_core_web_sm")
    assert all(s[w.start : w.end] == w.word for w in ws)
    pos = {w.word: w.pos for w in ws}
    assert pos["the"] == "DET" and pos["dogs"] == "NOUN" and pos["2"] == "NUM"
    assert {"woman", "wearing", "blue", "2", "dogs", "running", "quickly"} <= set(_content(ws))
    assert not {"the", "on", ","} & set(_content(ws))
    # "auto" picks spaCy when present
    assert content_words(s).tagger == ws.tagger


def _bpe_tokenizer():
    """A real HF fast tokenizer (byte-level BPE, trained here, with a special
    token) whose offsets keep the leading space, as GPT-2/Qwen-style ones do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the red car is on the left of the man", "a dog with glasses"] * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_word_ids_from_fast_tokenizer_offsets(no_spacy):
    s = "Is there a reddish carpet?"
    enc = _bpe_tokenizer()(s, return_offsets_mapping=True)
    words = content_words(s)
    ids = word_ids_for_tokens(s, enc["offset_mapping"], words)
    assert ids[0] is None  # <s>, offset (0, 0)
    by_word = {}
    for (a, b), i in zip(enc["offset_mapping"], ids):
        if i is not None:
            by_word.setdefault(words[i].word, []).append(s[a:b])
    # sub-tokens of each word, leading space included, rebuild the word
    assert {w: "".join(p).strip() for w, p in by_word.items()} == {
        "Is": "Is",
        "there": "there",
        "a": "a",
        "reddish": "reddish",
        "carpet": "carpet",
        "?": "?",
    }
    assert len(by_word["reddish"]) > 1  # the word really was split
    # a whitespace-only token belongs to no word
    assert all(i is None for (a, b), i in zip(enc["offset_mapping"], ids) if s[a:b].isspace())


def test_word_ids_overlap():
    s = "red car"
    words = [Word("red", 0, 3, True, None), Word("car", 4, 7, True, None)]
    # "d c" and "ed ca" overlap both words equally: the first wins; "d car" is
    # mostly "car"; a special token (0, 0) and the space alone belong to no word
    assert word_ids_for_tokens(s, [(2, 5), (1, 6), (2, 7), (0, 0), (3, 4)], words) == [0, 0, 1, None, None]


def test_word_ids_for_a_phrase_inside_a_prompt(no_spacy):
    question = "Is the cat black?"
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    enc = _bpe_tokenizer()(prompt, return_offsets_mapping=True)
    words = content_words(question)
    start = prompt.index(question)
    ids = word_ids_for_tokens(question, enc["offset_mapping"], words, start=start)
    for (a, b), i in zip(enc["offset_mapping"], ids):
        inside = start <= a and b <= start + len(question) and not prompt[a:b].isspace()
        assert (i is not None) == inside, prompt[a:b]
        if i is not None:
            assert prompt[a:b].strip() in words[i].word
    assert {words[i].word for i in ids if i is not None and words[i].is_content} == {"cat", "black"}


def test_docstring_examples(no_spacy):
    assert doctest.testmod(text).failed == 0
