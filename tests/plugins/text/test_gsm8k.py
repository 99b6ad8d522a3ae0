"""GSM8K-style prompts and answer-checking rewards (format, integer, correctness), on
text decoded from a text backbone's completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mdmrl import options as opts
from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, GeneratedBatch
from mdmrl_plugins.text.gsm8k import (
    DEFAULT_TEMPLATE,
    GSM8KCorrect,
    GSM8KCorrectOptions,
    GSM8KFormat,
    GSM8KInteger,
    GSM8KPromptOptions,
    GSM8KPrompts,
    extract_answer,
    has_reasoning,
    read_questions,
    reference_answer,
    render,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "recipes" / "text" / "gsm8k_example.jsonl"


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<reasoning>3 + 4</reasoning>\n\\boxed{7}", "7"),
        ("first \\boxed{3}, then \\boxed{ 12 }", "12"),
        ("\\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("so $\\boxed 42$ apples", "42"),
        ("The answer is 9", "The answer is 9"),
        ("  18  ", "18"),
        ("unclosed \\boxed{5", "unclosed \\boxed{5"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_reference_answer_and_reasoning_tags():
    assert reference_answer("3 + 4 = 7\n#### 7") == "7"
    assert reference_answer(" 12 ") == "12"
    assert has_reasoning("<reasoning>\nstep one\nstep two\n</reasoning> \\boxed{2}")
    assert not has_reasoning("<reasoning> no end") and not has_reasoning("</reasoning><reasoning>")


def test_the_shipped_example_file():
    rows = read_questions(EXAMPLE)
    assert len(rows) == 8 and all(a is not None and a.isdigit() for _, a in rows)
    assert len({q for q, _ in rows}) == len(rows)


def test_prompt_source_reads_questions_and_samples_with_the_generator(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(5)]
    train = _write(tmp_path / "train.jsonl", rows)
    held = _write(tmp_path / "test.jsonl", rows[:3])
    ctx = BuildContext(recipe_dir=str(tmp_path))
    src = GSM8KPrompts.from_options(
        GSM8KPromptOptions(train="train.jsonl", eval="test.jsonl", max_eval=2), ctx
    )
    assert src.evaluation() == [render(DEFAULT_TEMPLATE, r["question"]) for r in rows[:2]]
    assert "<reasoning>" in src.evaluation()[0] and src.evaluation()[0].endswith("What is 0 + 1?")
    a = src.sample(6, torch.Generator().manual_seed(3))
    assert a == src.sample(6, torch.Generator().manual_seed(3)) and set(a) <= set(src.train_prompts)
    plain = GSM8KPrompts(train, held, template="Q: {question}")
    assert plain.evaluation()[0] == "Q: What is 0 + 1?" and len(plain.evaluation()) == 3


def test_bad_question_files_are_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for text, expect in [
        ('{"question": "ok", "answer": "1"}\n\n{"answer": "2"}\n', "line 3: expected an object"),
        ('{"question": "ok"}\nnot json\n', "line 2: not JSON"),
        ("\n\n", "no questions"),
    ]:
        bad.write_text(text)
        with pytest.raises(UserError) as err:
            read_questions(bad)
        assert str(bad) in str(err.value) and expect in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="question file not found"):
        read_questions(tmp_path / "missing.jsonl")
    problems: list[str] = []
    opts.build(
        GSM8KPromptOptions,
        {"train": "x.jsonl", "template": "no placeholder"},
        "prompts.train.options",
        problems,
    )
    assert len(problems) == 1 and "template" in problems[0] and "{question}" in problems[0]


def _encode(tokenizer, texts: list[str], width: int = 64) -> torch.Tensor:
    """Completions as token rows: the text, then EOS padding (and some junk after it)."""
    eos = tokenizer.eos_token_id
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
        ids += tokenizer(" junk \\boxed{0}", add_special_tokens=False)["input_ids"]
        rows.append((ids + [eos] * width)[:width])
    return torch.tensor(rows)


def test_rewards_score_the_decoded_text_before_the_first_eos(tmp_path, make_backbone, tokenizer):
    bb = make_backbone()
    _write(tmp_path / "a.jsonl", [{"question": "What is 3 + 4?", "answer": "3 + 4 = 7\n#### 7"}])
    ctx = BuildContext(backbone=bb, recipe_dir=str(tmp_path))
    correct = GSM8KCorrect.from_options(GSM8KCorrectOptions(answers=["a.jsonl"]), ctx)
    fmt = GSM8KFormat.from_options(None, ctx)
    integer = GSM8KInteger.from_options(None, ctx)
    texts = [
        "<reasoning>\n3 plus 4 is 7\n</reasoning>\n\\boxed{7}",  # all three
        "<reasoning>guess</reasoning> \\boxed{8}",  # format and integer
        "it is \\boxed{7.0}",  # none: not digits, not the exact result
        "7",  # integer and correct, no format
    ]
    prompt = render(DEFAULT_TEMPLATE, "What is 3 + 4?")
    batch = GeneratedBatch([prompt] * 4, _encode(tokenizer, texts), bb.grid_shape, bb.decode)
    assert bb.decode_text(batch.tokens) == texts
    assert correct.score(batch).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert fmt.score(batch).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert integer.score(batch).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert correct.score(batch).dtype == torch.float32


def test_correctness_finds_the_question_inside_any_prompt_and_refuses_unknown_ones(tmp_path):
    rows = [
        {"question": "How many legs do 2 cats have?", "answer": "#### 8"},
        {"question": "How many legs do 2 cats have? Each cat has 3 legs.", "answer": "#### 6"},
    ]
    _write(tmp_path / "a.jsonl", rows)
    reward = GSM8KCorrect(GSM8KCorrectOptions(answers=["a.jsonl"]), recipe_dir=str(tmp_path))
    assert reward.answer_for("Q: How many legs do 2 cats have?\nA:") == "8"
    assert reward.answer_for(render(DEFAULT_TEMPLATE, rows[1]["question"])) == "6"  # the longest match
    with pytest.raises(UserError) as err:
        reward.score_texts(["What is the capital of France?"], ["\\boxed{Paris}"])
    assert "no answer for the prompt" in str(err.value) and "a.jsonl" in str(err.value)
    assert "\n" not in str(err.value)


def test_text_rewards_need_a_text_backbone(tmp_path):
    from toys import TinyBackbone, TinyOptions

    with pytest.raises(UserError) as err:
        GSM8KFormat.from_options(None, BuildContext(backbone=TinyBackbone(TinyOptions())))
    assert "not a text backbone" in str(err.value) and "\n" not in str(err.value)
