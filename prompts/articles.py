"""Indefinite articles: the `a(n)` marker of the grammar language becomes "a" or "an" by the word after it.

English chooses by sound, not spelling, so the vowel-letter rule needs a few exception lists:
a vowel letter that sounds like a consonant ("a unicorn", "a European", "a one-eyed cat") and a
silent "h" ("an hour", "an honest fox"). Initialisms spelled letter by letter ("an MRI") are rare in
prompts and not handled: write the article yourself there.
"""

from __future__ import annotations

import re

# Word starts that are written with a vowel letter but start with a consonant sound.
_CONSONANT_SOUND_PREFIXES = (
    "eu", "ewe", "once", "one", "uni", "unanim", "use", "usu", "ute", "uti", "ura", "ure", "uro",
    "uvu", "ubi", "ufo", "uga", "uku", "ukr", "utop",
)
# Exceptions to the exceptions: "un-" words that keep the vowel sound.
_VOWEL_SOUND_UN = ("unin", "unim", "unid")
# Words with a silent "h".
_SILENT_H_PREFIXES = ("hour", "honest", "honor", "honour", "heir", "herb")

_MARKER = re.compile(r"\b([Aa])\(n\)(\s+)(\S*)")


def indefinite_article(word: str) -> str:
    """ "a" or "an" for the word that follows the article ("an elephant", "a unicorn", "an hour", "an 8")."""
    head = word.lstrip("\"'([").lower()
    if not head:
        return "a"
    if head[0].isdigit():
        # Numbers: "an 8", "an 11", "an 18", "an 80"; "a 1", "a 100".
        digits = re.match(r"\d+", head).group(0)
        return "an" if digits[0] == "8" or digits in ("11", "18") or (len(digits) in (2, 5) and digits[:2] in ("11", "18")) else "a"
    if head.startswith(_SILENT_H_PREFIXES):
        return "an"
    if head[0] not in "aeiou":
        return "a"
    if head.startswith(_CONSONANT_SOUND_PREFIXES) and not head.startswith(_VOWEL_SOUND_UN):
        return "a"
    return "an"


def resolve_articles(text: str) -> str:
    """Replace every `a(n)` (or `A(n)`) followed by a word with the right article; keep the capital letter.

    A trailing `a(n)` with no word after it stays as it is (the caller resolves it once more text follows).
    """

    def _replace(match: re.Match) -> str:
        capital, space, word = match.group(1), match.group(2), match.group(3)
        if not word:
            return match.group(0)
        article = indefinite_article(word)
        return (article.capitalize() if capital == "A" else article) + space + word

    return _MARKER.sub(_replace, text)


def has_dangling_marker(template_text: str) -> bool:
    """True when an `a(n)` in a template has nothing after it, so it could never be resolved."""
    return re.search(r"\b[Aa]\(n\)\s*$", template_text) is not None


def finish_text(text: str) -> str:
    """Collapse runs of whitespace (joined templates leave doubled spaces) and resolve `a(n)` markers."""
    return resolve_articles(" ".join(text.split()))
