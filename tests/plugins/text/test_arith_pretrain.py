"""Pretraining of the embedded text world's LLaDA (tiny configs, a few steps): the loss
falls, the folder loads through the llada backbone's path, runs are deterministic, an
interrupted run resumes exactly, and the accuracy stop ends the run where it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl_plugins.llada.backbone import LLaDABackbone
from mdmrl_plugins.llada.model import weight_files
from mdmrl_plugins.shapes.pretrain import partial_path
from mdmrl_plugins.text import arith
from mdmrl_plugins.text import pretrain as tp

TINY = dict(
    layers=1, width=16, heads=2, mlp=32, batch_size=8, threads=0, warmup=2, lr=1e-2, log_every=1,
    eval_every=4, eval_count=4, eval_steps=5,
)  # fmt: skip


def options(**kw) -> tp.PretrainOptions:
    return tp.PretrainOptions(**{**TINY, "steps": 8, **kw})


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in weight_files(folder):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "m"
    reports = []
    summary = LLaDABackbone.pretrain(options(seed=3), str(out), lambda s, d: reports.append((s, dict(d))))
    return summary, out, reports


def test_pretraining_lowers_the_loss_and_reports_heldout_accuracy(first_run):
    summary, out, reports = first_run
    assert [s for s, _ in reports] == list(range(1, 9))
    losses = [d["loss"] for _, d in reports]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert [s for s, d in reports if "heldout_accuracy" in d] == [4, 8]
    assert [s for s, _ in summary["heldout_accuracy_curve"]] == [4, 8]
    assert summary["stopped_at_step"] == 8
    assert json.loads((out / "pretrain.json").read_text())["loss_curve"] == summary["loss_curve"]
    assert out.with_name("m-loss.png").stat().st_size > 1000
    assert not tp.evals_path(str(out)).exists() and not partial_path(str(out)).exists()


def test_the_folder_loads_through_the_llada_backbone_path(first_run):
    _, out, _ = first_run
    opts = tp.backbone_options(options(), path=str(out))
    bb = LLaDABackbone.from_options(opts, BuildContext())
    assert bb.model.config.n_layers == 1 and bb.model.config.d_model == 16
    saved = state(out)
    assert all(torch.equal(saved[k], v) for k, v in bb.model.state_dict().items())
    # the char-level tokenizer came back through AutoTokenizer: one token per character,
    # BOS before a text, and the prompt of the backbone is BOS + the problem's characters
    text = arith.worked_solution("7+5*3-4")
    ids = bb.tokenizer(text)["input_ids"]
    assert len(ids) == len(text) + 1 and ids[0] == bb.tokenizer.bos_token_id
    assert bb.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (
        bb.prompt_ids("7+6=")
        == [bb.tokenizer.bos_token_id] + bb.tokenizer("7+6=", add_special_tokens=False)["input_ids"]
    )


def test_pretraining_is_deterministic(tmp_path, first_run):
    summary, out, _ = first_run
    again = LLaDABackbone.pretrain(options(seed=3), str(tmp_path / "b"), None)
    assert again["loss_curve"] == summary["loss_curve"]
    assert again["heldout_accuracy_curve"] == summary["heldout_accuracy_curve"]
    a, b = state(out), state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Stop(Exception):
    pass


def test_interrupted_pretraining_resumes_exactly(tmp_path, first_run):
    summary, out, _ = first_run
    opts = options(seed=3, checkpoint_minutes=1e-9)
    target = tmp_path / "r"

    def stop(s, _):
        if s == 6:
            raise _Stop

    with pytest.raises(_Stop):
        LLaDABackbone.pretrain(opts, str(target), stop)
    assert partial_path(str(target)).exists() and not target.exists()
    assert tp.evals_path(str(target)).exists()
    resumed = LLaDABackbone.pretrain(opts, str(target), None)
    assert resumed["loss_curve"] == summary["loss_curve"]
    assert resumed["heldout_accuracy_curve"] == summary["heldout_accuracy_curve"]
    a, b = state(out), state(target)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not partial_path(str(target)).exists()

    with pytest.raises(_Stop):
        LLaDABackbone.pretrain(opts, str(target), stop)
    with pytest.raises(UserError, match=r"partial pretraining with other options \(lr\)"):
        LLaDABackbone.pretrain(options(seed=3, checkpoint_minutes=1e-9, lr=5e-3), str(target), None)


def test_the_accuracy_stop_keeps_the_weights_of_that_step(tmp_path, first_run):
    """stop_accuracy = 0 stops at the first evaluation (step 4): the weights equal a run
    of the same options interrupted there (steps 1-4 are the same computation)."""
    stopped = LLaDABackbone.pretrain(options(seed=3, stop_accuracy=0.0), str(tmp_path / "s"), None)
    assert stopped["stopped_at_step"] == 4
    assert [s for s, _ in stopped["loss_curve"]] == [1, 2, 3, 4]
    assert stopped["loss_curve"] == first_run[0]["loss_curve"][:4]
    assert stopped["heldout_accuracy_curve"] == first_run[0]["heldout_accuracy_curve"][:1]


def test_masks_have_the_documented_shapes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 4000).tolist()
    mask, loss = tp.completion_masks(rng, lengths, 32, 8, 1.0)
    drawn = set()
    for row, lrow, length in zip(mask, loss, lengths):
        idx = np.flatnonzero(lrow)
        b = idx[0] // 8
        assert (idx // 8 == b).all() and 1 <= len(idx) <= 8  # k ~ U{1..8} of one block
        assert b * 8 < length  # a block that holds the solution or its end token
        assert not row[: b * 8].any() and row[(b + 1) * 8 :].all()  # before clear, after masked
        assert (row[b * 8 : (b + 1) * 8] == lrow[b * 8 : (b + 1) * 8]).all()
        drawn.add((-(-length // 8), b))
    assert drawn == {(c, b) for c in range(1, 5) for b in range(c)}  # every content block
    flat, flat_loss = tp.completion_masks(rng, lengths, 32, 8, 0.0)
    assert (flat == flat_loss).all() and flat.any(1).all()
    assert abs(flat.sum(1).mean() - 16.5) < 0.5  # k ~ U{1..32}
    mixed, mixed_loss = tp.completion_masks(rng, [32] * 4000, 32, 8, 0.75)
    # block-shaped rows with b < 3 are the rows whose masked positions are not all loss positions
    assert abs((mixed != mixed_loss).any(1).mean() - 0.75 * 3 / 4) < 0.03


def test_batches_mask_only_the_completion_and_pad_with_eos():
    tok = tp.arith_tokenizer()
    o = options()
    eos, mask_id = tok.eos_token_id, tok.mask_token_id
    prompts, targets, inputs, loss = tp.make_batch(np.random.default_rng(1), o, tok, eos, mask_id)
    masked = inputs == mask_id
    assert (masked | ~loss).all() and loss.any(1).all() and torch.equal(inputs[~masked], targets[~masked])
    for p, row in zip(prompts, targets):
        problem = arith.problem_of(p)
        assert arith.split_of(problem) == "train"
        solution = arith.worked_solution(problem)
        assert tok.decode(row[: len(solution)].tolist()) == solution
        assert (row[len(solution) :] == eos).all()


def test_every_sample_weighs_the_same_in_the_loss():
    """The loss is the mean over samples of each sample's mean cross-entropy: a sample
    with one loss position counts as much as one with eight."""

    class Fixed:
        def __init__(self, logits):
            self.logits = logits

        def encode_prompts(self, prompts):
            return None

        def __call__(self, inputs, cond, timestep):
            return self

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 5, generator=gen)
    targets = torch.randint(0, 5, (2, 8), generator=gen)
    loss = torch.zeros(2, 8, dtype=torch.bool)
    loss[0, 3] = True
    loss[1] = True
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    got = tp.masked_loss(Fixed(logits), ["", ""], targets, targets, loss)
    torch.testing.assert_close(got, (ce[0, 3] + ce[1].mean()) / 2)


def test_options_are_checked():
    assert options(width=18, heads=4).check_options() == ["heads: 4 does not divide width 18"]
    assert "gen_length" in options(gen_length=16, block_length=8).check_options()[0]
