"""The ``mdmrl`` command line.

Errors caused by input (recipes, paths, plug-in names, weights) print one line on
stderr and exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from mdmrl import __version__
from mdmrl.errors import ConfigError, UserError
from mdmrl.hostmem import keep_freed_memory


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdmrl", description="RL post-training of masked diffusion models.")
    p.add_argument("--version", action="version", version=f"mdmrl {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def overrides(sp):
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe value, e.g. --set train.model.lr=3e-5 (repeatable)",
        )

    r = sub.add_parser("run", help="train with a recipe, or resume a run directory")
    r.add_argument("recipe", nargs="?", help="recipe TOML file")
    r.add_argument("--run-dir", help="where to write the run (default: runs/<recipe>-<time>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--num-processes", type=int, default=1, help="launch N processes through accelerate")
    r.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="launch through accelerate with this config file (configs/accelerate/: ddp, fsdp, zero2, "
        "zero3, multinode, cpu)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    overrides(r)

    e = sub.add_parser("eval", help="score the base model or a checkpoint on held-out prompts")
    e.add_argument("recipe", nargs="?", help="recipe TOML (default: the checkpoint's run recipe)")
    e.add_argument(
        "--prompts", help="plain-text prompt file, one per line (default: the recipe's eval prompts)"
    )
    e.add_argument("--checkpoint", help="checkpoint folder or run directory (default: the base model)")
    e.add_argument("--steps", type=int, action="append", help="step count (repeatable)")
    e.add_argument("--seeds", type=int, help="samples per prompt")
    e.add_argument("--out", help="also write the results as JSON")
    e.add_argument("--write-images", metavar="DIR", help="also write every image, in --layout")
    e.add_argument("--layout", default="plain", help="image layout: geneval, dpg or plain")
    overrides(e)

    s = sub.add_parser("sample", help="generate images for prompts into a PNG grid")
    s.add_argument("recipe", nargs="?", help="recipe TOML (default: the checkpoint's run recipe)")
    s.add_argument("--checkpoint", help="checkpoint folder or run directory")
    s.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    s.add_argument("--prompts", help="prompt file, one per line")
    s.add_argument("--steps", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    overrides(s)

    x = sub.add_parser(
        "export", help="write a run's trained model as a standalone folder (diffusers, LLaDA, safetensors)"
    )
    x.add_argument(
        "checkpoint",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="run directory (its latest checkpoint) or checkpoint folder",
    )
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    x.add_argument("--force", action="store_true", help="replace --out when it exists and is not empty")
    x.add_argument("--recipe", help="recipe TOML (default: the run directory's recipe.toml)")
    overrides(x)

    v = sub.add_parser(
        "validate", help="check a recipe (training, evaluation or pretraining) without running it"
    )
    v.add_argument("recipe")
    overrides(v)

    sub.add_parser(
        "schema", help="print the JSON Schema of recipes (installed plug-ins included), for editors"
    )

    sub.add_parser("plugins", help="list installed plug-ins and what they register")

    rp = sub.add_parser("report", help="render PNG plots of a run directory")
    rp.add_argument("run_dir")

    pt = sub.add_parser("pretrain", help="pretrain a backbone that supports it (masked objective)")
    pt.add_argument("recipe")
    overrides(pt)

    rs = sub.add_parser(
        "reward-server",
        help='serve a recipe\'s rewards to runs with reward_placement.mode = "process" (docs/rewards.md)',
    )
    rs.add_argument("recipe", help="recipe TOML whose [[rewards]] to serve")
    rs.add_argument("--host", default="127.0.0.1", help="interface to listen on (no authentication)")
    rs.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port, printed)")
    rs.add_argument("--recipe-dir", help=argparse.SUPPRESS)  # relative paths of the run's own process
    rs.add_argument("--exit-when-stdin-closes", action="store_true", help=argparse.SUPPRESS)
    overrides(rs)
    return p


def _plugins_table() -> str:
    from mdmrl.plugins import get_registry

    reg = get_registry()
    rows = [("name", "kind", "plugin", "distribution", "version")]
    for kind, entries in reg.parts.items():
        for name in sorted(entries):
            x = entries[name]
            rows.append((name, kind, x.plugin, x.distribution, x.version))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"error: {e}" for e in reg.errors]
    return "\n".join(lines)


def _validate(path: str, overrides: list[str]) -> str:
    """What `mdmrl validate` prints for a valid recipe of any kind; every problem
    otherwise (a ConfigError)."""
    from mdmrl import recipe as rc

    raw = rc.apply_overrides(rc.read_toml(path), overrides)
    if rc.is_pretrain(raw):
        spec, options = rc.validate_pretrain(raw, source=path)
        steps = getattr(options, "steps", None)
        return (
            f"{path}: valid pretraining recipe (mdmrl pretrain).\n"
            f"  backbone={spec.backbone} output={spec.output}" + (f" steps={steps}" if steps else "")
        )
    r = rc.validate(raw, source=path).recipe
    return (
        f"{path}: valid. {r.description}".rstrip()
        + f"\n  backbone={r.backbone.name} schedule={r.schedule.name} sampler={r.sampler.name} "
        f"(T={r.sampler.steps}) objective={r.objective.name} mode={r.train.mode} "
        f"rewards={', '.join(f'{x.weight}*{x.name}' for x in r.rewards)}"
        f"\n  plan: {rc.plan_summary(r.train)}"
    )


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _relaunch(launcher: list[str], rest: list[str]) -> int:
    """Run ``mdmrl REST`` in the processes ``accelerate launch LAUNCHER`` starts."""
    import subprocess

    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "mdmrl", *rest]
    return subprocess.call(cmd)


def _launch_multi(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "1"
    launcher = ["--num_processes", str(args.num_processes), "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if args.num_processes > 1:
        launcher.append("--multi_gpu")
    return _relaunch(launcher, _without(argv, "--num-processes"))


def accelerate_config(path: str, mixed_precision: str | None):
    """Read an accelerate config file (as ``accelerate launch`` does) and check what
    would fail after the processes start: DeepSpeed without its package, FSDP
    without a GPU, a mixed precision other than the recipe's. UserError otherwise."""
    from accelerate.commands.config.config_args import load_config_from_file

    from mdmrl.distributed import check_deepspeed

    where = f"--accelerate-config {path}"
    if not os.path.isfile(path):
        raise UserError(f"{where}: file not found (shipped configs: configs/accelerate/*.yaml)")
    try:
        config = load_config_from_file(path)
    except Exception as exc:  # noqa: BLE001 - yaml, json, unknown keys or values: one line
        reason = " ".join(str(exc).split())
        raise UserError(f"{where}: not a valid accelerate config ({reason})") from None
    kind = str(getattr(config, "distributed_type", "NO")).split(".")[-1]
    if kind == "DEEPSPEED":
        check_deepspeed()
    if kind == "FSDP":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{where}: FSDP runs on GPUs only under accelerate, and none is available")
    launched = str(config.mixed_precision or "no")
    if mixed_precision is not None and launched not in ("no", mixed_precision):
        raise UserError(
            f"{where}: mixed_precision {launched!r} differs from the recipe's train.mixed_precision "
            f"{mixed_precision!r}; add --set train.mixed_precision={launched}"
        )
    return config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while waiting make torch many times slower when other
    # processes share the cores (measured ~10x on a busy 2-core machine); this only
    # takes effect when torch has not been imported yet, and a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # freed tensor memory stays in the process instead of being faulted in again at
    # every step (mdmrl/hostmem.py; benchmarks/allocator.py: B = 8 rollouts 1.07-1.26x faster)
    keep_freed_memory()
    finished = False
    try:
        code = _dispatch(args, argv)
        finished = code == 0
        return code
    except UserError as exc:
        if args.debug:
            raise
        msg = str(exc)
        if isinstance(exc, ConfigError) and len(exc.problems) > 1:
            msg = f"{exc.source}: {len(exc.problems)} problems:\n  " + "\n  ".join(exc.problems)
        print(f"mdmrl: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # the reader of our output went away (``mdmrl validate R | head``): what it read
        # was right; stop quietly, and keep the interpreter's final flush from failing too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if "torch.distributed" in sys.modules:  # only a command that used torch can hold a group
            from mdmrl.distributed import shutdown

            shutdown(together=finished)


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "plugins":
        print(_plugins_table())
        return 0
    if args.command == "validate":
        print(_validate(args.recipe, args.overrides))
        return 0
    if args.command == "schema":
        import json

        from mdmrl.docgen import recipe_schema

        print(json.dumps(recipe_schema(), indent=1))
        return 0
    if args.command == "report":
        from mdmrl.report import report

        for p in report(args.run_dir):
            print(p)
        return 0
    if args.command == "run":
        if args.num_processes < 1:
            raise UserError(f"--num-processes: {args.num_processes} is not allowed; use 1 or more")
        if args.accelerate_config and args.num_processes > 1:
            raise UserError(
                "--num-processes and --accelerate-config: give one (the config sets num_processes)"
            )
        if args.accelerate_config and "WORLD_SIZE" not in os.environ:
            from mdmrl import recipe as rc

            if args.recipe:
                mp = rc.load(args.recipe, args.overrides).recipe.train.mixed_precision
            elif args.resume and os.path.isfile(os.path.join(args.resume, "recipe.toml")):
                mp = rc.load(
                    os.path.join(args.resume, "recipe.toml"), run_dir=True
                ).recipe.train.mixed_precision
            else:
                mp = None
            config = accelerate_config(args.accelerate_config, mp)
            if config.use_cpu:
                os.environ["ACCELERATE_USE_CPU"] = "1"
            launcher = ["--config_file", args.accelerate_config]
            if config.num_machines <= 1 and not config.main_process_port:
                launcher += ["--main_process_port", str(_free_port())]  # two runs on one machine
            return _relaunch(launcher, _without(argv, "--accelerate-config"))
        if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
            if args.recipe:
                from mdmrl import recipe as rc

                rc.load(args.recipe, args.overrides)  # fail fast, before starting processes
            return _launch_multi(args, argv)
        from mdmrl.runner import run

        run(
            args.recipe,
            args.run_dir,
            args.overrides,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        return 0
    if args.command == "eval":
        from mdmrl.runner import eval_command

        print(
            eval_command(
                args.recipe,
                args.prompts,
                args.checkpoint,
                args.steps,
                args.seeds,
                args.overrides,
                args.out,
                args.write_images,
                args.layout,
            )
        )
        return 0
    if args.command == "sample":
        from mdmrl.runner import sample_command

        path = sample_command(
            args.recipe,
            args.checkpoint,
            args.prompt,
            args.prompts,
            args.steps,
            args.seed,
            args.out,
            args.overrides,
        )
        print(path)
        return 0
    if args.command == "export":
        from mdmrl.weights import export_command

        print(export_command(args.checkpoint, args.out, args.force, args.recipe, args.overrides))
        return 0
    if args.command == "pretrain":
        from mdmrl.pretrain import pretrain_command

        pretrain_command(args.recipe, args.overrides)
        return 0
    if args.command == "reward-server":
        from mdmrl.reward_server import serve_command

        return serve_command(
            args.recipe, args.overrides, args.host, args.port, args.recipe_dir, args.exit_when_stdin_closes
        )
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
