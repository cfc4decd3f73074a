"""`make gpu-check`: everything about the GPU path that needs a real GPU, in one script.

Runs on a bare GPU machine with Python 3.12+ and PyTorch 2.11+ preinstalled and no network. The
few pure-model packages it may lack travel as wheels made here (`make gpu-wheels` fills
gpu-wheels/; the script installs from there what is missing and says which). Ray is not
needed: it checks the model and the op, not the cluster.

Steps, each with its expected time on one H200 (16 cores), 8 minutes in all:

    step            expected   what
    build             120 s    model._C built with nvcc there, for that GPU's architecture only
    op-tests           60 s    the CUDA op tests: float32 / float16 / bfloat16 against the float64
                               reference, gradcheck, im2col_step; the CUDA post-processing test;
                               the fake-CUDA tests' expectations on real CUDA tensors
    model-parity       40 s    tiny and r50 on the GPU against the CPU (float32), bf16 autocast
    amp-train          40 s    8 AMP steps (bf16, and float16 with a GradScaler): finite, falling
    op-bench           60 s    the op vs the grid_sample reference (and torch-ms-deform-attn when
                               importable): fwd, fwd+bwd at the 512 and 1024 encoder shapes
    model-bench       160 s    r50 at 800 x 1333: float32 / bf16, batch 1 / 8, eager / compiled;
                               images/s and peak memory

    python bench/gpu_check.py [--report gpu-check-report.md] [--skip-build] [--quick]

Writes one Markdown report. Without a GPU it says so in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
WHEELS = ROOT / "gpu-wheels"
NEEDED = {"numpy": "numpy", "safetensors": "safetensors", "yaml": "pyyaml", "scipy": "scipy",
          "pytest": "pytest", "fsspec": "fsspec", "PIL": "pillow"}
BUDGET_S = {"build": 120, "op-tests": 60, "model-parity": 40, "amp-train": 40,
            "op-bench": 60, "model-bench": 160}


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []
        self.failed: list[str] = []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    @contextlib.contextmanager
    def step(self, name: str):
        started = time.monotonic()
        self.add(f"\n## {name} (expected {BUDGET_S[name]} s)\n")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a failed step is reported; the others still run
            self.failed.append(name)
            self.add(f"**FAILED**: {type(e).__name__}: {e}")
        self.add(f"\n_{name}: {time.monotonic() - started:.0f} s_")
        self.write()

    def write(self) -> None:
        self.path.write_text("\n".join(self.lines) + "\n")


def install_missing(report: Report) -> None:
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    if not WHEELS.is_dir():
        raise SystemExit(f"gpu-check: missing {', '.join(missing)} and no gpu-wheels/ folder; "
                         "run `make gpu-wheels` on a machine with network and bring it along")
    report.add(f"installing from gpu-wheels/: {', '.join(missing)}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                    str(WHEELS), *missing], check=True)


def build(report: Report) -> None:
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, PANORAY_CUDA="1", PANORAY_CUDA_ARCH=f"{major}.{minor}",
               MAX_JOBS=str(os.cpu_count() or 4))
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the op did not build:\n{run.stderr[-4000:]}")
    report.add(f"built model._C for sm_{major}{minor} with nvcc")


def op_tests(report: Report) -> None:
    tests = ["tests/model/test_ops.py", "tests/model/test_postprocess.py"]
    if (ROOT / "tests/model/test_fake_cuda.py").exists():
        tests.append("tests/model/test_fake_cuda.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-k", "cuda", "--override-ini", "addopts=", *tests],
                         cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PANORAY_REAL_CUDA="1"))
    tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]
    report.add(f"pytest {' '.join(tests)} -k cuda: {tail}")
    if run.returncode != 0:
        report.add("```\n" + run.stdout[-4000:] + "\n```")
        raise RuntimeError("CUDA tests failed")


def _images(batch: int, height: int, width: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    return (torch.rand(batch, 3, height, width, generator=gen) * 255).to(device)


def model_parity(report: Report) -> None:
    import torch

    from model.mask2former import build_model

    report.add("| model | check | max abs diff | rel. to output scale |\n|---|---|---|---|")
    for preset, (h, w) in (("tiny", (256, 320)), ("r50-coco-panoptic", (384, 512))):
        torch.manual_seed(0)
        net = build_model(preset).eval()
        images = _images(2, h, w, "cpu")
        with torch.inference_mode():
            cpu = net(images, aux_outputs=False)
            gpu_net = net.cuda()
            gpu = gpu_net(images.cuda(), aux_outputs=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = gpu_net(images.cuda(), aux_outputs=False)
        for key in ("pred_logits", "pred_masks"):
            scale = cpu[key].abs().max().item() or 1.0
            d32 = (gpu[key].float().cpu() - cpu[key]).abs().max().item()
            d16 = (bf16[key].float().cpu() - cpu[key]).abs().max().item()
            report.add(f"| {preset} | {key} GPU fp32 vs CPU | {d32:.2e} | {d32 / scale:.2e} |")
            report.add(f"| {preset} | {key} GPU bf16 vs CPU | {d16:.2e} | {d16 / scale:.2e} |")
            if d32 / scale > 1e-3:
                raise RuntimeError(f"{preset} {key}: GPU float32 differs from the CPU by "
                                   f"{d32 / scale:.1e} of the output scale")
        del gpu_net
        torch.cuda.empty_cache()
    # The segment job's predictor (pinned staging, side-stream copies, device post-processing)
    # on the GPU against the CPU, float32 both, on real photos.
    import numpy as np
    from PIL import Image

    from pipeline.segment.predictor import PanopticPredictor

    torch.manual_seed(0)
    net = build_model("tiny").eval()
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in
              sorted((ROOT / "tests/data/coco-panoptic-sample").rglob("*.jpg"))]
    cpu = PanopticPredictor(model=net, device="cpu", batch_size=2).predict(photos)
    gpu = PanopticPredictor(model=net, device="cuda", batch_size=2, amp=False).predict(photos)
    # the same input path on both (resize_on_device, which the GPU runs by default)
    same_path = PanopticPredictor(model=net, device="cpu", batch_size=2,
                                  device_resize=True).predict(photos)
    exact = [float((a[0] == b[0]).mean()) for a, b in zip(same_path, gpu)]
    report.add(f"\npredictor on {len(photos)} COCO photos, GPU (device resize) vs CPU with the "
               f"same device resize: id maps agree on {min(exact):.4%} of pixels or more")
    agree = [float((a[0] == b[0]).mean()) for a, b in zip(cpu, gpu)]
    report.add(f"predictor, GPU vs CPU (Pillow resize, float32): id maps agree "
               f"on {min(agree):.4%} of pixels or more")
    if min(agree) < 0.99:
        raise RuntimeError(f"the GPU predictor's id maps agree with the CPU's on only "
                           f"{min(agree):.2%} of pixels")


def amp_train(report: Report, steps: int = 8) -> None:
    import torch

    from model.criterion import LossConfig, build_criterion
    from model.mask2former import build_model
    from model.optim import build_optimizer

    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        net = build_model("tiny").cuda().train()
        criterion = build_criterion(LossConfig(num_points=1024),
                                    num_classes=net.config.num_classes).cuda()
        optimizer = build_optimizer(net, lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        images = _images(2, 256, 256, "cuda")
        masks = torch.zeros(2, 3, 256, 256, dtype=torch.bool, device="cuda")
        for i in range(3):
            masks[:, i, 40 * i: 40 * i + 100, 30 + 50 * i: 150 + 50 * i] = True
        targets = [{"labels": torch.tensor([1, 5, 7], device="cuda"), "masks": masks[b]}
                   for b in range(2)]
        losses = []
        for _ in range(steps):
            with torch.autocast("cuda", dtype=dtype):
                out = net(images)
                terms = criterion(out, targets, num_masks=6.0)
            total = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(total))
        report.add(f"{str(dtype).split('.')[-1]}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
                   f"over {steps} steps")
        if not all(map(lambda v: v == v and abs(v) != float("inf"), losses)):
            raise RuntimeError(f"{dtype}: a loss is not finite: {losses}")
        if not losses[-1] < losses[0]:
            raise RuntimeError(f"{dtype}: the loss did not fall: {losses}")


def _cuda_median(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_bench(report: Report, repeats: int) -> None:
    import torch
    from op import INPUT_SIZES, encoder_inputs, ops, run_once

    table = ops()
    report.add("| input | pass | " + " | ".join(f"{n} (ms)" for n in table) +
               " | reference / panoray |\n|---|---|" + "---|" * (len(table) + 1))
    for size in INPUT_SIZES:
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                  for k, v in encoder_inputs(size).items()}
        for backward in (False, True):
            times = {name: _cuda_median(
                lambda op=op, inputs=inputs, backward=backward: run_once(
                    op, inputs, backward=backward), repeats) for name, op in table.items()}
            cells = " | ".join(f"{times[n] * 1e3:.2f}" for n in table)
            report.add(f"| {size} | {'fwd+bwd' if backward else 'fwd'} | {cells} | "
                       f"{times['reference'] / times['panoray']:.1f}x |")


def model_bench(report: Report, repeats: int, quick: bool) -> None:
    import torch

    from model.mask2former import build_model

    torch.manual_seed(0)
    net = build_model("r50-coco-panoptic").cuda().eval()
    compiled = torch.compile(net)
    report.add("r50 at 800 x 1333, random weights\n\n| precision | batch | mode | images/s | "
               "peak memory (GiB) |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (1, 8):
            for mode, fn in (("eager", net), ("compiled", compiled)):
                if quick and (mode == "compiled" or batch == 8):
                    continue
                images = _images(batch, 800, 1333, "cuda")
                torch.cuda.reset_peak_memory_stats()

                def forward(fn=fn, images=images, dtype=dtype):
                    with torch.inference_mode(), torch.autocast(
                            "cuda", dtype=dtype, enabled=dtype != torch.float32):
                        fn(images, aux_outputs=False)

                seconds = _cuda_median(forward, repeats)
                peak = torch.cuda.max_memory_allocated() / 2**30
                report.add(f"| {str(dtype).split('.')[-1]} | {batch} | {mode} | "
                           f"{batch / seconds:.1f} | {peak:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default="gpu-check-report.md")
    ap.add_argument("--skip-build", action="store_true", help="model._C is already built")
    ap.add_argument("--quick", action="store_true", help="eager batch-1 model benchmarks only")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu-check: PyTorch is not installed here; it must be preinstalled")
        return 2
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}); run "
              "`make gpu-check` on a GPU machine")
        return 2
    report = Report(Path(args.report))
    report.add("# gpu-check report\n")
    arch = "".join(map(str, torch.cuda.get_device_capability()))
    report.add(f"{torch.cuda.get_device_name()} (sm_{arch}), torch {torch.__version__}, "
               f"CUDA {torch.version.cuda}, Python {platform.python_version()}, "
               f"{os.cpu_count()} CPUs")
    install_missing(report)
    if not args.skip_build:
        with report.step("build"):
            build(report)
    with report.step("op-tests"):
        op_tests(report)
    with report.step("model-parity"):
        model_parity(report)
    with report.step("amp-train"):
        amp_train(report)
    with contextlib.redirect_stderr(io.StringIO()), report.step("op-bench"):
        op_bench(report, args.repeats)
    with report.step("model-bench"):
        model_bench(report, args.repeats, args.quick)
    report.add(f"\n**{'FAILED: ' + ', '.join(report.failed) if report.failed else 'all passed'}**")
    report.write()
    print(f"report: {report.path}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
