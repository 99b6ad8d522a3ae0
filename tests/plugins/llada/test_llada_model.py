"""The LLaDA network: the published parameter layout, the forward against a plain
re-derivation of the architecture, sharded checkpoints and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mdmrl.errors import UserError
from mdmrl_plugins.llada.model import (
    INDEX_FILE,
    LLaDAConfig,
    LLaDAModel,
    load_weights,
    published_structure,
    read_config,
    save_checkpoint,
    weight_files,
)
from mdmrl_plugins.llada.tiny import random_model, tiny_config


def _ids(config: LLaDAConfig, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (1, length), generator=g)


def reference_logits(state: dict, c: LLaDAConfig, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward for one sequence, written out in float64 from the architecture's
    description: RMSNorm, rotary positions as complex rotations, full (bidirectional)
    softmax attention with grouped key/value heads, SwiGLU MLP."""
    w = {k: v.double() for k, v in state.items()}
    t = "model.transformer."
    x = w[t + "wte.weight"][ids[0]]  # [S, D]
    s, hd, h, kv = x.shape[0], c.head_dim, c.n_heads, c.kv_heads

    def rms(v, weight):
        return weight * v / torch.sqrt((v * v).mean(-1, keepdim=True) + c.rms_norm_eps)

    freqs = c.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rotation = torch.polar(
        torch.ones(s, hd // 2, dtype=torch.float64), torch.outer(torch.arange(s).double(), freqs)
    )

    def rotate(v):  # [S, heads, hd]: halves (a, b) as a + ib, times e^(i angle)
        z = torch.complex(v[..., : hd // 2], v[..., hd // 2 :]) * rotation[:, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    for i in range(c.n_layers):
        p = f"{t}blocks.{i}."
        n = rms(x, w[p + "attn_norm.weight"])
        q = rotate((n @ w[p + "q_proj.weight"].T).view(s, h, hd))
        k = rotate((n @ w[p + "k_proj.weight"].T).view(s, kv, hd))
        v = (n @ w[p + "v_proj.weight"].T).view(s, kv, hd)
        heads = []
        for j in range(h):
            g = j // (h // kv)
            att = torch.softmax(q[:, j] @ k[:, g].T / math.sqrt(hd), dim=-1)
            heads.append(att @ v[:, g])
        x = x + torch.cat(heads, dim=-1) @ w[p + "attn_out.weight"].T
        m = rms(x, w[p + "ff_norm.weight"])
        gate, up = m @ w[p + "ff_proj.weight"].T, m @ w[p + "up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "ff_out.weight"].T
    x = rms(x, w[t + "ln_f.weight"])
    return x @ w[t + "ff_out.weight"].T


# ------------------------------------------------------------------ layout


def test_the_8b_config_has_the_published_parameter_names_shapes_and_count():
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    table = published_structure()
    assert state == table
    assert (
        "model.transformer.blocks.31.up_proj.weight" in state and "model.transformer.ff_out.weight" in state
    )
    assert state["model.transformer.wte.weight"] == (126464, 4096)
    # LLaDA-8B: 8.02 billion parameters
    assert sum(math.prod(s) for s in table.values()) == 8_015_581_184


def test_tiny_config_layout_and_grouped_heads(tokenizer):
    config = tiny_config(tokenizer)
    assert config.kv_heads < config.n_heads and config.vocab_rows % 64 == 0
    model = LLaDAModel(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published_structure(config)


def test_weight_tying_drops_the_output_projection(tokenizer):
    config = tiny_config(tokenizer, weight_tying=True)
    model = random_model(config)
    assert "model.transformer.ff_out.weight" not in model.state_dict()
    ids = _ids(config, 5)
    hidden = model.hidden_states(model.embed(ids))
    torch.testing.assert_close(model(ids), hidden @ model.transformer.wte.weight.T)


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "rope_theta": 500000.0}])
def test_forward_matches_the_written_out_architecture(tokenizer, overrides):
    config = tiny_config(tokenizer, **overrides)
    model = random_model(config, seed=3, std=0.2).eval()
    ids = _ids(config, 11)
    with torch.no_grad():
        got = model(ids)[0].double()
    ref = reference_logits(model.state_dict(), config, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_attention_is_bidirectional(tokenizer):
    config = tiny_config(tokenizer)
    model = random_model(config, std=0.2).eval()
    ids = _ids(config, 8)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position sees the last


def test_left_padding_that_is_not_attended_changes_nothing(tokenizer):
    config = tiny_config(tokenizer)
    model = random_model(config, std=0.2).eval()
    ids = _ids(config, 9)
    padded = torch.cat([torch.full((1, 4), config.pad_token_id), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    with torch.no_grad():
        plain, with_pad = model(ids), model(padded, mask)
    torch.testing.assert_close(with_pad[:, 4:], plain, atol=1e-5, rtol=1e-5)


def test_scale_logits_and_input_embedding_norm(tokenizer):
    base = random_model(tiny_config(tokenizer), seed=1)
    scaled = random_model(tiny_config(tokenizer, scale_logits=True), seed=1)
    ids = _ids(base.config, 6)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids), base(ids) / math.sqrt(base.config.d_model))
        normed = random_model(tiny_config(tokenizer, input_emb_norm=True), seed=1)
        x = base.embed(ids) * math.sqrt(base.config.d_model)
        torch.testing.assert_close(normed(ids), base.logits(base.hidden_states(x)))


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    def grads(flag):
        model = random_model(tiny_config(tokenizer), seed=2).train()
        model.gradient_checkpointing = flag
        model(_ids(model.config, 7)).logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    a, b = grads(False), grads(True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


# ------------------------------------------------------------------ checkpoints


def test_sharded_checkpoint_round_trip(tmp_path, tokenizer):
    model = random_model(tiny_config(tokenizer), seed=4)
    shards = save_checkpoint(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(shards) > 2 and sorted({tmp_path / f for f in index["weight_map"].values()}) == sorted(shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert read_config(tmp_path) == model.config

    with torch.device("meta"):
        loaded = LLaDAModel(read_config(tmp_path))
    load_weights(loaded, weight_files(tmp_path))
    ids = _ids(model.config, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_single_file_checkpoint_loads_too(tmp_path, tokenizer):
    from safetensors.torch import save_file

    model = random_model(tiny_config(tokenizer), seed=5)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert weight_files(tmp_path / "nothing") is None


def _empty(config: LLaDAConfig) -> LLaDAModel:
    with torch.device("meta"):
        return LLaDAModel(config)


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_shard_missing_key_unknown_key_and_bad_shape_are_one_line_errors(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    config = tiny_config(tokenizer)
    save_checkpoint(random_model(config), tmp_path, max_shard_bytes=20_000)
    files = weight_files(tmp_path)
    with pytest.raises(UserError) as err:
        load_weights(_empty(config), [*files, tmp_path / "model-99999-of-99999.safetensors"])
    assert "model-99999" in _one_line(err) and "missing" in str(err.value)

    with pytest.raises(UserError) as err:
        load_weights(_empty(config), files[1:])
    assert "lacks" in _one_line(err)

    extra = load_file(str(files[0]))
    extra["model.transformer.blocks.0.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(extra, str(files[0]))
    with pytest.raises(UserError) as err:
        load_weights(_empty(config), files)
    assert "gate_proj" in _one_line(err)

    wrong = {k: torch.zeros(3, 3) for k in load_file(str(files[1]))}
    save_file(wrong, str(files[1]))
    with pytest.raises(UserError) as err:
        load_weights(_empty(config), files[1:2])
    assert str(files[1]) in _one_line(err) and "does not fit" in str(err.value)


def test_unsupported_or_broken_configs_name_the_file_and_field(tmp_path, tokenizer):
    model = random_model(tiny_config(tokenizer))
    save_checkpoint(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for key, value, expect in [
        ("block_type", "sequential", "block_type"),
        ("activation_type", "gelu", "activation_type"),
        ("n_heads", 5, "n_heads"),
        ("alibi", True, "alibi"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(UserError) as err:
            read_config(tmp_path)
        assert str(tmp_path / "config.json") in _one_line(err) and expect in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError) as err:
        read_config(tmp_path)
    assert "config.json" in _one_line(err)
    (tmp_path / INDEX_FILE).write_text("[]")
    with pytest.raises(UserError, match="weight_map"):
        weight_files(tmp_path)
