"""Report text: sections and de-identification, radiology NER, label vocabulary and prompts."""

from xlip.text.labels import (
    CANONICAL_FINDINGS,
    CHEXPERT_FINDINGS,
    UnknownLabelError,
    canonical_label,
    parse_labels,
)
from xlip.text.ner import Entity, extract_entities, guide_entities, label_sets, report_labels
from xlip.text.prompts import label_prompt, zeroshot_prompts
from xlip.text.sections import TEXT_POLICIES, clean_deid, parse_sections, select_text

__all__ = [
    "CANONICAL_FINDINGS",
    "CHEXPERT_FINDINGS",
    "TEXT_POLICIES",
    "Entity",
    "UnknownLabelError",
    "canonical_label",
    "clean_deid",
    "extract_entities",
    "guide_entities",
    "label_prompt",
    "label_sets",
    "parse_labels",
    "parse_sections",
    "report_labels",
    "select_text",
    "zeroshot_prompts",
]
