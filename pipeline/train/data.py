"""Training data: a COCO panoptic split at any URI -> a Ray Data stream of LSJ-augmented examples.

A split is a folder (local, ``s3://``, ...) holding one COCO panoptic JSON, the images and the
panoptic PNGs::

    split/panoptic.json       (or the folder's only *.json; or pass the JSON's URI itself)
    split/images/<file_name>  the JSON's images[].file_name
    split/panoptic/<png>      the JSON's annotations[].file_name (or a folder named like the
                              JSON without ".json", panopticapi's default)

Label space: contiguous class index k <-> the k-th category of the JSON sorted by category id
(unless the caller passes another order, e.g. a bundle's own for the same categories). Crowd
segments (``iscrowd == 1``) get no target, as in the reference mapper; their pixels count as
background to no query. Segments cropped away entirely are dropped too.

Augmentation is the reference large-scale jitter (Mask2Former's
``coco_panoptic_new_baseline_dataset_mapper``): horizontal flip (p = 0.5), resize keeping the
aspect ratio so the image fits a square of side ``crop_size * s``, s ~ U(min_scale, max_scale),
then a fixed ``crop_size`` crop at a random offset, padded (image 128, no segment) where the
image is smaller. Unlike detectron2's FixedSizeCrop the two crop offsets are drawn
independently.

Order and randomness: the stream is a sequence of global positions p = 0, 1, 2, ...; position p
is image ``perm(seed, epoch)[p % N]`` of epoch ``p // N``, and its augmentation (and the point
sampling seed handed to the loss) are functions of (seed, epoch, image id) only, so an example
is the same whichever worker or task produces it. Each row::

    image        (3, S, S) uint8 RGB
    segments     (S, S) uint16: 0 no target, k >= 1 the k-th entry of `labels`
    labels       (N,) int64 contiguous class indices, one per segment
    image_id     str; position, epoch, sample_seed int64

:func:`to_model_inputs` turns a batch of rows into the model's images and the criterion's
targets (per-segment binary masks).
"""

from __future__ import annotations

import functools
import json
import posixpath
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.config import Category
from model.storage import get_filesystem, join, redact
from pipeline.coco.panoptic_io import decode_panoptic_png, index_coco_panoptic, read_bytes
from pipeline.segment.decode import decode_image

IMAGE_PAD_VALUE = 128  # grey, the reference's FixedSizeCrop pad value
ROWS_PER_TASK = 4  # examples made per Ray Data batch: small, so the stream stays smooth


@dataclass(frozen=True)
class LSJConfig:
    """Large-scale jitter settings (reference: 1024 crop, scale 0.1 - 2.0, flip on)."""

    crop_size: int = 1024  # side S of the square training crop, pixels
    min_scale: float = 0.1  # smallest resize, as a share of the crop size
    max_scale: float = 2.0  # largest resize
    flip: bool = True  # random horizontal flip with p = 0.5

    def __post_init__(self) -> None:
        if self.crop_size < 32:
            raise ValueError(f"crop_size must be at least 32 pixels, got {self.crop_size}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {self.min_scale} and "
                             f"{self.max_scale}")


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where its files are and its segments (crowd ones as label -1)."""

    image_id: str
    image_uri: str
    png_uri: str
    height: int
    width: int
    segment_ids: tuple[int, ...]
    labels: tuple[int, ...]  # contiguous class index per segment; -1 for crowd (no target)


@dataclass(frozen=True)
class PanopticSplit:
    """A COCO panoptic split read from its JSON: label space and image records."""

    uri: str
    categories: tuple[Category, ...]  # class index k <-> categories[k]
    records: tuple[ImageRecord, ...]


def dataset_categories(doc: Mapping[str, Any]) -> tuple[Category, ...]:
    """The JSON's categories as model categories, sorted by category id."""
    cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
    return tuple(Category(id=int(c["id"]), name=str(c["name"]), isthing=bool(c["isthing"]),
                          color=tuple(int(v) for v in c.get("color", (128, 128, 128))))
                 for c in cats)


def load_split(uri: str, *, category_order: Sequence[int] | None = None) -> PanopticSplit:
    """Read a COCO panoptic split (a folder or its JSON's URI) at any URI.

    category_order: category ids in contiguous-index order; default sorted ids. It must list
    exactly the JSON's categories.
    """
    json_uri, image_dir, png_dir = split_layout(uri)
    doc = json.loads(read_bytes(json_uri))
    index = index_coco_panoptic(doc)
    categories = dataset_categories(doc)
    if category_order is not None:
        by_id = {c.id: c for c in categories}
        if sorted(category_order) != sorted(by_id):
            raise ValueError(f"category_order {list(category_order)} does not list the "
                             f"categories of {redact(json_uri)} ({sorted(by_id)}); pass the same "
                             "category ids in the order wanted")
        categories = tuple(by_id[i] for i in category_order)
    label_of = {c.id: k for k, c in enumerate(categories)}
    records = []
    for image_id, ann in index.annotations.items():
        image = index.images.get(image_id)
        if image is None:
            raise ValueError(f"{redact(json_uri)}: annotation for image {image_id!r} has no entry "
                             "in images[]; add it (file_name, height, width)")
        seg_ids, labels = [], []
        for seg in ann["segments_info"]:
            if seg["category_id"] not in label_of:
                raise ValueError(f"{redact(json_uri)}: image {image_id!r} has a segment of "
                                 f"category {seg['category_id']}, which categories[] does not "
                                 "list; add the category or fix the segment")
            seg_ids.append(int(seg["id"]))
            labels.append(-1 if seg.get("iscrowd", 0) else label_of[seg["category_id"]])
        records.append(ImageRecord(
            image_id=str(image_id), image_uri=join(image_dir, image["file_name"]),
            png_uri=join(png_dir, ann["file_name"]), height=int(image["height"]),
            width=int(image["width"]), segment_ids=tuple(seg_ids), labels=tuple(labels)))
    if not records:
        raise ValueError(f"{redact(json_uri)} has no annotated images; nothing to train on")
    return PanopticSplit(uri=uri, categories=categories, records=tuple(records))


def split_layout(uri: str) -> tuple[str, str, str]:
    """(json URI, image folder URI, PNG folder URI) of a split folder or JSON URI."""
    fs, path = get_filesystem(uri)
    clean_path = path.rstrip("/")
    if clean_path.endswith(".json"):
        json_path = clean_path
        root = posixpath.dirname(clean_path)
    else:
        root = clean_path
        if fs.exists(posixpath.join(root, "panoptic.json")):
            json_path = posixpath.join(root, "panoptic.json")
        else:
            found = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"{redact(uri)} should hold one COCO panoptic JSON (panoptic.json), found "
                    f"{len(found)}; pass the JSON's URI instead")
            json_path = found[0]
    png_path = json_path[: -len(".json")]
    if not fs.isdir(png_path):
        png_path = posixpath.join(root, "panoptic")
    image_path = posixpath.join(root, "images")
    for what, p in (("PNG", png_path), ("image", image_path)):
        if not fs.isdir(p):
            raise FileNotFoundError(f"no {what} folder at {redact(_with_scheme(uri, p))}; a split "
                                    "holds images/ and panoptic/ beside its JSON")
    return tuple(_with_scheme(uri, p) for p in (json_path, image_path, png_path))


def _with_scheme(uri: str, path: str) -> str:
    """`path` (inside `uri`'s filesystem) as a URI of the same scheme and endpoint."""
    if "://" not in uri or uri.startswith("file://"):
        return path
    scheme = uri.split("://", 1)[0]
    endpoint = uri.split("?", 1)[1] if "?" in uri else ""
    return f"{scheme}://{path}" + (f"?{endpoint}" if endpoint else "")


# ------------------------------------------------------------------------------- one example

def image_key(image_id: str) -> int:
    """A stable non-negative integer for an image id (the id itself when it is one)."""
    return int(image_id) if image_id.isdigit() else zlib.crc32(image_id.encode())


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The image order of one epoch: a permutation of range(num_images) fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def load_image_and_segments(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB and (H, W) uint16 segment index map (k >= 1: k-th non-crowd segment
    of the record in order; 0 void, crowd or unknown ids)."""
    png = decode_panoptic_png(read_bytes(record.png_uri))
    data = read_bytes(record.image_uri)
    rgb = decode_image(data).array
    if rgb.shape[:2] != png.shape:  # annotations made on the stored pixels, not the EXIF-upright
        rgb = decode_image(data, apply_exif=False).array
    if rgb.shape[:2] != png.shape:
        raise ValueError(f"image {record.image_id}: {redact(record.image_uri)} is "
                         f"{rgb.shape[1]}x{rgb.shape[0]} but its panoptic PNG is "
                         f"{png.shape[1]}x{png.shape[0]}; fix the dataset so both match")
    kept = [(sid, lab) for sid, lab in zip(record.segment_ids, record.labels) if lab >= 0]
    if not kept:
        return rgb, np.zeros(png.shape, dtype=np.uint16)
    if len(kept) >= 65535:
        raise ValueError(f"image {record.image_id} has {len(kept)} segments; at most 65534 fit")
    lut_ids = np.array([sid for sid, _ in kept], dtype=np.uint32)
    order = np.argsort(lut_ids)
    pos = np.searchsorted(lut_ids[order], png)
    pos = np.clip(pos, 0, len(kept) - 1)
    hit = lut_ids[order][pos] == png
    index_map = np.where(hit, order[pos] + 1, 0).astype(np.uint16)
    return rgb, index_map


def lsj_augment(rgb: np.ndarray, index_map: np.ndarray, *, lsj: LSJConfig,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flip, scale and crop/pad an image and its segment map together.

    rgb (H, W, 3) uint8, index_map (H, W) integer -> (S, S, 3) uint8 and (S, S) uint16.
    Draws from `rng` in a fixed order: flip, scale, crop offsets.
    """
    size = lsj.crop_size
    flip = bool(rng.random() < 0.5)
    scale = rng.uniform(lsj.min_scale, lsj.max_scale)
    offset_u = rng.random(2)
    if lsj.flip and flip:
        rgb, index_map = rgb[:, ::-1], index_map[:, ::-1]
    h, w = index_map.shape
    factor = min(size * scale / h, size * scale / w)
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    image = Image.fromarray(np.ascontiguousarray(rgb)).resize((new_w, new_h), Image.BILINEAR)
    seg = Image.fromarray(np.ascontiguousarray(index_map).astype(np.int32), mode="I").resize(
        (new_w, new_h), Image.NEAREST)
    top = round(max(new_h - size, 0) * offset_u[0])
    left = round(max(new_w - size, 0) * offset_u[1])
    box = (left, top, left + min(size, new_w), top + min(size, new_h))
    image_np = np.asarray(image.crop(box))
    seg_np = np.asarray(seg.crop(box)).astype(np.uint16)
    out_rgb = np.full((size, size, 3), IMAGE_PAD_VALUE, dtype=np.uint8)
    out_seg = np.zeros((size, size), dtype=np.uint16)
    out_rgb[: image_np.shape[0], : image_np.shape[1]] = image_np
    out_seg[: seg_np.shape[0], : seg_np.shape[1]] = seg_np
    return out_rgb, out_seg


def make_example(record: ImageRecord, *, lsj: LSJConfig, seed: int, epoch: int) -> dict[str, Any]:
    """The augmented example of `record` in `epoch`: a row as described in the module doc."""
    key = image_key(record.image_id)
    rng = np.random.default_rng([seed, epoch, key])
    rgb, index_map = load_image_and_segments(record)
    rgb, index_map = lsj_augment(rgb, index_map, lsj=lsj, rng=rng)
    labels = np.array([lab for lab in record.labels if lab >= 0], dtype=np.int64)
    present = np.unique(index_map)
    present = present[present > 0]
    # Renumber the segments still visible after the crop as 1..N, in their original order.
    remap = np.zeros(len(labels) + 1, dtype=np.uint16)
    remap[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    return {
        "image": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "segments": remap[index_map],
        "labels": labels[present.astype(np.int64) - 1],
        "image_id": record.image_id,
        "epoch": epoch,
        "sample_seed": int(np.random.default_rng([seed, epoch, key, 1]).integers(2**62)),
    }


def example_at(split: PanopticSplit, position: int, *, lsj: LSJConfig, seed: int) -> dict:
    """The example at global stream position `position` (see the module doc)."""
    n = len(split.records)
    epoch = position // n
    record = split.records[int(epoch_order(seed, epoch, n)[position % n])]
    return {**make_example(record, lsj=lsj, seed=seed, epoch=epoch), "position": position}


# ------------------------------------------------------------------------------- Ray Data

def _examples_batch(batch: dict[str, np.ndarray], *, split: PanopticSplit, lsj: LSJConfig,
                    seed: int, start: int) -> dict[str, Any]:
    rows = [example_at(split, start + int(i), lsj=lsj, seed=seed) for i in batch["id"]]
    labels = np.empty(len(rows), dtype=object)
    labels[:] = [r["labels"] for r in rows]
    return {
        "image": np.stack([r["image"] for r in rows]),
        "segments": np.stack([r["segments"] for r in rows]),
        "labels": labels,
        "image_id": np.array([r["image_id"] for r in rows], dtype=object),
        "position": np.array([r["position"] for r in rows], dtype=np.int64),
        "epoch": np.array([r["epoch"] for r in rows], dtype=np.int64),
        "sample_seed": np.array([r["sample_seed"] for r in rows], dtype=np.int64),
    }


def train_dataset(split: PanopticSplit, *, lsj: LSJConfig, seed: int, num_samples: int,
                  start: int = 0, cpus_per_task: float = 1.0):
    """A Ray Dataset of the examples at stream positions start .. start + num_samples - 1.

    Decoding and augmentation run as Ray Data CPU tasks (`cpus_per_task` each), a few
    examples per task. Row order follows position when the consumer preserves order.
    """
    import ray.data

    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return ray.data.range(num_samples).map_batches(
        _examples_batch, fn_kwargs={"split": split, "lsj": lsj, "seed": seed, "start": start},
        batch_size=ROWS_PER_TASK, batch_format="numpy", num_cpus=cpus_per_task)


# ------------------------------------------------------------------------------- to the model

def to_model_inputs(batch: Mapping[str, Any], *, size_divisibility: int = 32,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """A batch of rows -> (images (B, 3, S, S) float 0..255, targets for the criterion).

    Each target holds "labels" (N,) int64 and "masks" (N, S', S') bool, zero-padded to S' (S up
    to a multiple of `size_divisibility`), the extent the model's mask predictions cover.
    """
    images = torch.from_numpy(np.asarray(batch["image"], dtype=np.float32)).to(device)
    size = images.shape[-1]
    padded = -(-size // size_divisibility) * size_divisibility
    targets = []
    for seg, labels in zip(batch["segments"], batch["labels"]):
        seg_t = torch.as_tensor(np.asarray(seg).astype(np.int64), device=device)
        labels_t = torch.as_tensor(np.array(labels, dtype=np.int64), device=device)
        ids = torch.arange(1, len(labels_t) + 1, device=device)
        masks = torch.zeros((len(labels_t), padded, padded), dtype=torch.bool, device=device)
        masks[:, :size, :size] = seg_t[None] == ids[:, None, None]
        targets.append({"labels": labels_t, "masks": masks})
    return images, targets

