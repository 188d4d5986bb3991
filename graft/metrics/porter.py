"""The Porter stemmer as NLTK's default PorterStemmer (NLTK_EXTENSIONS), which rouge_score uses.

Porter, M. "An algorithm for suffix stripping." Program 14.3 (1980): 130-137, plus the
extensions of Martin Porter's own implementations and of NLTK.
"""

_IRREGULAR = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}  # fmt: skip

# (suffix, replacement); in each step only the first matching suffix is tried
_STEP2 = [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
    ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
    ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"),
    ("fulli", "ful"),
]  # fmt: skip
_STEP3 = [
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", ""),
]  # fmt: skip
_STEP4 = [
    (s, "") for s in "al ance ence er ic able ible ant ement ment ent ion ou ism ate iti ous ive ize".split()
]


def _cv(word: str) -> str:
    """'c' or 'v' per letter: a, e, i, o, u are vowels, and so is a y after a consonant."""
    out = ""
    for ch in word:
        out += "v" if ch in "aeiou" or (ch == "y" and out[-1:] == "c") else "c"
    return out


def _measure(stem: str) -> int:
    """m in the form [C](VC)^m[V]."""
    return _cv(stem).count("vc")


def _ends_cvc(stem: str) -> bool:
    """*o: consonant-vowel-consonant, the last not w, x or y (NLTK also accepts a 2-letter vc)."""
    cv = _cv(stem)
    return (cv[-3:] == "cvc" and stem[-1] not in "wxy") or cv == "vc"


def _apply(word: str, rules: list[tuple[str, str]], min_measure: int) -> str:
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[: -len(suffix)]
            ok = _measure(stem) >= min_measure and (suffix != "ion" or stem[-1:] in ("s", "t"))
            return stem + replacement if ok else word
    return word


def _step1(word: str) -> str:
    # 1a: plurals
    if word.endswith("ies") and len(word) == 4:
        word = word[:-1]
    elif word.endswith("sses") or word.endswith("ies"):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    # 1b: -ed, -ing
    if word.endswith("ied"):
        word = word[:-3] + ("ie" if len(word) == 4 else "i")
    elif word.endswith("eed"):
        if _measure(word[:-3]) > 0:
            word = word[:-1]
    elif (word.endswith("ed") and "v" in _cv(word[:-2])) or (word.endswith("ing") and "v" in _cv(word[:-3])):
        word = word[:-2] if word.endswith("ed") else word[:-3]
        if word.endswith(("at", "bl", "iz")):
            word += "e"
        elif len(word) >= 2 and word[-1] == word[-2] and _cv(word)[-1] == "c":
            word = word if word[-1] in "lsz" else word[:-1]
        elif _measure(word) == 1 and _ends_cvc(word):
            word += "e"
    # 1c: y -> i after a consonant that is not the first letter
    if word.endswith("y") and len(word) > 2 and _cv(word[:-1])[-1] == "c":
        word = word[:-1] + "i"
    return word


def _step2(word: str) -> str:
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        return _step2(word[:-2])
    if word.endswith("logi"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    return _apply(word, _STEP2, 1)


def _step5(word: str) -> str:
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word


def porter_stem(word: str) -> str:
    """The Porter stem of one word, e.g. 'running' -> 'run', 'relational' -> 'relat'."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    return _step5(_apply(_apply(_step2(_step1(word)), _STEP3, 1), _STEP4, 2))
