"""Disease-kind prompts: deterministic in evaluation, varied in training, readable by the NER."""

import random
from itertools import combinations

import pytest

from xlip.errors import InputError
from xlip.text.labels import CANONICAL_FINDINGS, UnknownLabelError
from xlip.text.ner import extract_entities, report_labels
from xlip.text.prompts import (
    FINDING_PHRASES,
    NEGATIVE_TEMPLATES,
    NO_FINDING_PROMPTS,
    POSITIVE_TEMPLATES,
    PROMPT_SETS,
    finding_phrase,
    label_prompt,
    zeroshot_prompts,
)

FINDINGS = [f for f in CANONICAL_FINDINGS if f != "No Finding"]


def test_every_finding_has_a_phrase():
    assert set(FINDING_PHRASES) == set(FINDINGS)
    assert FINDING_PHRASES["Pleural Effusion"] == "pleural effusion"
    assert FINDING_PHRASES["Support Devices"] == "support devices"
    assert FINDING_PHRASES["Enlarged Cardiomediastinum"] == "an enlarged cardiomediastinum"
    assert finding_phrase("Effusion") == "pleural effusion"
    assert finding_phrase("Nodule", article=False) == "nodule"


@pytest.mark.parametrize("finding", FINDINGS)
def test_phrase_is_recognised_as_its_finding(finding):
    phrase = FINDING_PHRASES[finding]
    canonicals = [e.canonical for e in extract_entities(phrase) if e.type in ("finding", "device")]
    assert canonicals == [finding]


@pytest.mark.parametrize("prompt_set", list(PROMPT_SETS))
@pytest.mark.parametrize("finding", FINDINGS)
def test_zeroshot_prompts_read_as_present_and_absent(finding, prompt_set):
    positives, negatives = zeroshot_prompts(finding, prompt_set)
    assert positives and negatives
    for prompt in positives:
        assert report_labels(prompt)[finding] == "present", prompt
    for prompt in negatives:
        assert report_labels(prompt)[finding] == "absent", prompt


@pytest.mark.parametrize("prompt_set", list(PROMPT_SETS))
def test_no_finding_bank_reads_as_no_finding(prompt_set):
    positives, negatives = zeroshot_prompts("normal", prompt_set)
    assert positives and negatives and not set(positives) & set(negatives)
    for prompt in positives:
        labels = report_labels(prompt)
        assert labels["No Finding"] == "present", prompt
        assert [f for f, a in labels.items() if a != "absent"] == ["No Finding"], prompt


def test_prompt_sets_are_distinct_and_cover_every_finding():
    assert list(PROMPT_SETS) == ["xlip", "chexzero", "report"]
    assert zeroshot_prompts("normal") == (list(NO_FINDING_PROMPTS),
                                          list(PROMPT_SETS["xlip"].abnormal))
    assert len(zeroshot_prompts("Edema")[0]) == len(POSITIVE_TEMPLATES)  # the default: xlip
    assert zeroshot_prompts("Edema", "chexzero") == (["pulmonary edema"], ["no pulmonary edema"])
    assert zeroshot_prompts("Lung Lesion", "report")[1][0] == "No lung lesion is seen."
    assert zeroshot_prompts("Support Devices", "report")[1][0] == "No support devices are seen."
    for finding in CANONICAL_FINDINGS:
        lists = {name: zeroshot_prompts(finding, name) for name in PROMPT_SETS}
        for name, (pos, neg) in lists.items():
            assert pos and neg and not set(pos) & set(neg), (finding, name)
            assert len(set(pos)) == len(pos) and len(set(neg)) == len(neg), (finding, name)
        for (a, pa), (b, pb) in combinations(lists.items(), 2):
            assert pa[0] != pb[0] and pa[1] != pb[1], (finding, a, b)
    for s in PROMPT_SETS.values():
        assert s.description and s.name in PROMPT_SETS
    with pytest.raises(InputError, match="prompt set 'clip': unknown; choose one of xlip, "
                                         "chexzero, report"):
        zeroshot_prompts("Edema", "clip")


def test_eval_prompt_is_deterministic_first_templates_in_canonical_order():
    prompt = label_prompt(["Effusion", "cardiomegaly"])
    assert prompt == "There is cardiomegaly. There is pleural effusion."
    assert label_prompt(["Cardiomegaly", "Pleural Effusion"]) == prompt
    assert label_prompt(["Cardiomegaly"], negatives=["Pneumothorax"]) == (
        "There is cardiomegaly. No pneumothorax."
    )


def test_no_finding_prompts():
    assert label_prompt([]) == NO_FINDING_PROMPTS[0]
    assert label_prompt(["No Finding"]) == NO_FINDING_PROMPTS[0]
    assert label_prompt(["No Finding", "Support Devices"]) == (
        f"{NO_FINDING_PROMPTS[0]} There are support devices."
    )
    assert label_prompt(["No Finding", "Edema"]) == "There is pulmonary edema."


def test_training_prompts_vary_and_are_reproducible():
    labels = ["Cardiomegaly", "Edema", "Pleural Effusion"]
    prompts = {label_prompt(labels, random.Random(seed)) for seed in range(30)}
    assert len(prompts) > 10
    assert label_prompt(labels, random.Random(5)) == label_prompt(labels, random.Random(5))
    for prompt in prompts:
        assert set(report_labels(prompt)) >= set(labels)
        assert all(report_labels(prompt)[f] == "present" for f in labels)


def test_negatives_are_appended_and_read_as_absent():
    rng = random.Random(0)
    prompt = label_prompt(["Nodule"], rng, negatives=["Pneumothorax", "Effusion"])
    labels = report_labels(prompt)
    assert labels["Nodule"] == "present"
    assert labels["Pneumothorax"] == "absent" and labels["Pleural Effusion"] == "absent"
    assert prompt.index("odule") < prompt.index("neumothorax")


def test_bad_prompt_requests_raise():
    with pytest.raises(UnknownLabelError):
        label_prompt(["Pleural Efusion"])
    with pytest.raises(ValueError, match="both present and negative"):
        label_prompt(["Edema"], negatives=["edema"])
    with pytest.raises(ValueError, match="No Finding"):
        label_prompt(["Edema"], negatives=["No Finding"])


def test_templates_have_placeholders():
    for template in POSITIVE_TEMPLATES + NEGATIVE_TEMPLATES:
        assert "{finding}" in template or "{Finding}" in template
