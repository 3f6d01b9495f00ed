"""Each dataset's label names and values → canonical findings.

Where a dataset names something that is not one of :data:`xlip.text.labels.CANONICAL_FINDINGS`,
its table below says so explicitly with an empty tuple: the name is kept in ``labels_raw`` and
counted in the summary. A name that is in neither the table nor the canonical aliases is an
unknown label: the row is rejected with that reason.
"""

from __future__ import annotations

from typing import Mapping

from xlip.errors import InputError
from xlip.text.labels import CHEXPERT_FINDINGS

#: The 14 label columns of CheXpert and MIMIC-CXR's chexpert/negbio files.
CHEXPERT_COLUMNS: tuple[str, ...] = CHEXPERT_FINDINGS

#: How CheXpert's -1 (uncertain) is used: kept apart (``uncertain_labels``), as positive (U-Ones)
#: or as negative (U-Zeros).
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")


def chexpert_labels(row: Mapping[str, str], policy: str = "ignore",
                    ) -> tuple[list[str], list[str], list[str]]:
    """(present, absent, uncertain) canonical findings of a CheXpert-style row.

    Values: ``1`` present, ``0`` absent, ``-1`` uncertain, blank not mentioned.

    Raises:
        InputError (a ValueError): a value that is none of those, or an unknown policy.
    """
    if policy not in UNCERTAIN_POLICIES:
        raise InputError(f"uncertainty policy {policy!r}: use one of {UNCERTAIN_POLICIES}")
    pos, neg, unc = [], [], []
    for name in CHEXPERT_COLUMNS:
        value = row.get(name, "").strip()
        if value == "":
            continue
        try:
            v = float(value)
        except ValueError:
            v = None
        if v == 1.0:
            pos.append(name)
        elif v == 0.0:
            neg.append(name)
        elif v == -1.0:
            {"ignore": unc, "positive": pos, "negative": neg}[policy].append(name)
        else:
            raise InputError(f"column {name!r}: value {value!r} is not 1, 0, -1 or blank")
    return pos, neg, unc


#: COVID-19 image data collection (ieee8023) ``finding``: diagnoses and pathogens, flat
#: ("COVID-19, ARDS") or as a hierarchy ("Pneumonia/Viral/COVID-19"). An infectious pneumonia's
#: pathogen also gives Pneumonia; ARDS shows as diffuse bilateral opacity.
COVID_FINDINGS: Mapping[str, tuple[str, ...]] = {
    "COVID-19": ("COVID-19", "Pneumonia"),
    "Pneumonia": ("Pneumonia",),
    **{name: ("Pneumonia",) for name in (
        "Viral", "Bacterial", "Fungal", "SARS", "MERS", "MERS-CoV", "Influenza", "Varicella",
        "Herpes", "Streptococcus", "Klebsiella", "Legionella", "Mycoplasma",
        "Mycoplasma Bacterial Pneumonia", "Chlamydophila", "E.Coli", "Staphylococcus",
        "Staphylococcus aureus", "Nocardia", "Pneumocystis", "Aspergillosis", "Lipoid",
        "Aspiration", "Klebsiella pneumoniae")},
    "ARDS": ("Lung Opacity",),
    "No Finding": ("No Finding",),
    "Tuberculosis": ("Tuberculosis",),
    "Unknown": (),
    "todo": (),
}

#: VinDr-CXR local and global labels (PhysioNet ``image_labels_*.csv`` columns and the Kaggle
#: ``class_name``s). Nodule/Mass and the cavity/cyst lesions → Lung Lesion (CheXpert's nodule-or-
#: mass finding); aortic enlargement → Enlarged Cardiomediastinum.
VINDR_FINDINGS: Mapping[str, tuple[str, ...]] = {
    "Aortic enlargement": ("Enlarged Cardiomediastinum",),
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Clavicle fracture": ("Fracture",),
    "Rib fracture": ("Fracture",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema",),
    "Emphysema": ("Emphysema",),
    "Infiltration": ("Infiltration",),
    "Lung Opacity": ("Lung Opacity",),
    "Lung cavity": ("Lung Lesion",),
    "Lung cyst": ("Lung Lesion",),
    "Nodule/Mass": ("Lung Lesion",),
    "Lung tumor": ("Lung Lesion",),
    "Pleural effusion": ("Pleural Effusion",),
    "Pleural thickening": ("Pleural Thickening",),
    "Pneumothorax": ("Pneumothorax",),
    "Pulmonary fibrosis": ("Fibrosis",),
    "Pneumonia": ("Pneumonia",),
    "COPD": ("Emphysema",),
    "No finding": ("No Finding",),
    "Calcification": (),
    "Enlarged PA": (),
    "ILD": (),
    "Mediastinal shift": (),
    "Other lesion": (),
    "Tuberculosis": ("Tuberculosis",),
    "Other disease": (),
    "Other diseases": (),
}

#: RSNA Pneumonia Detection ``Target`` / detailed ``class``: a pneumonia-like opacity is the
#: target; "Normal" is a normal radiograph; "No Lung Opacity / Not Normal" is abnormal without
#: pneumonia (no positive finding known: Pneumonia goes to negative_labels).
RSNA_POSITIVE = ("Pneumonia",)
