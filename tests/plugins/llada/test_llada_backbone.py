"""The ``llada`` backbone: loading a checkpoint folder the way a user's LLaDA-8B folder
loads, prompts through the chat template, the forward conventions, text outputs,
missing-weight errors, LoRA, registration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext
from mdmrl_plugins.llada.backbone import BLOCK_LINEARS, HUB_ID, LLaDABackbone, LLaDAOptions
from mdmrl_plugins.llada.tiny import END_OF_TURN, EOS, tiny_backbone

N = 12


def _completion(bb, masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 200, (2, N), generator=g)
    tokens[:, N - masked :] = bb.mask_token_id
    return tokens


def _load(folder, recipe_dir=".", **options) -> LLaDABackbone:
    opts = LLaDAOptions(**{"path": str(folder), "dtype": "float32", "gen_length": N, **options})
    return LLaDABackbone.from_options(opts, BuildContext(recipe_dir=str(recipe_dir)))


# ------------------------------------------------------------------ loading


def test_a_checkpoint_folder_loads_through_the_user_path_and_matches_the_model(
    tmp_path, checkpoint, tokenizer
):
    folder, model = checkpoint
    # the published config.json names remote code in auto_map; it is never run
    copy = tmp_path / "weights" / "llada"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {
        "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoConfig": "configuration_llada.LLaDAConfig",
    }
    (copy / "config.json").write_text(json.dumps(config))
    assert len(list(copy.glob("model-*-of-*.safetensors"))) > 1

    loaded = _load("weights/llada", recipe_dir=tmp_path)  # relative to the recipe folder
    assert type(loaded.tokenizer).__name__ == "PreTrainedTokenizerFast"
    built = LLaDABackbone(model, tokenizer, LLaDAOptions(dtype="float32", gen_length=N))
    prompts = ["What is 2 + 3?", "Tom has 3 apples."]
    cond = loaded.encode_prompts(prompts)
    assert torch.equal(cond.attention_mask, built.encode_prompts(prompts).attention_mask)
    tokens = _completion(loaded, 5)
    with torch.no_grad():
        a, b = (
            loaded(tokens, cond, torch.zeros(2)),
            built(tokens, built.encode_prompts(prompts), torch.zeros(2)),
        )
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)


def test_dtype_option(checkpoint):
    bb = _load(checkpoint[0], dtype="bfloat16")
    assert bb.model.transformer.wte.weight.dtype == torch.bfloat16
    out = bb(_completion(bb, 3), bb.encode_prompts(["a", "b"]), torch.zeros(2))
    assert out.logits.dtype == torch.float32 and out.features.dtype == torch.bfloat16


def test_random_weights_need_only_the_config_and_tokenizer(tmp_path, checkpoint):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for f in checkpoint[0].iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, folder)
    a, b = _load(folder, weights="random", seed=7), _load(folder, weights="random", seed=7)
    c = _load(folder, weights="random", seed=8)
    wa, wc = a.model.transformer.wte.weight.detach(), c.model.transformer.wte.weight
    assert torch.equal(wa, b.model.transformer.wte.weight) and not torch.equal(wa, wc)
    assert abs(float(wa.std()) - 0.02) < 0.003
    with pytest.raises(UserError) as err:
        _load(folder)  # weights = "checkpoint" needs the weight files
    assert "neither model.safetensors.index.json nor model.safetensors" in str(err.value)
    assert "\n" not in str(err.value) and HUB_ID in str(err.value)


def _assert_download_hint(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("backbone.options.path: LLaDA weights not found")
    assert f"huggingface-cli download {HUB_ID}" in msg
    return msg


def test_missing_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        _load(tmp_path / "nowhere" / "llada")
    assert "nowhere" in _assert_download_hint(err) and "does not exist" in str(err.value)


def test_folder_without_config_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        _load(tmp_path)
    assert "has no config.json" in _assert_download_hint(err)


def test_hub_id_absent_from_the_cache_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        _load("GSAI-ML/LLaDA-8B-not-downloaded", recipe_dir=tmp_path)
    assert time.monotonic() - start < 10
    assert "HF_HUB_OFFLINE" in _assert_download_hint(err)


def test_missing_tokenizer_is_one_line(tmp_path, checkpoint):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in checkpoint[0].iterdir():
        if f.name.startswith("model") or f.name == "config.json":
            shutil.copy(f, folder)
    with pytest.raises(UserError) as err:
        _load(folder)
    assert (
        "\n" not in str(err.value)
        and "no usable tokenizer" in str(err.value)
        and str(folder) in str(err.value)
    )


# ------------------------------------------------------------------ prompts


def test_prompts_use_the_chat_template_and_are_left_padded(tokenizer):
    bb = tiny_backbone(tokenizer, max_prompt_length=40, gen_length=N)
    cond = bb.encode_prompts(["What is 2 + 3?", "Hi"])
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True
    )
    assert bb.prompt_ids("What is 2 + 3?") == list(expected)
    assert tokenizer.decode(expected).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert cond.hidden.shape == (2, 40, bb.feature_dim) and cond.attention_mask.shape == (2, 40)
    lengths = cond.attention_mask.sum(1).tolist()
    assert lengths == [len(expected), len(bb.prompt_ids("Hi"))]
    assert (
        not cond.attention_mask[1, : 40 - lengths[1]].any()
        and cond.attention_mask[1, 40 - lengths[1] :].all()
    )
    torch.testing.assert_close(cond.hidden[0, -1], bb.model.transformer.wte.weight[expected[-1]])

    raw = tiny_backbone(tokenizer, chat_template=False)
    assert raw.prompt_ids("Hi") == tokenizer("Hi")["input_ids"]


def test_long_prompts_keep_their_end_with_a_warning(tokenizer):
    bb = tiny_backbone(tokenizer, max_prompt_length=8)
    with pytest.warns(UserWarning, match="max_prompt_length"):
        ids = bb.prompt_ids("apples " * 30)
    full = tiny_backbone(tokenizer, max_prompt_length=400).prompt_ids("apples " * 30)
    assert ids == full[-8:] and bool(bb.encode_prompts(["apples " * 30]).attention_mask.all())


def test_null_condition_is_the_empty_prompt_and_is_kept(tokenizer):
    bb = tiny_backbone(tokenizer, max_prompt_length=32, lora_rank=2)  # wte frozen: the encoding is reused
    null = bb.null_conditioning(3)
    torch.testing.assert_close(null.hidden, bb.encode_prompts([""] * 3).hidden)
    assert bb.null_conditioning(3) is null
    full = tiny_backbone(tokenizer, max_prompt_length=32)
    with torch.enable_grad():
        assert full.null_conditioning(2).hidden.requires_grad  # a trained wte gets gradients from it


def test_a_chat_template_is_required_unless_switched_off(tokenizer):
    from mdmrl_plugins.llada.tiny import byte_level_tokenizer

    plain = byte_level_tokenizer(chat_template=None)
    with pytest.raises(UserError, match="chat_template = false"):
        tiny_backbone(plain)
    tiny_backbone(plain, chat_template=False)


# ------------------------------------------------------------------ forward


def test_forward_conventions(tokenizer):
    bb = tiny_backbone(tokenizer, gen_length=N)
    assert bb.grid_shape == (1, N) and bb.num_tokens == N
    assert bb.codebook_size == bb.model.config.vocab_rows > bb.mask_token_id
    tokens = _completion(bb, 4)
    cond = bb.encode_prompts(["What is 2 + 3?", "Hi"])
    with torch.no_grad():
        out = bb(tokens, cond, torch.tensor([0.3, 0.9]))
        same = bb(tokens, cond, torch.tensor([1.0, 0.0]))  # LLaDA has no timestep input
        swapped = bb(tokens.flip(0), bb.encode_prompts(["Hi", "What is 2 + 3?"]), torch.zeros(2))
        ids = torch.tensor([bb.prompt_ids("Hi") + tokens[1].tolist()])
        plain = bb.model(ids)[:, -N:]
    assert out.logits.shape == (2, N, bb.codebook_size) and out.logits.dtype == torch.float32
    assert out.features.shape == (2, N, bb.feature_dim)
    assert torch.equal(out.logits, same.logits)
    torch.testing.assert_close(
        swapped.logits[0], out.logits[1], atol=1e-5, rtol=1e-5
    )  # padding is not attended
    torch.testing.assert_close(out.logits[1:], plain, atol=1e-5, rtol=1e-5)  # = LLaDA on [prompt; completion]
    assert not torch.allclose(out.logits[0], out.logits[1], atol=1e-3)  # the prompt conditions


def test_full_fine_tune_trains_wte_through_the_prompt(tokenizer):
    bb = tiny_backbone(tokenizer).train()
    assert all(p.requires_grad for p in bb.parameters())
    prompt = bb.prompt_ids("Hi")
    completion = _completion(bb, N)[:1]  # fully masked: only the prompt's tokens are embedded
    bb(completion, bb.encode_prompts(["Hi"]), torch.ones(1)).logits.logsumexp(-1).mean().backward()
    rows = bb.model.transformer.wte.weight.grad.abs().sum(1)
    assert bool((rows[sorted(set(prompt))] > 0).all()) and float(rows[300]) == 0.0


def test_lora_adapts_the_chosen_block_layers_only(tokenizer):
    plain = tiny_backbone(tokenizer, gen_length=N)
    bb = tiny_backbone(tokenizer, gen_length=N, lora_rank=2, lora_targets=["q_proj", "up_proj"])
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "up_proj"}
    assert not any("transformer.ff_out" in n and "blocks" not in n for n in trainable)
    every = tiny_backbone(tokenizer, lora_rank=2)
    adapted = {n.split(".")[-4] for n, p in every.named_parameters() if p.requires_grad}
    assert adapted == set(BLOCK_LINEARS)

    cond, tokens = plain.encode_prompts(["a", "b"]), _completion(plain, 5)
    with torch.no_grad():  # fresh adapters are zero: the same function
        torch.testing.assert_close(
            bb(tokens, cond, torch.zeros(2)).logits, plain(tokens, cond, torch.zeros(2)).logits
        )
    bb.train()
    bb(tokens, bb.encode_prompts(["a", "b"]), torch.zeros(2)).logits.logsumexp(-1).mean().backward()
    assert {n for n, p in bb.named_parameters() if p.grad is not None} <= set(trainable)


def test_gradient_checkpointing_option_gives_the_same_gradients(tokenizer):
    def grads(flag):
        bb = tiny_backbone(tokenizer, gradient_checkpointing=flag).train()
        out = bb(_completion(bb, 6), bb.encode_prompts(["a", "bb"]), torch.zeros(2))
        out.logits.logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in bb.named_parameters()}

    a, b = grads(False), grads(True)
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


# ------------------------------------------------------------------ outputs


def test_decode_text_stops_at_the_first_end_of_sequence(tokenizer):
    bb = tiny_backbone(tokenizer, gen_length=N)
    eos, eot = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert bb.eos_token_ids == tuple(sorted({eos, eot})) and bb.pad_token_id == eos
    answer = tokenizer("The answer is \\boxed{7}.", add_special_tokens=False)["input_ids"]
    junk = tokenizer(" more text", add_special_tokens=False)["input_ids"]
    rows = [answer + [eot] + junk, answer + [eos] * (len(junk) + 1), answer + junk + [eos]]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
    assert bb.decode_text(tokens) == ["The answer is \\boxed{7}."] * 2 + [
        "The answer is \\boxed{7}. more text"
    ]
    images = bb.decode(tokens)
    assert images.shape == (3, 3, 256, 256) and images.dtype == torch.float32
    assert 0 <= float(images.min()) < 0.5 < float(images.max()) <= 1  # black text on white


# ------------------------------------------------------------------ registration


def test_registered_and_options_validate():
    from mdmrl import options as opts
    from mdmrl.plugins import Registry
    from mdmrl_plugins.llada import plugin

    reg = Registry()
    reg.register_plugin(plugin, "llada")
    assert reg.get("backbone", "llada").cls is LLaDABackbone
    problems: list[str] = []
    built = opts.build(
        LLaDAOptions, {"path": "w", "lora_rank": 8, "lora_targets": ["q_proj"]}, "backbone.options", problems
    )
    assert problems == [] and built.lora_targets == ["q_proj"]
    opts.build(
        LLaDAOptions,
        {"dtype": "float64", "weights": "pretrained", "lora_targets": ["o_proj"], "gen_length": 0},
        "backbone.options",
        problems,
    )
    assert len(problems) == 4


def test_plugin_module_imports_no_heavy_library():
    code = (
        "import sys, mdmrl_plugins.llada.plugin, mdmrl_plugins.text.plugin; "
        "print(sorted(m for m in ('transformers', 'peft', 'safetensors', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
