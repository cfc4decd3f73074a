"""Shared bits of the segment job tests: a tiny model bundle, inputs, reading the output."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from model.storage import get_filesystem
from pipeline.segment.tar import tar_bytes


def tiny_bundle(path: str) -> str:
    import torch

    from model.bundle import save_bundle
    from model.mask2former import build_model

    torch.manual_seed(0)
    save_bundle(build_model("tiny"), path)
    return path


def image_bytes(seed: int, *, size=(72, 56), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, names: list[str], *, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(image_bytes(seed + i))


def tar_shard(members: dict[str, bytes]) -> bytes:
    return tar_bytes(members)


def read_output(dst: str) -> pa.Table:
    """Every committed row under dst (read with pyarrow, as any user would)."""
    fs, path = get_filesystem(dst)
    files = sorted(p for p in fs.ls(f"{path.rstrip('/')}/data", detail=False)
                   if p.endswith(".parquet"))
    tables = [pq.read_table(fs.open(p)) for p in files]
    return pa.concat_tables(tables) if tables else pa.table({})


def commit_ground_truth_as_output(coco_sample: Path, out: str, *, image_id, image_uri):
    """A segment output at `out` (one shard "s") that predicts each COCO sample photo as its
    ground truth; `image_id(stem)` / `image_uri(stem)` name the rows. Returns the sample's
    categories file, its panoptic JSON (a dict), its categories by id and the rows written."""
    import json

    from pipeline.coco.panoptic_io import read_panoptic_png
    from pipeline.segment.commits import OutputStore
    from pipeline.segment.schema import encode_result, ok_row, to_table

    meta = json.loads((coco_sample / "panoptic_examples.json").read_text())
    cats_file = coco_sample / "panoptic_coco_categories.json"
    cats = {c["id"]: c for c in json.loads(cats_file.read_text())}
    rows = []
    for ann in meta["annotations"]:
        stem = ann["file_name"].rsplit(".", 1)[0]
        ids = read_panoptic_png(str(coco_sample / "panoptic" / ann["file_name"]))
        png, segments = encode_result(ids, [
            {"id": s["id"], "category_id": s["category_id"],
             "isthing": bool(cats[s["category_id"]]["isthing"]), "score": 1.0}
            for s in ann["segments_info"]])
        rows.append(ok_row(image_id=image_id(stem), image_uri=image_uri(stem), shard="s",
                           width=ids.shape[1], height=ids.shape[0], panoptic_png=png,
                           segments_info=segments, model_id="m@0"))
    OutputStore(out).commit_shard("s", to_table(rows))
    return cats_file, meta, cats, rows
