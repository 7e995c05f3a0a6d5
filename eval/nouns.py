"""Word tokenizer and noun lemmatizer with no downloaded language data, as the reference scorers use NLTK's.

The reference scorers use NLTK's `word_tokenize` and `WordNetLemmatizer().lemmatize(word)` (nouns); NLTK's data
cannot be downloaded here. So:

* `tokenize` splits like the Treebank tokenizer where it matters: punctuation is its own token (a
  phrase never pairs across a '.' or ','), "dog's" -> "dog", "'s" (and 'm 'd 'll 're 've; "can't" -> "ca", "n't"),
  a quoted word is a word ("'dog'" -> "'", "dog", "'"), words joined by '-', '/' or '_' stay whole ("hot-dog",
  "bird's-eye",
  "knife/fork": NLTK finds no object in "knife/fork"). Punctuation runs ("...", "--") and abbreviations ("U.S.")
  split otherwise than NLTK's, which changes no object.
* `lemmatize(word)` is WordNet's noun lemma as NLTK 3.10 gives it: the word itself and its exception forms
  (noun.exc) or else its suffix-rule forms (-s, -ses, -ves, -xes, -zes, -ches, -shes, -men, -ies), kept when
  WordNet holds them as nouns, the shortest (the first of equal length) returned; a word with none comes back
  unchanged. WordNet 3.0's noun list and exceptions are in data/wordnet/ (scripts/wordnet_nouns.py wrote them;
  LICENSE there). So "men" stays "men" (WordNet holds it as a noun: not a COCO word), "vases" becomes "vas".
"""
from __future__ import annotations

import functools
import gzip
import re
from pathlib import Path

WORDNET = Path(__file__).parent / "data" / "wordnet"

# NLTK's word_tokenize on one sentence: "n't" and clitics ('s 'm 'd 'll 're 've) split off; a word with an apostrophe
# inside that is no clitic ("o'clock") kept whole; hyphen / slash compounds kept whole.
_TOKEN = re.compile(r"[a-z0-9_]+(?=n't\b)|n't\b|'(?:s|m|d|ll|re|ve)(?![a-z0-9_'-])"
                    r"|[a-z0-9_]+(?:'(?!(?:s|m|d|ll|re|ve)(?![a-z0-9_'-]))[a-z0-9_]+)+"
                    r"(?![-/a-z0-9_]|'(?!(?:s|m|d|ll|re|ve)(?![a-z0-9_'-])))"
                    r"|[a-z0-9_]+(?:(?:[-/]|'[a-z0-9_]+[-/])[a-z0-9_]+)*|[^\sa-z0-9_]", re.IGNORECASE)

# WordNet morphy's noun rules, in NLTK's order: (suffix, replacement).
_RULES = (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y"))


def tokenize(text: str) -> list[str]:
    """Words, clitics ("'s") and single punctuation marks, in order."""
    return _TOKEN.findall(text)


@functools.cache
def wordnet_nouns() -> tuple[frozenset[str], dict[str, list[str]]]:
    """(WordNet 3.0's single-word noun lemmas, its irregular noun forms -> their lemmas)."""
    nouns = frozenset(gzip.decompress((WORDNET / "nouns.txt.gz").read_bytes()).decode().split())
    exceptions = {}
    for line in (WORDNET / "noun.exc").read_text().splitlines():
        form, *lemmas = line.split() or [""]
        if form:
            exceptions[form] = lemmas
    return nouns, exceptions


def lemmatize(word: str) -> str:
    """WordNet's noun lemma of `word` (lowercase), as NLTK's WordNetLemmatizer gives it (module docstring)."""
    nouns, exceptions = wordnet_nouns()
    forms = exceptions[word] if word in exceptions else [
        word[:len(word) - len(suffix)] + repl for suffix, repl in _RULES if word.endswith(suffix)]
    found = [f for f in dict.fromkeys([word, *forms]) if f in nouns]
    return min(found, key=len) if found else word
