"""A real English→German corpus that needs no network: the German gettext catalogs (.mo) of the
programs installed on this machine (Debian's packages), as a source/target TSV for
``tfkit train translation --data FILE``.

Each catalog pairs an English message with its German translation. Kept: one-line messages of 2 to
30 words, without printf placeholders (%s, {name}), whose translation is one line too; a message
is kept once, with the translation of the first catalog (in sorted order) that has it.

    python benchmarks/gettext_corpus.py /tmp/de.tsv
"""

from __future__ import annotations

import csv
import gettext
import re
import sys
from pathlib import Path

PLACEHOLDER = re.compile(r"%|\{|\}|\$|<|>|_\w|\\")


def pairs(folder: Path = Path("/usr/share/locale/de/LC_MESSAGES")) -> dict[str, str]:
    found: dict[str, str] = {}
    for catalog in sorted(folder.glob("*.mo")):
        with catalog.open("rb") as f:
            try:
                messages = gettext.GNUTranslations(f)._catalog
            except (OSError, UnicodeDecodeError):
                continue
        for english, german in messages.items():
            if not (isinstance(english, str) and isinstance(german, str) and english and german):
                continue
            english = english.rpartition("\x04")[2]  # "context\x04message" (msgctxt)
            if "\n" in english + german or "\t" in english + german or PLACEHOLDER.search(english + german):
                continue
            if 2 <= len(english.split()) <= 30 and english != german:
                found.setdefault(english.strip(), german.strip())
    return found


if __name__ == "__main__":
    out = Path(sys.argv[1])
    found = pairs()
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["source", "target"])
        writer.writerows(found.items())
    print(f"{len(found)} pairs -> {out}")
