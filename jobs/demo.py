"""`panoray demo` (the README's first command, via `make demo`): the whole product in minutes.

1. writes a synthetic panoptic dataset and packs its val images into WebDataset tar shards
   (the "archive");
2. gets a model: the small bundle shipped in ``jobs/demo_model/`` (made by `panoray finetune`;
   the exact command is in its README), or, with ``--train-steps N``, trains ``tiny`` itself;
3. segments the archive on a local Ray into Parquet (one row per image);
4. evaluates PQ against the synthetic ground truth;
5. draws overlays and a contact sheet, writes the HTML report (`panoray report`), and prints
   where everything is.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from model.storage import get_filesystem, join
from pipeline.segment.tar import tar_bytes

log = logging.getLogger(__name__)

SHIPPED_MODEL = Path(__file__).resolve().parent / "demo_model"
RECIPE = SHIPPED_MODEL / "finetune.yaml"  # the finetune spec that made the shipped bundle


def pack_archive(images_uri: str, archive_uri: str, *, per_shard: int = 8) -> int:
    """Pack the images under `images_uri` into tar shards at `archive_uri`; returns the count."""
    fs, root = get_filesystem(images_uri)
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".jpg"))
    out_fs, out_root = get_filesystem(archive_uri)
    out_fs.makedirs(out_root, exist_ok=True)
    for start in range(0, len(names), per_shard):
        members = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in names[start:start + per_shard]}
        out_fs.pipe_file(f"{out_root.rstrip('/')}/shard-{start // per_shard:05d}.tar",
                         tar_bytes(members))
    return len(names)


def run_demo(*, out: str = "demo-out", train_steps: int | None = None, num_val: int = 48,
             seed: int = 7, model: str | None = None, progress: bool = True) -> dict:
    """Run the demo into `out`; returns the paths and numbers it printed.

    `model` replaces the shipped bundle (a bundle over the synthetic label space); `progress`:
    Ray Data's progress bars (the log lines of each stage stay)."""
    from jobs.spec import load_spec
    from pipeline.coco.synth import make_synthetic_dataset
    from pipeline.segment.job import run_segment
    from pipeline.segment.output import evaluate_output, results_json
    from pipeline.segment.report import prepare_report, write_report
    from pipeline.segment.show import show

    t0 = time.time()
    data, archive = join(out, "synthetic"), join(out, "archive")
    segments, overlays, report = join(out, "segments"), join(out, "overlays"), join(out, "report")
    print(f"[1/5] synthetic dataset -> {data}")
    # 96 px: the size the shipped model was trained at (jobs/demo_model/README.md)
    make_synthetic_dataset(data, num_train=(1000 if train_steps else 0), num_val=num_val,
                           image_size=(96, 96), seed=seed)
    n = pack_archive(join(data, "val", "images"), archive)
    print(f"      {n} images packed into tar shards under {archive}")

    if train_steps:
        from pipeline.train.job import run_finetune

        print(f"[2/5] training tiny for {train_steps} steps (panoray finetune)")
        # the shipped bundle's recipe, for train_steps steps, on this demo's own paths
        recipe = load_spec(RECIPE).args
        result = run_finetune(params=recipe, train=join(data, "train"), val=None,
                              storage=join(out, "runs"), steps=train_steps, eval_every=0,
                              checkpoint_every=max(train_steps // 2, 1), progress=progress)
        model = result["final_bundle"]
    elif model is None:
        model = str(SHIPPED_MODEL)
        print(f"[2/5] model: the shipped bundle {model} (see its README for how it was made)")
    else:
        print(f"[2/5] model: {model}")

    print(f"[3/5] segmenting {archive} -> {segments} on a local Ray")
    summary = run_segment(src=archive, dst=segments, model=model, batch_size=4,
                          progress=progress)
    print(summary.render())

    print("[4/5] PQ against the synthetic ground truth")
    gt = join(data, "val", "panoptic.json")
    evaluation = evaluate_output(segments, gt)
    print(evaluation.render())
    fs, path = get_filesystem(join(out, "pq.json"))
    fs.pipe_file(path, results_json(evaluation).encode())

    print(f"[5/5] overlays -> {overlays}, report -> {report}")
    shown = show(segments, overlays, model=model, limit=16, progress=False)
    page = write_report(prepare_report(segments, model=model, gt=gt, progress=False), report,
                        progress=False)
    took = time.time() - t0
    pq = evaluation.results["All"]["pq"]
    print(f"\nDone in {took:.0f} s. PQ {pq:.3f} on {n} images.")
    print(f"  archive:   {archive}\n  model:     {model}\n  output:    {segments}/data/*.parquet"
          f"\n  PQ:        {join(out, 'pq.json')}\n  overlays:  {overlays} "
          f"(contact sheet: {shown.contact_sheet})\n  report:    {page.report} (open it in a "
          "browser)")
    return {"pq": pq, "seconds": took, "images": n, "segments": segments,
            "contact_sheet": shown.contact_sheet, "report": page.report}
