"""Peak GPU memory of LongVideoPipeline's two big stages at real Wan 2.1 sizes, with random weights (no download).

Measures, on one CUDA GPU in bf16:

* one denoising step (conditional pass with per-shot caption anchors + unconditional pass) of the Wan 2.1
  transformer (1.3B or 14B layout) over `--shots` shots of `--frames` frames at `--height` x `--width`,
  all shots in one sequence with MoC self-attention;
* VAE decoding of one shot (the pipeline decodes shot by shot).

The text encoder (umt5-xxl, about 11 GB in bf16) runs once per distinct caption before denoising and is not built
here; offload it (`enable_model_cpu_offload`) or free it if the transformer needs the room.

    python benchmarks/long_video_memory.py --model 1.3b              # eight 5 s 480p shots
    python benchmarks/long_video_memory.py --model 14b --layers 40

Prints a table and writes JSON to benchmarks/results/long_video_memory.json. Without CUDA it runs the same code at
the given size on CPU and reports no memory (a smoke run: use tiny sizes, e.g. `--height 32 --width 32 --frames 5
--layers 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

WAN_CONFIGS = {
    "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14b": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
}
TEXT_TOKENS = 512  # Wan pads every caption to 512 T5 tokens
TEXT_DIM = 4096  # umt5-xxl


def gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from diffusers_moc import MoCConfig, apply_moc, moc_context

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(WAN_CONFIGS), default="1.3b")
    p.add_argument("--layers", type=int, help="override the number of transformer blocks")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--frames", type=int, default=81, help="pixel frames per shot (4n+1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "long_video_memory.json"))
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = dict(WAN_CONFIGS[args.model])
    if args.layers is not None:
        cfg["num_layers"] = args.layers

    latent_frames = (args.frames - 1) // 4 + 1
    h, w = args.height // 8, args.width // 8
    tokens = args.shots * latent_frames * (h // 2) * (w // 2)

    def peak() -> float | None:
        return gib(torch.cuda.max_memory_allocated()) if cuda else None

    def reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    rows = []
    with torch.device(device):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=256,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
            **cfg,
        )
    transformer = transformer.to(dtype).eval()
    moc = MoCConfig(top_k=args.top_k, anchor_own_shot=True, causal=True, backend=args.backend)
    config = moc
    apply_moc(transformer, config)  # self-attention and the per-shot caption cross-attention
    weights = sum(t.numel() * t.element_size() for t in transformer.parameters())

    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 16, args.shots * latent_frames, h, w, generator=g, device=device, dtype=dtype)
    # Global caption + one caption per shot (the pipeline stores each distinct caption once).
    cond = torch.randn(1, (args.shots + 1) * TEXT_TOKENS, TEXT_DIM, generator=g, device=device, dtype=dtype)
    uncond = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g, device=device, dtype=dtype)
    spans = [((s + 1) * TEXT_TOKENS, (s + 2) * TEXT_TOKENS) for s in range(args.shots)]
    t = torch.tensor([999.0], device=device)

    reset()
    start = time.perf_counter()
    with torch.no_grad(), moc_context(shot_frames=[latent_frames] * args.shots):
        with moc_context(
            shot_frames=[latent_frames] * args.shots, caption_spans=spans, global_caption_span=(0, TEXT_TOKENS)
        ):
            out_cond = transformer(latents, t, cond, return_dict=False)[0]
        out_uncond = transformer(latents, t, uncond, return_dict=False)[0]
        _ = out_uncond + 5.0 * (out_cond - out_uncond)
    if cuda:
        torch.cuda.synchronize()
    rows.append(
        {
            "stage": "denoising step (cond + uncond)",
            "tokens": tokens,
            "weights_gib": gib(weights),
            "peak_gib": peak(),
            "seconds": time.perf_counter() - start,
        }
    )
    del transformer, out_cond, out_uncond

    if not args.skip_vae:
        with torch.device(device):
            vae = AutoencoderKLWan()
        vae = vae.to(torch.float32).eval()  # the pipeline's CLI runs Wan's VAE in float32
        reset()
        start = time.perf_counter()
        with torch.no_grad():
            video = vae.decode(latents[:, :, :latent_frames].float(), return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
        rows.append(
            {
                "stage": "VAE decode of one shot (fp32)",
                "tokens": None,
                "weights_gib": gib(sum(t.numel() * t.element_size() for t in vae.parameters())),
                "peak_gib": peak(),
                "seconds": time.perf_counter() - start,
            }
        )
        assert video.shape[2] == args.frames

    device_name = torch.cuda.get_device_name() if cuda else "cpu (no memory measured)"
    print(
        f"Wan {args.model} ({cfg['num_layers']} layers), {args.shots} shots x {args.frames} frames at "
        f"{args.width}x{args.height}, MoC top_k={args.top_k}, on {device_name}"
    )
    print(f"{'stage':<34} {'tokens':>8} {'weights GiB':>12} {'peak GiB':>9} {'s':>7}")
    for r in rows:
        peak_s = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        tok = "-" if r["tokens"] is None else str(r["tokens"])
        print(f"{r['stage']:<34} {tok:>8} {r['weights_gib']:>12.2f} {peak_s:>9} {r['seconds']:>7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"device": device_name, "args": vars(args), "moc_config": config.to_dict(), "rows": rows}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
