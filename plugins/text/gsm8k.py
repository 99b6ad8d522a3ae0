"""GSM8K-style math questions: a prompt source and answer-checking rewards.

Data: JSON Lines, one object per line with a ``question`` and an ``answer`` whose final
result follows ``####`` (GSM8K's own layout, e.g. ``"... so 3 + 4 = 7.\\n#### 7"``; an
answer without ``####`` is the result itself). Blank lines are skipped.

Prompt: ``template`` with ``{question}`` replaced by the question; the default asks for
the reasoning between ``<reasoning>`` tags and the result in ``\\boxed{}``, the output
format MaskGRPO's language experiments reward (its public code, grpo/data_utils.py and
grpo/reward_func.py). The backbone wraps the prompt in its chat template.

Rewards (each 0 or 1; the paper's weights are set in the recipe: format 0.5, integer
0.5, correctness 2.0), on the text before the completion's first end-of-sequence token:

- ``gsm8k-format``: the text holds ``<reasoning> ... </reasoning>`` (across lines);
- ``gsm8k-integer``: the extracted answer is made of digits only;
- ``gsm8k-correct``: the extracted answer equals the reference result (exact string
  comparison after stripping spaces, as in the public code).

The extracted answer is the content of the last ``\\boxed{...}`` (braces balanced), or
what follows the last ``\\boxed `` up to a ``$``, or else the whole text, stripped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, GeneratedBatch, PromptSource, Rewarder
from mdmrl_plugins.text.protocol import is_text_backbone

QUESTION = "{question}"
DEFAULT_TEMPLATE = (
    "Solve this math problem step by step. Write your reasoning between <reasoning> and </reasoning>, "
    "then give the final answer as a number inside \\boxed{}. Question: {question}"
)
REASONING = re.compile(r"<reasoning>.*?</reasoning>", re.DOTALL)


# --------------------------------------------------------------------------- data


def resolve_path(path: str, recipe_dir: str) -> Path:
    """``path`` itself when absolute or existing, else relative to the recipe folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else Path(recipe_dir) / p


def reference_answer(answer: str) -> str:
    """The final result of a GSM8K answer: what follows its last ``####``, stripped
    (the whole answer, stripped, when it has none)."""
    return answer.rsplit("####", 1)[-1].strip()


def read_questions(path: Path) -> list[tuple[str, str | None]]:
    """(question, reference result or None) of every line of a JSONL file; UserError
    naming the file and line for a line that is not an object with a text ``question``."""
    if not path.is_file():
        raise UserError(f"{path}: question file not found (JSON Lines with question and answer)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}, line {number}: not JSON ({exc})") from None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("question"), str)
            or not item["question"].strip()
        ):
            raise UserError(f'{path}, line {number}: expected an object with a text field "question"')
        answer = item.get("answer")
        rows.append((item["question"].strip(), None if answer is None else reference_answer(str(answer))))
    if not rows:
        raise UserError(f"{path}: no questions in the file")
    return rows


def render(template: str, question: str) -> str:
    """The prompt of one question: ``template`` with ``{question}`` replaced."""
    return template.replace(QUESTION, question)


def extract_answer(text: str) -> str:
    """The answer a completion gives: the content of its last ``\\boxed{...}`` (balanced
    braces), else what follows its last ``\\boxed `` up to a ``$``, else the whole
    text; stripped."""
    at = text.rfind("\\boxed{")
    if at >= 0:
        depth, start = 0, at + len("\\boxed")
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + 1 : i].strip()
    if "\\boxed " in text:
        return text.rsplit("\\boxed ", 1)[1].split("$", 1)[0].strip()
    return text.strip()


def has_reasoning(text: str) -> bool:
    """True when the text holds ``<reasoning> ... </reasoning>``."""
    return REASONING.search(text) is not None


# --------------------------------------------------------------------------- prompts


def _check_template(template: str) -> list[str]:
    return [] if QUESTION in template else [f"template: must contain {QUESTION} (where the question goes)"]


@dataclass
class GSM8KPromptOptions:
    """Options of the ``gsm8k`` prompt source."""

    train: str = field(
        metadata={"doc": "training questions, JSON Lines (relative paths: from the recipe's folder)"}
    )
    eval: str | None = field(
        default=None, metadata={"doc": "held-out questions (default: the training file)"}
    )
    max_eval: int | None = field(
        default=None, metadata={"doc": "use only the first N held-out questions", "min": 1}
    )
    template: str = field(
        default=DEFAULT_TEMPLATE, metadata={"doc": "the prompt; {question} is replaced by the question"}
    )

    def check_options(self) -> list[str]:
        return _check_template(self.template)


class GSM8KPrompts(PromptSource):
    """Questions of a JSONL file as prompts: training prompts drawn uniformly with
    replacement from the seeded generator; the held-out list in file order."""

    name = "gsm8k"
    Options = GSM8KPromptOptions

    def __init__(
        self,
        train: Path,
        eval_path: Path | None = None,
        max_eval: int | None = None,
        template=DEFAULT_TEMPLATE,
    ):
        self.train_prompts = [render(template, q) for q, _ in read_questions(train)]
        held = [render(template, q) for q, _ in read_questions(eval_path or train)]
        self.eval_prompts = held[:max_eval] if max_eval else held

    @classmethod
    def from_options(cls, options: GSM8KPromptOptions, ctx: BuildContext) -> GSM8KPrompts:
        ev = None if options.eval is None else resolve_path(options.eval, ctx.recipe_dir)
        return cls(resolve_path(options.train, ctx.recipe_dir), ev, options.max_eval, options.template)

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(0, len(self.train_prompts), (n,), generator=generator)
        return [self.train_prompts[i] for i in idx.tolist()]

    def evaluation(self) -> list[str]:
        return list(self.eval_prompts)


# --------------------------------------------------------------------------- rewards


class TextRewarder(Rewarder):
    """A reward on the completions' text (read with the text backbone's ``decode_text``)."""

    def __init__(self, options=None, decode_text: Callable[[torch.Tensor], list[str]] | None = None):
        self.options = options if options is not None else self.Options()
        self.decode_text = decode_text

    @classmethod
    def text_reader(cls, ctx: BuildContext) -> Callable[[torch.Tensor], list[str]]:
        """The built backbone's ``decode_text``; UserError when it is not a text backbone."""
        if not is_text_backbone(ctx.backbone):
            kind = getattr(ctx.backbone, "name", None)
            raise UserError(
                f"rewards: {cls.name!r} scores text, but backbone {kind!r} is not a text backbone "
                "(it has no decode_text); use a text backbone such as llada"
            )
        return ctx.backbone.decode_text

    @classmethod
    def from_options(cls, options, ctx: BuildContext) -> TextRewarder:
        return cls(options, cls.text_reader(ctx))

    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        texts = self.decode_text(batch.tokens)
        return torch.tensor(self.score_texts(batch.prompts, texts), dtype=torch.float32)

    def score_texts(self, prompts: list[str], texts: list[str]) -> list[float]:
        """One score per (prompt, completion text)."""
        raise NotImplementedError


class GSM8KFormat(TextRewarder):
    """1 when the completion holds ``<reasoning> ... </reasoning>``, else 0."""

    name = "gsm8k-format"

    def score_texts(self, prompts: list[str], texts: list[str]) -> list[float]:
        return [float(has_reasoning(t)) for t in texts]


class GSM8KInteger(TextRewarder):
    """1 when the extracted answer is made of digits only, else 0."""

    name = "gsm8k-integer"

    def score_texts(self, prompts: list[str], texts: list[str]) -> list[float]:
        return [float(extract_answer(t).isdigit()) for t in texts]


@dataclass
class GSM8KCorrectOptions:
    """Options of the ``gsm8k-correct`` reward."""

    answers: list[str] = field(
        metadata={
            "doc": "JSON Lines files holding the prompts' questions with their answers (e.g. the training "
            "and held-out files; relative paths: from the recipe's folder)"
        }
    )


class GSM8KCorrect(TextRewarder):
    """1 when the extracted answer equals the reference result of the prompt's
    question, else 0. A prompt's question is the longest question of ``answers``
    that it contains (so any prompt template works)."""

    name = "gsm8k-correct"
    Options = GSM8KCorrectOptions

    def __init__(self, options: GSM8KCorrectOptions, decode_text=None, recipe_dir: str = "."):
        super().__init__(options, decode_text)
        self.files = [resolve_path(p, recipe_dir) for p in options.answers]
        self.answers: dict[str, str] = {}
        for path in self.files:
            for question, answer in read_questions(path):
                if answer is not None:
                    self.answers[question] = answer
        if not self.answers:
            raise UserError(
                f"rewards: gsm8k-correct: no question with an answer in {', '.join(map(str, self.files))}"
            )
        self._by_prompt: dict[str, str] = {}

    @classmethod
    def from_options(cls, options: GSM8KCorrectOptions, ctx: BuildContext) -> GSM8KCorrect:
        return cls(options, cls.text_reader(ctx), ctx.recipe_dir)

    def answer_for(self, prompt: str) -> str:
        """The reference result of the question ``prompt`` contains; UserError when it
        contains none of the files' questions."""
        hit = self._by_prompt.get(prompt)
        if hit is None:
            found = [q for q in self.answers if q in prompt]
            if not found:
                raise UserError(
                    f"rewards: gsm8k-correct has no answer for the prompt {prompt[:80]!r}: its question is in "
                    f"none of {', '.join(map(str, self.files))} (options.answers)"
                )
            hit = self._by_prompt[prompt] = self.answers[max(found, key=len)]
        return hit

    def score_texts(self, prompts: list[str], texts: list[str]) -> list[float]:
        return [float(extract_answer(t) == self.answer_for(p)) for p, t in zip(prompts, texts)]
