"""Report sections, de-identification clean-up and text policies."""

import pytest

from xlip.text.sections import TEXT_POLICIES, clean_deid, parse_sections, select_text

MIMIC_REPORT = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 WET READ: ___ ___ ___ 3:45 PM
   No pneumothorax.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.  Dr. ___ was paged at ___ on ___.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

IU_REPORT = (
    "COMPARISON: None. INDICATION: XXXX-year-old male, chest pain. "
    "FINDINGS: The cardiac silhouette and mediastinum size are within normal limits. There are "
    "no XXXX of a pleural effusion. Inferior XXXX XXXX XXXX. "
    "IMPRESSION: Normal chest x-XXXX."
)


def test_mimic_sections():
    sections = parse_sections(MIMIC_REPORT)
    assert list(sections) == [
        "EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON", "WET READ", "FINDINGS",
        "IMPRESSION",
    ]
    assert sections["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert sections["WET READ"].endswith("No pneumothorax.")
    assert sections["FINDINGS"].startswith("There is no focal consolidation")
    assert sections["IMPRESSION"] == "No acute cardiopulmonary process."


def test_mimic_text_policies():
    findings = (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular "
        "opacities that most likely represent nipple shadows. The cardiomediastinal silhouette is "
        "normal. Dr. was paged at on."
    )
    impression = "No acute cardiopulmonary process."
    assert select_text(MIMIC_REPORT) == f"{findings} {impression}"
    assert select_text(MIMIC_REPORT, "findings") == findings
    assert select_text(MIMIC_REPORT, "impression") == impression
    assert select_text(MIMIC_REPORT, "longest") == findings
    assert "___" not in select_text(MIMIC_REPORT)


def test_iu_sections_and_deid():
    sections = parse_sections(IU_REPORT)
    assert list(sections) == ["COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"]
    assert select_text(IU_REPORT) == (
        "The cardiac silhouette and mediastinum size are within normal limits. There are no of a "
        "pleural effusion. Inferior. Normal chest x-ray."
    )
    assert clean_deid(sections["INDICATION"]) == "year-old male, chest pain."


def test_headers_are_case_insensitive_and_found_after_a_sentence():
    text = "findings: Heart is normal. impression: no acute disease. Conclusion: normal"
    assert parse_sections(text) == {
        "FINDINGS": "Heart is normal.", "IMPRESSION": "no acute disease.", "CONCLUSION": "normal",
    }


def test_header_words_inside_a_sentence_are_not_headers():
    text = "FINDINGS: The findings of the prior study: resolved."
    assert parse_sections(text) == {"FINDINGS": "The findings of the prior study: resolved."}


def test_text_without_headers_is_findings():
    assert parse_sections("  Lungs are clear.\n") == {"FINDINGS": "Lungs are clear."}
    assert parse_sections("   ") == {}
    assert select_text("Lungs are clear. XXXX") == "Lungs are clear."


def test_preamble_and_repeated_sections():
    text = "Portable view.\nIMPRESSION: Effusion.\nIMPRESSION: Edema."
    sections = parse_sections(text)
    assert sections == {"PREAMBLE": "Portable view.", "IMPRESSION": "Effusion. Edema."}
    assert select_text(text) == "Portable view. Effusion. Edema."


def test_policy_fallbacks():
    only_impression = "INDICATION: cough. IMPRESSION: No acute disease."
    assert select_text(only_impression) == "No acute disease."
    assert select_text(only_impression, "findings") == ""
    assert select_text(only_impression, "longest") == "No acute disease."
    conclusion = "FINDINGS: Small effusion. CONCLUSION: Effusion."
    assert select_text(conclusion, "impression") == "Effusion."


def test_unknown_policy_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        select_text("Lungs are clear.", "summary")
    for policy in TEXT_POLICIES:
        assert policy in str(info.value)


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("No pneumothorax. XXXX", "No pneumothorax."),
        ("xxxx and XXXX-XXXX lungs", "and lungs"),
        ("Dr. ___ was notified at ___ .", "Dr. was notified at."),
        ("Comparison to ___ , no change", "Comparison to, no change"),
        ("Seen on prior (___).", "Seen on prior."),
        ("Effusion, XXXX, and edema.", "Effusion, and edema."),
        ("  a \n\n  b\tc ", "a b c"),
        ("___. Lungs clear.", "Lungs clear."),
        ("Normal chest x-XXXX.", "Normal chest x-ray."),
        ("tax_id and a_b stay", "tax_id and a_b stay"),
    ],
)
def test_clean_deid(raw, clean):
    assert clean_deid(raw) == clean
