import pytest
import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl.plugins import get_registry


def _build(tmp_path, **kw):
    cls = get_registry().get("prompts", "prompt-file").cls
    return cls.from_options(cls.Options(**kw), BuildContext(recipe_dir=str(tmp_path)))


def test_reads_prompts_categories_and_samples_reproducibly(tmp_path):
    (tmp_path / "train.txt").write_text("# comment\na cat\n\na dog\n")
    (tmp_path / "eval.txt").write_text("anime\ta fox\nphoto\ta car\nplain prompt\n")
    src = _build(tmp_path, train="train.txt", eval="eval.txt")
    assert src.evaluation() == ["a fox", "a car", "plain prompt"]
    assert src.categorize(src.evaluation()) == ["anime", "photo", "all"]
    a = src.sample(20, torch.Generator().manual_seed(5))
    assert a == src.sample(20, torch.Generator().manual_seed(5))
    assert set(a) == {"a cat", "a dog"}


def test_missing_or_empty_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="prompt file not found"):
        _build(tmp_path, train="nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(UserError, match="no prompts"):
        _build(tmp_path, train="empty.txt")
