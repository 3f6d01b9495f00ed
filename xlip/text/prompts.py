"""Disease-kind prompts: report-like text made from labels (DESIGN section 1).

An image that has labels but no report gets a prompt built from template banks: one sentence per
present finding, the no-finding bank when it has none, and optional negative sentences. In
training the templates are drawn at random and the sentence order is shuffled; in evaluation
(``rng=None``) the first template of each bank is used, so the same labels always give the same
text. Every finding phrase is recognised by :mod:`xlip.text.ner` as its finding, present in the
positive templates and absent in the negative ones (the tests check this for every finding).

Zero-shot classification compares an image with a positive and a negative prompt list per finding;
the lists come from a named :class:`PromptSet` of :data:`PROMPT_SETS` (``xlip``, the default, is
the training templates above; ``chexzero`` and ``report`` measure how much the wording matters).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

from xlip.errors import InputError
from xlip.text.labels import CANONICAL_FINDINGS, canonical_label

__all__ = [
    "DEFAULT_PROMPT_SET",
    "FINDING_PHRASES",
    "NEGATIVE_TEMPLATES",
    "NO_FINDING_PROMPTS",
    "POSITIVE_TEMPLATES",
    "PROMPT_SETS",
    "PromptSet",
    "finding_phrase",
    "get_prompt_set",
    "label_prompt",
    "label_prompt_sentences",
    "zeroshot_prompts",
]

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"

#: Natural phrase for each canonical finding (with an article where the noun needs one).
FINDING_PHRASES: Mapping[str, str] = MappingProxyType({
    "Enlarged Cardiomediastinum": "an enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "a lung lesion",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "a pleural abnormality",
    "Fracture": "a fracture",
    "Support Devices": "support devices",
    "Emphysema": "emphysema",
    "Fibrosis": "pulmonary fibrosis",
    "Hernia": "a hiatal hernia",
    "Infiltration": "an infiltrate",
    "Mass": "a mass",
    "Nodule": "a nodule",
    "Pleural Thickening": "pleural thickening",
    "COVID-19": "COVID-19 pneumonia",
    "Tuberculosis": "tuberculosis",
})

#: Sentences for a present finding; ``{finding}`` is the phrase, ``{Finding}`` it capitalised,
#: ``{be}`` "is" or "are" to agree with it.
POSITIVE_TEMPLATES: tuple[str, ...] = (
    "There {be} {finding}.",
    "Findings consistent with {finding}.",
    "{Finding} {be} seen.",
    "The radiograph shows {finding}.",
    "Evidence of {finding}.",
    "{Finding} {be} present.",
    "The chest radiograph demonstrates {finding}.",
)

#: Sentences for an absent finding; the phrase comes without its article ("No nodule.").
NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "No {finding}.",
    "There {be} no {finding}.",
    "No evidence of {finding}.",
    "{Finding} {be} not seen.",
    "No radiographic evidence of {finding}.",
)

#: Texts for an image without findings.
NO_FINDING_PROMPTS: tuple[str, ...] = (
    "No acute cardiopulmonary abnormality.",
    "The lungs are clear. No acute disease.",
    "No acute cardiopulmonary process.",
    "Heart size is normal and the lungs are clear.",
    "Normal chest radiograph. No acute findings.",
    "The cardiomediastinal silhouette is normal. The lungs are clear without focal consolidation, "
    "pleural effusion or pneumothorax.",
)

#: Negative prompts for zero-shot ``No Finding`` (statements of some abnormality).
_ABNORMAL_PROMPTS: tuple[str, ...] = (
    "There is an acute cardiopulmonary abnormality.",
    "Abnormal chest radiograph with acute findings.",
    "Acute cardiopulmonary process.",
    "The chest radiograph shows acute disease.",
    "Findings consistent with acute cardiopulmonary disease.",
)

_ARTICLES = ("a ", "an ")
_PLURAL_PHRASES = frozenset({"Support Devices"})


def finding_phrase(finding: str, article: bool = True) -> str:
    """The natural phrase of a finding (any known spelling), with or without its article."""
    canonical = canonical_label(finding)
    if canonical == NO_FINDING:
        raise ValueError("'No Finding' has no finding phrase; use NO_FINDING_PROMPTS")
    phrase = FINDING_PHRASES[canonical]
    if not article:
        for prefix in _ARTICLES:
            if phrase.startswith(prefix):
                return phrase[len(prefix):]
    return phrase


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fill(template: str, finding: str, article: bool) -> str:
    """A template filled with the phrase of a canonical finding."""
    phrase = finding_phrase(finding, article)
    be = "are" if finding in _PLURAL_PHRASES else "is"
    return template.format(finding=phrase, Finding=_capitalise(phrase), be=be)


def _positive(finding: str, rng: random.Random | None) -> str:
    template = rng.choice(POSITIVE_TEMPLATES) if rng else POSITIVE_TEMPLATES[0]
    return _fill(template, finding, article=True)


def _negative(finding: str, rng: random.Random | None) -> str:
    template = rng.choice(NEGATIVE_TEMPLATES) if rng else NEGATIVE_TEMPLATES[0]
    return _fill(template, finding, article=False)


def _canonical_set(labels: Sequence[str], what: str) -> list[str]:
    """Canonical names of ``labels`` in canonical order, de-duplicated."""
    names = {canonical_label(label, where=what) for label in labels}
    return [finding for finding in CANONICAL_FINDINGS if finding in names]


def label_prompt(labels: Sequence[str], rng: random.Random | None = None,
                 negatives: Sequence[str] = ()) -> str:
    """A report-like prompt for an image's labels: :func:`label_prompt_sentences` joined by
    spaces.

    Args:
        labels: the image's findings (canonical names or known dataset spellings). Empty, or only
            ``No Finding`` (with or without ``Support Devices``), gives a no-finding sentence.
        rng: ``None`` for evaluation: the first template of each bank, findings in canonical
            order. With a generator: random templates and a shuffled sentence order.
        negatives: findings to state as absent, appended after the positive sentences.

    Raises:
        UnknownLabelError: a label or negative that is not a known finding.
        ValueError: ``No Finding`` among the negatives, or a finding both present and negative.
    """
    return " ".join(label_prompt_sentences(labels, rng, negatives))


def label_prompt_sentences(labels: Sequence[str], rng: random.Random | None = None,
                           negatives: Sequence[str] = ()) -> list[str]:
    """The sentences of :func:`label_prompt` (same arguments, same draws from ``rng``), each
    drawn from a finite bank (templates x findings), so per-sentence work can be cached."""
    present = _canonical_set(labels, "label_prompt labels")
    absent = _canonical_set(negatives, "label_prompt negatives")
    if NO_FINDING in absent:
        raise ValueError("'No Finding' cannot be a negative; list the findings to negate")
    clash = sorted(set(present) & set(absent))
    if clash:
        raise ValueError(f"findings both present and negative: {clash}")
    findings = [f for f in present if f != NO_FINDING]
    sentences = [_positive(f, rng) for f in findings]
    if not [f for f in findings if f != SUPPORT_DEVICES]:
        no_finding = rng.choice(NO_FINDING_PROMPTS) if rng else NO_FINDING_PROMPTS[0]
        sentences.insert(0, no_finding)
    negative_sentences = [_negative(f, rng) for f in absent]
    if rng is not None:
        rng.shuffle(sentences)
        rng.shuffle(negative_sentences)
    return sentences + negative_sentences


@dataclass(frozen=True)
class PromptSet:
    """Zero-shot prompt templates: ``positive`` for a present finding (its phrase with the
    article, ``{finding}``, ``{Finding}``, ``{be}`` as in :data:`POSITIVE_TEMPLATES`),
    ``negative`` for an absent one (the phrase without its article); ``normal`` and ``abnormal``
    are the positive and negative texts of ``No Finding``."""

    name: str
    description: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    normal: tuple[str, ...]
    abnormal: tuple[str, ...]


_SETS = (
    PromptSet(
        "xlip", "the training templates: every label-prompt sentence pattern, positive and "
        "negated (what the model saw for image-only rows)",
        POSITIVE_TEMPLATES, NEGATIVE_TEMPLATES, NO_FINDING_PROMPTS, _ABNORMAL_PROMPTS),
    PromptSet(
        "chexzero", "CheXzero's pair (Tiu et al. 2022): the bare finding name against "
        "'no' + the name; No Finding is 'normal' against 'abnormal'",
        ("{finding}",), ("no {finding}",), ("normal",), ("abnormal",)),
    PromptSet(
        "report", "report sentences in the words radiologists write (noted, identified, "
        "compatible with; no ... is seen)",
        ("There {be} {finding}.", "{Finding} {be} noted.", "{Finding} {be} identified.",
         "Findings are compatible with {finding}."),
        ("No {finding} {be} seen.", "No {finding} {be} identified.",
         "There is no evidence of {finding}."),
        ("The lungs are clear. No pleural effusion or pneumothorax.",
         "No acute cardiopulmonary abnormality is seen.", "Normal heart size. Clear lungs."),
        ("Acute cardiopulmonary abnormality is seen.",
         "There is an acute cardiopulmonary process.", "Abnormal chest radiograph."),
    ),
)

#: The zero-shot prompt sets by name (``xlip eval zeroshot --prompts NAME``).
PROMPT_SETS: Mapping[str, PromptSet] = MappingProxyType({s.name: s for s in _SETS})
DEFAULT_PROMPT_SET = "xlip"


def get_prompt_set(name: str) -> PromptSet:
    """The prompt set called ``name``; an unknown name raises :class:`InputError`."""
    if name not in PROMPT_SETS:
        raise InputError(f"prompt set {name!r}: unknown; choose one of "
                         f"{', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]


def zeroshot_prompts(finding: str, prompt_set: str = DEFAULT_PROMPT_SET
                     ) -> tuple[list[str], list[str]]:
    """Positive and negative prompt lists for zero-shot classification of one finding.

    ``No Finding`` gets the set's ``normal`` texts as positives and its ``abnormal`` texts as
    negatives; every other finding the set's templates filled with its phrase.
    """
    canonical = canonical_label(finding, where="zeroshot_prompts")
    ps = get_prompt_set(prompt_set)
    if canonical == NO_FINDING:
        return list(ps.normal), list(ps.abnormal)
    positives = [_fill(t, canonical, article=True) for t in ps.positive]
    negatives = [_fill(t, canonical, article=False) for t in ps.negative]
    return positives, negatives
