"""Write eval/data/wordnet/ from a WordNet 3.0 dictionary folder (Debian's wordnet-base: /usr/share/wordnet; NLTK's
wordnet corpus holds the same files):

    python scripts/wordnet_nouns.py /usr/share/wordnet

nouns.txt.gz: every single-word noun lemma of index.noun, one per line (compounds, written with "_", are left out:
a tokenizer's word never lemmatizes to a benchmark word through one); noun.exc: the irregular noun forms, as
WordNet lists them. eval.nouns lemmatizes with these as NLTK's WordNetLemmatizer does with the whole WordNet.
"""
import gzip
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "eval" / "data" / "wordnet"


def main(src: str) -> None:
    src_dir = Path(src)
    lemmas = sorted({line.split(" ", 1)[0] for line in (src_dir / "index.noun").read_text(encoding="latin-1")
                     .splitlines() if line and not line.startswith(" ") and "_" not in line.split(" ", 1)[0]})
    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT / "nouns.txt.gz", "wb", mtime=0) as f:  # mtime 0: the same bytes on every run
        f.write(("\n".join(lemmas) + "\n").encode())
    (OUT / "noun.exc").write_text((src_dir / "noun.exc").read_text(encoding="latin-1"))
    print(f"{len(lemmas)} noun lemmas -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
