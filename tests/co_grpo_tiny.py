"""A tiny run of the shapes Co-GRPO recipe for the multi-process tests: ``--set``
overrides for one cycle of 2 model + 1 schedule iterations of 4 images (G = 2) at 4
sampling steps, evaluated at 4 steps on 6 prompts with one seed, on the CPU, without
TensorBoard. Each test adds its own checkpoint, image and evaluation settings."""

from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "shapes" / "co_grpo.toml"
SETS = [
    "train.cycles=1",
    "train.model_iterations=2",
    "train.schedule_iterations=1",
    "train.model.batch_size=4",
    "train.model.group_size=2",
    "train.schedule.batch_size=4",
    "train.schedule.group_size=2",
    "sampler.steps=4",
    "eval.seeds=1",
    "eval.steps=[4]",
    "prompts.eval.options.count=6",
    'device="cpu"',
    "logging.tensorboard=false",
]
