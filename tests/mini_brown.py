"""A miniature NLTK data folder in the real format (corpora/brown.zip + taggers/universal_tagset.zip) for tests."""

from __future__ import annotations

import zipfile
from pathlib import Path


def write_mini_nltk(root: Path, files: dict[str, str], categories: str, tag_map: str) -> Path:
    """Write ``root/corpora/brown.zip`` (``files`` + ``brown/cats.txt``) and the universal tag map; return ``root``."""
    (root / "corpora").mkdir(parents=True)
    (root / "taggers").mkdir()
    with zipfile.ZipFile(root / "corpora" / "brown.zip", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("brown/cats.txt", categories)
    with zipfile.ZipFile(root / "taggers" / "universal_tagset.zip", "w") as z:
        z.writestr("universal_tagset/en-brown.map", tag_map)
    return root
