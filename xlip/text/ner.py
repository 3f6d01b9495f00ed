"""A deterministic lexicon + rule radiology named-entity recogniser with NegEx-style assertions.

It serves EntMLM (which words to mask), AttMIM (which tokens guide the image masking) and report ->
label extraction (DESIGN section 3). Everything is explicit and documented here; there is no model.
The term lexicons, trigger phrases and normal-statement rules are data in
:mod:`xlip.text.ner_lexicon`; this module holds the matcher and the rules that use them.

Matching
    Text is split into word tokens (letters/digits; hyphens, slashes and apostrophes separate words,
    so ``x-ray`` = ``x ray`` and ``COVID-19`` = ``covid 19``) and punctuation. Lexicon terms are
    token sequences, matched case-insensitively on word boundaries; at each position the longest
    term wins and matches never overlap (leftmost-longest). Every finding, anatomy and device term
    also matches its plural (``opacity`` -> ``opacities``, ``apex`` -> ``apices``). Entity types:
    ``finding``, ``anatomy``, ``modifier``, ``device``. ``canonical`` is the canonical finding of
    :mod:`xlip.text.labels` for findings and devices (every device is ``Support Devices``), ``None``
    for findings outside the label vocabulary (``pericardial effusion``, ``scoliosis``, the generic
    ``acute cardiopulmonary abnormality``), and a normalised term for anatomy and modifiers
    (``lungs`` -> ``lung``, ``bilaterally`` -> ``bilateral``). Granulomas are ``Nodule`` (see
    :mod:`xlip.text.labels`); ``pleural thickening`` is ``Pleural Thickening`` and other pleural
    abnormalities (plaques, pleural scarring) are ``Pleural Other``. An *airspace opacity* is
    ``Lung Opacity`` (a description), *airspace disease* ``Consolidation``. Hyperinflation
    (``hyperexpanded lungs``, ``air trapping``) is outside the vocabulary: a sign that goes with
    COPD, not emphysema (Indiana University's MeSH indexers file it as lung hyperdistention).

Assertion (present / absent / uncertain), per sentence
    Sentences end at ``.``, ``!``, ``?`` (not after ``dr.``, ``vs.``, ``e.g.``) and blank lines.
    A pre-trigger (``no``, ``without``, ``no evidence of``, ``negative for``, ``free of``, ``clear
    of``, ``resolved``, ``removal of``, ...; uncertainty: ``may``, ``possible``, ``likely``,
    ``suspicious for``, ``cannot exclude``, ``question of``, ``rule out``, ...) applies to the
    entities that follow it: the first within four words, then each next one within two words of
    the previous one (``No pleural effusion or pneumothorax`` negates both), until a terminator
    (``but``, ``however``, ``although``, ``except``, ``which``, ``with``, ``there is``, ``;``,
    ``:``, ...), the sentence end, another pre-trigger, or a determiner opening a new phrase after
    ``,``/``and`` (``No effusion and the ET tube ...``). A post-trigger (``is absent``, ``has
    resolved``, ``not seen``, ``removed``, ``within normal limits``; uncertainty: ``cannot be
    excluded``, ``not ruled out``, ``is suspected``) applies backwards in the same way. ``versus`` makes uncertain the nearest
    finding before it and the entities after it. Pseudo-triggers (``no change``, ``no increase``,
    ``not only``, ``no interval change``, ...) do nothing. Inside a negated clause, ``suggest(s)``,
    ``suggestive of``, ``concerning for``, ``consistent with`` continue the negation (``No
    consolidation to suggest pneumonia``: pneumonia absent); elsewhere the first three are
    uncertainty triggers. Two-way phrases pick a direction by position: ``resolved`` / ``absent``
    / ``ruled out`` look back when an entity precedes them (``effusion resolved``) and otherwise
    negate the next finding only (``resolved effusion, new pneumothorax``); ``is likely`` looks
    forward when an entity follows (``opacity is likely atelectasis``), else back (``pneumonia is
    likely``). Absent wins over uncertain when both reach an entity.

Normal statements (explicit rules)
    Some anatomy terms state a finding through a predicate; when one is found, the anatomy entity
    becomes a ``finding`` entity of that finding with the predicate's assertion (the words between
    may negate or hedge an abnormal predicate):

    ==================================================  ========================  ===============
    subject                                             normal (absent)           abnormal
    ==================================================  ========================  ===============
    heart, heart size, cardiac silhouette / contour     normal, within normal     enlarged, large
      -> Cardiomegaly                                   limits, top normal, ...
    mediastinum, mediastinal contour, cardiomediastinal normal, within normal     enlarged,
      silhouette -> Enlarged Cardiomediastinum          limits, unremarkable      widened
    lung(s), right/left lung, lung fields               clear, normal,            --
      -> Lung Opacity                                   unremarkable
    costophrenic angle(s), pleural space(s)             sharp, clear, normal,     blunted
      -> Pleural Effusion                               preserved
    pulmonary vasculature -> Edema                      normal, within normal     engorged,
                                                        limits                    congested
    ==================================================  ========================  ===============

    The predicate follows the subject in the same clause (``Heart size is normal``, ``The cardiac
    silhouette and mediastinum size are within normal limits``) or is an adjective right before it
    (``normal heart size``, ``clear lungs``, ``sharp costophrenic angles``). ``No acute
    cardiopulmonary abnormality`` yields an absent finding outside the label vocabulary
    (``canonical=None``).

Labels
    :func:`report_labels` aggregates the finding and device entities over the report (present >
    uncertain > absent) and adds ``No Finding``: present when the report is not blank and no
    finding other than ``Support Devices`` is present or uncertain, absent otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

from xlip.text.labels import CANONICAL_FINDINGS
from xlip.text.ner_lexicon import (
    ABBREVIATIONS,
    ANATOMY_TERMS,
    CONNECTORS,
    CONTINUE,
    COPULAS,
    DETERMINERS,
    DEVICE_TERMS,
    FINDING_TERMS,
    HEDGES,
    IRREGULAR_PLURALS,
    MODIFIER_TERMS,
    NEG_POST,
    NEG_PRE,
    NEGATORS,
    OTHER_FINDING_TERMS,
    PRE_NORMAL,
    SIDED_ANATOMY,
    STATE_RULES,
    TERM,
    TRIGGERS,
    UNC_BI,
    UNC_POST,
    UNC_PRE,
    UNC_WEAK,
    StateRule,
)

__all__ = [
    "ASSERTIONS",
    "ENTITY_TYPES",
    "Entity",
    "extract_entities",
    "guide_entities",
    "label_sets",
    "report_labels",
]

ENTITY_TYPES: tuple[str, ...] = ("finding", "anatomy", "modifier", "device")
ASSERTIONS: tuple[str, ...] = ("present", "absent", "uncertain")


@dataclass(frozen=True)
class Entity:
    """One recognised mention.

    Attributes:
        start, end: character span in the input text (``text[start:end] == self.text``).
        text: the mention as written.
        type: ``'finding'``, ``'anatomy'``, ``'modifier'`` or ``'device'``.
        canonical: the canonical finding (:data:`xlip.text.labels.CANONICAL_FINDINGS`) for
            findings and devices, ``None`` for a finding outside that vocabulary, a normalised
            term for anatomy and modifiers.
        assertion: ``'present'``, ``'absent'`` or ``'uncertain'``.
    """

    start: int
    end: int
    text: str
    type: str
    canonical: str | None
    assertion: str


# Two-way trigger kinds (_pick_kind): a phrase listed in TRIGGERS as pre and post acts by position.
_NEG_BOTH = "neg_both"  # acts as post when an entity precedes it
_UNC_BOTH = "unc_both"  # acts as pre when an entity follows it
_BACKWARD = frozenset({NEG_POST, UNC_POST, UNC_BI, _NEG_BOTH, _UNC_BOTH})

_PREDICATE_WINDOW = 8  # words scanned after a normal-statement subject for its predicate

# Scope limits (in plain words).
_FIRST_GAP = 4
_CHAIN_GAP = 2
_POST_FIRST_GAP = 3

# --------------------------------------------------------------------------------------------
# Lexicon construction (pure functions, run once).
# --------------------------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+")
_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+|\n[ \t]*\n\s*|[.;:,!?()]")
_GROUP = re.compile(r"\(([^()]*)\)")


@dataclass(frozen=True)
class _Term:
    type: str  # an entity type, or "trigger"
    canonical: str | None  # entity canonical, or the trigger kind


def _expand(pattern: str) -> list[str]:
    """All surface forms of a pattern with "(a|b|)" groups."""
    group = _GROUP.search(pattern)
    if group is None:
        return [" ".join(pattern.split())]
    forms: list[str] = []
    for alternative in group.group(1).split("|"):
        forms.extend(_expand(pattern[: group.start()] + alternative + pattern[group.end():]))
    return forms


def _words(text: str) -> tuple[str, ...]:
    return tuple(word.lower() for word in _WORD.findall(text))


def _plural(word: str) -> str:
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith("sis"):
        return word[:-3] + "ses"
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _entity_entries() -> Iterator[tuple[str, _Term, bool]]:
    """(pattern, term, pluralise) for every lexicon entry."""
    for canonical, patterns in FINDING_TERMS.items():
        for pattern in patterns:
            yield pattern, _Term("finding", canonical), True
    for pattern in OTHER_FINDING_TERMS:
        yield pattern, _Term("finding", None), True
    for pattern in DEVICE_TERMS:
        yield pattern, _Term("device", "Support Devices"), True
    for canonical, patterns in ANATOMY_TERMS.items():
        for pattern in patterns:
            yield pattern, _Term("anatomy", canonical), True
    for part in SIDED_ANATOMY:
        for side in ("right", "left"):
            yield f"{side} {part}", _Term("anatomy", f"{side} {part}"), True
    for canonical, patterns in MODIFIER_TERMS.items():
        for pattern in patterns:
            yield pattern, _Term("modifier", canonical), False
    for kind, phrases in TRIGGERS.items():
        for phrase in phrases:
            yield phrase, _Term("trigger", kind), False


def _build_lexicon() -> dict[tuple[str, ...], _Term]:
    """Token sequence -> term. Written forms win over generated plurals; a written form that
    means two things, or a trigger that is also an entity, is a bug in the tables of
    :mod:`xlip.text.ner_lexicon`."""
    written: dict[tuple[str, ...], _Term] = {}
    plurals: dict[tuple[str, ...], _Term] = {}
    triggers: dict[tuple[str, ...], set[str]] = {}
    for pattern, term, pluralise in _entity_entries():
        for form in _expand(pattern):
            words = _words(form)
            if term.type == "trigger":
                triggers.setdefault(words, set()).add(term.canonical or "")
                continue
            if written.get(words, term) != term:
                raise AssertionError(f"lexicon term {form!r} is both {written[words]} and {term}")
            written[words] = term
            if pluralise:
                plurals.setdefault(words[:-1] + (_plural(words[-1]),), term)
    lexicon = {**{k: v for k, v in plurals.items() if k not in written}, **written}
    for words, kinds in triggers.items():
        if words in written:
            raise AssertionError(f"trigger {' '.join(words)!r} is also a lexicon term")
        # A phrase listed as pre and post (absent, resolved, ruled out) acts by position.
        lexicon[words] = _Term("trigger", _pick_kind(kinds, words))
    return lexicon


def _pick_kind(kinds: set[str], words: tuple[str, ...]) -> str:
    """The kind of a trigger phrase; a phrase listed as pre and post acts by position."""
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {NEG_PRE, NEG_POST}:
        return _NEG_BOTH
    if kinds == {UNC_PRE, UNC_POST}:
        return _UNC_BOTH
    raise AssertionError(f"trigger {' '.join(words)!r} has kinds {sorted(kinds)}")


@dataclass(frozen=True)
class _Trie:
    """Leftmost-longest matcher over token sequences (read-only once built)."""

    root: Mapping[str, object]

    def longest(self, words: list[str | None], i: int) -> tuple[int, _Term] | None:
        """(length, term) of the longest term starting at ``words[i]``; None entries stop it."""
        node, best = self.root, None
        for j in range(i, len(words)):
            word = words[j]
            if word is None or word not in node:
                break
            node = node[word]  # type: ignore[assignment]
            if "" in node:
                best = (j - i + 1, node[""])
        return best  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _trie() -> _Trie:
    root: dict[str, object] = {}
    for words, term in _build_lexicon().items():
        node = root
        for word in words:
            node = node.setdefault(word, {})  # type: ignore[assignment]
        node[""] = term
    return _Trie(root)


# --------------------------------------------------------------------------------------------
# Tokens, matches and sentences.
# --------------------------------------------------------------------------------------------


class _Token(NamedTuple):  # a tuple: built for every token of every text, so kept cheap
    text: str  # lower case; "\n\n" for a blank line
    start: int
    end: int

    @property
    def is_word(self) -> bool:
        return self.text[0].isalnum()


@dataclass(frozen=True)
class _Match:
    start: int  # token index
    end: int  # token index, exclusive
    term: _Term


def _tokenize(text: str) -> list[_Token]:
    return [_Token("\n\n" if m[0][0] == "\n" else m[0].lower(), m.start(), m.end())
            for m in _TOKEN.finditer(text)]


def _match(tokens: list[_Token]) -> list[_Match]:
    words = [t.text if t.is_word else None for t in tokens]
    trie, matches, i = _trie(), [], 0
    while i < len(tokens):
        found = trie.longest(words, i)
        if found is None:
            i += 1
            continue
        length, term = found
        matches.append(_Match(i, i + length, term))
        i += length
    return matches


def _is_sentence_end(tokens: list[_Token], i: int) -> bool:
    token = tokens[i].text
    if token in ("!", "?", "\n\n"):
        return True
    return token == "." and not (i > 0 and tokens[i - 1].text in ABBREVIATIONS
                                 and tokens[i - 1].end == tokens[i].start)


def _sentences(tokens: list[_Token]) -> list[tuple[int, int]]:
    """Token index ranges of sentences (end exclusive, the end mark excluded)."""
    bounds, start = [], 0
    for i in range(len(tokens)):
        if _is_sentence_end(tokens, i):
            if i > start:
                bounds.append((start, i))
            start = i + 1
    if start < len(tokens):
        bounds.append((start, len(tokens)))
    return bounds


# --------------------------------------------------------------------------------------------
# Assertion: a sentence as a sequence of units (entities, triggers, plain words, punctuation).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    kind: str  # "entity", "trigger", "word", "punct"
    index: int  # entity index for entities, token index otherwise
    text: str  # the trigger kind for triggers, the token for words and punctuation


def _units(tokens: list[_Token], span: tuple[int, int], matches_at: Mapping[int, _Match],
           entity_at: Mapping[int, int]) -> list[_Unit]:
    units, i = [], span[0]
    while i < span[1]:
        match = matches_at.get(i)
        if match is not None:
            if match.term.type == "trigger":
                units.append(_Unit("trigger", i, match.term.canonical or ""))
            else:
                units.append(_Unit("entity", entity_at[i], ""))
            i = match.end
            continue
        token = tokens[i]
        units.append(_Unit("word" if token.is_word else "punct", i, token.text))
        i += 1
    return units


def _is_stop(unit: _Unit) -> bool:
    return (unit.kind == "punct" and unit.text in ";:") or (
        unit.kind == "trigger" and unit.text == TERM)


def _opens_phrase(units: list[_Unit], k: int) -> bool:
    """A determiner right after "," / "and" / "or": a new phrase, outside the scope."""
    return (units[k].kind == "word" and units[k].text in DETERMINERS and k > 0
            and units[k - 1].text in CONNECTORS and units[k - 1].kind != "trigger")


def _entity_near(units: list[_Unit], k: int, step: int, limit: int) -> bool:
    """Whether an entity lies within ``limit`` plain words of trigger ``k``, going ``step``."""
    gap, j = 0, k + step
    while 0 <= j < len(units) and not _is_stop(units[j]) and units[j].kind != "trigger":
        if units[j].kind == "entity":
            return True
        if units[j].kind == "word":
            gap += 1
            if gap > limit:
                return False
        j += step
    return False


def _acts_forward(units: list[_Unit], k: int) -> bool:
    """Whether trigger ``k`` opens a forward scope; two-way triggers pick one direction."""
    kind = units[k].text
    if kind == _NEG_BOTH:  # "effusion resolved" (post) vs "resolved effusion" (pre)
        return not _entity_near(units, k, -1, _POST_FIRST_GAP)
    if kind == _UNC_BOTH:  # "opacity is likely atelectasis" (pre) vs "atelectasis is likely"
        return _entity_near(units, k, 1, _FIRST_GAP)
    return kind in (NEG_PRE, UNC_PRE, UNC_BI, UNC_WEAK, CONTINUE)


def _forward(units: list[_Unit], entities: list[_Match], out: dict[int, set[str]]) -> None:
    """Pre-trigger scopes, left to right."""
    state: str | None = None
    gap, first, negated_clause, single = 0, True, False, False
    for k, unit in enumerate(units):
        if _is_stop(unit) or _opens_phrase(units, k):
            state, negated_clause = None, False
        elif unit.kind == "trigger" and _acts_forward(units, k):
            kind = unit.text
            if kind in (NEG_PRE, _NEG_BOTH) or (kind in (UNC_WEAK, CONTINUE) and negated_clause):
                state, negated_clause = "absent", True
            elif kind != CONTINUE:
                state = "uncertain"
            # "resolved", "absent" before a finding reach that finding only.
            gap, first, single = 0, True, kind == _NEG_BOTH
        elif unit.kind == "entity" and state is not None:
            out.setdefault(unit.index, set()).add(state)
            gap = 0
            if entities[unit.index].term.type in ("finding", "device"):
                first = False  # modifiers and anatomy before the first finding keep its window
                state = None if single else state
        elif unit.kind == "word" and state is not None:
            gap += 1
            if gap > (_FIRST_GAP if first else _CHAIN_GAP):
                state = None


def _backward_from(units: list[_Unit], k: int, assertion: str, max_findings: int,
                   entities: list[_Match], out: dict[int, set[str]]) -> None:
    gap, first, findings = 0, True, 0
    for j in range(k - 1, -1, -1):
        unit = units[j]
        if _is_stop(unit) or unit.kind == "trigger":
            return
        if unit.kind == "word":
            gap += 1
            if _opens_phrase(units, j) or gap > (_POST_FIRST_GAP if first else _CHAIN_GAP):
                return
        elif unit.kind == "entity":
            out.setdefault(unit.index, set()).add(assertion)
            gap, first = 0, False
            if entities[unit.index].term.type in ("finding", "device"):
                findings += 1
                if findings >= max_findings:
                    return


def _backward(units: list[_Unit], entities: list[_Match], out: dict[int, set[str]]) -> None:
    """Post-trigger scopes, right to left from each post-trigger."""
    for k, unit in enumerate(units):
        if unit.kind != "trigger" or unit.text not in _BACKWARD:
            continue
        if unit.text in (_NEG_BOTH, _UNC_BOTH) and _acts_forward(units, k):
            continue
        assertion = "absent" if unit.text in (NEG_POST, _NEG_BOTH) else "uncertain"
        _backward_from(units, k, assertion, 1 if unit.text == UNC_BI else len(units),
                       entities, out)


def _combine(assertions: Iterable[str]) -> str:
    found = set(assertions)
    if "absent" in found:
        return "absent"
    return "uncertain" if "uncertain" in found else "present"


# --------------------------------------------------------------------------------------------
# Normal statements.
# --------------------------------------------------------------------------------------------


def _rule_for(term: _Term) -> StateRule | None:
    if term.type != "anatomy":
        return None
    for rule in STATE_RULES:
        if term.canonical in rule.subjects:
            return rule
    return None


def _starts_with(words: list[str | None], j: int, phrase: tuple[str, ...]) -> bool:
    return tuple(words[j:j + len(phrase)]) == phrase


def _predicate_after(rule: StateRule, subject: _Match, sentence_end: int,
                     words: list[str | None], owner: Mapping[int, _Match]) -> str | None:
    """The assertion that a predicate after the subject, in its clause, states (None if none).

    ``words`` holds None for punctuation other than ";"; ``owner`` maps a token to the entity or
    terminator covering it. The scan stops at ";", a terminator, a finding or device, or another
    subject after a copula (``Heart size is stable and lungs clear``).
    """
    seen_copula = negated = hedged = False
    scanned, j = 0, subject.end
    while j < sentence_end and scanned <= _PREDICATE_WINDOW and words[j] != ";":
        word = words[j]
        other = owner.get(j)
        if word is None:
            j += 1
            continue
        if other is not None and other != subject:
            if other.term.type in ("finding", "device", "trigger"):
                return None
            if seen_copula and _rule_for(other.term) is not None:
                return None
        for phrase in rule.abnormal:
            if _starts_with(words, j, phrase):
                return "absent" if negated else ("uncertain" if hedged else "present")
        for phrase in rule.normal:
            if _starts_with(words, j, phrase):
                return "present" if negated and rule.abnormal else "absent"
        seen_copula |= word in COPULAS
        negated |= word in NEGATORS
        hedged |= word in HEDGES
        scanned += 1
        j += 1
    return None


def _predicate_before(subject: _Match, words: list[str | None]) -> str | None:
    """"absent" when a normal adjective directly precedes the subject (``clear lungs``)."""
    for phrase in PRE_NORMAL:
        start = subject.start - len(phrase)
        if start >= 0 and tuple(words[start:subject.start]) == phrase:
            return "absent"
    return None


def _owners(matches: list[_Match]) -> dict[int, _Match]:
    """Token index -> the entity or terminator trigger covering it."""
    owner: dict[int, _Match] = {}
    for match in matches:
        if match.term.type != "trigger" or match.term.canonical == TERM:
            for i in range(match.start, match.end):
                owner[i] = match
    return owner


def _normal_states(units: list[_Unit], entities: list[_Match], sentence_end: int,
                   words: list[str | None], owner: Mapping[int, _Match]) -> dict[int, str]:
    """Entity index -> assertion, for the subjects of normal statements in one sentence."""
    states: dict[int, str] = {}
    for unit in units:
        if unit.kind != "entity":
            continue
        subject = entities[unit.index]
        rule = _rule_for(subject.term)
        if rule is None:
            continue
        state = _predicate_after(rule, subject, sentence_end, words, owner)
        state = state or _predicate_before(subject, words)
        if state is not None:
            states[unit.index] = state
    return states


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def extract_entities(text: str) -> list[Entity]:
    """Recognise findings, anatomy, modifiers and devices in a radiology text, with assertions.

    See the module docstring for the lexicon, the matching, the assertion and the normal-statement
    rules. Entities never overlap and are sorted by ``start``.
    """
    tokens = _tokenize(text)
    return _extract(text, tokens, _sentences(tokens))


def guide_entities(text: str, entities: Sequence[Entity] | None = None) -> list[Entity]:
    """The entities that steer attention-guided masking (AttMIM).

    Findings and devices asserted present or uncertain, and the anatomy and modifier words of
    the sentences that hold one (unless those words are themselves negated): in "No pleural
    effusion. Large right pneumothorax." that is "Large", "right" and "pneumothorax". Negated
    findings, normal statements and template words never guide. Sorted by ``start``.
    """
    tokens = _tokenize(text)
    sentences = _sentences(tokens)
    if entities is None:
        entities = _extract(text, tokens, sentences)
    return _guides(entities, tokens, sentences)


def entities_and_guides(text: str) -> tuple[list[Entity], list[Entity]]:
    """``(extract_entities(text), guide_entities(text))``, the text read once."""
    tokens = _tokenize(text)
    sentences = _sentences(tokens)
    entities = _extract(text, tokens, sentences)
    return entities, _guides(entities, tokens, sentences)


def _extract(text: str, tokens: list[_Token], sentences: list[tuple[int, int]]) -> list[Entity]:
    matches = _match(tokens)
    entities = [m for m in matches if m.term.type != "trigger"]
    entity_at = {m.start: i for i, m in enumerate(entities)}
    matches_at = {m.start: m for m in matches}
    owner = _owners(matches)
    words = [t.text if t.is_word else (";" if t.text == ";" else None) for t in tokens]
    assertions: dict[int, set[str]] = {}
    states: dict[int, str] = {}
    for span in sentences:
        units = _units(tokens, span, matches_at, entity_at)
        _forward(units, entities, assertions)
        _backward(units, entities, assertions)
        states.update(_normal_states(units, entities, span[1], words, owner))
    return [_to_entity(text, tokens, i, m, assertions, states) for i, m in enumerate(entities)]


def _guides(entities: Sequence[Entity], tokens: list[_Token],
            sentences: list[tuple[int, int]]) -> list[Entity]:
    out: list[Entity] = []
    for first, last in sentences:
        lo, hi = tokens[first].start, tokens[last - 1].end
        inside = [e for e in entities if lo <= e.start and e.end <= hi]
        shown = [e for e in inside if e.type in ("finding", "device") and e.assertion != "absent"]
        if shown:
            out += [e for e in inside if e.assertion != "absent"
                    and (e.type in ("anatomy", "modifier") or e in shown)]
    return sorted(out, key=lambda e: e.start)


def _to_entity(text: str, tokens: list[_Token], index: int, match: _Match,
               assertions: Mapping[int, set[str]], states: Mapping[int, str]) -> Entity:
    start, end = tokens[match.start].start, tokens[match.end - 1].end
    rule = _rule_for(match.term)
    if index in states and rule is not None:
        return Entity(start, end, text[start:end], "finding", rule.finding, states[index])
    return Entity(start, end, text[start:end], match.term.type, match.term.canonical,
                  _combine(assertions.get(index, ())))


_RANK = {"present": 2, "uncertain": 1, "absent": 0}


def report_labels(text: str) -> dict[str, str]:
    """Canonical finding -> assertion for a report, aggregated over its mentions.

    Present beats uncertain beats absent. ``No Finding`` is present when the text is not blank
    and no finding other than ``Support Devices`` is present or uncertain, absent otherwise.
    Findings that the report does not mention are left out. Keys follow the canonical order.
    """
    found: dict[str, str] = {}
    for entity in extract_entities(text):
        if entity.type not in ("finding", "device") or entity.canonical not in CANONICAL_FINDINGS:
            continue
        previous = found.get(entity.canonical)
        if previous is None or _RANK[entity.assertion] > _RANK[previous]:
            found[entity.canonical] = entity.assertion
    if text.strip():
        abnormal = any(a != "absent" for f, a in found.items() if f != "Support Devices")
        found["No Finding"] = "absent" if abnormal else "present"
    return {f: found[f] for f in CANONICAL_FINDINGS if f in found}


def label_sets(text: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(present, absent, uncertain) canonical findings of a report, each in canonical order."""
    labels = report_labels(text)
    return tuple(  # type: ignore[return-value]
        tuple(f for f in labels if labels[f] == assertion)
        for assertion in ("present", "absent", "uncertain")
    )
