"""PQ of a model being trained on a COCO panoptic validation split, in memory.

The training loop's rank 0 calls :func:`evaluate_pq` every `eval_every` steps: each val image is
segmented by `PanopticPredictor` (which resizes it to the model's test size and answers at the
image's size), exactly as the segment job would, and scored with `pipeline.evaluate`'s
per-image PQ (panopticapi's semantics); nothing is written.
"""

from __future__ import annotations

from typing import Any

import torch

from model.storage import join
from pipeline.coco.panoptic_io import decode_panoptic_png, load_coco_panoptic, read_bytes
from pipeline.evaluate import PQStat, pq_image_stat, pq_results
from pipeline.segment.decode import decode_image
from pipeline.segment.predictor import PanopticPredictor
from pipeline.train.data import split_layout

# The reference trains on 1024 crops and tests with the shorter side at 800 (longer <= 1333).
REFERENCE_CROP, REFERENCE_MIN_SIZE, REFERENCE_MAX_SIZE = 1024, 800, 1333


def test_size_for_crop(crop_size: int) -> tuple[int, int]:
    """(min_size, max_size) of the test resize for a model trained on `crop_size` crops, in the
    reference's proportions (1024 -> 800, 1333)."""
    return (round(crop_size * REFERENCE_MIN_SIZE / REFERENCE_CROP),
            round(crop_size * REFERENCE_MAX_SIZE / REFERENCE_CROP))


test_size_for_crop.__test__ = False  # not a pytest test, despite the name


def evaluate_pq(net: torch.nn.Module, val_uri: str, *, device: torch.device | str = "cpu",
                batch_size: int = 4, limit: int | None = None) -> dict[str, Any]:
    """PQ of `net` on the split at `val_uri` (a folder or its JSON's URI, as for training).

    Predicted category ids are the model config's; they must be the split's. Returns
    pipeline.evaluate's result dict ({"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, ...}).
    Leaves `net` in eval mode.
    """
    json_uri, image_dir, png_dir = split_layout(val_uri)
    gt = load_coco_panoptic(json_uri)
    model_ids = {c.id for c in net.config.categories}
    if not model_ids <= set(gt.categories):
        raise ValueError(f"the model predicts category ids {sorted(model_ids - set(gt.categories))}"
                         f" that the val split does not define; use a val split of the same "
                         "label space")
    predictor = PanopticPredictor(model=net, device=str(device), batch_size=batch_size)
    annotations = list(gt.annotations.values())[:limit]
    stat = PQStat()
    for start in range(0, len(annotations), batch_size):
        chunk = annotations[start:start + batch_size]
        images, gt_maps = [], []
        for ann in chunk:
            info = gt.images[ann["image_id"]]
            data = read_bytes(join(image_dir, info["file_name"]))
            gt_map = decode_panoptic_png(read_bytes(join(png_dir, ann["file_name"])))
            image = decode_image(data).array
            if image.shape[:2] != gt_map.shape:  # annotated on the stored pixels (as in training)
                image = decode_image(data, apply_exif=False).array
            images.append(image)
            gt_maps.append(gt_map)
        # The predictor resizes to the test size and answers at each photo's size.
        for ann, gt_map, (pred_map, segments) in zip(chunk, gt_maps, predictor.predict(images)):
            stat += pq_image_stat(gt_segments=ann["segments_info"], gt_ids=gt_map,
                                  pred_segments=segments, pred_ids=pred_map,
                                  categories=gt.categories, image_id=ann["image_id"])
    return pq_results(stat, gt.categories)
