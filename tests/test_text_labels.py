"""The canonical finding vocabulary and dataset label spellings."""

import pytest

from xlip.text.labels import (
    CANONICAL_FINDINGS,
    CHEXPERT_FINDINGS,
    LABEL_ALIASES,
    UnknownLabelError,
    canonical_label,
    label_key,
    parse_labels,
)


def test_vocabulary_is_chexpert_then_nih_extras_then_covid_and_tb():
    assert len(CHEXPERT_FINDINGS) == 14
    assert CANONICAL_FINDINGS[:14] == CHEXPERT_FINDINGS
    assert CANONICAL_FINDINGS[14:] == (
        "Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule",
        "Pleural Thickening", "COVID-19", "Tuberculosis",
    )
    assert len(set(CANONICAL_FINDINGS)) == len(CANONICAL_FINDINGS)


@pytest.mark.parametrize("finding", CANONICAL_FINDINGS)
def test_canonical_names_map_to_themselves(finding):
    assert canonical_label(finding) == finding
    assert canonical_label(finding.upper().replace(" ", "_")) == finding


@pytest.mark.parametrize(
    "spelling, canonical",
    [
        # NIH ChestX-ray14
        ("Effusion", "Pleural Effusion"),
        ("Pleural_Thickening", "Pleural Thickening"),
        ("Infiltration", "Infiltration"),
        ("No Finding", "No Finding"),
        ("Nodule", "Nodule"),
        ("Mass", "Mass"),
        ("Hernia", "Hernia"),
        # CheXpert / MIMIC-CXR, spelled loosely
        ("pleural effusion", "Pleural Effusion"),
        ("lung_opacity", "Lung Opacity"),
        ("Support-Devices", "Support Devices"),
        ("  Enlarged   Cardiomediastinum ", "Enlarged Cardiomediastinum"),
        ("Airspace Opacity", "Lung Opacity"),
        # PadChest-style and generic
        ("normal", "No Finding"),
        ("NORMAL", "No Finding"),
        ("infiltrates", "Infiltration"),
        ("hiatal hernia", "Hernia"),
        ("pulmonary mass", "Mass"),
        ("costophrenic angle blunting", "Pleural Effusion"),
        ("pacemaker", "Support Devices"),
        # IU X-ray MeSH
        ("Hernia, Hiatal", "Hernia"),
        ("Pulmonary Atelectasis", "Atelectasis"),
        ("Calcified Granuloma", "Nodule"),
        ("Catheters, Indwelling", "Support Devices"),
        ("Airspace Disease", "Consolidation"),
        ("Pulmonary Disease, Chronic Obstructive", "Emphysema"),
        ("Fractures, Bone", "Fracture"),
        # COVID-19
        ("covid19", "COVID-19"),
        ("COVID 19", "COVID-19"),
        ("sars-cov-2", "COVID-19"),
    ],
)
def test_dataset_spellings(spelling, canonical):
    assert canonical_label(spelling) == canonical


def test_every_alias_maps_to_a_canonical_finding():
    assert set(LABEL_ALIASES.values()) <= set(CANONICAL_FINDINGS)
    assert label_key("Pleural_Thickening") == label_key("pleural thickening")


def test_unknown_label_names_label_place_suggestion_and_fix():
    with pytest.raises(UnknownLabelError) as info:
        canonical_label("Pleural Efusion", where="manifest.csv row 12")
    message = str(info.value)
    assert "'Pleural Efusion'" in message
    assert "manifest.csv row 12" in message
    assert "'Pleural Effusion'" in message
    assert "Fix:" in message
    assert isinstance(info.value, ValueError)


def test_unknown_label_without_close_match_lists_canonical_names():
    with pytest.raises(UnknownLabelError, match="canonical names: 'No Finding'"):
        canonical_label("qqqqqqqq")


def test_unknown_label_suggests_through_aliases():
    with pytest.raises(UnknownLabelError, match="'Infiltration'"):
        canonical_label("Infiltrats", where="row 3")


@pytest.mark.parametrize("field", [None, "", "   ", ";", " ; ;"])
def test_parse_labels_empty(field):
    assert parse_labels(field) == ()


def test_parse_labels_canonicalises_and_deduplicates_in_order():
    field = "Effusion; cardiomegaly;Pleural Effusion ; No_Finding;"
    assert parse_labels(field) == ("Pleural Effusion", "Cardiomegaly", "No Finding")


def test_parse_labels_error_names_the_row():
    with pytest.raises(UnknownLabelError, match="labels.csv row 7") as info:
        parse_labels("Cardiomegaly;Pulmonary Artery", where="labels.csv row 7")
    assert "'Pulmonary Artery'" in str(info.value)
