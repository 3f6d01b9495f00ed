"""The lexicon + rule radiology NER: entities, spans, assertions, report labels."""

import pytest

from xlip.text.labels import CANONICAL_FINDINGS
from xlip.text.ner import Entity, extract_entities, label_sets, report_labels

P, A, U = "present", "absent", "uncertain"
PE, PTX, CM = "Pleural Effusion", "Pneumothorax", "Cardiomegaly"
EC, LO, SD = "Enlarged Cardiomediastinum", "Lung Opacity", "Support Devices"


def findings(text: str) -> set[tuple[str, str]]:
    """(canonical, assertion) of the vocabulary findings and devices in ``text``."""
    return {
        (e.canonical, e.assertion)
        for e in extract_entities(text)
        if e.type in ("finding", "device") and e.canonical is not None
    }


CASES = [
    # negation, including coordination and windows
    ("No pleural effusion or pneumothorax.", {(PE, A), (PTX, A)}),
    ("No focal consolidation, pleural effusion, or pneumothorax.",
     {("Consolidation", A), (PE, A), (PTX, A)}),
    ("Negative for pneumothorax.", {(PTX, A)}),
    ("Without evidence of pneumothorax.", {(PTX, A)}),
    ("There is no radiographic evidence of pneumothorax.", {(PTX, A)}),
    ("No new consolidation.", {("Consolidation", A)}),
    ("The lungs are free of infiltrates.", {("Infiltration", A)}),
    ("No evidence of COVID-19 pneumonia.", {("COVID-19", A)}),
    ("No focal areas of pulmonary consolidation.", {("Consolidation", A)}),
    # post-negation
    ("The pleural effusion has resolved.", {(PE, A)}),
    ("Pneumothorax is no longer seen.", {(PTX, A)}),
    ("Pneumothorax is not seen.", {(PTX, A)}),
    ("Nasogastric tube has been removed.", {(SD, A)}),
    ("Interval removal of the endotracheal tube.", {(SD, A)}),
    # scope termination
    ("No effusion, but there is a small right pneumothorax.", {(PE, A), (PTX, P)}),
    ("There is no pneumothorax; however, a small effusion persists.", {(PTX, A), (PE, P)}),
    ("No pneumothorax although there is a small effusion.", {(PTX, A), (PE, P)}),
    ("There is no evidence of pneumothorax and the ET tube is in standard position.",
     {(PTX, A), (SD, P)}),
    ("Small effusion which may represent fluid overload.", {(PE, P), ("Edema", U)}),
    ("Resolved right effusion, new left pneumothorax.", {(PE, A), (PTX, P)}),
    # pseudo-negation
    ("No change in the small left pleural effusion.", {(PE, P)}),
    ("No interval increase in the right pneumothorax.", {(PTX, P)}),
    ("Not only is there a large effusion, there is also a pneumothorax.", {(PE, P), (PTX, P)}),
    # uncertainty
    ("Bibasilar opacities likely represent atelectasis.", {(LO, P), ("Atelectasis", U)}),
    ("Possible right lower lobe pneumonia.", {("Pneumonia", U)}),
    ("Pneumonia cannot be excluded.", {("Pneumonia", U)}),
    ("Superimposed infection cannot be entirely excluded.", {("Pneumonia", U)}),
    ("Findings suspicious for pulmonary edema.", {("Edema", U)}),
    ("Atelectasis versus pneumonia at the left base.", {("Atelectasis", U), ("Pneumonia", U)}),
    ("Opacity in the right lower lobe may reflect aspiration or pneumonia.",
     {(LO, P), ("Pneumonia", U)}),
    ("Questionable small right apical pneumothorax.", {(PTX, U)}),
    ("Findings are concerning for COVID-19.", {("COVID-19", U)}),
    ("No focal consolidation to suggest pneumonia.", {("Consolidation", A), ("Pneumonia", A)}),
    # normal statements
    ("Heart size is normal.", {(CM, A)}),
    ("Normal cardiac silhouette.", {(CM, A)}),
    ("The heart is not enlarged.", {(CM, A)}),
    ("The heart is mildly enlarged.", {(CM, P)}),
    ("The cardiac silhouette may be enlarged.", {(CM, U)}),
    ("The lungs are clear.", {(LO, A)}),
    ("Clear lungs.", {(LO, A)}),
    ("Costophrenic angles are sharp.", {(PE, A)}),
    ("The cardiomediastinal silhouette is within normal limits.", {(EC, A)}),
    ("Heart size and mediastinal contours are within normal limits.", {(CM, A), (EC, A)}),
    ("No acute cardiopulmonary abnormality.", set()),
    ("Heart size is stable and lungs clear.", {(LO, A)}),
    # multi-word terms, synonyms, plurals
    ("Moderate cardiomegaly.", {(CM, P)}),
    ("Enlarged cardiac silhouette.", {(CM, P)}),
    ("Enlarged heart with pulmonary vascular congestion.", {(CM, P), ("Edema", P)}),
    ("Widened mediastinum.", {(EC, P)}),
    ("Bilateral pleural effusions are present.", {(PE, P)}),
    ("Blunting of the left costophrenic angle.", {(PE, P)}),
    ("Fluid in the pleural space.", {(PE, P)}),
    ("Mild interstitial edema.", {("Edema", P)}),
    ("Patchy airspace disease in the lingula.", {("Consolidation", P)}),
    ("Hyperinflated lungs consistent with emphysema.", {("Emphysema", P)}),
    ("Calcified granuloma in the right upper lobe.", {("Nodule", P)}),
    ("Multiple pulmonary nodules.", {("Nodule", P)}),
    ("Left hilar mass.", {("Mass", P)}),
    ("Small hiatal hernia.", {("Hernia", P)}),
    ("Old healed right rib fractures.", {("Fracture", P)}),
    ("Apical pleural thickening.", {("Pleural Thickening", P)}),
    ("Calcified pleural plaques.", {("Pleural Other", P)}),
    ("Left lower lobe collapse.", {("Atelectasis", P)}),
    ("Linear scarring at the lung bases.", {("Fibrosis", P)}),
    ("Right apical pneumothoraces.", {(PTX, P)}),
    ("Dense right upper lobe opacities.", {(LO, P)}),
    # hyperinflation is a sign that goes with COPD, not emphysema itself (IU: "hyperdistention")
    ("Lungs are hyperexpanded but clear.", set()),
    ("Mildly hyperinflated lungs.", set()),
    ("Bilateral airspace opacities.", {(LO, P)}),  # an opacity, not (yet) a consolidation
    ("Left basilar airspace disease.", {("Consolidation", P)}),
    ("Pulmonary vascular engorgement appears within normal limits.", {("Edema", A)}),
    ("Vascular congestion is within the limits of normal.", {("Edema", A)}),
    ("Pericardial effusion.", set()),
    ("Subcutaneous emphysema in the left chest wall.", set()),
    # devices
    ("Endotracheal tube terminates 4 cm above the carina.", {(SD, P)}),
    ("Right PICC line tip in the SVC.", {(SD, P)}),
    ("Left subclavian pacemaker with leads in the right atrium and ventricle.", {(SD, P)}),
    ("The patient is status post median sternotomy.", {(SD, P)}),
    ("No support devices.", {(SD, A)}),
]


def test_case_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("text, expected", CASES, ids=[c[0][:48] for c in CASES])
def test_assertions(text, expected):
    assert findings(text) == expected


def test_types_and_exact_spans_with_laterality():
    text = "Small right pleural effusion."
    assert extract_entities(text) == [
        Entity(0, 5, "Small", "modifier", "small", P),
        Entity(6, 11, "right", "modifier", "right", P),
        Entity(12, 28, "pleural effusion", "finding", PE, P),
    ]


def test_spans_of_anatomy_device_and_negated_mentions():
    text = "ET tube 3 cm above the carina. No right lower lobe opacity."
    entities = extract_entities(text)
    assert [(e.text, e.type, e.canonical, e.assertion) for e in entities] == [
        ("ET tube", "device", SD, P),
        ("carina", "anatomy", "carina", P),
        ("right lower lobe", "anatomy", "right lower lobe", A),
        ("opacity", "finding", LO, A),
    ]
    for e in entities:
        assert text[e.start:e.end] == e.text
    assert (entities[0].start, entities[0].end) == (0, 7)
    assert (entities[3].start, entities[3].end) == (51, 58)


def test_normal_statement_retypes_its_subject():
    (entity,) = extract_entities("Heart size is normal.")
    assert entity == Entity(0, 10, "Heart size", "finding", CM, A)


def test_findings_outside_the_vocabulary_have_no_canonical():
    (entity,) = extract_entities("No acute cardiopulmonary abnormality.")
    assert entity.type == "finding" and entity.canonical is None and entity.assertion == A


def test_case_insensitive_longest_match_and_word_boundaries():
    upper = extract_entities("SMALL LEFT PLEURAL EFFUSION")
    assert [(e.text, e.canonical) for e in upper][-1] == ("PLEURAL EFFUSION", PE)
    # "effusions" inside a longer word is not a match; "pleural effusion" beats "effusion"
    assert extract_entities("noneffusionlike") == []
    assert [e.text for e in extract_entities("pleural effusion")] == ["pleural effusion"]


def test_entities_are_sorted_and_do_not_overlap():
    text = (
        "Stable moderate cardiomegaly with small bilateral pleural effusions and bibasilar "
        "atelectasis. Left PICC ends in the SVC. No pneumothorax."
    )
    entities = extract_entities(text)
    assert len(entities) >= 10
    for a, b in zip(entities, entities[1:]):
        assert a.end <= b.start
    assert {e.type for e in entities} == {"finding", "anatomy", "modifier", "device"}


def test_hyphenated_and_spaced_spellings_match_the_same_term():
    for text in ("COVID-19", "covid 19", "Covid19"):
        assert findings(text) == {("COVID-19", P)}
    assert findings("Plate-like atelectasis") == {("Atelectasis", P)}


def test_sentence_scope_does_not_cross_sentences():
    assert findings("No effusion. Pneumothorax.") == {(PE, A), (PTX, P)}
    assert findings("Possible pneumonia. Atelectasis.") == {("Pneumonia", U), ("Atelectasis", P)}
    assert findings("Atelectasis vs. pneumonia.") == {("Atelectasis", U), ("Pneumonia", U)}


def test_report_labels_aggregates_present_over_uncertain_over_absent():
    text = "Small left effusion. No right effusion. Possible pneumonia. No pneumonia on the right."
    labels = report_labels(text)
    assert labels[PE] == P
    assert labels["Pneumonia"] == U
    assert labels["No Finding"] == A
    assert list(labels) == [f for f in CANONICAL_FINDINGS if f in labels]


def test_no_finding_ignores_support_devices_and_absent_findings():
    labels = report_labels("ET tube in place. The lungs are clear. No pneumothorax.")
    assert labels == {"No Finding": P, LO: A, PTX: A, SD: P}
    assert report_labels("Possible small effusion.")["No Finding"] == A
    assert report_labels("Old granuloma.")["No Finding"] == A


def test_blank_report_has_no_labels():
    assert report_labels("") == {}
    assert report_labels("  \n ") == {}
    assert report_labels("Portable view.") == {"No Finding": P}


def test_label_sets_in_canonical_order():
    text = (
        "Pleural effusion and cardiomegaly. Possible pneumonia. No pneumothorax. "
        "Edema cannot be excluded."
    )
    present, absent, uncertain = label_sets(text)
    assert present == (CM, PE)
    assert absent == ("No Finding", PTX)
    assert uncertain == ("Edema", "Pneumonia")


def test_realistic_report():
    report = (
        "Frontal and lateral views of the chest. The heart is mildly enlarged. There is a small "
        "left pleural effusion with adjacent atelectasis; pneumonia cannot be excluded. No "
        "pneumothorax. Median sternotomy wires are intact."
    )
    assert report_labels(report) == {
        "No Finding": A, CM: P, "Pneumonia": U, "Atelectasis": P, PTX: A, PE: P, SD: P,
    }


def test_guide_entities_present_findings_and_their_words():
    from xlip.text.ner import guide_entities

    def words(text):
        return [e.text for e in guide_entities(text)]

    assert words("No pleural effusion. Large right pneumothorax.") == ["Large", "right",
                                                                        "pneumothorax"]
    assert words("Possible small left basilar atelectasis. No edema.") == [
        "small", "left", "basilar", "atelectasis"]
    assert words("Left lower lobe consolidation. No effusion in the right hemithorax.") == [
        "Left lower lobe", "consolidation"]
    assert words("The lungs are clear. No acute cardiopulmonary abnormality.") == []
    assert words("ET tube in place. No pneumothorax.") == ["ET tube"]


def test_guide_entities_reads_the_entities_it_is_given():
    """The collator passes the entities it has already extracted: they are used, not
    extracted a second time (which also doubled the NER's cost in every batch)."""
    from xlip.text.ner import extract_entities, guide_entities

    text = "No pleural effusion. Large right pneumothorax."
    ents = extract_entities(text)
    assert guide_entities(text, ents) == guide_entities(text)
    only_first_sentence = [e for e in ents if e.start < text.index(".")]
    assert guide_entities(text, only_first_sentence) == []  # "No pleural effusion." guides nothing


def test_entities_and_guides_reads_the_text_once_for_both():
    from xlip.text.ner import entities_and_guides, extract_entities, guide_entities

    for text in ["No pleural effusion. Large right pneumothorax.", "",
                 "Heart size is normal.\n\nPossible left basilar atelectasis; no edema.",
                 "There is a nodule. No pneumothorax. No pleural effusion."]:
        ents, guides = entities_and_guides(text)
        assert ents == extract_entities(text) and guides == guide_entities(text)
    assert [e.text for e in entities_and_guides("Large right pneumothorax. No edema.")[1]] \
        == ["Large", "right", "pneumothorax"]
