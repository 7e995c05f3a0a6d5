"""Word tokenizer and noun lemmatizer that need no downloaded language data.

The reference scorers use NLTK's `word_tokenize` and WordNet's noun lemmatizer; their data cannot
be downloaded here. What the scorers need from them is narrow: split a response into words and
punctuation, and turn a plural noun into the singular that the benchmark's vocabulary holds. So:

* `tokenize` splits like the Treebank tokenizer where it matters: punctuation is its own token (a
  phrase never pairs across a '.' or ','), "dog's" -> "dog", "'s", hyphenated words stay whole.
* `lemmatize(word, vocab)` follows WordNet's `morphy` for nouns: an exception table of irregular
  plurals, then the suffix rules (-s, -ses, -xes, -zes, -ches, -shes, -men, -ies), keeping only
  candidates in `vocab` (WordNet keeps only candidates in WordNet) and returning the shortest, as
  `WordNetLemmatizer` does. A word with no candidate in `vocab` comes back unchanged (WordNet does
  the same for words it does not know); with `vocab=None` the first rule's singular is returned.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'[a-z]+|[^\sa-z0-9]", re.IGNORECASE)

# Irregular plurals (WordNet's noun.exc entries for everyday objects, people and animals).
IRREGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "grandchildren": "grandchild",
    "mice": "mouse", "geese": "goose", "oxen": "ox", "teeth": "tooth", "feet": "foot", "lice": "louse",
    "knives": "knife", "pocketknives": "pocketknife", "wives": "wife", "lives": "life", "leaves": "leaf",
    "loaves": "loaf", "wolves": "wolf", "calves": "calf", "halves": "half", "shelves": "shelf",
    "scarves": "scarf", "thieves": "thief", "hooves": "hoof", "elves": "elf", "selves": "self",
    "cacti": "cactus", "fungi": "fungus", "radii": "radius", "dice": "die", "criteria": "criterion",
    "buffaloes": "buffalo", "tomatoes": "tomato", "potatoes": "potato", "mangoes": "mango",
    "volcanoes": "volcano", "heroes": "hero", "dominoes": "domino", "mosquitoes": "mosquito",
    "torpedoes": "torpedo", "echoes": "echo",
}

# WordNet morphy's noun rules, in its order: (suffix, replacement).
_RULES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y"))


def tokenize(text: str) -> list[str]:
    """Words, clitics ("'s") and single punctuation marks, in order."""
    return _TOKEN.findall(text)


def _candidates(word: str) -> list[str]:
    out = [word]
    for suffix, repl in _RULES:
        if word.endswith(suffix) and len(word) > len(suffix):
            out.append(word[: len(word) - len(suffix)] + repl)
    return out


def _guess(word: str) -> str:
    """A singular for a word outside any vocabulary (used only when `vocab` is None)."""
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("xes", "x"),
                         ("zes", "z"), ("men", "man")):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            return word[: len(word) - len(suffix)] + repl
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def lemmatize(word: str, vocab: set[str] | frozenset[str] | None = None) -> str:
    """Singular noun form of `word` (lowercase), restricted to `vocab` when one is given."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if vocab is None:
        return _guess(word)
    found = [c for c in _candidates(word) if c in vocab]
    return min(found, key=len) if found else word
