"""Against a peer: images/s of the ``confidence`` sampler versus diffusers' ``AmusedPipeline``.

Both run the very same tiny random aMUSEd (one ``UVit2DModel``, ``VQModel`` and CLIP
text model, shared, not copied), the same prompts, seed, steps and guidance scale.
The sampler runs in its parity configuration: ``rng = "shared"``, ``rounding =
"floor"`` and the ``amused`` schedule (cosine masking, re-mask temperature 2 -> 0,
guidance 10), which reproduces the pipeline's tokens; the script checks that the
tokens (and the decoded images) are equal and prints it.

Two figures, each timed interleaved in one process:

- tokens out: ``sampler.sample(...)`` vs ``pipe(..., output_type="latent")``; both
  encode the prompt and the empty prompt, run T CFG forwards of batch 2B and sample;
  the sampler also records the trajectory (T + 1 states, log-probs) for training;
- images out: the above plus VQ decoding (``backbone.decode`` vs the pipeline's
  ``output_type="pt"``).

Target: ours / peer >= 1.2 in images/s.

    python benchmarks/amused_peer.py
    python benchmarks/amused_peer.py --device cuda --batch 16
    python benchmarks/amused_peer.py --quick --json /tmp/peer.json
"""

from __future__ import annotations

import warnings

import common
import torch

TARGET = ">= 1.2"


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="B, images per call (default 8; 2 with --quick)")
    p.add_argument(
        "--steps", type=int, default=None, help="T (default 12, the pipeline's default; 4 with --quick)"
    )
    p.add_argument("--guidance", type=float, default=10.0, help="guidance scale (default 10, the pipeline's)")
    p.add_argument("--seed", type=int, default=7, help="generator seed of both samplers")
    args = p.parse_args(argv)
    device = common.setup(args)
    batch = args.batch or (2 if args.quick else 8)
    steps = args.steps or (4 if args.quick else 12)
    reps = common.repeats(args, 5)
    env = common.environment(device)

    from diffusers import AmusedPipeline, AmusedScheduler

    from mdmrl_plugins.cogrpo.sampler import ConfidenceOptions, ConfidenceSampler
    from mdmrl_plugins.cogrpo.schedules import AmusedSchedule, AmusedScheduleOptions

    cfg = (
        common.TinyAmusedConfig(grid=8, codebook=64, hidden=32, channels=16, layers=1) if args.quick else None
    )
    tiny = common.tiny_amused(device, cfg)
    bb = tiny.backbone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AmusedPipeline is marked deprecated in diffusers 0.39
        pipe = AmusedPipeline(
            vqvae=tiny.vqvae,
            tokenizer=tiny.tokenizer,
            text_encoder=tiny.text_encoder,
            transformer=tiny.transformer,
            scheduler=AmusedScheduler(mask_token_id=tiny.mask_token_id, masking_schedule="cosine"),
        )
    pipe.set_progress_bar_config(disable=True)
    sampler = ConfidenceSampler(ConfidenceOptions(rng="shared", rounding="floor"))
    schedule = AmusedSchedule(AmusedScheduleOptions(guidance_scale=args.guidance, masking_schedule="cosine"))
    prompts = common.amused_prompts(batch)
    seeds = torch.full((batch,), args.seed, dtype=torch.long)
    h, w = bb.grid_shape

    def ours_tokens() -> torch.Tensor:
        with torch.no_grad():
            return sampler.sample(bb, schedule, prompts, steps, seeds).final_tokens

    def peer_tokens() -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        out = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            generator=gen,
            output_type="latent",
        )
        return out.images.reshape(batch, h * w)

    def ours_images() -> torch.Tensor:
        return bb.decode(ours_tokens())

    def peer_images() -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        return pipe(
            prompts, num_inference_steps=steps, guidance_scale=args.guidance, generator=gen, output_type="pt"
        ).images

    common.header("against a peer: confidence sampler vs diffusers AmusedPipeline (same tiny aMUSEd)", device)
    n_params = sum(q.numel() for q in tiny.transformer.parameters())
    print(
        f"   UVit2DModel {n_params / 1e6:.2f} M parameters, grid {h}x{w}, V={bb.codebook_size}; "
        f"B={batch}, T={steps}, guidance {args.guidance}, seed {args.seed}; median of {reps} interleaved calls"
    )
    a, b = ours_tokens(), peer_tokens()
    tokens_equal = bool(torch.equal(a.cpu(), b.cpu()))
    ia, ib = ours_images(), peer_images()
    image_diff = float((ia.float().cpu() - ib.float().cpu()).abs().max())
    print(
        f"   parity: tokens equal = {tokens_equal} ({int((a == b).sum())}/{a.numel()} positions); "
        f"decoded images max |diff| = {image_diff:.3g}"
    )

    tm = common.time_interleaved(
        {
            "ours_tokens": ours_tokens,
            "peer_tokens": peer_tokens,
            "ours_images": ours_images,
            "peer_images": peer_images,
        },
        device,
        reps,
        args.warmup,
    )
    ips = {k: batch / t.median for k, t in tm.items()}
    speed_tokens = ips["ours_tokens"] / ips["peer_tokens"]
    speed_images = ips["ours_images"] / ips["peer_images"]
    load = common.load_average()[0]
    rows = [
        [
            "tokens out (no VQ decode)",
            tm["ours_tokens"].median,
            tm["peer_tokens"].median,
            ips["ours_tokens"],
            ips["peer_tokens"],
            speed_tokens,
            load,
        ],
        [
            "images out (with VQ decode)",
            tm["ours_images"].median,
            tm["peer_images"].median,
            ips["ours_images"],
            ips["peer_images"],
            speed_images,
            load,
        ],
    ]
    print(
        common.table(
            rows,
            ["figure", "ours s", "pipeline s", "ours img/s", "pipeline img/s", "ours/pipeline", "load 1m"],
        )
    )
    results = {
        "batch": batch,
        "steps": steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "tokens": bb.num_tokens,
        "codebook": bb.codebook_size,
        "transformer_parameters": n_params,
        "tokens_equal": tokens_equal,
        "image_max_abs_diff": image_diff,
        "timings": {k: t.to_dict() for k, t in tm.items()},
        "images_per_s": ips,
        "speedup_tokens": speed_tokens,
        "speedup_images": speed_images,
        "load_average_1m": load,
    }
    targets = {
        "ours/pipeline images/s, tokens out": common.target(speed_tokens, TARGET),
        "ours/pipeline images/s, with VQ decode": common.target(speed_images, TARGET),
        "token parity (1 = equal)": common.target(float(tokens_equal), ">= 1"),
    }
    return common.finish(args, env, results, targets)


if __name__ == "__main__":
    common.run_main(main)
