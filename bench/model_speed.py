"""Benchmark: panoray's Mask2Former vs Hugging Face's, same weights, CPU inference.

Builds a Hugging Face `Mask2FormerForUniversalSegmentation` with the `r50-coco-panoptic`
architecture (ResNet-50, 133 classes, 100 queries, 6 + 9 layers) and seeded random weights,
converts it with `model.convert_hf`, checks that both give the same class and mask logits for
every decoder layer, then reports, for 384^2 and 512^2 inputs at batch 1 and 4:

- throughput: images / s from the fastest of `--repeats` timed forwards (after one warm-up;
  other load on the machine only ever adds time), ours and HF's interleaved so that load on
  a shared machine hits both alike;
  `torch.inference_mode()`, float32, torch's default thread count;
- peak memory: the rise of the process's peak resident set (VmHWM - VmRSS before) over the
  first forward in a fresh process that has just loaded the model, i.e. activations,
  workspaces and allocator growth, not the weights.

Inputs: ours gets RGB 0..255, HF the ImageNet-normalised tensor (as its image processor gives).
Each runs its inference forward: ours `net(images, aux_outputs=False)` (what `PanopticPredictor`
runs: the earlier layers' masks only at attention resolution), HF's `model(pixel_values=...)`
(which always makes every layer's full-resolution masks). The check covers both of ours: all
10 predictions of the full forward, and the inference forward's last one, against HF's.
The compiled deformable-attention op (model._C) must be built: `make setup`.

Run: ``python bench/model_speed.py [--repeats N] [--sizes 384 512] [--batches 1 4] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model.config import coco_panoptic_categories
from model.convert_hf import convert_hf
from model.mask2former import build_model
from model.ops import has_compiled_op

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def make_hf_checkpoint(folder: Path) -> None:
    """A randomly initialised HF Mask2Former-R50 (COCO panoptic head) saved to `folder`."""
    import transformers

    torch.manual_seed(0)
    coco = coco_panoptic_categories()
    backbone = transformers.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                                         layer_type="bottleneck", out_features=STAGES)
    cfg = transformers.Mask2FormerConfig(backbone_config=backbone, num_labels=len(coco),
                                         id2label={i: c.name for i, c in enumerate(coco)})
    hf = transformers.Mask2FormerForUniversalSegmentation(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BN statistics and norms, so the check means something
        for m in hf.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 0.6, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    hf.save_pretrained(folder)


def load(kind: str, folder: Path):
    """(model, input transform) for "ours" or "hf"."""
    if kind == "ours":
        cfg, state_dict = convert_hf(folder)
        net = build_model(cfg)
        net.load_state_dict(state_dict)
        return net.eval(), lambda x: {"images": x, "aux_outputs": False}
    import transformers

    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return hf, lambda x: {"pixel_values": (x - mean) / std}


def check_equal(ours, ours_in, hf, hf_in) -> float:
    """Largest difference over every layer's class and mask logits, and the inference
    forward's (raises if > 1e-3)."""
    x = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(2)) * 255
    with torch.inference_mode():
        a = ours(**{**ours_in(x), "aux_outputs": True})
        fast = ours(**ours_in(x))
        b = hf(**hf_in(x), output_auxiliary_logits=True)
    mine = [(p["pred_logits"], p["pred_masks"]) for p in a["aux_outputs"]]
    mine.append((a["pred_logits"], a["pred_masks"]))
    theirs = [(p["class_queries_logits"], p["masks_queries_logits"]) for p in b.auxiliary_logits]
    theirs.append((b.class_queries_logits, b.masks_queries_logits))
    assert len(mine) == len(theirs) == 10
    mine.append((fast["pred_logits"], fast["pred_masks"]))
    theirs.append(theirs[-1])
    worst = max(max((c - rc).abs().max().item(), (m - rm).abs().max().item())
                for (c, m), (rc, rm) in zip(mine, theirs))
    if worst > 1e-3:
        raise SystemExit(f"outputs differ by {worst:.2e}; not benchmarking different models")
    return worst


def time_both(models: dict, size: int, batch: int, repeats: int) -> dict[str, float]:
    """Fastest seconds per forward for each model, runs interleaved."""
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3)) * 255
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for net, to_input in models.values():
            net(**to_input(x))  # warm-up: oneDNN primitives, caches
        for _ in range(repeats):
            for name, (net, to_input) in models.items():
                inputs = to_input(x)
                start = time.perf_counter()
                net(**inputs)
                times[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(kind: str, folder: Path, size: int, batch: int) -> None:
    """In a fresh process: print the peak RSS rise (MiB) over the first forward."""
    net, to_input = load(kind, folder)
    inputs = to_input(torch.rand(batch, 3, size, size) * 255)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    with torch.inference_mode():
        net(**inputs)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def peak_memory(kind: str, folder: Path, size: int, batch: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(folder),
                          str(size), str(batch), "--threads", str(torch.get_num_threads())],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, i.e. all cores); on a machine "
                             "shared with other jobs, 1 thread gives steadier ratios")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        kind, folder, size, batch = args.memory_child
        peak_memory_child(kind, Path(folder), int(size), int(batch))
        return
    if not has_compiled_op():
        raise SystemExit("model._C is not built; run `make setup` (the benchmark must use the "
                         "compiled deformable attention op)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_hf_checkpoint(folder)
        models = {"ours": load("ours", folder), "hf": load("hf", folder)}
        worst = check_equal(*models["ours"], *models["hf"])
        print(f"outputs agree: max |ours - hf| over all 10 predictions and the inference "
              f"forward = {worst:.1e}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
              f"best of {args.repeats}; peak = rise of VmHWM over a fresh process's first "
              "forward\n")
        header = ("| input | batch | ours img/s | HF img/s | speed-up | ours peak MiB "
                  "| HF peak MiB | memory ratio |")
        print(header)
        print("|" + "---|" * 8)
        for size in args.sizes:
            for batch in args.batches:
                t = time_both(models, size, batch, args.repeats)
                mem = {k: peak_memory(k, folder, size, batch) for k in models}
                print(f"| {size}x{size} | {batch} | {batch / t['ours']:.2f} | "
                      f"{batch / t['hf']:.2f} | {t['hf'] / t['ours']:.2f}x | "
                      f"{mem['ours']:.0f} | {mem['hf']:.0f} | {mem['ours'] / mem['hf']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
