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


#: Two files of two genres (news = informative, fiction = imaginative) for the interpretability tests.
TWO_GENRES = {"brown/ca01": "\n\n\tThe/at man/nn is/bez playing/vbg the/at guitar/nn ./.\n"
                            "\n\tA/at dog/nn reads/vbz ./.\n",
              "brown/ck01": "\n\n\tthe/at boy./nn paints/vbz a/at car/nn\n\tTwo/cd kids/nns cooking/vbg pasta/nn ./.\n"}
TWO_GENRES_TAG_MAP = "AT\tDET\nNN\tNOUN\nNNS\tNOUN\nBEZ\tVERB\nVBG\tVERB\nVBZ\tVERB\nCD\tNUM\n.\t.\n"


def write_two_genres(data_root: Path) -> Path:
    """``data_root/nltk_data`` holding :data:`TWO_GENRES`; return ``data_root`` (the datamodules' data_root)."""
    write_mini_nltk(data_root / "nltk_data", TWO_GENRES, "ca01 news\nck01 fiction\n", TWO_GENRES_TAG_MAP)
    return data_root
