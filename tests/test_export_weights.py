"""`mdmrl export`: tiny runs of each first-party backbone train one or two iterations,
export, and the folder loads back through the backbone's own loading path (and, for
the diffusers backbones, through the diffusers class) with the checkpoint's weights;
LoRA runs export merged weights whose outputs equal the LoRA model's. One checkpoint
holds only its sharded/ folder (torch.distributed.checkpoint, written here in one
process in the layout the FSDP engine writes). Errors are one line, exit 2, and the
run directory is never written to."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdmrl import checkpoint as ckpt
from mdmrl.cli import main
from mdmrl.interfaces import BuildContext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "meissonic"))  # meissonic_tiny: tiny random parts
sys.path.insert(0, str(ROOT / "tests" / "plugins" / "amused"))  # amused_tiny: tiny random parts

SHAPES_SETS = [
    "train.cycles=1",
    "train.model_iterations=1",
    "train.schedule_iterations=1",
    "train.model.batch_size=4",
    "train.model.group_size=2",
    "train.schedule.batch_size=4",
    "train.schedule.group_size=2",
    "train.rollout_batch=4",
    "sampler.steps=2",
    "eval.before=false",
    "eval.after=false",
    'device="cpu"',
    "logging.checkpoint_every=1",
    "logging.image_every=0",
    "logging.kl_every=0",
    "logging.tensorboard=false",
]

#: A tiny image-backbone run: one naive GRPO iteration scored by the tests' toy reward.
IMAGE_RECIPE = """\
seed = 0
device = "cpu"
[backbone]
name = "{backbone}"
[backbone.options]
{options}
[schedule]
name = "{schedule}"
[sampler]
name = "confidence"
steps = 2
[[rewards]]
name = "toy-count"
options = {{ target = 1 }}
[objective]
name = "grpo"
[prompts.train]
name = "toy-prompts"
[train]
mode = "naive"
iterations = 1
rollout_batch = 8
[train.model]
lr = 0.01
group_size = 4
batch_size = 8
[eval]
before = false
after = false
[logging]
checkpoint_every = 1
image_every = 0
kl_every = 0
tensorboard = false
"""


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _train(recipe: Path | str, run_dir: Path, sets: list[str] = ()) -> Path:
    code, _, err = _call(["run", recipe, "--run-dir", run_dir, "--no-progress", *_sets(list(sets))])
    assert code == 0, err[-3000:]
    return run_dir


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _export(source: Path, out: Path, *extra: str) -> dict:
    code, stdout, err = _call(["export", source, "--out", out, *extra])
    assert code == 0, err[-3000:]
    assert stdout.strip() == str(out)
    return json.loads((out / "mdmrl-export.json").read_text())


def _one_line_error(argv: list[str]) -> str:
    code, stdout, err = _call(argv)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("mdmrl: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def with_toy_parts(monkeypatch):
    """The installed plug-ins plus the tests' toy reward and prompt source."""
    from toy_plugin import ToyPrompts, ToyReward

    from mdmrl import plugins
    from mdmrl.hookspecs import hookimpl

    class Extra:
        @hookimpl
        def register_rewarders(self, register):
            register(ToyReward)

        @hookimpl
        def register_prompt_sources(self, register):
            register(ToyPrompts)

    reg = plugins.Registry()
    reg.load_entry_points()
    reg.register_plugin(Extra(), "export-test-toys")
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    return reg


# --------------------------------------------------------------------------- shapes-mdm


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """Co-GRPO on shapes-mdm: one model and one schedule iteration, a checkpoint after each."""
    tmp = tmp_path_factory.mktemp("shapes")
    return _train(ROOT / "recipes" / "shapes" / "co_grpo.toml", tmp / "run", SHAPES_SETS)


def test_shapes_export_loads_back_with_the_checkpoints_weights(shapes_run, tmp_path):
    from mdmrl_plugins.shapes.model import ShapesMDM, ShapesMDMOptions

    before = _files(shapes_run)
    out = tmp_path / "export"
    info = _export(shapes_run, out)
    assert _files(shapes_run) == before  # the run directory is only read
    last = ckpt.list_checkpoints(shapes_run / "checkpoints")[-1]
    assert info["iteration"] == 2 and info["backbone"] == "shapes-mdm"
    assert info["checkpoint"] == str(last.resolve()) and info["weights_read_from"] == "backbone.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [
        "mdmrl-export.json",
        "mdmrl-schedule.safetensors",
        "shapes-mdm.json",
        "shapes-mdm.safetensors",
    ]
    trained = load_file(str(last / "backbone.safetensors"))
    weights = out / "shapes-mdm.safetensors"
    # the backbone's own loading path: a recipe's backbone.options.weights
    model = ShapesMDM.from_options(ShapesMDMOptions(weights=str(weights)), BuildContext())
    assert set(trained) == {k for k, p in model.named_parameters()}
    base = ShapesMDM.from_options(ShapesMDMOptions(), BuildContext())
    assert any(not torch.equal(base.get_parameter(k), v) for k, v in trained.items())  # training moved it
    for k, v in trained.items():
        assert torch.equal(model.get_parameter(k).detach(), v), k
    schedule = load_file(str(out / "mdmrl-schedule.safetensors"))
    want = load_file(str(last / "schedule.safetensors"))
    assert schedule.keys() == want.keys() and all(torch.equal(schedule[k], want[k]) for k in want)
    assert info["schedule"] == {"name": "gaussian", "file": "mdmrl-schedule.safetensors"}


def test_a_checkpoint_folder_is_taken_as_is_and_out_needs_force(shapes_run, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("x")
    first = shapes_run / "checkpoints" / "iter_000001"
    err = _one_line_error(["export", first, "--out", out])
    assert "exists and is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    info = _export(first, out, "--force")
    assert info["iteration"] == 1 and not (out / "old.txt").exists()
    model = load_file(str(out / "shapes-mdm.safetensors"))
    for k, v in load_file(str(first / "backbone.safetensors")).items():
        assert torch.equal(model[k], v), k
    assert not list(tmp_path.glob(".export.export-*"))  # no staging folder left


def test_export_errors_are_one_line(shapes_run, tmp_path):
    before = _files(shapes_run)
    out = tmp_path / "out"
    err = _one_line_error(["export", tmp_path / "missing", "--out", out])
    assert "missing: checkpoint not found" in err
    empty = tmp_path / "stopped"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(shapes_run / "recipe.toml", empty / "recipe.toml")
    assert "no complete checkpoint" in _one_line_error(["export", empty, "--out", out])
    assert "neither a run directory" in _one_line_error(["export", tmp_path, "--out", out])
    inside = shapes_run / "exported"
    assert "lies inside" in _one_line_error(["export", shapes_run, "--out", inside])
    err = _one_line_error(["export", shapes_run, "--out", shapes_run.parent, "--force"])
    assert "holds" in err  # --force never removes the run directory
    assert not out.exists() and not inside.exists()
    assert _files(shapes_run) == before


def test_a_backbone_without_an_export_method_is_one_line(toy_registry, toy_recipe, tmp_path):
    text = toy_recipe.read_text().replace("cycles = 2", "cycles = 1")
    toy_recipe.write_text(text.replace("[eval]", "[eval]\nbefore = false\nafter = false"))
    run_dir = _train(toy_recipe, tmp_path / "toy-run")
    out = tmp_path / "out"
    err = _one_line_error(["export", run_dir, "--out", out])
    assert err == "mdmrl: error: backbone 'tiny' cannot export (it has no export method)\n"
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process, on purpose
def test_export_reads_a_checkpoint_that_holds_only_its_shards(shapes_run, tmp_path):
    """The engine's sharded layout (torch.distributed.checkpoint of the wrapped module's
    model state under "model"), written here in one process; the whole-weight files
    are removed, so export must gather the shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from mdmrl import recipe as rc
    from mdmrl.build import build_parts
    from mdmrl.engine import TrainStep

    last = ckpt.list_checkpoints(shapes_run / "checkpoints")[-1]
    run_dir = tmp_path / "sharded-run"
    copy = run_dir / "checkpoints" / last.name
    copy.mkdir(parents=True)
    shutil.copy(shapes_run / "recipe.toml", run_dir / "recipe.toml")
    shutil.copy(last / "meta.json", copy / "meta.json")
    loaded = rc.load(run_dir / "recipe.toml", run_dir=True)
    parts = build_parts(loaded, torch.device("cpu"))
    ckpt.load(last, parts.backbone, parts.schedule)
    dcp.save(
        {"model": get_model_state_dict(TrainStep(parts, None))},
        checkpoint_id=str(copy / "sharded"),
        no_dist=True,
    )
    assert not (copy / "backbone.safetensors").exists() and list((copy / "sharded").glob("*.distcp"))

    out = tmp_path / "export"
    info = _export(run_dir, out)
    assert info["weights_read_from"] == "sharded/ (gathered)"
    exported = load_file(str(out / "shapes-mdm.safetensors"))
    for k, v in load_file(str(last / "backbone.safetensors")).items():
        assert torch.equal(exported[k], v), k
    schedule = load_file(str(out / "mdmrl-schedule.safetensors"))
    for k, v in load_file(str(last / "schedule.safetensors")).items():
        assert torch.equal(schedule[k], v), k
    shutil.rmtree(copy / "sharded")
    err = _one_line_error(["export", run_dir, "--out", tmp_path / "again"])
    assert "neither backbone.safetensors nor a sharded/ folder" in err


# --------------------------------------------------------------------------- llada


def test_llada_lora_export_is_a_checkpoint_folder_with_merged_weights(tmp_path, with_toy_parts):
    """LoRA on the embedded arithmetic model, rewarded by the share of end-of-text
    tokens (id 22, the digit 1), which varies within a group, so the adapters move in one iteration."""
    from mdmrl.runner import load_for_eval
    from mdmrl_plugins.llada.backbone import LLaDABackbone, LLaDAOptions
    from mdmrl_plugins.llada.model import INDEX_FILE

    base = ROOT / "plugins" / "text" / "weights" / "arith-llada"
    sets = [
        f"backbone.options.path={json.dumps(str(base))}",
        "backbone.options.lora_rank=2",
        'rewards=[{name="toy-count", weight=1.0, options={target=22}}]',
        "sampler.steps=10",
        "objective.options.mu=1",
        "prompts.eval.options.count=2",
        "train.iterations=1",
        "train.model.lr=0.01",
        "train.model.batch_size=8",
        "train.model.group_size=4",
        "train.rollout_batch=8",
        "eval.before=false",
        "eval.after=false",
        "logging.checkpoint_every=1",
    ]
    run_dir = _train(ROOT / "recipes" / "text" / "mask_grpo.toml", tmp_path / "run", sets)
    out = tmp_path / "export"
    info = _export(run_dir, out)
    assert info["lora_merged"] is True
    for name in ("config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    keys = {k for f in out.glob("model-*.safetensors") for k in load_file(str(f))}
    assert keys == {k for f in base.glob("model-*.safetensors") for k in load_file(str(f))}
    assert not any("lora" in k or "base_layer" in k for k in keys)

    # the llada loader reads the export as a checkpoint path, without LoRA
    _, parts = load_for_eval(None, str(run_dir), [])
    lora = parts.backbone.eval()
    options = LLaDAOptions(**{**vars(lora.options), "path": str(out), "lora_rank": 0})
    merged = LLaDABackbone.from_options(options, BuildContext()).eval()
    plain = LLaDABackbone.from_options(LLaDAOptions(**{**vars(options), "path": str(base)}), BuildContext())
    assert not any(n for n, _ in merged.named_parameters() if "lora" in n)
    prompts = ["12+7=", "3*4-5="]
    tokens = torch.randint(0, lora.codebook_size, (2, lora.num_tokens))
    tokens[:, ::3] = lora.mask_token_id
    with torch.no_grad():
        want = lora(tokens, lora.encode_prompts(prompts), torch.ones(2)).logits
        got = merged(tokens, merged.encode_prompts(prompts), torch.ones(2)).logits
        untrained = plain.eval()(tokens, plain.encode_prompts(prompts), torch.ones(2)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (untrained - want).abs().max() > 1e-4  # the adapters changed the model: merging mattered


# --------------------------------------------------------------------------- meissonic and aMUSEd


def _image_run(tmp_path: Path, backbone: str, schedule: str, options: dict) -> Path:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    recipe = tmp_path / f"{backbone}.toml"
    recipe.write_text(IMAGE_RECIPE.format(backbone=backbone, schedule=schedule, options=lines))
    return _train(recipe, tmp_path / "run")


def test_meissonic_lora_export_loads_through_diffusers_with_merged_weights(tmp_path, with_toy_parts):
    RESOLUTION = 16  # the recipe minimum: an 8 x 8 token grid with the tiny 2x VQ model
    from meissonic_tiny import clip_tokenizer, save_tiny_meissonic, tiny_transformer

    from mdmrl.runner import load_for_eval
    from mdmrl_plugins.meissonic.backbone import MeissonicBackbone, MeissonicOptions
    from mdmrl_plugins.meissonic.transformer import MeissonicTransformer2DModel

    base = save_tiny_meissonic(tmp_path / "meissonic", clip_tokenizer(tmp_path / "bpe"))
    run_dir = _image_run(
        tmp_path, "meissonic", "meissonic", {"path": str(base), "resolution": RESOLUTION, "lora_rank": 2}
    )
    out = tmp_path / "export"
    info = _export(run_dir, out)
    assert info["lora_merged"] is True and info["base"] == str(base)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "text_encoder",
        "tokenizer",
        "transformer",
        "vqvae",
    ]

    _, parts = load_for_eval(None, str(run_dir), [])
    lora = parts.backbone.eval()
    transformer = MeissonicTransformer2DModel.from_pretrained(str(out), subfolder="transformer").eval()
    assert set(transformer.state_dict()) == set(tiny_transformer().state_dict())  # no adapter left
    reloaded = MeissonicBackbone.from_options(
        MeissonicOptions(path=str(out), resolution=RESOLUTION), BuildContext()
    ).eval()
    plain = MeissonicBackbone.from_options(
        MeissonicOptions(path=str(base), resolution=RESOLUTION), BuildContext()
    ).eval()
    cond = lora.encode_prompts(["red big", "blue small"])
    tokens = torch.randint(0, lora.codebook_size, (2, lora.num_tokens))
    tokens[:, ::2] = lora.mask_token_id
    t = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        want = lora(tokens, cond, t)
        got = reloaded(tokens, reloaded.encode_prompts(["red big", "blue small"]), t)
        untrained = plain(tokens, cond, t).logits
        reloaded.transformer = transformer  # the diffusers class's own from_pretrained
        direct = reloaded(tokens, cond, t).logits
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(direct, want.logits, atol=1e-4, rtol=1e-4)
    assert (untrained - want.logits).abs().max() > 1e-4  # the adapters changed the model


def test_amused_export_is_a_diffusers_pipeline_with_the_trained_transformer(tmp_path, with_toy_parts):
    from amused_tiny import clip_tokenizer, save_tiny_amused, tiny_modules
    from diffusers import AmusedPipeline, UVit2DModel

    from mdmrl_plugins.amused.backbone import AmusedBackbone, AmusedOptions

    base = save_tiny_amused(tmp_path / "amused", (*tiny_modules(), clip_tokenizer(tmp_path / "bpe")))
    run_dir = _image_run(tmp_path, "amused", "amused", {"path": str(base)})
    out = tmp_path / "export"
    _export(run_dir, out)
    trained = load_file(str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1] / "backbone.safetensors"))
    assert trained and all(k.startswith("transformer.") for k in trained)  # full fine-tune of the transformer
    untouched = UVit2DModel.from_pretrained(str(base), subfolder="transformer")
    assert any(not torch.equal(untouched.get_parameter(k[12:]), v) for k, v in trained.items())

    transformer = UVit2DModel.from_pretrained(str(out), subfolder="transformer")
    pipeline = AmusedPipeline.from_pretrained(str(out))
    backbone = AmusedBackbone.from_options(AmusedOptions(path=str(out)), BuildContext())
    assert pipeline.scheduler.config.mask_token_id == backbone.mask_token_id == 17
    for module in (transformer, pipeline.transformer, backbone.transformer):
        state = module.state_dict()
        assert set(state) == {k[12:] for k in trained}
        for k, v in trained.items():
            assert torch.equal(state[k[12:]], v), k
