"""The Brown Corpus with universal part-of-speech tags, read straight from NLTK's zip files (no nltk needed).

Layout (the NLTK data package, e.g. ``../shared/data/nltk_data``)::
    corpora/brown.zip                 brown/c[a-r]NN: one sentence per line, ``word/tag`` tokens separated by
                                      whitespace, paragraphs separated by blank lines; brown/cats.txt: category
    taggers/universal_tagset.zip      universal_tagset/en-brown.map: ``BROWN-TAG TAB UNIVERSAL-TAG`` per line

This reproduces ``nltk.corpus.brown.tagged_sents(tagset="universal")``: the tag is what follows the LAST ``/``
of a token, upper-cased, and mapped through ``en-brown.map``; tags the map lacks become ``X`` (NLTK's default).
57,340 sentences and 1,161,192 tokens in 500 files. Reading the zip directly is a few lines of ``zipfile``; nltk
itself is not a dependency of this project.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

from core.errors import DataError

#: The 12 tags of Petrov, Das & McDonald's universal tagset (as NLTK spells them).
UNIVERSAL_TAGS = ("ADJ", "ADP", "ADV", "CONJ", "DET", "NOUN", "NUM", "PRON", "PRT", "VERB", ".", "X")
BROWN_FILE = re.compile(r"brown/c[a-r]\d\d")


class TaggedSentence(NamedTuple):
    """One Brown sentence: its words and one tag per word."""

    fileid: str
    category: str
    words: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def find_nltk_data(data_root: str | Path | None = None) -> Path:
    """The NLTK data folder: ``<data_root>/nltk_data``, ``<data_root>`` itself, or ``$NLTK_DATA``."""
    candidates = []
    if data_root is not None:
        candidates += [Path(data_root) / "nltk_data", Path(data_root)]
    if os.environ.get("NLTK_DATA"):
        candidates += [Path(p) for p in os.environ["NLTK_DATA"].split(os.pathsep)]
    for folder in candidates:
        if (folder / "corpora" / "brown.zip").is_file():
            return folder
    looked = ", ".join(str(c) for c in candidates) or "(no data_root given and NLTK_DATA unset)"
    raise DataError(
        f"Brown Corpus not found: no corpora/brown.zip under {looked}. Set data.data_root to the folder holding "
        "nltk_data/ (e.g. ../shared/data) or NLTK_DATA to the nltk_data folder itself"
    )


def load_tag_map(tagset_zip: str | Path, name: str = "en-brown") -> dict[str, str]:
    """``{fine tag: universal tag}`` from ``universal_tagset.zip`` (the file NLTK's ``map_tag`` reads)."""
    tagset_zip = Path(tagset_zip)
    if not tagset_zip.is_file():
        raise DataError(f"universal tagset mapping {tagset_zip} not found (needed for tagset='universal')")
    member = f"universal_tagset/{name}.map"
    with zipfile.ZipFile(tagset_zip) as z:
        try:
            text = z.read(member).decode("utf-8")
        except KeyError:
            raise DataError(f"{tagset_zip}: no member {member}") from None
    mapping = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fine, _, coarse = line.partition("\t")
        if coarse not in UNIVERSAL_TAGS:
            raise DataError(f"{tagset_zip}:{member}:{n}: {coarse!r} is not a universal tag")
        mapping[fine] = coarse
    return mapping


def read_brown(
    data_root: str | Path | None = None,
    tagset: str = "universal",
    categories: list[str] | None = None,
    max_sentences: int | None = None,
) -> list[TaggedSentence]:
    """Brown sentences in NLTK's file order (ca01 ... cr09).

    Args:
        data_root: folder holding ``nltk_data/`` (or the nltk_data folder itself); else ``$NLTK_DATA``.
        tagset: ``universal`` (12 tags) or ``brown`` (the original tags, upper-cased as NLTK returns them).
        categories: keep only these categories (e.g. ``["news"]``); None keeps all 15.
        max_sentences: stop after this many sentences.
    """
    if tagset not in ("universal", "brown"):
        raise DataError(f"tagset must be 'universal' or 'brown', got {tagset!r}")
    root = find_nltk_data(data_root)
    brown_zip = root / "corpora" / "brown.zip"
    mapping = load_tag_map(root / "taggers" / "universal_tagset.zip") if tagset == "universal" else None
    out: list[TaggedSentence] = []
    with zipfile.ZipFile(brown_zip) as z:
        cats = dict(line.split() for line in z.read("brown/cats.txt").decode("ascii").splitlines() if line.strip())
        known = sorted(set(cats.values()))
        if categories is not None and (bad := set(categories) - set(known)):
            raise DataError(f"unknown Brown categories {sorted(bad)}; choose from {known}")
        for member in sorted(n for n in z.namelist() if BROWN_FILE.fullmatch(n)):
            fileid = member.split("/")[1]
            if categories is not None and cats[fileid] not in categories:
                continue
            for n, line in enumerate(z.read(member).decode("ascii").splitlines(), 1):
                tokens = line.split()
                if not tokens:
                    continue
                words, tags = [], []
                for tok in tokens:
                    word, sep, tag = tok.rpartition("/")
                    if not sep:
                        raise DataError(f"{brown_zip}:{member}:{n}: token {tok!r} has no '/TAG'")
                    tag = tag.upper()
                    words.append(word)
                    tags.append(mapping.get(tag, "X") if mapping is not None else tag)
                out.append(TaggedSentence(fileid, cats[fileid], tuple(words), tuple(tags)))
                if max_sentences is not None and len(out) >= max_sentences:
                    return out
    return out
