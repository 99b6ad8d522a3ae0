"""Shared helpers of the benchmark scripts: command line, timing, environment, JSON,
log-log fits, and the small models the scripts measure.

Timing rules used by every script:

- ``torch.set_num_threads(threads)`` (2 by default) before anything is timed;
- every timed call is preceded by ``warmup`` untimed calls and followed, on CUDA, by
  ``torch.cuda.synchronize()`` so that the wall clock covers the queued kernels;
- figures compared with each other are measured *interleaved* (A, B, A, B, ...) in the
  same process, so that a change of machine load hits both sides alike;
- the reported figure is the median of ``repeats`` calls; min and max are kept in the
  JSON output.

The scripts are run as files (``python benchmarks/<name>.py``); this module is found
because the script's own folder is first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning. Set before torch loads its OpenMP
# runtime (scripts import this module before torch): with spinning threads, two torch
# threads on a shared 2-core machine with other busy processes wait on each other at
# every parallel region and a forward pass can take 10x its unloaded time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mdmrl.hostmem import keep_freed_memory  # noqa: E402

# as ``mdmrl`` runs: freed tensor memory stays in the process (mdmrl/hostmem.py);
# MDMRL_KEEP_FREED_MEMORY=0 measures glibc's defaults (benchmarks/allocator.py compares)
MALLOC = keep_freed_memory()

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- command line


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark script accepts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument(
        "--quick", action="store_true", help="smallest sizes, one repeat: a smoke run of a few seconds"
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to this JSON file")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --device; exit with one line when CUDA is asked for and absent."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available; run with --device cpu")
    return torch.device(args.device)


def repeats(args: argparse.Namespace, full: int) -> int:
    """--repeats if given, else 1 with --quick, else ``full``."""
    if args.repeats is not None:
        return max(1, args.repeats)
    return 1 if args.quick else full


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall times in seconds of the timed calls of one function."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "repeats": len(self.times),
        }


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronised on CUDA before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@contextmanager
def time_inside(module: Any, device: torch.device) -> Iterator[list[float]]:
    """Patch ``module.forward`` while the block runs; yields a one-element list that
    accumulates the seconds spent inside it (synchronised on ``device`` around each
    call). The class's forward is restored afterwards."""
    spent = [0.0]
    forward = module.forward

    def timed(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        sync(device)
        spent[0] += time.perf_counter() - t0
        return out

    module.forward = timed
    try:
        yield spent
    finally:
        del module.forward


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time several functions in alternation: ``warmup`` untimed rounds, then
    ``repeats`` rounds calling each function once. Returns a :class:`Timing` per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    out = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name].times.append(time_call(fn, device))
    return out


def time_one(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """:func:`time_interleaved` of a single function."""
    return time_interleaved({"fn": fn}, device, repeats, warmup)["fn"]


# --------------------------------------------------------------------------- environment


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def device_label(device: torch.device) -> str:
    """ "CPU, 2 cores (2 torch threads)" or the CUDA device's name."""
    if device.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(device)}"
    return f"CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """What the JSON output records about the machine and the libraries."""
    return {
        "device": device.type,
        "device_label": device_label(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "keep_freed_memory": MALLOC,
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def load_note() -> str:
    """One line with the current load average, printed next to figures."""
    one, five, fifteen = load_average()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def header(title: str, device: torch.device) -> None:
    print(f"== {title}")
    print(
        f"   device: {device_label(device)}; torch {torch.__version__}; {load_note()}; keep_freed_memory: {MALLOC}"
    )


def finish(args: argparse.Namespace, env: dict[str, Any], results: dict[str, Any], targets: dict) -> dict:
    """Print the target lines, write --json, and return the whole record."""
    env["load_average_end"] = load_average()
    print("-- targets")
    for name, t in targets.items():
        verdict = "met" if t["met"] else "NOT met"
        print(f"   {name}: {t['value']:.3f} (target {t['target']}) -> {verdict}")
    record = {"environment": env, "quick": bool(args.quick), "results": results, "targets": targets}
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        print(f"   wrote {path}")
    return record


def target(value: float, goal: str) -> dict[str, Any]:
    """A target record: ``goal`` is "<= x" or ">= x"."""
    op, num = goal.split()
    limit = float(num)
    met = value <= limit if op == "<=" else value >= limit
    return {"value": float(value), "target": goal, "met": bool(met)}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Timing):
        return obj.to_dict()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def log_log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the growth exponent k of y ~ x^k."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["   " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "   " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:.0f}"
    return str(c)


# --------------------------------------------------------------------------- prompts


def shapes_prompts(n: int, seed: int = 0) -> list[str]:
    """n training prompts of the shapes world, drawn reproducibly."""
    from mdmrl_plugins.shapes.prompts import ShapesTrainPrompts

    return ShapesTrainPrompts().sample(n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- shapes model

#: A narrow shapes-mdm for --quick runs (architecture options of ``shapes-mdm``).
QUICK_SHAPES_ARCH = {"width": 16, "layers": 1, "heads": 2}


def shapes_arch(quick: bool = False) -> dict[str, Any]:
    """Architecture options of ``shapes-mdm`` (the fields of its Options that shape the
    network): those of the committed weights when they exist, else the option
    defaults; a narrow network with ``quick``."""
    from dataclasses import fields

    from mdmrl_plugins.shapes.model import BUILTIN_WEIGHTS, ShapesMDMOptions, config_path

    names = {f.name for f in fields(ShapesMDMOptions)} - {"weights", "seed"}
    if quick:
        return {k: v for k, v in QUICK_SHAPES_ARCH.items() if k in names}
    cfg_file = config_path(BUILTIN_WEIGHTS)
    if BUILTIN_WEIGHTS.is_file() and cfg_file.is_file():
        arch = json.loads(cfg_file.read_text()).get("architecture", {})
        return {k: v for k, v in arch.items() if k in names}
    return {f.name: f.default for f in fields(ShapesMDMOptions) if f.name in names}


def shapes_backbone(
    device: torch.device, grid: int | None = None, quick: bool = False, seed: int = 0, **arch: Any
):
    """A random-weight ``shapes-mdm`` with the world's vocabulary and palette, the
    architecture of :func:`shapes_arch` (overridden by ``arch``) and a ``grid`` x
    ``grid`` token grid (default: the world's). Timing does not depend on the
    weights' values, only on the architecture."""
    from dataclasses import replace

    from mdmrl.interfaces import BuildContext
    from mdmrl_plugins.shapes.model import ShapesMDM, ShapesMDMOptions

    options = ShapesMDMOptions(weights="random", seed=seed, **{**shapes_arch(quick), **arch})
    base = ShapesMDM.from_options(options, BuildContext())
    if grid is not None and grid != base.config.grid:
        cfg = replace(base.config, grid=grid)
        cfg.check()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = ShapesMDM(cfg)
    return base.to(device).eval()


# --------------------------------------------------------------------------- tiny aMUSEd


@dataclass
class TinyAmusedConfig:
    """Sizes of the tiny random aMUSEd built by :func:`tiny_amused`.

    grid: token grid side (N = grid^2); codebook: V; hidden: transformer width;
    channels: the conv blocks' width (= feature width D); layers: transformer layers.
    The default keeps aMUSEd-256's grid (16 x 16) and its codebook-to-width ratio
    (8192 / 1024 = 8 = 512 / 64) at a size a CPU runs a forward pass of batch 16 in
    a few hundred milliseconds.
    """

    grid: int = 16
    codebook: int = 512
    hidden: int = 64
    channels: int = 32
    layers: int = 2
    heads: int = 4
    text_width: int = 32
    text_layers: int = 2
    vq_channels: int = 16


def _clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """Write a CLIP BPE tokenizer's vocab.json and merges.txt (49408 ids) into
    ``folder``, from the merge list that ships with open_clip (no network)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip is not installed; it provides the CLIP merge list")
    source = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    rows = gzip.open(source).read().decode("utf-8").split("\n")
    n_merges = 49408 - 2 * 256 - 2
    merges = [tuple(r.split()) for r in rows[1 : 1 + n_merges]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merge_file = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merge_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab, merge_file


_TOKENIZER: Any = None


def clip_tokenizer():
    """A real ``CLIPTokenizer`` (77 tokens), built offline once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import CLIPTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            vocab, merges = _clip_bpe_files(Path(tmp))
            _TOKENIZER = CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    return _TOKENIZER


@dataclass
class TinyAmused:
    """The parts of a tiny random aMUSEd: the mdmrl backbone and the diffusers modules
    it wraps (shared, not copied, so the pipeline runs the very same weights)."""

    backbone: Any
    transformer: Any
    vqvae: Any
    text_encoder: Any
    tokenizer: Any
    mask_token_id: int
    config: TinyAmusedConfig


def tiny_amused(device: torch.device, cfg: TinyAmusedConfig | None = None, seed: int = 0) -> TinyAmused:
    """Build a random ``UVit2DModel`` + ``VQModel`` + CLIP text model of the sizes in
    ``cfg`` and wrap them in the project's ``amused`` backbone."""
    from diffusers import UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from mdmrl_plugins.amused.backbone import AmusedBackbone, AmusedOptions

    cfg = cfg or TinyAmusedConfig()
    micro_dim = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = UVit2DModel(
            hidden_size=cfg.hidden,
            use_bias=False,
            cond_embed_dim=cfg.text_width,
            micro_cond_encode_dim=micro_dim,
            micro_cond_embed_dim=5 * micro_dim,
            encoder_hidden_size=cfg.text_width,
            vocab_size=cfg.codebook + 1,
            codebook_size=cfg.codebook,
            in_channels=cfg.channels,
            block_out_channels=cfg.channels,
            num_res_blocks=1,
            downsample=False,
            upsample=False,
            block_num_heads=cfg.heads,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            intermediate_size=4 * cfg.hidden,
            sample_size=cfg.grid,
        )
        vqvae = VQModel(
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(cfg.vq_channels, cfg.vq_channels),
            layers_per_block=1,
            latent_channels=4,
            sample_size=2 * cfg.grid,
            num_vq_embeddings=cfg.codebook,
            norm_num_groups=4,
            vq_embed_dim=4,
            mid_block_add_attention=False,
            lookup_from_codebook=True,
        )
        text_encoder = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=cfg.text_width,
                intermediate_size=2 * cfg.text_width,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=cfg.text_width,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    tokenizer = clip_tokenizer()
    mask_id = cfg.codebook
    backbone = AmusedBackbone.from_modules(
        transformer, vqvae, text_encoder, tokenizer, options=AmusedOptions(), mask_token_id=mask_id
    )
    backbone = backbone.to(device).eval()
    return TinyAmused(backbone, transformer, vqvae, text_encoder, tokenizer, mask_id, cfg)


AMUSED_PROMPTS = (
    "a photo of a cat",
    "a red bicycle leaning on a wall",
    "an astronaut riding a horse",
    "a bowl of fruit on a table",
)


def amused_prompts(n: int) -> list[str]:
    """n prompts for the aMUSEd benchmarks (a fixed list, cycled)."""
    return [AMUSED_PROMPTS[i % len(AMUSED_PROMPTS)] for i in range(n)]


# --------------------------------------------------------------------------- output


def run_main(main: Callable[[list[str] | None], dict], argv: list[str] | None = None) -> dict:
    """Run a script's ``main`` and restore the torch thread count afterwards (so an
    in-process caller such as the smoke test keeps its own setting)."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
