"""Tests of the shapes-mdm backbone (tiny random configs; the committed weights once)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl.trajectory import Conditioning
from mdmrl_plugins.shapes import grammar, world
from mdmrl_plugins.shapes.model import (
    BUILTIN_WEIGHTS,
    ShapesMDM,
    ShapesMDMConfig,
    ShapesMDMOptions,
    WordTokenizer,
    config_path,
)

V = world.CODEBOOK_SIZE
N = world.GRID * world.GRID


def tiny(seed: int = 0, **kw) -> ShapesMDM:
    cfg = dict(
        vocabulary=list(grammar.VOCABULARY),
        codebook_size=V,
        layers=1,
        width=16,
        heads=2,
        text_layers=1,
        text_len=12,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    return ShapesMDM(ShapesMDMConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def model() -> ShapesMDM:
    return tiny()


def run(m: ShapesMDM, prompts: list[str], tokens: torch.Tensor | None = None, t: float = 1.0):
    b = len(prompts)
    if tokens is None:
        tokens = torch.full((b, N), m.mask_token_id)
    with torch.no_grad():
        return m(tokens, m.encode_prompts(prompts), torch.full((b,), t))


def test_forward_shapes_and_dtypes(model):
    tokens = torch.randint(0, V + 1, (3, N))
    out = run(model, ["a red circle", "", "two squares"], tokens, 0.5)
    assert out.logits.shape == (3, N, V) and out.logits.dtype == torch.float32
    assert out.features.shape == (3, N, model.feature_dim)
    assert torch.isfinite(out.logits).all()
    assert model.mask_token_id == V and model.grid_shape == (16, 16) and model.num_tokens == N
    cond = model.encode_prompts(["a red circle", ""])
    assert cond.hidden.shape == (2, 12, 16) and cond.pooled.shape == (2, 16)
    assert cond.attention_mask.dtype == torch.bool and cond.attention_mask.shape == (2, 12)


def test_features_are_final_normed_states(model):
    out = run(model, ["a blue square"], t=0.3)
    f = out.features[0]
    # LayerNorm output with unit gain and zero bias at init: zero mean, unit variance per token.
    assert torch.allclose(f.mean(-1), torch.zeros(N), atol=1e-5)
    assert torch.allclose(model.head(out.features).float(), out.logits, atol=1e-6)


def test_null_prompt_is_a_null_token_and_changes_the_output(model):
    ids, mask = model.tokenizer(["", "a red circle"])
    assert ids[0, 0].item() == model.tokenizer.stoi["[NULL]"] and mask[0].tolist() == [True] + [False] * 11
    assert mask[1].sum().item() == 3
    a, b = run(model, ["", "a red circle"]).logits
    assert not torch.allclose(a, b)
    null = model.null_conditioning(2)
    assert torch.equal(null.hidden, model.encode_prompts(["", ""]).hidden)


words = st.sampled_from(list(grammar.VOCABULARY))
spaces = st.sampled_from([" ", "  ", "\t", " \n "])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(words, st.booleans(), spaces), min_size=1, max_size=12), spaces)
def test_case_and_whitespace_do_not_matter(model, parts, lead):
    canonical = " ".join(w for w, _, _ in parts)
    messy = lead + "".join((w.upper() if up else w.capitalize()) + sp for w, up, sp in parts)
    a, b = model.tokenizer([canonical, messy])[0]
    assert torch.equal(a, b)
    assert (a[: len(parts)] >= 3).all()  # every grammar word is in the vocabulary


def test_unknown_words_and_truncation():
    tok = WordTokenizer(["a", "red"], length=4)
    ids, mask = tok(["a zebra red", "a a a a a a"])
    assert ids[0].tolist() == [tok.stoi["a"], tok.stoi["[UNK]"], tok.stoi["red"], 0]
    assert mask[1].all() and ids.shape == (2, 4)


def test_canonical_prompts_encode_word_by_word_as_before():
    tok = WordTokenizer(grammar.VOCABULARY, length=12)
    for family in grammar.FAMILIES:
        for split in grammar.SPLITS:
            for prompt in grammar.family_prompts(family, split):
                ids = [tok.stoi[w] for w in prompt.split()]  # the encoding before plain-English prompts
                assert tok.encode_one(prompt) == ids
                assert tok.encode_one(prompt.upper()) == ids


def test_plain_english_prompts_encode_as_their_canonical_text():
    tok = WordTokenizer(grammar.VOCABULARY, length=12)
    pairs = {
        "One blue triangle.": "a blue triangle",
        "a blue circle left of a red square": "a blue circle to the left of a red square",
        "3 squares": "three squares",
        "the circle on top of the square!": "a circle above a square",
        "a orange circle": "an orange circle",
    }
    for plain, canonical in pairs.items():
        assert tok.encode_one(plain) == tok.encode_one(canonical)
    ids, _ = tok(list(pairs))
    assert (ids != tok.stoi["[UNK]"]).all()
    # any other text is encoded word by word, unknown words as [UNK], and never raises
    unk = tok.stoi["[UNK]"]
    assert tok.encode_one("a photo of a cat") == [tok.stoi["a"], unk, tok.stoi["of"], tok.stoi["a"], unk]
    assert tok.encode_one("a circle near a square") == [
        tok.stoi["a"], tok.stoi["circle"], unk, tok.stoi["a"], tok.stoi["square"]
    ]  # fmt: skip


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_padding_positions_do_not_reach_the_image(model, seed):
    g = torch.Generator().manual_seed(seed)
    cond = model.encode_prompts(["a green triangle"])
    noisy = Conditioning(
        hidden=torch.where(
            cond.attention_mask[..., None], cond.hidden, torch.randn(cond.hidden.shape, generator=g)
        ),
        pooled=cond.pooled,
        attention_mask=cond.attention_mask,
    )
    tokens = torch.randint(0, V + 1, (1, N), generator=g)
    with torch.no_grad():
        a = model(tokens, cond, torch.tensor([0.5])).logits
        b = model(tokens, noisy, torch.tensor([0.5])).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_cfg_batch_concatenation(model):
    cond = model.encode_prompts(["a red circle and a blue square", "three triangles"])
    both = Conditioning.cat([cond, model.null_conditioning(2)])
    tokens = torch.randint(0, V + 1, (2, N))
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        joint = model(torch.cat([tokens, tokens]), both, torch.cat([t, t])).logits
        alone = model(tokens, cond, t).logits
    assert torch.allclose(joint[:2], alone, atol=1e-5)


def test_timestep_changes_the_output(model):
    tokens = torch.randint(0, V + 1, (1, N))
    a = run(model, ["a circle"], tokens, 0.1).logits
    b = run(model, ["a circle"], tokens, 0.9).logits
    assert not torch.allclose(a, b)


def test_save_load_round_trip(tmp_path):
    m = tiny(seed=3)
    path = tmp_path / "m.safetensors"
    m.save(str(path), extra={"note": 1})
    meta = json.loads(config_path(path).read_text())
    assert meta["architecture"]["width"] == 16 and meta["note"] == 1 and meta["storage"] == "float32"
    back = ShapesMDM.load(str(path)).eval()
    tokens = torch.randint(0, V + 1, (2, N))
    assert torch.equal(
        run(m, ["a red circle", ""], tokens, 0.4).logits, run(back, ["a red circle", ""], tokens, 0.4).logits
    )
    built = ShapesMDM.from_options(
        ShapesMDMOptions(weights=path.name), BuildContext(recipe_dir=str(tmp_path))
    )
    assert torch.equal(
        run(built, ["two squares"], tokens[:1]).logits, run(m, ["two squares"], tokens[:1]).logits
    )


def test_builtin_weights_load_and_give_valid_logits():
    assert BUILTIN_WEIGHTS.is_file() and BUILTIN_WEIGHTS.stat().st_size <= 20 * 2**20
    m = ShapesMDM.from_options(ShapesMDMOptions(), BuildContext()).eval()
    assert m.codebook_size == V
    out = run(m, ["a red circle", ""], t=1.0)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (2, N, V)
    # On an all-mask canvas the most likely token is the background almost everywhere.
    assert (out.logits.argmax(-1) == 0).float().mean() > 0.5


def test_random_weights_follow_the_options_and_seed():
    opts = ShapesMDMOptions(weights="random", layers=1, width=24, heads=3, text_layers=0, text_len=10, seed=5)
    a = ShapesMDM.from_options(opts, BuildContext())
    b = ShapesMDM.from_options(opts, BuildContext())
    assert a.feature_dim == 24 and len(a.blocks) == 1 and len(a.text_blocks) == 0
    assert a.encode_prompts(["a circle"]).hidden.shape == (1, 10, 24)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(UserError, match="divisible"):
        ShapesMDM.from_options(ShapesMDMOptions(weights="random", width=30, heads=4), BuildContext())


def test_missing_or_corrupt_weights_raise_user_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError, match="nope.safetensors"):
        ShapesMDM.from_options(ShapesMDMOptions(weights=str(missing)), BuildContext())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    config_path(bad).write_text(json.dumps({"architecture": tiny().config.to_dict()}))
    with pytest.raises(UserError, match="bad.safetensors"):
        ShapesMDM.load(str(bad))
    good = tmp_path / "good.safetensors"
    tiny().save(str(good))
    config_path(good).unlink()
    with pytest.raises(UserError, match="good.json"):
        ShapesMDM.load(str(good))


def test_weights_for_another_palette_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    tiny(codebook_size=V + 2).save(str(path))
    with pytest.raises(UserError, match="colours"):
        ShapesMDM.from_options(ShapesMDMOptions(weights=str(path)), BuildContext())


def test_decode_renders_the_world_palette(model):
    tokens = torch.zeros(1, N, dtype=torch.long)
    tokens[0, :16] = 1
    img = model.decode(tokens)
    assert img.shape == (1, 3, 128, 128)
    assert torch.equal(img, world.render_rgb(tokens.view(1, 16, 16), scale=8))


def test_registered_under_its_name():
    from mdmrl.plugins import get_registry

    assert get_registry().get("backbone", "shapes-mdm").cls is ShapesMDM


def test_patches_map_tokens_back_to_their_grid_positions():
    """With identity blocks and one-hot embeddings, a 2x2-patch model must return every
    token at its own grid position: checks the patch and un-patch index order."""
    m = tiny(width=40, heads=2, patch=2)
    v1 = V + 1
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for blk in m.blocks:  # zero qkv / proj / fc2 -> residual identity; LayerNorms stay finite
            blk.norm1.weight.fill_(1.0)
            blk.norm2.weight.fill_(1.0)
        m.norm.weight.fill_(1.0)
        m.tok_emb.weight[:, : 4 * v1].copy_(torch.eye(4 * v1))  # sub k, token v -> dim k * (V+1) + v
        for j in range(4):  # unpatch: sub-position j reads its own block of dims into dims 0..V
            m.unpatch.weight[j * 40 : j * 40 + v1, j * v1 : (j + 1) * v1].copy_(torch.eye(v1))
        m.head.weight[:, :V].copy_(torch.eye(V))
    tokens = torch.randint(0, V, (3, N))
    out = run(m, ["a circle", "", "two squares"], tokens, 0.0)
    assert torch.equal(out.logits.argmax(-1), tokens)


def test_null_conditioning_is_reused_without_gradients_and_trains_with_them():
    """The null condition is the empty prompts; a rollout (no gradients) reuses it until
    the text tower changes, and a trained step recomputes it so that the null branch's
    gradient reaches the text tower."""
    m = tiny()
    with torch.no_grad():
        first = m.null_conditioning(3)
        fresh = m.encode_prompts(["", "", ""])
        assert torch.equal(first.hidden, fresh.hidden) and torch.equal(first.pooled, fresh.pooled)
        assert m.null_conditioning(3) is first
    with torch.inference_mode():
        assert m.null_conditioning(3) is first
    # with gradients: computed again, and the text tower gets a gradient from it
    trained = m.null_conditioning(3)
    assert trained is not first and trained.hidden.grad_fn is not None
    tokens = torch.full((3, N), m.mask_token_id)
    m(tokens, trained, torch.ones(3)).logits.logsumexp(-1).sum().backward()
    assert m.text_pos.grad is not None and bool(m.text_pos.grad.abs().sum() > 0)
    # an optimizer step on the text tower: the kept value is not reused
    torch.optim.SGD(m.parameters(), lr=1.0).step()
    with torch.no_grad():
        after = m.null_conditioning(3)
        assert after is not first and torch.equal(after.hidden, m.encode_prompts([""] * 3).hidden)
        assert not torch.equal(after.hidden, first.hidden)
