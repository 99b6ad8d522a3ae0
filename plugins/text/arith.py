"""The embedded text world: integer arithmetic solved in a fixed worked format.

A problem is a chain of single-digit operands 1-9 joined by ``n`` operators from
``+ - *`` (``n`` = 1, 2 or 3), e.g. ``7+5*3-4``, evaluated from left to right (a
calculator chain: no operator precedence). Its worked solution applies one operator per
step to the running value, each step written ``a op b=c`` and followed by a space, and
ends with the result after ``####``::

    prompt      7+5*3-4=
    completion  7+5=12 12*3=36 36-4=32 #### 32

Every value is an exact integer; the running value may be negative (``1-9=-8 -8*3=-24``),
the operands never are.

Splits: a problem (its expression text) is held out when the first 8 bytes of its
SHA-256, read as a big-endian integer, are 0 modulo :data:`HELDOUT_MODULUS` (one problem
in five); every other problem is a training problem. The two never share a problem.

Rewards (each 0 or 1, on the text before the completion's end-of-sequence token,
leading and trailing spaces ignored):

- ``arith-format``: the text is in the worked format, one or more ``a op b=c`` steps
  each followed by a space, then ``#### v``, with a, c and v integers and b a digit
  string (:data:`WORKED`);
- ``arith-correct``: the integer after the last ``####`` equals the value of the
  prompt's expression (the prompt is read back as a problem; a prompt that is not one
  is an error).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import PromptSource
from mdmrl_plugins.text.gsm8k import TextRewarder

OPERATORS = "+-*"
DIGITS = tuple(range(1, 10))
OP_COUNTS = (1, 2, 3)
HELDOUT_MODULUS = 5
SPLITS = ("train", "heldout")
ANSWER_MARK = "#### "
PROBLEM = re.compile(r"[1-9](?:[+\-*][1-9]){1,3}")
_INT = r"-?\d+"
#: The worked format: steps "a op b=c" each followed by a space, then "#### " and an integer.
WORKED = re.compile(rf"(?:{_INT}[+\-*]\d+={_INT} )+#### ({_INT})")
_ANSWER = re.compile(rf"####\s*({_INT})\s*$")


# --------------------------------------------------------------------------- problems


def _text(items: list) -> str:
    return "".join(str(x) for x in items)


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def steps_of(problem: str) -> list[tuple[int, str, int, int]]:
    """The worked steps of ``problem``: (running value, operator, operand, new value)."""
    acc, out = int(problem[0]), []
    for i in range(1, len(problem), 2):
        op, b = problem[i], int(problem[i + 1])
        new = _apply(acc, op, b)
        out.append((acc, op, b, new))
        acc = new
    return out


def worked_solution(problem: str) -> str:
    """The completion of ``problem``: its steps, each followed by a space, then "#### " and the result."""
    steps = steps_of(problem)
    return "".join(f"{a}{op}{b}={c} " for a, op, b, c in steps) + ANSWER_MARK + str(steps[-1][3])


def value(problem: str) -> int:
    """The exact integer value of ``problem``, evaluated from left to right."""
    return steps_of(problem)[-1][3]


@functools.cache
def longest_solution(ops: int) -> int:
    """Characters of the longest worked solution of a problem with ``ops`` operators."""
    return max(len(worked_solution(p)) for p in all_problems(ops))


def operator_count(problem: str) -> int:
    return sum(problem.count(op) for op in OPERATORS)


def split_of(problem: str) -> str:
    """The split of a problem: "heldout" for one in :data:`HELDOUT_MODULUS` (by SHA-256), else "train"."""
    digest = hashlib.sha256(problem.encode("ascii")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0 else "train"


def all_problems(ops: int) -> list[str]:
    """Every problem with ``ops`` operators, in lexicographic order of (operands, operators)."""
    out = []
    for digits in itertools.product(DIGITS, repeat=ops + 1):
        for operators in itertools.product(OPERATORS, repeat=ops):
            out.append(_text([x for pair in zip(digits, operators) for x in pair] + [digits[-1]]))
    return out


def sample_problem(rng: np.random.Generator, split: str, ops: int) -> str:
    """A uniformly random problem of ``split`` with ``ops`` operators (rejection sampling)."""
    while True:
        digits = rng.integers(1, 10, ops + 1)
        operators = rng.integers(0, 3, ops)
        problem = _text(
            [x for d, o in zip(digits, operators) for x in (int(d), OPERATORS[o])] + [int(digits[-1])]
        )
        if split_of(problem) == split:
            return problem


def prompt_of(problem: str) -> str:
    return problem + "="


def problem_of(prompt: str) -> str:
    """The problem a prompt asks (the prompt minus its final "="); UserError when the
    prompt is not one of this world's."""
    text = prompt.strip()
    problem = text[:-1] if text.endswith("=") else text
    if not PROBLEM.fullmatch(problem):
        raise UserError(
            f"rewards: {prompt[:60]!r} is not an arithmetic problem of the embedded text world "
            "(operands 1-9 joined by 1 to 3 of + - *, then '='); use the arith-train / arith-heldout prompts"
        )
    return problem


def category(problem: str) -> str:
    n = operator_count(problem)
    return f"{n} op" if n == 1 else f"{n} ops"


# --------------------------------------------------------------------------- rewards


def is_worked(text: str) -> bool:
    """True when ``text`` is in the worked format (:data:`WORKED`)."""
    return WORKED.fullmatch(text.strip()) is not None


def final_answer(text: str) -> int | None:
    """The integer after the text's last ``####`` (at the end of the text), or None."""
    m = _ANSWER.search(text.strip())
    return None if m is None else int(m.group(1))


class ArithFormat(TextRewarder):
    """1 when the completion is in the worked format, else 0."""

    name = "arith-format"

    def score_texts(self, prompts: list[str], texts: list[str]) -> list[float]:
        return [float(is_worked(t)) for t in texts]


class ArithCorrect(TextRewarder):
    """1 when the integer after the completion's last ``####`` is the problem's value, else 0."""

    name = "arith-correct"

    def score_texts(self, prompts: list[str], texts: list[str]) -> list[float]:
        out = []
        for p, t in zip(prompts, texts):
            target = value(problem_of(p))
            out.append(float(final_answer(t) == target))
        return out


# --------------------------------------------------------------------------- prompts


@dataclass
class ArithPromptOptions:
    """Options of the ``arith-train`` / ``arith-heldout`` prompt sources."""

    ops: list[int] = field(
        default_factory=lambda: [1, 2, 3],
        metadata={
            "doc": "operator counts of the problems (categories '2 ops', ...)",
            "choices": list(OP_COUNTS),
        },
    )
    count: int = field(
        default=150,
        metadata={"doc": "length of the fixed evaluation() list (operator counts in turn)", "min": 1},
    )
    seed: int = field(default=1234, metadata={"doc": "seed of the fixed evaluation() list", "min": 0})

    def check_options(self) -> list[str]:
        if not self.ops:
            return ["ops: name at least one operator count (1, 2 or 3)"]
        if len(set(self.ops)) != len(self.ops):
            return [f"ops: an operator count is listed twice: {self.ops}"]
        return []


class _ArithPrompts(PromptSource):
    split = ""
    Options = ArithPromptOptions

    def __init__(self, options: ArithPromptOptions | None = None):
        o = options or ArithPromptOptions()
        problems = o.check_options()
        if problems:
            raise UserError(f"prompts: {self.name}: options.{problems[0]}")
        self.options = o
        self.ops = tuple(sorted(o.ops))

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """n prompts of this split, operator counts drawn uniformly; one 62-bit draw
        from ``generator`` per call seeds everything else."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        rng = np.random.default_rng(seed)
        return [
            prompt_of(sample_problem(rng, self.split, self.ops[rng.integers(len(self.ops))]))
            for _ in range(n)
        ]

    def evaluation(self) -> list[str]:
        """``count`` distinct problems of this split, operator counts in turn, each
        count walking through a seeded shuffle of all of its problems in the split."""
        rng = np.random.default_rng(self.options.seed)
        pools = {}
        for k in self.ops:
            pool = [p for p in all_problems(k) if split_of(p) == self.split]
            pools[k] = [pool[i] for i in rng.permutation(len(pool))]
        out = []
        for i in range(self.options.count):
            pool = pools[self.ops[i % len(self.ops)]]
            out.append(prompt_of(pool[(i // len(self.ops)) % len(pool)]))
        return out

    def categorize(self, prompts: list[str]) -> list[str]:
        """The category of each prompt: "1 op", "2 ops" or "3 ops" by the problem's operator count."""
        return [category(problem_of(p)) for p in prompts]


class ArithTrainPrompts(_ArithPrompts):
    """Training problems of the arithmetic world (never a held-out one)."""

    name = "arith-train"
    split = "train"


class ArithHeldoutPrompts(_ArithPrompts):
    """Held-out problems of the arithmetic world: evaluation() is the test list."""

    name = "arith-heldout"
    split = "heldout"
