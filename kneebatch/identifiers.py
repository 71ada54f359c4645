"""Identifiers found by value: does a cell of a table hold one?

Two questions, both case-insensitive and both answered inside free text:

* *shapes*: text that looks like an identifier whoever it names: a date, an e-mail
  address, a phone number, a DICOM-UID-like dotted number, a long digit run (an MRN);
* *known identifiers*: values the caller knows identify someone in this cohort (its
  StudyInstanceUIDs, PatientIDs, names, birth dates, ...).

The shapes are written so that what a clinical table is made of (ages, BMI 27.4, a KL
grade, WOMAC scores, measurements 1234.5, visit labels V01) never looks like one.
Reason codes only: nothing here returns a value to print.
"""

from __future__ import annotations

import re
from datetime import date

KNOWN = "known_identifier"  # the reason code of a known identifier; the shapes': date, email, phone, uid, long_number

_L = r"(?<![\w.])"  # not inside a word or a decimal number
_R = r"(?![\w]|[.,]\d)"  # ... on either side
_MONTH = (r"(?:january|february|march|april|may|june|july|august|september|october|november|december"
          r"|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)\.?")
_YEAR4 = r"(?:1[89]|20)\d\d"

_PATTERNS = {
    "date": [
        _L + rf"(?P<y>{_YEAR4})[-/.](?P<m>\d{{1,2}})[-/.](?P<d>\d{{1,2}})(?!\d)",  # 1961-03-04 (also with a time)
        _L + rf"(?P<a>\d{{1,2}})/(?P<b>\d{{1,2}})/(?P<y>{_YEAR4}|\d\d)(?!\d)",  # 04/03/1961, 3/4/61
        _L + rf"(?P<a>\d{{1,2}})-(?P<b>\d{{1,2}})-(?P<y>{_YEAR4}|\d\d)(?!\d)",  # 04-03-1961
        _L + rf"(?P<a>\d{{1,2}})\.(?P<b>\d{{1,2}})\.(?P<y>{_YEAR4})(?!\d)",  # 4.3.1961 (a 2-digit year: a version)
        _L + rf"(?P<y>{_YEAR4})(?P<m>0[1-9]|1[0-2])(?P<d>0[1-9]|[12]\d|3[01])(?!\d)",  # 19610304 (DICOM's DA)
        _L + rf"\d{{1,2}}(?:st|nd|rd|th)?[\s\-/.]*{_MONTH}[\s\-/.,]*{_YEAR4}(?!\d)",  # 4 March 1961
        _L + rf"\d{{1,2}}-{_MONTH}-\d\d(?!\d)",  # 04-Mar-61, as Excel writes it
        r"(?<![a-z])" + rf"{_MONTH}\s*\d{{1,2}}(?:st|nd|rd|th)?,?\s*{_YEAR4}(?!\d)",  # March 4, 1961
        r"(?<![a-z])" + rf"{_MONTH}[\s,]*{_YEAR4}(?!\d)",  # March 1961: a month is a date's element too
    ],
    "email": [r"[\w.%+\-]+@[\w\-]+(?:\.[\w\-]+)+"],
    "phone": [  # with at least 8 digits (counted below): a range or a list of scores is not a phone number
        r"(?<![\w+])\+\d[\d\s()\-/]{6,}\d",  # +49 30 1234567, +1 (555) 123-4567 (the + says it)
        r"\(\d{3}\)\s?\d{3}[\s.\-]\d{4}" + _R,  # (555) 123-4567
        r"(?<![\w.+])\d{3}([.\-])\d{3}\1\d{4}" + _R,  # 555-123-4567, 555.123.4567 (not 555 123 4567: a list)
        r"(?<![\w.+])0\d{2,4}[\s/\-]\d{3,8}(?:[\s\-]\d{2,5})?" + _R,  # 030 1234567, 020 7946 0958: a trunk 0
        r"(?<![\w.+])0[1-9](?:[\s.\-]\d\d){4}" + _R,  # 01 23 45 67 89
    ],
    # a UID's root is 0, 1 or 2 and it has many components; 4.3.1961 and 1.2.3 have too few
    "uid": [_L + r"[0-2](?:\.\d+){3,}(?!\w|\.\d)"],
    # an MRN, also with a short letter prefix or exported as a float (12345678.0); never the
    # digits after a decimal point, nor a run inside a hex hash
    "long_number": [r"(?<![\w.,])[a-z]{0,4}\d{8,}(?:\.0+)?" + _R, _L + r"\d{3}-\d\d-\d{4}" + _R],  # and an SSN
}
_COMPILED = {kind: [re.compile(p) for p in ps] for kind, ps in _PATTERNS.items()}


def _real_date(m: re.Match) -> bool:
    g = m.groupdict()
    if "m" in g:  # year first
        pairs = [(int(g["m"]), int(g["d"]))]
    elif "a" in g:  # day and month in either order (04/03 is 4 March or April 3)
        pairs = [(int(g["a"]), int(g["b"])), (int(g["b"]), int(g["a"]))]
    else:  # a month's name
        return True
    year = int(g["y"]) if len(g["y"]) == 4 else 2000
    for month, day in pairs:
        try:
            date(year, month, day)
            return True
        except ValueError:
            pass
    return False


# most cells of a clinical table: a number with at most 7 digits before its decimal point
# (an age, a BMI, a score, a volume) has no identifier's shape; not looked at by the patterns
_PLAIN_NUMBER = re.compile(r"\s*[+-]?\d{0,7}(?:\.\d*)?(?:e[+-]?\d+)?\s*")


def find_shapes(text: str) -> list[tuple[str, str]]:
    """(reason code, the text that has the shape) for every identifier shape in ``text``."""
    text = text.casefold()
    if _PLAIN_NUMBER.fullmatch(text):
        return []
    found = []
    for kind, patterns in _COMPILED.items():
        for p in patterns:
            for m in p.finditer(text):
                if kind == "date" and not _real_date(m):
                    continue
                if kind == "phone" and sum(c.isdigit() for c in m.group()) < 8:
                    continue
                found.append((kind, m.group()))
    return found


# a cell is cut into words at spaces and at punctuation no identifier holds (not at '.', '/',
# '-' or '@', which UIDs, dates, paths and addresses do); each word again into its parts at
# '/', '-', '_', '@', '+', so that an ID inside a path or a name in 'Smith-Jones' is a part
_WORDS = re.compile(r"[\s,;:()\[\]{}<>\"'|^=*&!?]+")
_PARTS = re.compile(r"[/\\\-_@+#]+")
_NUMBER = re.compile(r"[\d.,+\-/\s]+")
MIN_CHARS = 3  # shorter values (M, F, a KL grade, 'Li') are everywhere in a table
MIN_DIGITS = 6  # a shorter number (a subject 1001) equals an age, a score or a count too often
_FLOAT_ZERO = re.compile(r"(?<=\d)\.0+$")  # an ID exported as a float (9012345.0) is the ID


def _words(text: str) -> list[str]:
    return [w for w in (_FLOAT_ZERO.sub("", w.strip(".")) for w in _WORDS.split(text.casefold())) if w]


def specific(value: str) -> bool:
    """Whether a value names one person, not also half the numbers of a table."""
    if len(value) < MIN_CHARS:
        return False
    if _NUMBER.fullmatch(value):
        return sum(c.isdigit() for c in value) >= MIN_DIGITS
    return True


class KnownIdentifiers:
    """The cohort's identifiers, looked up as whole words (or word sequences) of a text."""

    def __init__(self):
        self._words: set[str] = set()
        self._phrases: dict[str, set[tuple[str, ...]]] = {}  # by first word

    def add(self, value, person_name: bool = False) -> None:
        """A known identifier; ``person_name``: each part of a name ('Smith^John', 'John
        Smith') is one as well, since free text names people by one part."""
        value = (value or "").strip()
        if not specific(value):
            return
        words = tuple(_words(value))
        if len(words) == 1:
            self._words.add(words[0])
        elif words:
            self._phrases.setdefault(words[0], set()).add(words)
        if person_name:
            for part in words:
                if specific(part):
                    self._words.add(part)

    def found_in(self, text: str) -> bool:
        words = _words(text)
        for i, w in enumerate(words):
            if w in self._words or any(p in self._words for p in _PARTS.split(w)):
                return True
            if any(tuple(words[i:i + len(p)]) == p for p in self._phrases.get(w, ())):
                return True
        return False


def kinds_in(cells, known: KnownIdentifiers) -> set[str]:
    """The reason codes of what a column's ``cells`` hold."""
    found: set[str] = set()
    for cell in set(cells):  # a table repeats its values (F, M, V01): each is looked at once
        if cell:
            found.update(kind for kind, _ in find_shapes(cell))
            if known.found_in(cell):
                found.add(KNOWN)
    return found


def copies(cells, id_cells) -> bool:
    """Whether a column repeats an identifier column row for row, which also catches IDs too
    short to look for anywhere else (subject 17 is also someone's age)."""
    pairs = [(a.strip().casefold(), b.strip().casefold()) for a, b in zip(cells, id_cells)]
    pairs = [(a, b) for a, b in pairs if a and b]
    return len(pairs) >= 2 and all(a == b for a, b in pairs)
