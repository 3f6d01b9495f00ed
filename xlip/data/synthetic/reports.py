"""Free-text reports true of a study's findings, in varied radiology wording."""

from __future__ import annotations

import numpy as np

from xlip.data.synthetic.config import SYNTH_FINDINGS

REPORT_WORDS = (18, 70)  # target range of words per report (fits 96 WordPiece tokens)

_NEGATIONS: dict[str, list[str]] = {
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax.",
                     "No evidence of pneumothorax."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion.",
                         "No pleural effusion is seen."],
    "Consolidation": ["No focal consolidation.", "There is no consolidation.",
                      "No airspace disease."],
    "Edema": ["No pulmonary edema.", "No evidence of pulmonary edema.",
              "There is no pulmonary edema."],
    "Nodule": ["No pulmonary nodule.", "No suspicious nodule."],
    "Mass": ["No mass.", "No pulmonary mass is seen."],
    "Atelectasis": ["No atelectasis.", "No significant atelectasis."],
    "Cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is within normal limits.",
                     "Normal heart size.", "No cardiomegaly."],
}
_CLEAR_LUNGS = ["The lungs are clear.", "The lungs are clear bilaterally.", "Clear lungs."]
_NORMAL_IMPRESSIONS = ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                       "Normal chest radiograph.", "No acute intrathoracic process."]
_LUNG_FINDINGS = ("Consolidation", "Nodule", "Mass", "Edema", "Atelectasis", "Pneumothorax",
                  "Pleural Effusion")


def write_report(findings: dict[str, dict], rng: np.random.Generator) -> str:
    """A free-text report, ``"FINDINGS: ...\\nIMPRESSION: ..."``, true of the given findings.

    Every present finding is described in the findings section with its laterality, zone and
    size/severity in varied wording, and summarised (up to three) in the impression, which also
    always names any support devices; absent findings are negated at random; normal studies
    read as normal. About 18-70 words.
    """
    unknown = set(findings) - set(SYNTH_FINDINGS)
    if unknown:
        raise ValueError(f"write_report: unknown finding(s) {sorted(unknown)}")
    options = {name: _phrases(name, attrs, rng) for name, attrs in findings.items()}
    picks = {name: (_choice(rng, body), _choice(rng, imp)) for name, (body, imp) in options.items()}
    disease = [n for n in findings if n != "Support Devices"]
    disease = [disease[i] for i in rng.permutation(len(disease))]
    if "Cardiomegaly" in disease and rng.random() < 0.6:  # the heart is usually discussed last
        disease = [n for n in disease if n != "Cardiomegaly"] + ["Cardiomegaly"]
    order = (["Support Devices"] if "Support Devices" in findings else []) + disease

    absent = [f for f in _NEGATIONS if f not in findings]
    candidates: list[str] = []  # negative statements, in the order they are added
    if not any(f in findings for f in _LUNG_FINDINGS):
        candidates.append(_choice(rng, _CLEAR_LUNGS))
    if "Nodule" in absent and "Mass" in absent and rng.random() < 0.5:
        absent = [f for f in absent if f not in ("Nodule", "Mass")]
        candidates.append(_choice(rng, ["No suspicious pulmonary nodules or masses.",
                                        "No pulmonary nodule or mass."]))
    candidates += [_choice(rng, _NEGATIONS[absent[i]]) for i in rng.permutation(len(absent))]
    n_neg = int(rng.integers(1, 4)) if len(disease) < 3 else int(rng.integers(0, 2))

    impressions = [picks[n][1] for n in disease][:3]
    if not impressions:
        impressions = [_choice(rng, _NORMAL_IMPRESSIONS)]
    # tubes and lines are always summarised, as in practice (first when the study is otherwise
    # normal, else last)
    devices = [picks["Support Devices"][1]] if "Support Devices" in findings else []
    lead = not disease

    def compose(body: list[str], negs: list[str], imp: list[str]) -> str:
        imp = devices + imp if lead else imp + devices
        return f"FINDINGS: {' '.join(body + negs)}\nIMPRESSION: {' '.join(imp)}"

    body = [picks[n][0] for n in order]
    negs = candidates[:n_neg]
    report = compose(body, negs, impressions)
    lo, hi = REPORT_WORDS
    while len(report.split()) < lo and len(negs) < len(candidates):  # too terse: negate more
        negs = candidates[: len(negs) + 1]
        report = compose(body, negs, impressions)
    if len(report.split()) > hi:  # too long: fewer negations, shortest wording, shorter impression
        negs = negs[:1] if negs and negs[0] in _CLEAR_LUNGS else []
        body = [min(options[n][0], key=len) for n in order]
        impressions = ([min(options[n][1], key=len) for n in disease][: 2 - bool(devices)]
                       or impressions)
        report = compose(body, negs, impressions)
    return report


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _choice(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(0, len(options)))]


def _where(side: str, zone: str, rng: np.random.Generator) -> tuple[str, str]:
    """(noun phrase, adjective phrase) naming a lung zone: ("left upper lobe", "left upper lobe"),
    ("lingula", "lingular"), ..."""
    if zone == "upper":
        options = [f"{side} upper lobe", f"{side} upper lung zone", f"{side} upper lung"]
    elif zone == "middle":
        options = (["right middle lobe", "right mid lung zone", "right mid lung"] if side == "right"
                   else ["lingula", "left mid lung zone", "left mid lung"])
    else:
        options = [f"{side} lower lobe", f"{side} lung base", f"{side} lower lung zone"]
    noun = _choice(rng, options)
    adjective = {"lingula": "lingular", f"{side} lung base": f"{side} basilar"}.get(noun, noun)
    return noun, adjective


def _phrases(name: str, a: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(findings-sentence options, impression options) describing one present finding."""
    if name == "Cardiomegaly":
        return _cardiomegaly(a)
    if name == "Pleural Effusion":
        return _effusion(a)
    if name in ("Consolidation", "Nodule", "Mass"):
        return _lesion(name, a, rng)
    if name == "Pneumothorax":
        return _pneumothorax(a)
    if name == "Edema":
        return _edema(a)
    if name == "Atelectasis":
        return _atelectasis(a, rng)
    if name == "Support Devices":
        return _devices(a, rng)
    raise KeyError(name)


def _cardiomegaly(a: dict) -> tuple[list[str], list[str]]:
    sev = a["severity"]
    adv = "markedly" if sev == "marked" else "moderately"
    return [
        f"{_cap(sev)} cardiomegaly.",
        "The heart is enlarged.",
        f"The heart is enlarged, cardiothoracic ratio about {a['ctr']:.2f}.",
        f"The cardiac silhouette is {adv} enlarged, consistent with cardiomegaly.",
        "Enlarged cardiac silhouette.",
        f"{_cap(sev)} enlargement of the cardiac silhouette, consistent with cardiomegaly.",
        f"There is {sev} cardiomegaly.",
    ], [f"{_cap(sev)} cardiomegaly.", "Cardiomegaly.", "Enlarged heart."]


def _effusion(a: dict) -> tuple[list[str], list[str]]:
    lat, size = a["laterality"], a["size"]
    plural = "effusions" if lat == "bilateral" else "effusion"
    angle = "both costophrenic angles" if lat == "bilateral" else f"the {lat} costophrenic angle"
    diaphragm = "hemidiaphragms" if lat == "bilateral" else f"{lat} hemidiaphragm"
    hemithorax = "hemithoraces" if lat == "bilateral" else "hemithorax"
    body = [
        f"{_cap(size)} {lat} pleural {plural}.",
        f"There {'are' if lat == 'bilateral' else 'is a'} {size} {lat} pleural {plural}.",
        f"{_cap(lat)} pleural {plural}, {size} in size.",
    ]
    if size == "small":
        body += [f"Blunting of {angle}, consistent with small pleural {plural}.",
                 f"Small {lat} {plural} with blunting of {angle}."]
    else:
        body += [f"{_cap(size)} {lat} pleural {plural} obscuring the {diaphragm}."]
    if size == "large":
        body += [f"Large {lat} pleural {plural} with opacification of the lower {hemithorax}."]
    return body, [f"{_cap(size)} {lat} pleural {plural}.", f"{_cap(lat)} pleural {plural}."]


def _lesion(name: str, a: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Consolidation, Nodule or Mass, named by lung zone (and size in cm for nodule and mass)."""
    where, adj = _where(a["laterality"], a["zone"], rng)
    if name == "Consolidation":
        return [
            f"Patchy consolidation in the {where}.",
            f"There is focal consolidation in the {where}.",
            f"Airspace opacity in the {where}, consistent with consolidation.",
            f"Patchy airspace disease in the {where}.",
            f"Consolidation is present in the {where}.",
            f"{_cap(adj)} consolidation.",
        ], [f"{_cap(adj)} consolidation.", f"Consolidation in the {where}.",
            f"{_cap(adj)} airspace disease."]
    cm = a["diameter_cm"]
    if name == "Nodule":
        return [
            f"A {cm:.1f} cm nodule is seen in the {where}.",
            f"There is a rounded pulmonary nodule in the {where}.",
            f"Well-circumscribed nodule in the {where}, measuring {cm:.1f} cm.",
            f"Solitary pulmonary nodule projecting over the {where}.",
            f"{_cap(adj)} nodule.",
        ], [f"{_cap(adj)} pulmonary nodule; CT recommended.", f"Pulmonary nodule in the {where}.",
            f"{_cap(adj)} nodule."]
    return [
        f"There is a {cm:.1f} cm mass in the {where}.",
        f"Large lobulated mass in the {where}.",
        f"A rounded mass measuring {cm:.1f} cm projects over the {where}.",
        f"{_cap(adj)} mass, approximately {cm:.0f} cm.",
        f"{_cap(adj)} mass.",
    ], [f"{_cap(adj)} mass; further evaluation with CT is recommended.", f"Mass in the {where}.",
        f"{_cap(adj)} mass."]


def _pneumothorax(a: dict) -> tuple[list[str], list[str]]:
    lat, size = a["laterality"], a["size"]
    apical = "apical " if size == "small" else ""
    return [
        f"{_cap(size)} {lat} {apical}pneumothorax.",
        f"There is a {size} {lat} {apical}pneumothorax.",
        f"{_cap(size)} {lat} pneumothorax with a visible pleural line and absent peripheral "
        "markings.",
        f"A {lat} visceral pleural line is seen, consistent with a {size} pneumothorax.",
    ], [f"{_cap(size)} {lat} pneumothorax.", f"{_cap(lat)} pneumothorax."]


def _edema(a: dict) -> tuple[list[str], list[str]]:
    sev = a["severity"]
    return [
        f"{_cap(sev)} pulmonary edema.",
        f"Bilateral perihilar opacities and interstitial lines, consistent with {sev} pulmonary "
        "edema.",
        f"Pulmonary vascular congestion with {sev} interstitial edema.",
        f"Findings are consistent with {sev} pulmonary edema.",
        f"{_cap(sev)} interstitial pulmonary edema with perihilar haziness.",
    ], [f"{_cap(sev)} pulmonary edema.", "Pulmonary edema."]


def _atelectasis(a: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    lat, pattern = a["laterality"], a["pattern"]
    if lat == "bilateral":
        kind = "plate-like " if pattern == "plate-like" else ""
        return [
            f"Bibasilar {kind}atelectasis with elevated hemidiaphragms.",
            f"{'Plate-like' if pattern == 'plate-like' else 'Basilar'} atelectasis at both lung "
            "bases.",
            f"Bibasilar {kind}atelectasis.",
        ], ["Bibasilar atelectasis."]
    kind = (_choice(rng, ["plate-like", "linear", "discoid"]) if pattern == "plate-like"
            else "basilar")
    return [
        f"{_cap(kind)} atelectasis at the {lat} lung base.",
        f"{_cap(lat)} {kind} atelectasis with elevation of the {lat} hemidiaphragm.",
        f"There is {kind} atelectasis at the {lat} base with mild volume loss.",
        f"{_cap(lat)} basilar atelectasis.",
    ], [f"{_cap(lat)} basilar atelectasis.", f"Atelectasis at the {lat} base."]


def _devices(a: dict, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """One sentence per device (each wording drawn here), as a single findings option."""
    parts = []
    if "endotracheal tube" in a["devices"]:
        parts.append(_choice(rng, [
            f"Endotracheal tube terminates {a['ett_cm_above_carina']} cm above the carina.",
            "The endotracheal tube is in standard position above the carina.",
            "Endotracheal tube in place.",
        ]))
    if "nasogastric tube" in a["devices"]:
        parts.append(_choice(rng, [
            "Nasogastric tube courses below the diaphragm with the tip in the stomach.",
            "The nasogastric tube tip is in the stomach.",
            "Nasogastric tube in the stomach.",
        ]))
    if "central venous catheter" in a["devices"]:
        cl = a["central_line"]
        line = f"{_cap(cl['laterality'])} {cl['access']}"
        tip = ("at the cavoatrial junction" if cl["tip"] == "cavoatrial junction"
               else "in the superior vena cava")
        parts.append(_choice(rng, [
            f"{line} central venous catheter with the tip {tip}.",
            f"A {cl['laterality']} {cl['access']} central venous catheter terminates {tip}.",
            f"{line} central venous catheter.",
        ]))
    if "pacemaker" in a["devices"]:
        pm = a["pacemaker"]
        chambers = "Dual" if pm["leads"] == 2 else "Single"
        leads = ("leads in the right atrium and right ventricle" if pm["leads"] == 2
                 else "a single lead in the right ventricle")
        parts.append(_choice(rng, [
            f"{_cap(pm['laterality'])}-sided pacemaker with {leads}.",
            f"{chambers}-chamber pacemaker, generator over the {pm['laterality']} chest.",
        ]))
    return [" ".join(parts)], ["Support devices in place.",
                               "Lines and tubes in satisfactory position.",
                               "Support devices as described."]
