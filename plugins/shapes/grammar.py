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

The six GenEval task families are the sub-languages in :data:`FAMILIES`; prompts of
the grammar outside them (``"two red circles"``) parse and score too. A prompt belongs
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

#: Every word a grammar prompt can contain (lower case).
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


# -- parsing -------------------------------------------------------------------------------


def _fail(prompt: str, why: str) -> UserError:
    return UserError(
        f"prompt {prompt!r} is outside the shapes grammar ({why}); see {DOC} for the allowed forms"
    )


def _phrase(prompt: str, words: list[str], i: int) -> tuple[ObjectPhrase, int]:
    if i >= len(words):
        raise _fail(prompt, "expected 'a', 'an' or a number at the end")
    w = words[i]
    if w in ("a", "an"):
        count = 1
    elif w in NUMBERS:
        count = NUMBERS[w]
    else:
        raise _fail(prompt, f"word {i + 1} {w!r}: expected 'a', 'an' or one of {', '.join(NUMBERS)}")
    i += 1
    colour = None
    if i < len(words) and words[i] in COLOUR_WORDS:
        colour = words[i]
        i += 1
    if i >= len(words):
        raise _fail(prompt, "expected a shape at the end")
    w = words[i]
    if count == 1:
        if w in SHAPES:
            shape = w
        elif w in _SINGULARS:
            raise _fail(prompt, f"word {i + 1} {w!r}: use the singular {_SINGULARS[w]!r} after 'a'/'an'")
        else:
            raise _fail(prompt, f"word {i + 1} {w!r}: expected a colour or a shape ({', '.join(SHAPES)})")
    else:
        if w in _SINGULARS:
            shape = _SINGULARS[w]
        elif w in SHAPES:
            raise _fail(prompt, f"word {i + 1} {w!r}: use the plural {PLURALS[w]!r} after a number")
        else:
            raise _fail(prompt, f"word {i + 1} {w!r}: expected a colour or a plural shape")
    return ObjectPhrase(shape, colour, count), i + 1


@lru_cache(maxsize=4096)
def _parse_words(words: tuple[str, ...], prompt: str) -> Requirements:
    ws = list(words)
    if not ws:
        raise _fail(prompt, "it is empty")
    first, i = _phrase(prompt, ws, 0)
    if i == len(ws):
        return Requirements((first,))
    relation = None
    if ws[i] == "and":
        i += 1
    else:
        for key, rel_words in RELATIONS.items():
            if tuple(ws[i : i + len(rel_words)]) == rel_words:
                relation = key
                i += len(rel_words)
                break
        else:
            raise _fail(
                prompt,
                f"word {i + 1} {ws[i]!r}: expected 'and', 'to the left of', 'to the right of', "
                "'above' or 'below'",
            )
    second, i = _phrase(prompt, ws, i)
    if i != len(ws):
        raise _fail(prompt, f"unexpected words after the second object: {' '.join(ws[i:])!r}")
    if relation is not None and (first.count != 1 or second.count != 1):
        raise _fail(prompt, "a relation joins two single objects ('a' or 'an'), not counts")
    if (
        relation is None
        and first.shape == second.shape
        and (first.colour is None or second.colour is None or first.colour == second.colour)
    ):
        raise _fail(
            prompt, "two phrases joined by 'and' must differ in shape or in colour; use a count instead"
        )
    return Requirements((first, second), relation)


def parse(prompt: str) -> Requirements:
    """Parse a prompt of the grammar (any case, any whitespace) into its requirements.

    A prompt outside the grammar raises :class:`mdmrl.errors.UserError` naming it.
    """
    if not isinstance(prompt, str):
        raise UserError(f"prompt {prompt!r} is not a string; see {DOC}")
    return _parse_words(tuple(prompt.lower().split()), prompt)


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
