"""The canonical finding vocabulary and the mapping from each dataset's label spellings to it.

Every label that enters ``xlip`` (a manifest's ``labels`` column, a dataset adapter, a prompt, the
NER) is one of :data:`CANONICAL_FINDINGS`. Public datasets spell the same finding differently (NIH
``Effusion`` and ``Pleural_Thickening``, CheXpert ``Pleural Effusion``, IU X-ray MeSH ``Hernia,
Hiatal``, PadChest ``normal``); :func:`canonical_label` maps those spellings, ignoring case,
spaces, underscores and hyphens. A label it does not know is an error that names the label, where it
was read and the closest canonical names: it is never dropped or guessed silently.

Granulomas (``Calcified Granuloma``, ``Granulomatous Disease``) map to ``Nodule``: on a radiograph a
granuloma is a (usually calcified) nodule, and NIH ChestX-ray14 labels them so.
"""

from __future__ import annotations

import difflib
import re
from types import MappingProxyType
from typing import Mapping

from xlip.errors import XlipError

__all__ = [
    "CANONICAL_FINDINGS",
    "CHEXPERT_FINDINGS",
    "LABEL_ALIASES",
    "UnknownLabelError",
    "canonical_label",
    "label_key",
    "parse_labels",
]

#: The CheXpert 14 observations, in CheXpert's order.
CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: Every finding ``xlip`` knows: the CheXpert 14, then the NIH ChestX-ray14 findings that CheXpert
#: lacks, then COVID-19 (COVIDx) and Tuberculosis (TBX11K). The order is the canonical order of
#: label vectors and label sets.
CANONICAL_FINDINGS: tuple[str, ...] = CHEXPERT_FINDINGS + (
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural Thickening",
    "COVID-19",
    "Tuberculosis",
)

# Dataset spellings that differ from a canonical name (the canonical names map to themselves).
# Keys are compared through ``label_key``, so case, spaces, underscores and hyphens do not matter.
_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "No Finding": (
        "normal", "no findings", "nofinding", "no abnormality", "no acute findings",
        "normal chest", "healthy",
    ),
    "Enlarged Cardiomediastinum": (
        "enlarged cardiomediastinal silhouette", "widened mediastinum", "mediastinal widening",
        "mediastinal enlargement", "enlarged mediastinum", "cardiomediastinal enlargement",
    ),
    "Cardiomegaly": (
        "enlarged heart", "cardiac enlargement", "heart enlargement", "enlarged cardiac silhouette",
    ),
    "Lung Opacity": (
        "opacity", "opacities", "lung opacities", "pulmonary opacity", "airspace opacity",
        "air space opacity", "ground glass opacity", "ground glass pattern", "density",
    ),
    "Lung Lesion": ("lesion", "lung lesions", "pulmonary lesion", "lung tumor", "tumor"),
    "Edema": (
        "pulmonary edema", "oedema", "pulmonary oedema", "interstitial edema",
        "pulmonary congestion", "vascular congestion", "heart insufficiency",
    ),
    "Consolidation": (
        "consolidations", "airspace disease", "air space disease", "alveolar pattern",
    ),
    "Pneumonia": ("pneumonias", "bronchopneumonia"),
    "Atelectasis": (
        "pulmonary atelectasis", "atelectases", "laminar atelectasis", "lobar atelectasis",
        "segmental atelectasis", "collapse",
    ),
    "Pneumothorax": ("pneumothoraces", "ptx"),
    "Pleural Effusion": (
        "effusion", "effusions", "pleural effusions", "costophrenic angle blunting",
        "hydrothorax",
    ),
    "Pleural Other": ("pleural plaque", "pleural plaques", "fibrothorax", "pleural abnormality"),
    "Fracture": (
        "fractures", "fractures, bone", "bone fracture", "rib fracture",
        "rib fractures", "clavicle fracture", "vertebral fracture", "vertebral compression",
    ),
    "Support Devices": (
        "support device", "device", "devices", "medical device", "implanted medical device",
        "catheters, indwelling", "tube, inserted",
        "tubes and lines", "lines and tubes", "pacemaker", "electrical device",
        "dual chamber device", "endotracheal tube", "nasogastric tube", "nsg tube",
        "central venous catheter", "chest drain tube", "chest tube", "stents",
    ),
    "Emphysema": (
        "pulmonary emphysema", "copd", "pulmonary disease, chronic obstructive",
        "chronic obstructive pulmonary disease",
    ),
    "Fibrosis": ("pulmonary fibrosis", "interstitial fibrosis", "fibrotic band"),
    "Hernia": (
        "hernia, hiatal", "hiatal hernia", "hiatus hernia", "hernias", "diaphragmatic hernia",
    ),
    "Infiltration": ("infiltrate", "infiltrates", "infiltrations"),
    "Mass": ("masses", "lung mass", "pulmonary mass"),
    "Nodule": (
        "nodules", "pulmonary nodule", "lung nodule", "multiple nodules", "nodular opacity",
        "calcified granuloma", "granuloma", "granulomas", "granulomatous disease",
    ),
    "Pleural Thickening": (
        "pleural_thickening", "apical pleural thickening", "pleural thickenings",
    ),
    "COVID-19": (
        "covid", "covid19", "covid 19", "covid-19 pneumonia", "sars-cov-2", "sars cov 2",
        "coronavirus", "covid pneumonia",
    ),
    "Tuberculosis": (
        "tb", "pulmonary tuberculosis", "active tuberculosis", "latent tuberculosis",
        "active tb", "latent tb",
    ),
})

_KEY_DROP = re.compile(r"[\s_\-,]+")


def label_key(name: str) -> str:
    """The comparison key of a label spelling: lower case, without spaces, ``_``, ``-`` or ``,``.

    >>> label_key("Pleural_Thickening") == label_key("pleural thickening")
    True
    """
    return _KEY_DROP.sub("", name.strip().lower())


def _build_alias_table() -> Mapping[str, str]:
    table: dict[str, str] = {}
    for canonical in CANONICAL_FINDINGS:
        table[label_key(canonical)] = canonical
    for canonical, spellings in _ALIASES.items():
        if canonical not in CANONICAL_FINDINGS:
            raise AssertionError(f"alias table names a non-canonical finding {canonical!r}")
        for spelling in spellings:
            key = label_key(spelling)
            if table.get(key, canonical) != canonical:
                raise AssertionError(
                    f"label alias {spelling!r} maps to both {table[key]!r} and {canonical!r}"
                )
            table[key] = canonical
    return MappingProxyType(table)


#: Read-only map from :func:`label_key` of a known spelling to its canonical finding.
LABEL_ALIASES: Mapping[str, str] = _build_alias_table()


class UnknownLabelError(XlipError, ValueError):
    """A label spelling that maps to no canonical finding."""


def _closest(name: str, n: int = 3) -> list[str]:
    """Canonical names closest to ``name`` (by canonical name and by alias), best first."""
    key = label_key(name)
    matches = difflib.get_close_matches(key, list(LABEL_ALIASES), n=3 * n, cutoff=0.5)
    closest: list[str] = []
    for match in matches:
        canonical = LABEL_ALIASES[match]
        if canonical not in closest:
            closest.append(canonical)
    return closest[:n]


def canonical_label(name: str, where: str = "") -> str:
    """Map one label spelling to its canonical finding name.

    Args:
        name: a label as a dataset spells it, e.g. ``"Effusion"``, ``"pleural_thickening"``.
        where: where the label was read, for the error message, e.g. ``"manifest.csv row 12"``.

    Returns:
        One of :data:`CANONICAL_FINDINGS`.

    Raises:
        UnknownLabelError: the spelling is unknown; the message names it, ``where``, the closest
            canonical names and the fix.
    """
    canonical = LABEL_ALIASES.get(label_key(name))
    if canonical is not None:
        return canonical
    location = f" in {where}" if where else ""
    closest = _closest(name)
    hint = (
        "closest canonical names: " + ", ".join(repr(c) for c in closest)
        if closest
        else "canonical names: " + ", ".join(repr(c) for c in CANONICAL_FINDINGS)
    )
    raise UnknownLabelError(
        f"unknown label {name!r}{location}; {hint}. Fix: write one of the canonical names "
        "(xlip.text.labels.CANONICAL_FINDINGS) or a known dataset spelling, or map this label "
        "to one in the dataset adapter."
    )


def parse_labels(field: str | None, where: str = "") -> tuple[str, ...]:
    """Parse a ``;``-separated label field into canonical names.

    Args:
        field: e.g. ``"Effusion; cardiomegaly"``; ``None`` or blank means no labels.
        where: where the field was read, passed to :func:`canonical_label` for its errors.

    Returns:
        The canonical names, de-duplicated, in their order of first appearance.

    Raises:
        UnknownLabelError: for the first unknown label in the field.
    """
    if field is None:
        return ()
    labels: list[str] = []
    for part in field.split(";"):
        if not part.strip():
            continue
        canonical = canonical_label(part.strip(), where)
        if canonical not in labels:
            labels.append(canonical)
    return tuple(labels)
