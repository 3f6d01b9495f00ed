"""The data of :mod:`xlip.text.ner`: term lexicons, assertion triggers and normal-statement rules.

Nothing here runs; :mod:`xlip.text.ner` builds its matcher from these tables once and applies
its rules with them (its module docstring describes the matching and the assertion rules).

Lexicon
    :data:`FINDING_TERMS` (canonical finding -> surface forms), :data:`OTHER_FINDING_TERMS`
    (findings outside the label vocabulary, canonical ``None``), :data:`DEVICE_TERMS` (all
    ``Support Devices``), :data:`ANATOMY_TERMS` and :data:`MODIFIER_TERMS` (normalised term ->
    surface forms), and :data:`SIDED_ANATOMY` (anatomy that also matches after ``right`` /
    ``left``). A surface form is a pattern whose ``(a|b|)`` groups give alternatives (an empty
    alternative makes the group optional); ner.py expands the patterns, splits them into words
    and adds plurals of finding, anatomy and device terms (:data:`IRREGULAR_PLURALS` where the
    ``-s`` / ``-es`` / ``-ies`` rules fail). A written form with two meanings, or a trigger that is
    also a term, makes ner.py raise when it builds the lexicon.

Triggers
    :data:`TRIGGERS` maps each trigger kind (:data:`NEG_PRE`, :data:`UNC_POST`, ...) to its
    phrases, written in the same pattern syntax. A phrase listed under both the pre and the post
    kind of negation or of uncertainty becomes a two-way trigger in ner.py.

Cue words
    :data:`DETERMINERS` after :data:`CONNECTORS` open a new phrase (the end of a trigger's
    scope); :data:`ABBREVIATIONS` are the words after which ``.`` does not end a sentence.

Normal statements
    :data:`STATE_RULES` (one :class:`StateRule` per finding: its anatomy subjects and its normal
    and abnormal predicates), :data:`PRE_NORMAL` (adjectives stating normal before a subject) and
    the words that qualify a predicate: :data:`COPULAS`, :data:`NEGATORS`, :data:`HEDGES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "ABBREVIATIONS",
    "ANATOMY_TERMS",
    "CONNECTORS",
    "CONTINUE",
    "COPULAS",
    "DETERMINERS",
    "DEVICE_TERMS",
    "FINDING_TERMS",
    "HEDGES",
    "IRREGULAR_PLURALS",
    "MODIFIER_TERMS",
    "NEG_POST",
    "NEG_PRE",
    "NEGATORS",
    "OTHER_FINDING_TERMS",
    "PRE_NORMAL",
    "PSEUDO",
    "SIDED_ANATOMY",
    "STATE_RULES",
    "StateRule",
    "TERM",
    "TRIGGERS",
    "UNC_BI",
    "UNC_POST",
    "UNC_PRE",
    "UNC_WEAK",
]

# --------------------------------------------------------------------------------------------
# Lexicon. Surface forms may use "(a|b|)" groups (an empty alternative makes the group optional).
# --------------------------------------------------------------------------------------------

FINDING_TERMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "Enlarged Cardiomediastinum": (
        "enlarged cardiomediastinum",
        "enlarged cardiomediastinal (silhouette|contour|shadow)",
        "enlargement of the cardiomediastinal (silhouette|contour)",
        "cardiomediastinal enlargement",
        "(widened|enlarged) (superior |)mediastinum",
        "(widened|enlarged) (superior |)mediastinal (silhouette|contour|shadow)",
        "widening of the (superior |)mediastinum",
        "mediastinal (widening|enlargement)",
    ),
    "Cardiomegaly": (
        "cardiomegaly",
        "enlarged heart",
        "enlarged heart size",
        "increased heart size",
        "enlarged cardiac (silhouette|contour|shadow|size)",
        "(cardiac|heart) enlargement",
        "enlargement of the (heart|cardiac silhouette)",
    ),
    "Lung Opacity": (
        "opacity",
        "opacification",
        "opacified",
        "(lung|pulmonary|parenchymal) (opacity|opacification)",
        "(airspace|air space|alveolar) (opacity|opacification)",
        "ground glass (opacity|opacification)",
        "(reticular|reticulonodular|interstitial) opacity",
        "density",
        "haziness",
    ),
    "Lung Lesion": (
        "lesion",
        "(lung|pulmonary|cavitary) lesion",
        "cavitation",
        "cavity",
        "tumor",
        "tumour",
        "neoplasm",
        "carcinoma",
        "malignancy",
        "lung cancer",
        "metastasis",
        "metastatic disease",
    ),
    "Edema": (
        "edema",
        "oedema",
        "(pulmonary|interstitial|alveolar|hydrostatic) (edema|oedema)",
        "interstitial pulmonary edema",
        "(pulmonary |)(vascular|venous) congestion",
        "pulmonary congestion",
        "congestion",
        "congestive heart failure",
        "chf",
        "(fluid|volume) overload",
        "vascular engorgement",
        "cephalization",
        "kerley b line",
    ),
    "Consolidation": (
        "consolidation",
        "consolidative (opacity|process|change)",
        "(airspace|air space) (disease|consolidation|process)",
        "alveolar consolidation",
        "air bronchogram",
    ),
    "Pneumonia": (
        "pneumonia",
        "bronchopneumonia",
        "pneumonitis",
        "infection",
        "infectious process",
        "aspiration",
        "aspiration pneumonia",
    ),
    "Atelectasis": (
        "atelectasis",
        "atelectatic",
        "atelectatic (change|opacity|band)",
        "(plate like|platelike|discoid|linear|subsegmental) atelectasis",
        "collapse",
        "(lobar|lung|lobe) collapse",
        "volume loss",
        "loss of volume",
    ),
    "Pneumothorax": (
        "pneumothorax",
        "ptx",
        "hydropneumothorax",
        "tension pneumothorax",
    ),
    "Pleural Effusion": (
        "pleural effusion",
        "effusion",
        "pleural fluid",
        "parapneumonic effusion",
        "fluid in the pleural space",
        "hydrothorax",
        "empyema",
        "blunting of the (right |left |bilateral |)(costophrenic|cp) (angle|sulcus)",
        "blunting of (right |left |bilateral |)(costophrenic|cp) (angle|sulcus)",
        "blunted (right |left |bilateral |)(costophrenic|cp) (angle|sulcus)",
        "(costophrenic|cp) (angle |sulcus |)blunting",
        "blunting",
    ),
    "Pleural Other": (
        "(calcified |)pleural plaque",
        "pleural calcification",
        "fibrothorax",
        "(pleural|pleuroparenchymal|pleural parenchymal) scarring",
        "pleural (abnormality|disease|fibrosis)",
        "apical capping",
    ),
    "Fracture": (
        "fracture",
        "fractured",
        "rib fracture",
        "compression (fracture|deformity)",
    ),
    "Emphysema": (
        "emphysema",
        "emphysematous",
        "emphysematous change",
        "copd",
        "chronic obstructive pulmonary disease",
        "bulla",
        "bullous (disease|change)",
    ),
    "Fibrosis": (
        "fibrosis",
        "(pulmonary|interstitial) fibrosis",
        "fibrotic",
        "fibrotic change",
        "scarring",
        "scar",
        "honeycombing",
        "interstitial lung disease",
        "ild",
    ),
    "Hernia": (
        "hernia",
        "(hiatal|hiatus|diaphragmatic|paraesophageal|bochdalek|morgagni) hernia",
    ),
    "Infiltration": (
        "infiltrate",
        "infiltration",
        "infiltrative (opacity|process)",
    ),
    "Mass": (
        "mass",
        "(lung|pulmonary|hilar|mediastinal|soft tissue) mass",
    ),
    "Nodule": (
        "nodule",
        "micronodule",
        "nodular (opacity|density|opacification|lesion)",
        "(pulmonary|lung|calcified) nodule",
        "(calcified |)granuloma",
        "(calcified |)granulomatous (disease|change)",
    ),
    "Pleural Thickening": (
        "pleural thickening",
        "thickening of the pleura",
    ),
    "COVID-19": (
        "covid 19",
        "covid19",
        "covid",
        "(covid 19|covid19|covid) pneumonia",
        "sars cov 2",
        "coronavirus",
        "coronavirus disease",
    ),
    "Tuberculosis": (
        "(pulmonary |active |latent |miliary |reactivation |post primary |)tuberculosis",
        "tuberculous (infection|disease)",
    ),
})

# Findings outside the label vocabulary (canonical None): they are entities for EntMLM/AttMIM and
# keep look-alike terms from being read as vocabulary findings (pericardial effusion).
OTHER_FINDING_TERMS: tuple[str, ...] = (
    "pericardial effusion",
    "subcutaneous emphysema",
    "pneumomediastinum",
    "pneumoperitoneum",
    "free (intraperitoneal |)air",
    "mass effect",
    "scoliosis",
    "kyphosis",
    "degenerative (change|disease)",
    "osteophyte",
    "spondylosis",
    "osteopenia",
    "(aortic|vascular|vascular wall|coronary) calcification",
    "calcification",
    "atherosclerosis",
    "atherosclerotic (change|disease|calcification|plaque)",
    "tortuous aorta",
    "tortuosity",
    "(aortic |)(unfolding|ectasia)",
    "unfolded aorta",
    "(hilar |mediastinal |)(lymphadenopathy|adenopathy)",
    "(diaphragmatic |)eventration",
    "nipple shadow",
    "(lytic|sclerotic|osseous|bony|blastic) lesion",
    "bronchiectasis",
    "cystic fibrosis",
    "(soft tissue|subcutaneous|extremity|chest wall) (edema|oedema)",
    "granulomatous infection",
    "(bronchial wall|peribronchial) thickening",
    "peribronchial cuffing",
    "pulmonary hypertension",
    "low lung volume",
    # signs that go with COPD but are not emphysema (IU's indexers file them as hyperdistention)
    "(pulmonary |)(hyperinflation|hyperexpansion|hyperaeration|overinflation)",
    "(hyperinflated|hyperexpanded|hyperaerated|overinflated)",
    "air trapping",
    "(cardiopulmonary|intrathoracic|pulmonary|lung|osseous) (abnormality|disease|process)",
    "(cardiopulmonary|pulmonary) finding",
    "acute (cardiopulmonary |intrathoracic |pulmonary |osseous |)"
    "(abnormality|disease|process|finding)",
    "active disease",
    "abnormality",
    "disease",
)

DEVICE_TERMS: tuple[str, ...] = (
    "(support|medical|cardiac|electronic) device",
    "device",
    "tube",
    "catheter",
    "lines and tubes",
    "tubes and lines",
    "(endotracheal|et|tracheostomy|nasogastric|ng|orogastric|og|enteric|feeding|dobhoff|chest"
    "|gastrostomy|nasoenteric|pleural|thoracostomy|drainage|small bore|pigtail) tube",
    "ett",
    "tracheostomy",
    "dobhoff",
    "central (venous |)(line|catheter)",
    "picc",
    "picc line",
    "(peripherally inserted central|pigtail|dialysis|hemodialysis|tunneled|midline|pleural"
    "|drainage|swan ganz|pulmonary artery|pa) catheter",
    "(internal jugular|ij|subclavian|femoral) (venous |central venous |)(line|catheter|sheath)",
    "swan ganz",
    "port",
    "port a cath",
    "portacath",
    "mediport",
    "power port",
    "(cardiac |dual chamber |single chamber |)(pacemaker|pacer)",
    "icd",
    "aicd",
    "(implantable cardioverter |)defibrillator",
    "lead",
    "(pacemaker|pacer|pacing|icd|aicd|defibrillator|transvenous|epicardial) (lead|wire)",
    "(ecg|ekg|monitoring|telemetry) (lead|wire|electrode)",
    "electrode",
    "(median |)sternotomy (wire|suture)",
    "sternal (wire|suture)",
    "(median |midline |)sternotomy",
    "drain",
    "(surgical|chest) drain",
    "stent",
    "(aortic|mitral|tricuspid|prosthetic) valve (replacement|prosthesis|)",
    "prosthetic valve",
    "lvad",
    "left ventricular assist device",
    "impella",
    "iabp",
    "intra aortic balloon pump",
    "loop recorder",
    "(neuro|spinal cord |)stimulator",
    "(septal |)occluder",
    "hardware",
    "guidewire",
)

SIDED_ANATOMY: tuple[str, ...] = (
    "lung", "lung base", "lung apex", "base", "apex", "hemithorax", "hemidiaphragm",
    "upper lobe", "lower lobe", "costophrenic angle", "hilum", "chest", "lung field",
    "pleural space", "mid lung", "upper lung", "lower lung",
)

ANATOMY_TERMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "lung": ("lung", "both lungs", "pulmonary parenchyma", "lung parenchyma", "parenchyma"),
    "lung field": ("lung field", "lung zone"),
    "lung base": ("lung base", "base"),
    "lung apex": ("lung apex", "apex"),
    "upper lobe": ("upper lobe",),
    "middle lobe": ("middle lobe", "right middle lobe", "rml"),
    "lower lobe": ("lower lobe",),
    "right upper lobe": ("rul",),
    "right lower lobe": ("rll",),
    "left upper lobe": ("lul",),
    "left lower lobe": ("lll",),
    "lingula": ("lingula", "lingular segment"),
    "mid lung": ("mid lung", "mid lung zone", "midlung"),
    "upper lung": ("upper lung", "upper lung zone"),
    "lower lung": ("lower lung", "lower lung zone"),
    "hemithorax": ("hemithorax",),
    "hilum": ("hilum", "hilar (region|contour|structure)"),
    "costophrenic angle": (
        "(costophrenic|cp) (angle|sulcus|recess)",
        "lateral costophrenic angle",
        "posterior costophrenic angle",
    ),
    "cardiophrenic angle": ("cardiophrenic angle",),
    "heart": ("heart",),
    "heart size": ("heart size", "(cardiac|heart) size"),
    "cardiac silhouette": ("(cardiac|heart) silhouette", "cardiac shadow"),
    "cardiac contour": ("(cardiac|heart) contour",),
    "cardiomediastinal silhouette": (
        "cardiomediastinal (silhouette|contour|shadow|structure)",
        "heart and mediastinum",
    ),
    "mediastinum": ("mediastinum", "superior mediastinum"),
    "mediastinal contour": ("mediastinal (contour|silhouette|structure|width|size)",),
    "diaphragm": ("diaphragm",),
    "hemidiaphragm": ("hemidiaphragm",),
    "pleura": ("pleura",),
    "pleural space": ("pleural (space|surface)",),
    "rib": ("rib",),
    "spine": ("spine", "(thoracic|lumbar|cervical) spine", "vertebra", "vertebral body"),
    "trachea": ("trachea",),
    "carina": ("carina",),
    "bronchus": ("bronchus", "bronchi", "mainstem bronchus"),
    "aorta": ("aorta", "(thoracic|descending|ascending) aorta", "aortic (arch|knob|contour)"),
    "pulmonary vasculature": (
        "pulmonary (vasculature|vascularity|vessel)",
        "vasculature",
        "vascularity",
    ),
    "pulmonary artery": ("pulmonary artery",),
    "clavicle": ("clavicle",),
    "scapula": ("scapula",),
    "sternum": ("sternum",),
    "chest wall": ("chest wall",),
    "soft tissue": ("soft tissue",),
    "bone": ("bone", "osseous structure", "bony structure", "bony thorax", "skeletal structure"),
    "thorax": ("thorax",),
    "chest": ("chest",),
    "abdomen": ("abdomen", "upper abdomen"),
    "stomach": ("stomach", "gastric bubble"),
    "superior vena cava": ("superior vena cava", "svc"),
    "cavoatrial junction": ("cavoatrial junction",),
    "right atrium": ("right atrium",),
    "atrium": ("atrium", "left atrium"),
    "ventricle": ("ventricle", "(right|left) ventricle"),
    "fissure": ("fissure", "(minor|major|horizontal|oblique) fissure"),
    "lung volume": ("lung volume",),
    "airway": ("airway",),
    "esophagus": ("esophagus",),
    "neck": ("neck",),
    "shoulder": ("shoulder",),
    "breast": ("breast",),
})

MODIFIER_TERMS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "left": ("left", "left sided", "lt"),
    "right": ("right", "right sided", "rt"),
    "bilateral": ("bilateral", "bilaterally"),
    "unilateral": ("unilateral",),
    "bibasilar": ("bibasilar", "bibasal", "bibasally"),
    "biapical": ("biapical",),
    "basilar": ("basilar", "basal"),
    "apical": ("apical",),
    "perihilar": ("perihilar",),
    "retrocardiac": ("retrocardiac",),
    "upper": ("upper",),
    "lower": ("lower",),
    "middle": ("middle",),
    "mid": ("mid",),
    "anterior": ("anterior",),
    "posterior": ("posterior",),
    "lateral": ("lateral",),
    "medial": ("medial",),
    "central": ("central",),
    "peripheral": ("peripheral",),
    "tiny": ("tiny",),
    "trace": ("trace",),
    "small": ("small",),
    "small to moderate": ("small to moderate",),
    "moderate": ("moderate", "moderately"),
    "moderate to large": ("moderate to large",),
    "mild to moderate": ("mild to moderate",),
    "moderate to severe": ("moderate to severe",),
    "large": ("large",),
    "massive": ("massive",),
    "minimal": ("minimal", "minimally"),
    "mild": ("mild", "mildly"),
    "slight": ("slight", "slightly"),
    "severe": ("severe", "severely"),
    "marked": ("marked", "markedly"),
    "significant": ("significant",),
    "borderline": ("borderline",),
    "patchy": ("patchy",),
    "focal": ("focal",),
    "diffuse": ("diffuse", "diffusely"),
    "multifocal": ("multifocal",),
    "scattered": ("scattered",),
    "multiple": ("multiple", "numerous"),
    "streaky": ("streaky",),
    "linear": ("linear",),
    "hazy": ("hazy",),
    "faint": ("faint",),
    "subtle": ("subtle",),
    "dense": ("dense",),
    "extensive": ("extensive",),
    "new": ("new",),
    "stable": ("stable",),
    "unchanged": ("unchanged",),
    "increased": ("increased", "increasing"),
    "decreased": ("decreased", "decreasing"),
    "improved": ("improved", "improving"),
    "worsened": ("worsened", "worsening"),
    "enlarging": ("enlarging",),
    "enlarged": ("enlarged",),
    "elevated": ("elevated",),
    "persistent": ("persistent",),
    "residual": ("residual",),
    "acute": ("acute",),
    "subacute": ("subacute",),
    "chronic": ("chronic",),
    "old": ("old",),
    "healed": ("healed", "healing"),
    "subsegmental": ("subsegmental",),
    "segmental": ("segmental",),
    "lobar": ("lobar",),
    "multilobar": ("multilobar",),
    "layering": ("layering",),
    "loculated": ("loculated",),
    "calcified": ("calcified",),
    "displaced": ("displaced",),
    "nondisplaced": ("nondisplaced", "non displaced"),
    "interstitial": ("interstitial",),
    "early": ("early",),
})

# --------------------------------------------------------------------------------------------
# Triggers.
# --------------------------------------------------------------------------------------------

NEG_PRE = "neg_pre"
NEG_POST = "neg_post"
UNC_PRE = "unc_pre"
UNC_POST = "unc_post"
UNC_BI = "unc_bi"  # versus: the nearest finding before and the entities after
UNC_WEAK = "unc_weak"  # uncertainty, but continues a negation in a negated clause
CONTINUE = "continue"  # no effect, but continues a negation in a negated clause
PSEUDO = "pseudo"  # no effect ("no change", "not only")
TERM = "term"  # ends every scope it meets

TRIGGERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    NEG_PRE: (
        "no", "not", "without", "neither", "absence of", "absent", "negative for",
        "free of", "clear of", "no evidence of", "no evidence for", "no signs of",
        "no sign of", "no findings of", "no suggestion of", "no radiographic evidence of",
        "without evidence of", "without any", "rather than", "resolved", "resolution of",
        "interval resolution of", "removal of", "interval removal of", "ruled out",
        "no longer", "never", "fails to reveal", "fails to demonstrate", "not demonstrate",
    ),
    NEG_POST: (
        "absent", "resolved", "removed", "not seen", "not identified", "not visualized",
        "not appreciated", "not present", "not evident", "not demonstrated", "not detected",
        "not apparent", "no longer seen", "no longer present", "no longer visualized",
        "no longer identified", "no longer evident", "no longer apparent", "ruled out",
        "has cleared", "have cleared", "cleared", "within normal limits",
        "within (the |)limits of normal",
    ),
    UNC_PRE: (
        "may", "might", "could", "possible", "possibly", "probable", "probably", "likely",
        "unlikely", "presumed", "presumably", "perhaps", "maybe", "questionable",
        "questionably", "question of", "suspect", "suspected", "suspicion of",
        "suspicion for", "cannot exclude", "can not exclude", "cannot rule out",
        "can not rule out", "differential", "differential diagnosis",
        "equivocal", "indeterminate", "uncertain", "not certain", "rule out", "r o",
        "question", "differential considerations include", "differential includes",
        "to exclude", "evaluate for", "eval for", "evaluation for", "assess for",
        "there may be", "there might be", "there could be", "is likely", "are likely",
        "is probably", "are probably",
    ),
    UNC_POST: (
        "(cannot|can not|could not|can't) be (entirely |completely |definitely |totally |)"
        "(excluded|ruled out)",
        "not (entirely |completely |definitely |)(excluded|ruled out)",
        "not (be|been) (entirely |completely |definitely |)(excluded|ruled out)",
        "(is|are) in the differential", "(is|are) (a|another) consideration",
        "is not excluded", "is possible",
        "are possible", "is suspected", "are suspected", "is questioned",
        "is likely", "are likely", "is probably", "are probably", "is unlikely", "are unlikely",
    ),
    UNC_BI: ("versus", "vs"),
    UNC_WEAK: (
        "suggest", "suggests", "suggesting", "suggestive of", "to suggest",
        "concerning for", "concerning", "suspicious for", "suspicious of", "worrisome for",
    ),
    CONTINUE: (
        "consistent with", "compatible with", "indicative of", "to indicate",
        "diagnostic of", "characteristic of",
    ),
    PSEUDO: (
        "no (significant |substantial |definite |suspicious |other |further |)(interval |)"
        "(change|increase|decrease|enlargement|progression|worsening)",
        "without (significant |)(interval |)(change|increase|decrease|progression)",
        "not (significantly |)(changed|change|increased)", "not only", "not necessarily",
        "not well", "gram negative",
    ),
    TERM: (
        "but", "however", "although", "though", "except", "apart from", "aside from",
        "other than", "which", "who", "whereas", "while", "with", "yet", "there is",
        "there are", "there was", "there were", "there has been", "there have been",
        "as well as", "otherwise", "in addition",
    ),
})

# --------------------------------------------------------------------------------------------
# Normal statements: anatomy subjects whose predicate states a finding (see xlip.text.ner).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateRule:
    """A finding stated through a predicate on an anatomy subject (``Heart size is normal``).

    Attributes:
        finding: the canonical finding that the statement asserts.
        subjects: anatomy canonicals (:data:`ANATOMY_TERMS`, sided forms) that can carry it.
        normal: word sequences that state the subject normal (the finding absent).
        abnormal: word sequences that state it abnormal (the finding present); may be empty.
    """

    finding: str
    subjects: frozenset[str]
    normal: tuple[tuple[str, ...], ...]
    abnormal: tuple[tuple[str, ...], ...]


def _phrases(*texts: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(text.split()) for text in texts)


STATE_RULES: tuple[StateRule, ...] = (
    StateRule(
        "Cardiomegaly",
        frozenset({"heart", "heart size", "cardiac silhouette", "cardiac contour"}),
        _phrases(
            "normal", "within normal limits", "within normal limit", "within normal range",
            "within limits of normal", "unremarkable", "top normal", "upper normal", "high normal",
            "upper limits of normal", "upper limit of normal",
        ),
        _phrases("enlarged", "large", "increased in size"),
    ),
    StateRule(
        "Enlarged Cardiomediastinum",
        frozenset({"mediastinum", "mediastinal contour", "cardiomediastinal silhouette"}),
        _phrases("normal", "within normal limits", "within normal limit", "unremarkable"),
        _phrases("enlarged", "widened", "wide"),
    ),
    StateRule(
        "Lung Opacity",
        frozenset({"lung", "right lung", "left lung", "lung field"}),
        _phrases("clear", "normal", "unremarkable"),
        (),
    ),
    StateRule(
        "Pleural Effusion",
        frozenset({
            "costophrenic angle", "right costophrenic angle", "left costophrenic angle",
            "pleural space", "right pleural space", "left pleural space",
        }),
        _phrases("sharp", "clear", "normal", "preserved", "sharply defined"),
        _phrases("blunted"),
    ),
    StateRule(
        "Edema",
        frozenset({"pulmonary vasculature"}),
        _phrases("normal", "within normal limits", "within normal limit", "unremarkable"),
        _phrases("engorged", "congested"),
    ),
)

PRE_NORMAL: tuple[tuple[str, ...], ...] = _phrases(
    "normal", "normal size", "normal sized", "normal appearing", "clear", "sharp", "unremarkable"
)
COPULAS = frozenset({"is", "are", "was", "were", "appear", "appears", "remain", "remains",
                     "seem", "seems", "look", "looks", "be"})
NEGATORS = frozenset({"not", "no", "never"})
HEDGES = frozenset({"may", "might", "could", "possible", "possibly", "probably", "likely",
                    "questionably", "perhaps", "presumably"})

# --------------------------------------------------------------------------------------------
# Cue words.
# --------------------------------------------------------------------------------------------

# A determiner right after a connector opens a new phrase, outside a trigger's scope.
DETERMINERS = frozenset({"the", "this", "these", "those", "it", "there", "a", "an"})
CONNECTORS = frozenset({",", "and", "or"})
# Words after which "." does not end a sentence ("e.g." is "e", ".", "g", ".").
ABBREVIATIONS = frozenset({"dr", "vs", "approx", "cf", "mr", "mrs", "ms", "st", "fig", "e", "g",
                           "i"})

# Plurals that ner.py's -s / -es / -ies rules get wrong.
IRREGULAR_PLURALS: Mapping[str, str] = MappingProxyType({
    "apex": "apices", "hilum": "hila", "pleura": "pleurae", "vertebra": "vertebrae",
    "pneumothorax": "pneumothoraces", "hemithorax": "hemithoraces", "bulla": "bullae",
    "metastasis": "metastases", "atelectasis": "atelectases", "fibrosis": "fibroses",
    "bronchus": "bronchi", "thorax": "thoraces", "sulcus": "sulci", "diagnosis": "diagnoses",
})

