"""The embedded arithmetic world: problems, worked solutions, the exact rewards, the
train / held-out split and the prompt sources."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.errors import UserError
from mdmrl_plugins.text import arith

problems = (
    st.integers(1, 3)
    .flatmap(
        lambda k: st.tuples(
            st.lists(st.integers(1, 9), min_size=k + 1, max_size=k + 1),
            st.lists(st.sampled_from("+-*"), min_size=k, max_size=k),
        )
    )
    .map(lambda t: "".join(f"{d}{o}" for d, o in zip(t[0], t[1])) + str(t[0][-1]))
)


def test_worked_solutions_go_from_left_to_right():
    assert arith.worked_solution("7+5*3-4") == "7+5=12 12*3=36 36-4=32 #### 32"
    assert arith.worked_solution("1-9*3") == "1-9=-8 -8*3=-24 #### -24"
    assert arith.worked_solution("9*9*9*9") == "9*9=81 81*9=729 729*9=6561 #### 6561"
    assert arith.worked_solution("4+4") == "4+4=8 #### 8"
    assert [arith.longest_solution(k) for k in (1, 2, 3)] == [14, 24, 36]


def chain(problem: str) -> int:
    """Left-to-right value, computed independently of the module."""
    acc = int(problem[0])
    for op, d in zip(problem[1::2], problem[2::2]):
        acc = eval(f"({acc}){op}{d}")  # noqa: S307 - digits and + - * only
    return acc


@settings(max_examples=200, deadline=None)
@given(problems)
def test_value_is_python_arithmetic_and_the_worked_solution_scores_one(problem):
    assert arith.value(problem) == chain(problem)
    solution = arith.worked_solution(problem)
    assert arith.is_worked(solution)
    assert arith.final_answer(solution) == chain(problem)
    prompt = arith.prompt_of(problem)
    assert arith.ArithCorrect().score_texts([prompt], [solution]) == [1.0]
    assert arith.ArithFormat().score_texts([prompt], [solution]) == [1.0]
    assert len(solution) < 40  # fits the world's completion length with its end token


@settings(max_examples=100, deadline=None)
@given(problems, st.integers(-3, 3).filter(lambda d: d != 0))
def test_a_wrong_final_answer_scores_zero(problem, delta):
    wrong = arith.worked_solution(problem).rsplit("####", 1)[0] + f"#### {arith.value(problem) + delta}"
    prompt = arith.prompt_of(problem)
    assert arith.ArithCorrect().score_texts([prompt], [wrong]) == [0.0]
    assert arith.ArithFormat().score_texts([prompt], [wrong]) == [1.0]  # well formed, wrong


@pytest.mark.parametrize(
    "text, fmt, correct",
    [
        ("7+5=12 12*3=36 36-4=32 #### 32", 1.0, 1.0),
        ("  7+5=12 12*3=36 36-4=32 #### 32  ", 1.0, 1.0),  # surrounding spaces are ignored
        ("7+5=12 #### 32", 1.0, 1.0),  # steps are not checked, only their form
        ("7+5=12 12*3=36 36-4=32 ####32", 0.0, 1.0),  # the mark needs its space; the answer is still read
        ("7+5=12 12*3=36 36-4=32", 0.0, 0.0),  # no #### answer
        ("#### 32", 0.0, 1.0),  # no step
        ("32 #### 32", 0.0, 1.0),
        ("7+5=12 12*3=36 36-4=32 #### 32 #### 31", 0.0, 0.0),  # the last answer counts
        ("7+5=12 12*3=36 36-4=32 #### 32x", 0.0, 0.0),  # trailing text
        ("7+5=12 12*3=36 36-4=32 #### 3 2", 0.0, 0.0),
        ("", 0.0, 0.0),
        ("7+5=12 12*3=36 36-4==32 #### 32", 0.0, 1.0),
        ("7+5=12  12*3=36 36-4=32 #### 32", 0.0, 1.0),  # one space between steps
        ("7+5*3-4=32 #### 32", 0.0, 1.0),  # one operator per step
    ],
)
def test_format_and_correctness_cases(text, fmt, correct):
    prompt = "7+5*3-4="
    assert arith.ArithFormat().score_texts([prompt], [text]) == [fmt]
    assert arith.ArithCorrect().score_texts([prompt], [text]) == [correct]


def test_negative_answers_are_read_exactly():
    assert arith.ArithCorrect().score_texts(["2-3*4="], ["2-3=-1 -1*4=-4 #### -4"]) == [1.0]
    assert arith.ArithCorrect().score_texts(["2-3*4="], ["2-3=-1 -1*4=-4 #### 4"]) == [0.0]


@pytest.mark.parametrize("prompt", ["hello", "7+5*3-4", "0+1=", "12+3=", "7+5*3-4+1+2=", "7/2="])
def test_a_prompt_outside_the_world_is_one_clear_error(prompt):
    if prompt == "7+5*3-4":  # the "=" is optional
        assert arith.problem_of(prompt) == "7+5*3-4"
        return
    with pytest.raises(UserError, match="not an arithmetic problem of the embedded text world"):
        arith.ArithCorrect().score_texts([prompt], ["1 #### 1"])


def test_splits_partition_every_problem_and_hold_out_about_a_fifth():
    for k in (1, 2):
        pool = arith.all_problems(k)
        assert len(pool) == len(set(pool)) == 9 ** (k + 1) * 3**k
        held = [p for p in pool if arith.split_of(p) == "heldout"]
        assert 0.15 < len(held) / len(pool) < 0.25
        assert all(arith.split_of(p) == "train" for p in set(pool) - set(held))


def test_training_prompts_are_never_heldout_and_the_eval_list_is_heldout_and_distinct():
    gen = torch.Generator().manual_seed(0)
    train = arith.ArithTrainPrompts().sample(2000, gen)
    assert all(arith.split_of(arith.problem_of(p)) == "train" for p in train)
    held = arith.ArithHeldoutPrompts(arith.ArithPromptOptions(count=150)).evaluation()
    assert len(set(held)) == 150
    assert all(arith.split_of(arith.problem_of(p)) == "heldout" for p in held)
    assert not set(held) & set(train)
    cats = arith.ArithHeldoutPrompts().categorize(held)
    assert cats.count("1 op") == cats.count("2 ops") == cats.count("3 ops") == 50
    # the train source's own evaluation list is training problems
    assert all(arith.split_of(arith.problem_of(p)) == "train" for p in arith.ArithTrainPrompts().evaluation())


def test_sampling_uses_only_the_generator():
    a = arith.ArithTrainPrompts().sample(16, torch.Generator().manual_seed(3))
    b = arith.ArithTrainPrompts().sample(16, torch.Generator().manual_seed(3))
    c = arith.ArithTrainPrompts().sample(16, torch.Generator().manual_seed(4))
    assert a == b != c
    ops = {
        arith.operator_count(arith.problem_of(p))
        for p in arith.ArithTrainPrompts(arith.ArithPromptOptions(ops=[1])).sample(50, torch.Generator())
    }
    assert ops == {1}


def test_prompt_options_are_checked():
    with pytest.raises(UserError, match="options.ops"):
        arith.ArithTrainPrompts(arith.ArithPromptOptions(ops=[]))
    with pytest.raises(UserError, match="listed twice"):
        arith.ArithHeldoutPrompts(arith.ArithPromptOptions(ops=[2, 2]))
