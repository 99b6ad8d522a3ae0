"""The memory plan (benchmarks/memory_plan.py): the formula's sharding and LoRA rules,
the meta-device measurements it rests on, and its agreement with a real CPU step."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_benchmarks_smoke import _load

mp = _load("memory_plan")
ROOT = Path(__file__).resolve().parent.parent


def counts(**changes) -> mp.Counts:
    """Counts of a made-up model: 1000 trained parameters (10 adapters), blocks of 100."""
    base = mp.Counts(
        trained=1000,
        adapters=10,
        frozen_bytes=500,
        unit=100,
        largest_tensor=50,
        train={"plain": mp.Fit([(40.0, 400.0)]), "checkpointing": mp.Fit([(500.0, 0.0), (40.0, 100.0)])},
        train_lora={"plain": mp.Fit([(40.0, 300.0)]), "checkpointing": mp.Fit([(40.0, 80.0)])},
        infer=mp.Fit([(0.0, 200.0)]),
        sampler=mp.Fit([(0.0, 50.0)]),
        decode=mp.Fit([(10.0, 30.0)]),
        decode_chunk=4,
        tokens=64,
        codebook=16,
        trajectory_bytes=7,
        batch=16,
        cfg=True,
    )
    return replace(base, **changes)


STATE = ("weights", "gradients", "optimizer")


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
@pytest.mark.parametrize("lora", [False, True])
def test_sharded_engines_divide_weights_gradients_and_optimizer_by_the_gpus(engine, lora):
    one = mp.plan(counts(), mp.Setup(engine=engine, gpus=1, lora=lora))
    eight = mp.plan(counts(), mp.Setup(engine=engine, gpus=8, lora=lora))
    for key in STATE:
        assert eight[key] == pytest.approx(one[key] / 8), key
    assert eight["frozen_base"] == pytest.approx(one["frozen_base"] / 8)  # LoRA's base is sharded too
    assert eight["frozen_encoders"] == one["frozen_encoders"]  # encoders are replicated
    # 16 bytes per trained parameter in all: ZeRO-3 2 + 2 + 12, FSDP 4 + 4 + 8
    trained = 10 if lora else 1000
    assert sum(one[k] for k in STATE) == 16 * trained


def test_ddp_replicates_the_state_and_adds_its_gradient_buckets():
    one = mp.plan(counts(), mp.Setup(engine="ddp", gpus=1))
    eight = mp.plan(counts(), mp.Setup(engine="ddp", gpus=8))
    for key in STATE:
        assert eight[key] == one[key]
    assert one["ddp_buckets"] == 0 and eight["ddp_buckets"] == 4 * 1000
    # autocast keeps a bf16 copy of every fp32 weight the forward reads
    assert one["autocast_copies"] == 2 * 1000
    assert mp.plan(counts(), mp.Setup(engine="ddp", precision="fp32"))["autocast_copies"] == 0


def test_lora_counts_optimizer_state_on_the_adapters_only():
    full = mp.plan(counts(), mp.Setup(engine="fsdp", lora=False))
    lora = mp.plan(counts(), mp.Setup(engine="fsdp", lora=True))
    assert full["optimizer"] == 8 * 1000
    assert lora["optimizer"] == 8 * 10 and lora["gradients"] == 4 * 10
    assert lora["frozen_base"] == 2 * 1000  # the frozen base in bf16
    zero3 = mp.plan(counts(), mp.Setup(engine="zero3", gpus=2, lora=True))
    assert zero3["optimizer"] == 12 * 10 / 2


def test_checkpointing_and_micro_batch_scale_the_activations():
    c = counts()
    plain = mp.plan(c, mp.Setup(checkpointing=False, micro_batch=2, term_chunk=3))
    ckpt = mp.plan(c, mp.Setup(checkpointing=True, micro_batch=2, term_chunk=3))
    assert plain["activations"] == 3 * (40 + 400 * 2)
    # the larger of a fixed-size peak (500) and the activations' line
    assert ckpt["activations"] == 3 * 500
    assert mp.plan(c, mp.Setup(checkpointing=True, micro_batch=10))["activations"] == 40 + 100 * 10
    assert ckpt["training_step"] < plain["training_step"]


def test_fit_takes_the_larger_line():
    fit = mp.Fit.through({1: 1000.0, 2: 1000.0, 8: 1700.0, 16: 3300.0})
    assert fit.lines == [(1000.0, 0.0), (100.0, 200.0)]
    assert fit(1) == 1000.0 and fit(4) == 1000.0 and fit(8) == 1700.0 and fit(32) == 6500.0
    assert fit.per_item == 200.0


def test_the_rollout_takes_the_larger_of_sampling_and_decoding():
    c = counts()
    r = mp.plan(c, mp.Setup(rollout_batch=4, gpus=2))  # 8 local trajectories, 4 per sampler call
    assert r["rollout_forward"] == 800 and r["sampler_buffers"] == 200
    assert r["decode"] == 10 + 30 * 4
    assert r["trajectories"] == 8 * 7
    assert r["rollout"] == 8 * 7 + r["autocast_copies"] + 1000
    assert r["peak"] == r["persistent"] + max(r["update"], r["rollout"])
    with pytest.raises(ValueError, match="engine 'zero2'"):
        mp.plan(c, mp.Setup(engine="zero2"))


def test_live_bytes_counts_new_storages_until_they_are_freed():
    outside = torch.ones(1000)
    with mp.LiveBytes() as live:
        a = torch.zeros(256)  # 1 KiB
        view = outside[:10]  # a view of a storage made before: not counted
        b = a * 2  # another KiB
        assert live.live == 2048
        del a, b, view
        assert live.live == 0
        c = torch.zeros(64)
    assert live.peak == 2048 and live.live == 256
    del c


def test_fused_attention_keeps_no_attention_matrix_on_meta():
    q = torch.zeros(1, 2, 512, 16, device="meta", requires_grad=True)

    def held(fused: bool) -> int:
        ctx = mp.on_meta() if fused else torch.autocast("cpu", enabled=False)
        with ctx, mp.LiveBytes() as live:
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
            alive = live.live
        del out
        return alive

    # the output [1, 2, 512, 16] and the log-sum-exp [1, 2, 512], float32
    assert held(True) == 4 * (2 * 512 * 16 + 2 * 512)
    assert held(False) > 4 * 2 * 512 * 512  # the math path keeps the [512, 512] matrices


def test_meissonic_1b_parameter_count_is_the_published_tables():
    from mdmrl_plugins.meissonic.backbone import LORA_TARGETS
    from mdmrl_plugins.meissonic.structure import PUBLISHED_CONFIG, published_structure

    spec = mp.specs(quick=False)["meissonic-1b"]
    _, transformer = spec.build(mp.Variant())
    measured = sum(p.numel() for p in transformer.parameters())
    table = sum(math.prod(shape) for shape in published_structure().values())
    assert measured == table
    # LoRA r on every targeted projection adds r (in + out) parameters
    lora, _ = spec.build(mp.Variant(lora=True))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    d = PUBLISHED_CONFIG["num_attention_heads"] * PUBLISHED_CONFIG["attention_head_dim"]
    dual = len(LORA_TARGETS) * PUBLISHED_CONFIG["num_layers"]
    single = 3 * PUBLISHED_CONFIG["num_single_layers"]  # to_q, to_k, to_v (no output projection)
    assert adapters == spec.lora_rank * 2 * d * (dual + single)
    # the figures docs/scaling.md and docs/meissonic.md give
    for doc in ("scaling.md", "meissonic.md"):
        assert f"{measured:,}" in (ROOT / "docs" / doc).read_text(), doc
    assert f"{adapters:,}" in (ROOT / "docs" / "scaling.md").read_text()


def test_llada_8b_parameter_count_is_the_published_tables():
    from mdmrl_plugins.llada.backbone import BLOCK_LINEARS
    from mdmrl_plugins.llada.model import LLaDAConfig, published_structure

    spec = mp.specs(quick=False)["llada-8b"]
    _, model = spec.build(mp.Variant())
    measured = sum(p.numel() for p in model.parameters())
    assert measured == sum(math.prod(shape) for shape in published_structure(LLaDAConfig()).values())
    lora, _ = spec.build(mp.Variant(lora=True))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    c = LLaDAConfig()
    shapes = {
        "q_proj": (c.d_model, c.d_model),
        "k_proj": (c.d_model, c.d_model),
        "v_proj": (c.d_model, c.d_model),
    }
    shapes |= {"attn_out": (c.d_model, c.d_model), "ff_out": (c.hidden_size, c.d_model)}
    shapes |= {"ff_proj": (c.d_model, c.hidden_size), "up_proj": (c.d_model, c.hidden_size)}
    assert sorted(shapes) == sorted(BLOCK_LINEARS)
    assert adapters == c.n_layers * sum(spec.lora_rank * (i + o) for i, o in shapes.values())
    text = (ROOT / "docs" / "scaling.md").read_text()
    assert f"{measured:,}" in text and f"{adapters:,}" in text


def test_scaling_doc_quotes_the_command_and_its_tables():
    text = (ROOT / "docs" / "scaling.md").read_text()
    assert "python benchmarks/memory_plan.py" in text
    assert "--device cuda" in text
    assert re.search(r"\| *full, checkpointing *\|", text)
