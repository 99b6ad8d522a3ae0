"""The caption grammar of the shapes world, its parser and the train / held-out split.

Grammar (words are case-insensitive, separated by any whitespace)::

    prompt   := phrase
              | phrase "and" phrase
              | single relation single
    phrase   := single | plural
    single   := ("a" | "an") [colour] shape
    plural   := number [colour] shape "s"
    number   := "two" | "three" | "four"
    relation := "to the left of" | "to the right of" | "above" | "below"

The parser also accepts the plain-English phrasings of :data:`ALIASES` ("one", "the",
numerals, "left of", "on top of", "under", ...) and trailing punctuation; every such
prompt parses to the same :class:`Requirements` as its canonical form, which
:meth:`Requirements.text` writes with the words of :data:`VOCABULARY` only.

The six GenEval task families are the sub-languages in :data:`FAMILIES`; prompts of
the grammar outside them (``"two red circles"``) parse and score too, and
:attr:`Requirements.category` puts every prompt in one of the six. A prompt belongs
to the held-out split when it contains a held-out composition (:func:`atoms`,
:func:`is_heldout`); everything else is training. See docs/shapes-world.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from mdmrl.errors import UserError
from mdmrl_plugins.shapes.world import COLOURS, SHAPES

#: The GenEval task families, in the order sources cycle through them.
FAMILIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")

#: Splits of the prompt space.
SPLITS: tuple[str, ...] = ("train", "heldout")

#: Colour words (the background is not a colour a prompt can ask for).
COLOUR_WORDS: tuple[str, ...] = COLOURS[1:]

#: Count words and their values (a count is exact).
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
_NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}

#: Plural of each shape word.
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
_SINGULARS = {v: k for k, v in PLURALS.items()}

#: Relations (between the first and the second object) and their words.
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("to", "the", "left", "of"),
    "right": ("to", "the", "right", "of"),
    "above": ("above",),
    "below": ("below",),
}

#: Every word a canonical prompt can contain (lower case): the words of
#: :meth:`Requirements.text`, and of the shapes model's tokenizer.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "an", "and"}
        | set(NUMBERS)
        | set(COLOUR_WORDS)
        | set(SHAPES)
        | set(PLURALS.values())
        | {w for words in RELATIONS.values() for w in words}
    )
)

#: Other phrasings the parser accepts, each with the canonical words it stands for.
#: Their words need not be in VOCABULARY: a prompt is read as its canonical text.
ALIASES: dict[str, str] = {
    "one": "a",
    "1": "a",
    "the": "a",
    "2": "two",
    "3": "three",
    "4": "four",
    "left of": "to the left of",
    "on the left of": "to the left of",
    "right of": "to the right of",
    "on the right of": "to the right of",
    "on top of": "above",
    "over": "above",
    "under": "below",
    "beneath": "below",
    "underneath": "below",
}

#: Characters dropped from the end of a prompt.
TRAILING_PUNCTUATION = ".!?;,"

#: Words that open a phrase -> count (1 means "at least one", singular shape).
_COUNT_WORDS: dict[str, int] = {"a": 1, "an": 1, **NUMBERS}
_COUNT_WORDS.update({alias: _COUNT_WORDS[canon] for alias, canon in ALIASES.items() if canon in _COUNT_WORDS})
#: Relation phrases (canonical and aliases) -> relation, longest first.
_RELATION_PHRASES: dict[tuple[str, ...], str] = {words: key for key, words in RELATIONS.items()}
_RELATION_PHRASES.update(
    {
        tuple(alias.split()): _RELATION_PHRASES[tuple(canon.split())]
        for alias, canon in ALIASES.items()
        if tuple(canon.split()) in _RELATION_PHRASES
    }
)
_RELATION_PHRASES = dict(sorted(_RELATION_PHRASES.items(), key=lambda kv: -len(kv[0])))
if set(ALIASES) - set(_COUNT_WORDS) - {" ".join(w) for w in _RELATION_PHRASES}:
    raise AssertionError("every alias stands for a count word or a relation")

DOC = "docs/shapes-world.md"


@dataclass(frozen=True)
class ObjectPhrase:
    """One noun phrase: ``count`` objects of ``shape``, all of ``colour`` when given.

    count 1 ("a", "an") means at least one; 2-4 ("two", ...) means exactly that many.
    """

    shape: str
    colour: str | None = None
    count: int = 1

    def text(self) -> str:
        col = f"{self.colour} " if self.colour else ""
        if self.count == 1:
            first = col or self.shape
            article = "an" if first[0] in "aeiou" else "a"
            return f"{article} {col}{self.shape}"
        return f"{_NUMBER_WORDS[self.count]} {col}{PLURALS[self.shape]}"


@dataclass(frozen=True)
class Requirements:
    """A parsed prompt.

    objects: one or two phrases; relation: None ("and" or a single phrase) or a key of
    :data:`RELATIONS`, read as "objects[0] is <relation> objects[1]".
    """

    objects: tuple[ObjectPhrase, ...]
    relation: str | None = None

    def text(self) -> str:
        """The canonical prompt (lower case, single spaces)."""
        if len(self.objects) == 1:
            return self.objects[0].text()
        joint = "and" if self.relation is None else " ".join(RELATIONS[self.relation])
        return f"{self.objects[0].text()} {joint} {self.objects[1].text()}"

    @property
    def family(self) -> str | None:
        """The GenEval family this prompt belongs to, or None for other grammar prompts."""
        objs = self.objects
        if len(objs) == 1:
            (p,) = objs
            if p.count == 1:
                return "colors" if p.colour else "single_object"
            return "counting" if p.colour is None else None
        if any(p.count != 1 for p in objs):
            return None
        coloured = [p.colour is not None for p in objs]
        if self.relation is not None:
            return "position" if not any(coloured) else None
        if all(coloured):
            return "color_attr"
        return "two_objects" if not any(coloured) else None

    @property
    def category(self) -> str:
        """The GenEval family of any grammar prompt, equal to :attr:`family` where that
        is not None: "position" for a relation, else "counting" for a count of 2 or
        more, else for two phrases "color_attr" when a colour is named and
        "two_objects" when not, and for one phrase "colors" or "single_object"."""
        objs = self.objects
        if self.relation is not None:
            return "position"
        if any(p.count != 1 for p in objs):
            return "counting"
        coloured = any(p.colour is not None for p in objs)
        if len(objs) == 2:
            return "color_attr" if coloured else "two_objects"
        return "colors" if coloured else "single_object"


# -- parsing -------------------------------------------------------------------------------


class _Mismatch(Exception):
    """Words outside the grammar; the message says where and what was expected."""


def _phrase(words: tuple[str, ...], i: int) -> tuple[ObjectPhrase, int]:
    if i >= len(words):
        raise _Mismatch("expected 'a', 'an' or a number at the end")
    w = words[i]
    if w not in _COUNT_WORDS:
        raise _Mismatch(f"word {i + 1} {w!r}: expected 'a', 'an' or one of {', '.join(NUMBERS)}")
    count = _COUNT_WORDS[w]
    i += 1
    colour = None
    if i < len(words) and words[i] in COLOUR_WORDS:
        colour = words[i]
        i += 1
    if i >= len(words):
        raise _Mismatch("expected a shape at the end")
    w = words[i]
    if count == 1:
        if w in SHAPES:
            shape = w
        elif w in _SINGULARS:
            raise _Mismatch(f"word {i + 1} {w!r}: use the singular {_SINGULARS[w]!r} after 'a'/'an'")
        else:
            raise _Mismatch(f"word {i + 1} {w!r}: expected a colour or a shape ({', '.join(SHAPES)})")
    else:
        if w in _SINGULARS:
            shape = _SINGULARS[w]
        elif w in SHAPES:
            raise _Mismatch(f"word {i + 1} {w!r}: use the plural {PLURALS[w]!r} after a number")
        else:
            raise _Mismatch(f"word {i + 1} {w!r}: expected a colour or a plural shape")
    return ObjectPhrase(shape, colour, count), i + 1


def _relation(words: tuple[str, ...], i: int) -> tuple[str | None, int]:
    """The joint at word i: (None, i + 1) for "and", (relation, next word) for a relation phrase."""
    if words[i] == "and":
        return None, i + 1
    for phrase, key in _RELATION_PHRASES.items():
        if words[i : i + len(phrase)] == phrase:
            return key, i + len(phrase)
    raise _Mismatch(
        f"word {i + 1} {words[i]!r}: expected 'and', 'to the left of', 'to the right of', 'above' or 'below'"
    )


def _read(words: tuple[str, ...]) -> Requirements:
    """The requirements of a word sequence; :class:`_Mismatch` when it is outside the grammar."""
    if not words:
        raise _Mismatch("it is empty")
    first, i = _phrase(words, 0)
    if i == len(words):
        return Requirements((first,))
    relation, i = _relation(words, i)
    second, i = _phrase(words, i)
    if i != len(words):
        raise _Mismatch(f"unexpected words after the second object: {' '.join(words[i:])!r}")
    if relation is not None and (first.count != 1 or second.count != 1):
        raise _Mismatch("a relation joins two single objects ('a' or 'an'), not counts")
    if (
        relation is None
        and first.shape == second.shape
        and (first.colour is None or second.colour is None or first.colour == second.colour)
    ):
        raise _Mismatch("two phrases joined by 'and' must differ in shape or in colour; use a count instead")
    return Requirements((first, second), relation)


@lru_cache(maxsize=4096)
def _parse_words(words: tuple[str, ...]) -> Requirements | str:
    """The requirements of a word sequence, or why it is outside the grammar (cached)."""
    try:
        return _read(words)
    except _Mismatch as e:
        return str(e)


def words_of(prompt: str) -> tuple[str, ...]:
    """The words the parser reads: lower case, split on whitespace, trailing
    punctuation (:data:`TRAILING_PUNCTUATION`) dropped."""
    return tuple(prompt.lower().strip().rstrip(TRAILING_PUNCTUATION).split())


def _distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


#: Words and phrases a one-word edit may put into a prompt.
_EDIT_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys([*VOCABULARY, *(" ".join(w) for w in RELATIONS.values()), *ALIASES])
)


def nearest(words: tuple[str, ...]) -> str | None:
    """The accepted prompt nearest to ``words`` by one edit (one or two words replaced
    by an accepted word or phrase, one inserted, or one deleted), cheapest first by
    characters changed; None when no single edit makes it a grammar prompt."""
    edits = []
    for i, w in enumerate(words):
        edits.append((len(w), 2, words[:i] + words[i + 1 :]))
        for j in (i + 1, i + 2)[: len(words) - i]:
            span = " ".join(words[i:j])
            edits += [(_distance(span, c), 0, (*words[:i], *c.split(), *words[j:])) for c in _EDIT_WORDS]
    for i in range(len(words) + 1):
        edits += [(len(c), 1, (*words[:i], *c.split(), *words[i:])) for c in _EDIT_WORDS]
    edits.sort(key=lambda e: e[:2])  # stable: ties keep the order of _EDIT_WORDS
    for _, _, candidate in edits:
        try:
            _read(candidate)
        except _Mismatch:
            continue
        return " ".join(candidate)
    return None


def parse(prompt: str) -> Requirements:
    """Parse a prompt of the grammar (any case, any whitespace, the phrasings of
    :data:`ALIASES`, trailing punctuation) into its requirements.

    A prompt outside the grammar raises :class:`mdmrl.errors.UserError` naming it, the
    word that failed and, when one edit fixes it, the nearest accepted prompt.
    """
    if not isinstance(prompt, str):
        raise UserError(f"prompt {prompt!r} is not a string; see {DOC}")
    words = words_of(prompt)
    got = _parse_words(words)
    if isinstance(got, Requirements):
        return got
    fix = nearest(words)
    hint = f"did you mean {fix!r}? " if fix else ""
    raise UserError(
        f"prompt {prompt!r} is outside the shapes grammar ({got}); {hint}see {DOC} for the allowed forms"
    )


@lru_cache(maxsize=4096)
def canonical(prompt: str) -> str | None:
    """``parse(prompt).text()`` for a grammar prompt, None for any other text."""
    got = _parse_words(words_of(prompt))
    return got.text() if isinstance(got, Requirements) else None


# -- the held-out rule ----------------------------------------------------------------------

#: Single-object prompts reserved for evaluation ("a triangle").
HELDOUT_SINGLE: frozenset[str] = frozenset({"triangle"})
#: Shape pairs joined by "and" reserved for evaluation (either order).
HELDOUT_PAIRS: frozenset[frozenset[str]] = frozenset({frozenset({"square", "triangle"})})
#: (count, shape) combinations reserved for evaluation.
HELDOUT_COUNTS: frozenset[tuple[int, str]] = frozenset({(2, "triangle"), (3, "square"), (4, "circle")})
#: (colour, shape) pairs reserved for evaluation: one shape per colour.
HELDOUT_COLOUR_SHAPES: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "square"),
        ("blue", "circle"),
        ("yellow", "triangle"),
        ("purple", "square"),
        ("orange", "circle"),
        ("white", "triangle"),
    }
)
#: Canonical (shape, relation, shape) triples reserved for evaluation; "right" and
#: "below" are rewritten as "left" and "above" with the objects swapped first.
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {("circle", "left", "square"), ("square", "above", "triangle"), ("triangle", "left", "circle")}
)

_MIRROR = {"right": "left", "below": "above"}


def atoms(req: Requirements) -> set[tuple]:
    """The compositions a prompt contains.

    ("single", shape) for a prompt that is one bare singular object; ("colour", c, s)
    for every coloured phrase; ("count", n, s) for every counted phrase; ("pair",
    {s1, s2}) for two phrases joined by "and"; ("relation", s1, rel, s2), canonical,
    for a relation.
    """
    out: set[tuple] = set()
    objs = req.objects
    if len(objs) == 1 and objs[0].count == 1 and objs[0].colour is None:
        out.add(("single", objs[0].shape))
    for p in objs:
        if p.colour is not None:
            out.add(("colour", p.colour, p.shape))
        if p.count != 1:
            out.add(("count", p.count, p.shape))
    if len(objs) == 2:
        a, b = objs[0].shape, objs[1].shape
        if req.relation is None:
            out.add(("pair", frozenset({a, b})))
        elif req.relation in _MIRROR:
            out.add(("relation", b, _MIRROR[req.relation], a))
        else:
            out.add(("relation", a, req.relation, b))
    return out


def _atom_heldout(atom: tuple) -> bool:
    kind = atom[0]
    if kind == "single":
        return atom[1] in HELDOUT_SINGLE
    if kind == "colour":
        return (atom[1], atom[2]) in HELDOUT_COLOUR_SHAPES
    if kind == "count":
        return (atom[1], atom[2]) in HELDOUT_COUNTS
    if kind == "pair":
        return atom[1] in HELDOUT_PAIRS
    return atom[1:] in HELDOUT_RELATIONS


def is_heldout(requirements: Requirements) -> bool:
    """True when the prompt contains at least one held-out composition."""
    return any(_atom_heldout(a) for a in atoms(requirements))


# -- enumerating and sampling prompts ---------------------------------------------------


def _family_requirements(family: str) -> list[Requirements]:
    S, C = SHAPES, COLOUR_WORDS
    if family == "single_object":
        return [Requirements((ObjectPhrase(s),)) for s in S]
    if family == "two_objects":
        return [Requirements((ObjectPhrase(a), ObjectPhrase(b))) for a in S for b in S if a != b]
    if family == "counting":
        return [Requirements((ObjectPhrase(s, None, n),)) for n in NUMBERS.values() for s in S]
    if family == "colors":
        return [Requirements((ObjectPhrase(s, c),)) for c in C for s in S]
    if family == "position":
        return [
            Requirements((ObjectPhrase(a), ObjectPhrase(b)), rel)
            for rel in RELATIONS
            for a in S
            for b in S
            if a != b
        ]
    if family == "color_attr":
        return [
            Requirements((ObjectPhrase(a, ca), ObjectPhrase(b, cb)))
            for a in S
            for b in S
            if a != b
            for ca in C
            for cb in C
            if ca != cb
        ]
    raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")


@cache
def family_prompts(family: str, split: str | None = None) -> tuple[str, ...]:
    """Every prompt of ``family`` (in a fixed order), restricted to ``split`` when given."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    reqs = _family_requirements(family)
    if split is not None:
        reqs = [r for r in reqs if is_heldout(r) == (split == "heldout")]
    return tuple(r.text() for r in reqs)


def sample_prompt(rng: np.random.Generator, split: str, family: str | None = None) -> str:
    """A prompt of ``split``, uniform within its family; the family is uniform over
    :data:`FAMILIES` unless given."""
    if family is None:
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    pool = family_prompts(family, split)
    return pool[int(rng.integers(len(pool)))]
