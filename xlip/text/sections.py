"""Radiology report sections and de-identification clean-up.

MIMIC-CXR free-text reports (``FINAL REPORT``, ``WET READ: ___``, ``FINDINGS:``, ``IMPRESSION:``)
and IU X-ray reports (``XXXX`` de-identification tokens) are split into named sections and the text
that pre-training sees is chosen by a policy (DESIGN section 3):

- ``findings_impression`` (default): findings then impression, joined with a space; whichever exists
  when only one does.
- ``impression`` / ``findings``: that section only; ``""`` when the report lacks it (the data
  adapters reject empty texts with a reason, so nothing is replaced silently).
- ``longest``: the longer of findings and impression.

``CONCLUSION`` stands in for a missing ``IMPRESSION``, and the text before the first header
(``PREAMBLE``) for missing ``FINDINGS``.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

from xlip.errors import InputError

__all__ = ["SECTION_HEADERS", "TEXT_POLICIES", "clean_deid", "parse_sections", "select_text"]

#: Text field policies accepted by :func:`select_text`.
TEXT_POLICIES: tuple[str, ...] = ("findings_impression", "impression", "findings", "longest")

#: Canonical section name -> spellings of its header (matched case-insensitively, before a colon).
SECTION_HEADERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "FINDINGS": ("findings and impressions", "findings and impression", "findings", "finding"),
    "IMPRESSION": ("impressions", "impression"),
    "CONCLUSION": ("conclusions", "conclusion"),
    "INDICATION": (
        "clinical indications", "clinical indication", "indications", "indication",
        "reason for examination", "reason for exam", "reason for study",
        "clinical information",
    ),
    "HISTORY": ("clinical history", "medical history", "history"),
    "COMPARISON": ("comparisons", "comparison"),
    "TECHNIQUE": ("techniques", "technique"),
    "EXAMINATION": ("type of examination", "examination", "exam", "procedure"),
    "WET READ": (r"wet read(?:\s+version\s*#?\s*\d+)?",),
    "ADDENDUM": ("addendum",),
    "NOTIFICATION": ("notifications", "notification"),
    "RECOMMENDATION": ("recommendations", "recommendation"),
})

_PREAMBLE = "PREAMBLE"


def _header_pattern() -> re.Pattern[str]:
    """A header: a known name and a colon, at the text start, a line start or after a sentence."""
    spellings = sorted(
        (s for names in SECTION_HEADERS.values() for s in names), key=len, reverse=True
    )
    names = "|".join(s if "\\" in s else re.escape(s).replace(r"\ ", r"\s+") for s in spellings)
    return re.compile(
        rf"(?:\A|(?<=\n)|(?<=[.!?])[ \t])[ \t]*(?P<name>{names})[ \t]*:", re.IGNORECASE
    )


_HEADER = _header_pattern()
_FINAL_REPORT = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.IGNORECASE | re.MULTILINE)

# x-XXXX is IU X-ray's de-identified "x-ray" (the tokeniser there took "ray" for a name).
_X_RAY = re.compile(r"\b(x)-x{3,}\b", re.IGNORECASE)
# XXXX tokens with a hyphen that joins them to a word (non-XXXX, XXXX-year-old), and ___ runs.
_DEID = re.compile(r"(?:(?<=\w)-)?\b[Xx]{3,}\b(?:-(?=\w))?|_{2,}")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
_DANGLING_PUNCT = re.compile(r"[,;:]+\s*(?=[.,;:!?])")
_REPEATED_PERIOD = re.compile(r"\.(?:\s*\.)+")
_LEADING_PUNCT = re.compile(r"^[\s.,;:!?]+")
_PUNCT_AFTER_SENTENCE = re.compile(r"([.!?])\s*[,;:]+")


def clean_deid(text: str) -> str:
    """Remove de-identification tokens and tidy what they leave behind.

    ``XXXX`` / ``xxxx`` (any run of three or more x) and runs of two or more underscores are
    removed; the empty brackets, doubled or orphaned punctuation and spaces they leave are fixed;
    all whitespace (newlines included) collapses to single spaces. ``x-XXXX`` becomes ``x-ray``.

    >>> clean_deid("Normal chest x-XXXX. ___ was notified , XXXX .")
    'Normal chest x-ray. was notified.'
    """
    text = _X_RAY.sub(r"\1-ray", text)
    text = _DEID.sub(" ", text)
    text = _EMPTY_BRACKETS.sub(" ", text)
    text = _SPACE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _SPACE_AFTER_OPEN.sub(r"\1", text)
    text = _DANGLING_PUNCT.sub("", text)
    text = _REPEATED_PERIOD.sub(".", text)
    text = _PUNCT_AFTER_SENTENCE.sub(r"\1", text)
    text = _LEADING_PUNCT.sub("", text)
    return _SPACE.sub(" ", text).strip()


def _canonical_header(name: str) -> str:
    """The canonical section name of a matched header spelling."""
    spelled = _SPACE.sub(" ", name.strip().lower())
    for canonical, spellings in SECTION_HEADERS.items():
        for spelling in spellings:
            if re.fullmatch(spelling.replace(" ", r"\s+"), spelled):
                return canonical
    raise AssertionError(f"header {name!r} matched no spelling")  # the pattern is built from them


def parse_sections(text: str) -> dict[str, str]:
    """Split a radiology report into sections keyed by canonical upper-case names.

    Headers (``FINDINGS:``, ``IMPRESSION:``, ``INDICATION:``, ``COMPARISON:``, ``TECHNIQUE:``,
    ``HISTORY:``, ``WET READ:``, ``CONCLUSION:``, ... see :data:`SECTION_HEADERS`) are recognised
    case-insensitively at the start of the text, of a line, or after a sentence end. A MIMIC
    ``FINAL REPORT`` title line is dropped. Text before the first header is kept as ``PREAMBLE``;
    a section that occurs twice is joined with a space; empty sections are left out. The section
    texts are stripped but not otherwise cleaned (see :func:`clean_deid`).

    Returns:
        ``{"FINDINGS": text}`` for text without any header, ``{}`` for blank text.
    """
    text = _FINAL_REPORT.sub("", text)
    headers = list(_HEADER.finditer(text))
    if not headers:
        return {"FINDINGS": text.strip()} if text.strip() else {}
    sections: dict[str, str] = {}
    bounds = [(_PREAMBLE, 0, headers[0].start())]
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        bounds.append((_canonical_header(header.group("name")), header.end(), end))
    for name, start, end in bounds:
        body = text[start:end].strip()
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def _findings(sections: dict[str, str]) -> str:
    return clean_deid(sections.get("FINDINGS") or sections.get(_PREAMBLE, ""))


def _impression(sections: dict[str, str]) -> str:
    return clean_deid(sections.get("IMPRESSION") or sections.get("CONCLUSION", ""))


def select_text(report: str, policy: str = "findings_impression") -> str:
    """The text of a report that a model sees, chosen by ``policy`` (one of :data:`TEXT_POLICIES`).

    Sections come from :func:`parse_sections` and are cleaned by :func:`clean_deid`.

    Raises:
        InputError (a ValueError): unknown policy; the message lists the valid ones.
    """
    if policy not in TEXT_POLICIES:
        raise InputError(
            f"unknown text policy {policy!r}; valid policies: {', '.join(TEXT_POLICIES)}"
        )
    sections = parse_sections(report)
    findings, impression = _findings(sections), _impression(sections)
    if policy == "findings":
        return findings
    if policy == "impression":
        return impression
    if policy == "longest":
        return findings if len(findings) >= len(impression) else impression
    return " ".join(part for part in (findings, impression) if part)
