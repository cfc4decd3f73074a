"""Benchmark: panoray's training step vs Hugging Face's, and the quality a short CPU run reaches.

Speed (default): a Hugging Face `Mask2FormerForUniversalSegmentation` with the architecture of
a panoray preset (default `tiny`: ResNet-18, 64-wide, 16 queries) and seeded random weights is
converted with `model.convert_hf`, so both sides start from the same weights (checked: same
logits in eval mode). Both then train on the same LSJ batches of the synthetic dataset: forward,
the Mask2Former loss (same weights, 12544 points, deep supervision), backward, full-model
gradient clipping and an AdamW step; ours is `model.criterion`, HF's is its built-in loss
(`mask_labels` / `class_labels`). The backbone's BatchNorm is frozen on both sides, as in the
reference. Ours runs as the training loop runs it on the CPU: with the opt-in layer
`model.cpu_training` (Winograd 3x3 convolutions, channels_last GroupNorm, 1x1 convolutions and
AdamW, the compiled importance sampling). Steps alternate between the two so machine load
hits both alike; the table gives images / s from the median step time after one warm-up step,
float32, `--threads` torch threads (default 1: on a busy machine two threads on two cores stall
each other at every op).

Quality (`--quality`): `run_finetune` trains `tiny` from scratch on 2 CPU Ray workers on the
synthetic train split and evaluates PQ on the synthetic val split every `--eval-every` steps;
the PQ curve is printed and written as a Markdown table.

Run: ``python bench/train.py [--sizes 128 256] [--batch 2] [--repeats 5] [--threads 1]``
     ``python bench/train.py --quality [--steps 1000] [--out bench/results/train_quality.md]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.config import Mask2FormerConfig, get_config
from model.convert_hf import convert_hf
from model.cpu_training import (
    ChannelsLastAdamW,
    accelerate_cpu_training,
    select_uncertain_points,
)
from model.criterion import LossConfig, build_criterion
from model.mask2former import build_model
from model.optim import build_optimizer, clip_grad_norm
from model.point_sampling import seeded_generators
from pipeline.coco.synth import make_synthetic_dataset
from pipeline.train.data import LSJConfig, example_at, load_split, to_model_inputs

STAGES = ["stage1", "stage2", "stage3", "stage4"]


# ------------------------------------------------------------------------------------ speed

def hf_config(cfg: Mask2FormerConfig):
    """The Hugging Face Mask2FormerConfig of a panoray ResNet config."""
    import transformers

    if cfg.backbone.kind != "resnet":
        raise ValueError("the speed benchmark maps ResNet presets only")
    basic = cfg.backbone.depth in (18, 34)
    depths = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
    widths = [64, 128, 256, 512] if basic else [256, 512, 1024, 2048]
    backbone = transformers.ResNetConfig(depths=depths[cfg.backbone.depth], hidden_sizes=widths,
                                         layer_type="basic" if basic else "bottleneck",
                                         out_features=STAGES)
    pd, td = cfg.pixel_decoder, cfg.transformer_decoder
    if pd.num_heads != td.num_heads:
        raise ValueError("HF uses one head count for both decoders")
    loss = LossConfig()
    return transformers.Mask2FormerConfig(
        backbone_config=backbone, num_labels=cfg.num_classes,
        id2label={i: c.name for i, c in enumerate(cfg.categories)},
        num_queries=td.num_queries, decoder_layers=td.num_layers + 1,
        encoder_layers=pd.num_layers, hidden_dim=td.hidden_dim, feature_size=pd.conv_dim,
        mask_feature_size=pd.mask_dim, num_attention_heads=td.num_heads,
        dim_feedforward=td.dim_feedforward, encoder_feedforward_dim=pd.dim_feedforward,
        pre_norm=td.pre_norm, dropout=0.0, train_num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio, class_weight=loss.class_weight,
        mask_weight=loss.mask_weight, dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight, use_auxiliary_loss=True)


def twin_models(preset: str, folder: Path):
    """(ours, HF) with identical weights, both in train mode with frozen backbone BatchNorm."""
    import transformers

    cfg = get_config(preset)
    torch.manual_seed(0)
    hf = transformers.Mask2FormerForUniversalSegmentation(hf_config(cfg))
    hf.save_pretrained(folder)
    converted, state_dict = convert_hf(folder, categories=cfg.categories)
    ours = build_model(converted)
    ours.load_state_dict(state_dict)
    images = torch.rand(1, 3, 64, 64) * 255
    mean, std = ours.pixel_mean, ours.pixel_std
    with torch.inference_mode():
        mine = ours.eval()(images)["pred_logits"]
        theirs = hf.eval()(pixel_values=(images - mean) / std).class_queries_logits
    if (mine - theirs).abs().max() > 1e-3:
        raise RuntimeError("converted weights do not reproduce HF's logits; check convert_hf")
    ours.train()
    hf.train()
    for m in hf.model.pixel_level_module.encoder.modules():  # frozen BN, as our backbone
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    return ours, hf


def batches(size: int, batch: int, count: int, folder: Path) -> list[dict]:
    """`count` batches of LSJ examples (synthetic shapes) at crop `size`."""
    make_synthetic_dataset(str(folder), num_train=batch * count, num_val=0,
                           image_size=(size, size), seed=0)
    split = load_split(str(folder / "train"))
    lsj = LSJConfig(crop_size=size, min_scale=0.5, max_scale=1.5)
    rows = [example_at(split, p, lsj=lsj, seed=0) for p in range(batch * count)]
    out = []
    for i in range(count):
        chunk = rows[i * batch:(i + 1) * batch]
        labels = np.empty(batch, dtype=object)
        labels[:] = [r["labels"] for r in chunk]
        out.append({"image": np.stack([r["image"] for r in chunk]),
                    "segments": np.stack([r["segments"] for r in chunk]), "labels": labels,
                    "sample_seed": np.array([r["sample_seed"] for r in chunk])})
    return out


def step_ours(net, criterion, optimizer, batch) -> tuple[float, float, float]:
    """One training step; returns (loss, seconds forward + loss, seconds backward + update)."""
    images, targets = to_model_inputs(batch)
    num_masks = sum(len(t["labels"]) for t in targets)
    start = time.perf_counter()
    outputs = net(images)
    losses = criterion(outputs, targets, num_masks=num_masks,
                       generators=seeded_generators(seeds=batch["sample_seed"].tolist()))
    total = criterion.total_loss(losses)
    middle = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    clip_grad_norm(net.parameters(), max_norm=0.01)
    optimizer.step()
    return float(total.detach()), middle - start, time.perf_counter() - middle


def step_hf(net, optimizer, batch, mean, std) -> tuple[float, float, float]:
    """The same step with HF's model and built-in loss."""
    images, targets = to_model_inputs(batch)
    size = images.shape[-1]
    pixel_values = (images - mean) / std
    masks = [t["masks"][:, :size, :size].float() for t in targets]
    start = time.perf_counter()
    out = net(pixel_values=pixel_values, mask_labels=masks,
              class_labels=[t["labels"] for t in targets])
    middle = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    clip_grad_norm(net.parameters(), max_norm=0.01)
    optimizer.step()
    return float(out.loss.detach()), middle - start, time.perf_counter() - middle


def speed(args) -> None:
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            ours, hf = twin_models(args.preset, tmp / f"hf{size}")
            # Ours: as the training loop sets it up on the CPU; HF: the Trainer's default
            # optimiser (fused AdamW).
            accelerate_cpu_training(ours)
            criterion = build_criterion(LossConfig(), num_classes=ours.config.num_classes,
                                        point_selector=select_uncertain_points)
            opt_ours = build_optimizer(ours, lr=1e-4, adamw=ChannelsLastAdamW)
            opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], 1e-4,
                                       weight_decay=0.05, fused=True)
            data = batches(size, args.batch, args.repeats + 1, tmp / f"data{size}")
            mean, std = ours.pixel_mean, ours.pixel_std
            times = {"ours": [], "hf": []}
            first = {}
            for i, batch in enumerate(data):
                for kind in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
                    loss, forward, backward = (
                        step_ours(ours, criterion, opt_ours, batch) if kind == "ours"
                        else step_hf(hf, opt_hf, batch, mean, std))
                    if i == 0:
                        first[kind] = loss  # warm-up step, not timed
                    else:
                        times[kind].append((forward, backward))
            med = {k: [statistics.median(t[j] for t in v) for j in (0, 1)]
                   for k, v in times.items()}
            ips = {k: args.batch / statistics.median(f + b for f, b in v)
                   for k, v in times.items()}
            rows.append((args.preset, size, args.batch, ips["ours"], ips["hf"],
                         ips["ours"] / ips["hf"], med["hf"][0] / med["ours"][0],
                         med["hf"][1] / med["ours"][1], first["ours"], first["hf"]))
            print(f"{args.preset} {size}px x{args.batch}: ours {ips['ours']:.2f} img/s, HF "
                  f"{ips['hf']:.2f} img/s (first-step loss {first['ours']:.2f} vs "
                  f"{first['hf']:.2f})", flush=True)
    print(f"\nTraining step (forward + loss + backward + clip + AdamW), CPU, "
          f"{torch.get_num_threads()} thread(s), float32; speed-ups are HF time / ours\n")
    print("| preset | crop | batch | ours img/s | HF img/s | ours / HF | forward+loss | "
          "backward+update | first loss ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, s, b, o, h, r, fw, bw, lo, lh in rows:
        print(f"| {p} | {s} | {b} | {o:.2f} | {h:.2f} | {r:.2f}x | {fw:.2f}x | {bw:.2f}x | "
              f"{lo:.1f} / {lh:.1f} |")


# ---------------------------------------------------------------------------------- quality

def quality(args) -> None:
    import ray

    from pipeline.train.job import run_finetune

    work = Path(args.workdir or tempfile.mkdtemp(prefix="panoray-quality-"))
    data = work / "synth"
    if not (data / "val" / "panoptic.json").exists():
        make_synthetic_dataset(str(data), num_train=args.num_train, num_val=args.num_val,
                               image_size=(args.image_size, args.image_size), seed=0)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    start = time.monotonic()
    result = run_finetune(
        train=str(data / "train"), val=str(data / "val"), storage=str(work / "runs"),
        name=args.name, model="tiny", steps=args.steps, batch_size=args.batch,
        num_workers=2, lr=args.lr, backbone_lr_multiplier=1.0, warmup_steps=20,
        crop_size=args.crop, min_scale=args.min_scale, max_scale=args.max_scale,
        checkpoint_every=args.eval_every, eval_every=args.eval_every, num_to_keep=1,
        seed=0, loss=LossConfig(num_points=args.points))
    minutes = (time.monotonic() - start) / 60
    lines = [f"`tiny` from scratch, 2 CPU workers x batch {args.batch}, crop {args.crop}, "
             f"lr {args.lr}, synthetic {args.image_size}px: {args.num_train} train / "
             f"{args.num_val} val images; {minutes:.1f} min in all (includes startup)", "",
             "| step | minutes | loss | PQ | PQ things | PQ stuff |", "|---|---|---|---|---|---|"]
    for h in result["history"]:
        if "pq" in h:
            lines.append(f"| {h['step']} | {h.get('elapsed_s', 0) / 60:.1f} | {h['loss']:.2f} | "
                         f"{100 * h['pq']:.1f} | {100 * h['pq_things']:.1f} | "
                         f"{100 * h['pq_stuff']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(f"final bundle: {result['final_bundle']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--quality", action="store_true", help="run the PQ-curve training run")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--min-scale", type=float, default=0.5)
    parser.add_argument("--max-scale", type=float, default=1.5)
    parser.add_argument("--points", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--name", default="quality")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
