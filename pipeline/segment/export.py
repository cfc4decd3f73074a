"""`panoray export`: a segment output as files that other tools read.

From the ok rows of a segment output OUT (error rows are skipped and counted), at any URI DST:

- ``coco-panoptic``: ``DST/panoptic.json`` (COCO panoptic: ``images``, ``annotations`` with
  ``segments_info`` [id, category_id, iscrowd 0, area, bbox, score], ``categories``) and
  ``DST/panoptic/<name>.png``, the rows' own panoptic PNGs: what panopticapi's ``pq_compute``
  and detectron2's COCO panoptic loader read.
- ``coco-instances``: ``DST/instances.json`` (COCO instances: one annotation per segment of a
  thing class, its mask as compressed RLE, ``iscrowd`` 0, ``score``; ``categories``: the thing
  classes), what ``pycocotools.coco.COCO`` reads.
- ``semantic-png``: ``DST/SegmentationClass/<name>.png``, one single-channel PNG per image
  whose pixel value is a class index: 0 = void (unlabelled, "background"), k = the k-th class of
  the label space (label order, from 1). 8-bit palette PNGs (the palette holds the class colours,
  so viewers show colours and readers get indices) for up to 255 classes, 16-bit greyscale
  above. Beside them: ``classes.json`` (index, id, name, isthing, colour of every index),
  ``labelmap.txt`` (CVAT's "Segmentation mask" class table, ``name:r,g,b::`` per index),
  ``ImageSets/Segmentation/default.txt`` (the names) and ``images.jsonl`` (per file: image_id,
  image_uri, size).

``<name>`` is :func:`~pipeline.segment.output.image_file_stem` of the row's image_id: unique,
the same on every export, safe on any store. In the COCO JSONs an image's ``id`` is its
COCO-style number when its file is named by one (``000000139.jpg`` -> 139) and no other image
shares that name, so the export evaluates against COCO ground truth as it is; otherwise a
stable number >= 2**40 from a hash of the image_id. Each image entry also carries
``panoray_image_id`` and ``image_uri``. The label space comes from a model bundle's config.json
or a categories file (:mod:`pipeline.coco.categories`). Index files are written last, so an
export cut short has no new index; PNGs are written by a few threads at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from model.storage import get_filesystem, join, shown_uri
from pipeline.coco.categories import parse_categories, read_categories
from pipeline.coco.panoptic_io import decode_panoptic_png
from pipeline.coco.rle import encode_segments
from pipeline.progress import Progress
from pipeline.segment.output import image_file_stem, iter_output_rows
from pipeline.segment.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

FORMATS = ("coco-panoptic", "coco-instances", "semantic-png")
WRITE_THREADS = 8  # PNG writes in flight at once (object stores: one request each)
HASHED_IDS_FROM = 2**40  # image ids from hashes lie in [2**40, 2**53): never a COCO number
_JSON_SAFE = 2**53  # integers every JSON reader (JavaScript's too) reads exactly


@dataclass
class ExportSummary:
    format: str
    dst: str
    images: int = 0  # images exported (ok rows)
    errors_skipped: int = 0  # error rows (nothing to export)
    segments: int = 0  # segments (panoptic, semantic) or instances (coco-instances) written
    written: list[str] = field(default_factory=list)  # the index files (JSON, tables)

    def render(self) -> str:
        noun = "instances" if self.format == "coco-instances" else "segments"
        return (f"exported {self.images} images ({self.segments} {noun}) as {self.format} to "
                f"{shown_uri(self.dst)}; {self.errors_skipped} error rows skipped")


def load_label_space(*, model: str | None = None, categories: str | None = None) -> list[dict]:
    """The categories of the export, in label order: a bundle's config.json or a JSON file."""
    if model and categories:
        raise ValueError("pass the label space once: --model or --categories, not both")
    if model:
        from model.bundle import read_bundle_config  # torch: only when a bundle names them

        cats = read_bundle_config(model).config.to_dict()["categories"]
        return parse_categories(cats, f"the bundle {shown_uri(model)}")
    if categories:
        return read_categories(categories)
    raise ValueError("an export needs the label space: pass --model BUNDLE (its config.json "
                     "names the classes) or --categories FILE")


@dataclass
class _Scan:
    ok: int = 0
    errors: int = 0
    numbered: Counter = field(default_factory=Counter)  # COCO-style number -> images named so
    model_ids: set = field(default_factory=set)


def scan_output(output_uri: str, label_space: list[dict]) -> _Scan:
    """One pass over the small columns: counts, and every category the rows use must be in the
    label space (checked before anything is written)."""
    known = {c["id"] for c in label_space}
    scan, unknown = _Scan(), {}
    for row in iter_output_rows(output_uri, ["image_id", "image_uri", "status",
                                             "segments_info", "model_id"], batch_size=1024):
        if row["status"] != "ok":
            scan.errors += 1
            continue
        scan.ok += 1
        scan.model_ids.add(row["model_id"])
        number = _number(row["image_uri"])
        if number is not None:
            scan.numbered[number] += 1
        for s in row["segments_info"] or ():
            if s["category_id"] not in known:
                unknown.setdefault(s["category_id"], row["image_id"])
    if unknown:
        cat_id, image_id = next(iter(sorted(unknown.items())))
        raise ValueError(f"{shown_uri(output_uri)} holds category ids {sorted(unknown)[:10]} "
                         f"that the label space does not list (e.g. {cat_id} in {image_id}); "
                         "pass the bundle the output was made with (--model) or its categories")
    return scan


def export_output(output_uri: str, dst: str, *, format: str = "coco-panoptic",
                  model: str | None = None, categories: str | None = None,
                  progress_every_s: float | None = None,
                  progress: bool = True) -> ExportSummary:
    """Export the ok rows of the segment output at `output_uri` to `dst` in `format`.
    `progress`: a line on stderr rewritten in place on a terminal, else a log record every
    `progress_every_s` seconds (default `pipeline.progress.EVERY_S`, 10 s)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    label_space = load_label_space(model=model, categories=categories)
    scan = scan_output(output_uri, label_space)
    fs, root = get_filesystem(dst)
    root = root.rstrip("/")
    writer = {"coco-panoptic": _CocoPanoptic, "coco-instances": _CocoInstances,
              "semantic-png": _SemanticPng}[format](fs, root, label_space)
    summary = ExportSummary(format=format, dst=dst, errors_skipped=scan.errors)
    ids = _ImageIds(scan.numbered)
    seen: set[str] = set()
    meter = Progress(f"export {format}", total=scan.ok, note=f"{scan.errors} error rows skipped",
                     enabled=progress, every_s=progress_every_s, log=log)
    with _Files(fs) as files, meter:
        for row in iter_output_rows(output_uri, ["image_id", "image_uri", "width", "height",
                                                 "status", "panoptic_png", "segments_info"]):
            if row["status"] != "ok":
                continue
            name = image_file_stem(row["image_id"])
            if name in seen:
                log.warning("%s appears twice in %s; exported once", row["image_id"],
                            shown_uri(output_uri))
                continue
            seen.add(name)
            summary.segments += writer.add(row, name, ids.of(row), files)
            summary.images += 1
            meter.advance()
    info = {"description": f"panoray export ({format}) of {shown_uri(output_uri)}",
            "model_id": ", ".join(sorted(scan.model_ids))}
    summary.written = [join(dst, name) for name in writer.finish(info)]
    log.debug("%s", summary.render())
    return summary


# ------------------------------------------------------------------------------------ helpers

def _file_name(image_uri: str) -> str:
    """The last path component of an image_uri (after ``#`` for archive members)."""
    return image_uri.rsplit("#", 1)[-1].rsplit("/", 1)[-1]


def _number(image_uri: str) -> int | None:
    """The COCO-style number a file is named by (``000000139.jpg`` -> 139), if it is."""
    stem = _file_name(image_uri).rsplit(".", 1)[0]
    if not (stem.isascii() and stem.isdigit() and len(stem) <= 13):
        return None
    return int(stem) if int(stem) < HASHED_IDS_FROM else None


def _extension(image_uri: str) -> str:
    base, dot, ext = _file_name(image_uri).rpartition(".")
    return f".{ext.lower()}" if dot and base and ext.lower() in IMAGE_EXTENSIONS else ""


class _ImageIds:
    """COCO image ids: the file's number when no other image shares it, else a hash."""

    def __init__(self, numbered: Counter):
        self.numbered = numbered
        self.hashed: set[int] = set()

    def of(self, row: dict) -> int:
        number = _number(row["image_uri"])
        if number is not None and self.numbered[number] == 1:
            return number
        digest = hashlib.sha1(row["image_id"].encode("utf-8", "surrogatepass")).digest()
        span = _JSON_SAFE - HASHED_IDS_FROM
        candidate = HASHED_IDS_FROM + int.from_bytes(digest[:8], "big") % span
        while candidate in self.hashed:  # a collision (rare): the next free number, in order
            candidate = HASHED_IDS_FROM + (candidate - HASHED_IDS_FROM + 1) % span
        self.hashed.add(candidate)
        return candidate


class _Files:
    """PNG writes, a few in flight at once; the first failure is raised on exit."""

    def __init__(self, fs):
        self.fs = fs
        self.pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="export")
        self.pending: list[Future] = []

    def write(self, path: str, data: bytes) -> None:
        if len(self.pending) >= 4 * WRITE_THREADS:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self.fs.pipe_file, path, data))

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self.pending:
                if exc[0] is None:
                    future.result()
                else:
                    future.cancel()
        finally:
            self.pool.shutdown(wait=True)


class _JsonList:
    """A JSON array built item by item in a local temporary file (memory stays flat)."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()
        self.count = 0

    def add(self, item: Any) -> None:
        self.file.write((b",\n" if self.count else b"\n") + _dumps(item))
        self.count += 1

    def copy_to(self, out) -> None:
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        self.file.close()


class _Lines:
    """Text lines gathered in a local temporary file."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()

    def add(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")

    def copy_to(self, out) -> None:
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        self.file.close()


def _dumps(item: Any) -> bytes:
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()


def _write_index(fs, path: str, head: dict, lists: dict[str, _JsonList]) -> None:
    """``{**head, name: [items...]}`` as one JSON file, streamed from the lists' files."""
    with fs.open(path, "wb") as out:
        out.write(b"{")
        for key, value in head.items():
            out.write(_dumps(key) + b":" + _dumps(value) + b",\n")
        for i, (key, items) in enumerate(lists.items()):
            out.write(_dumps(key) + b":[")
            items.copy_to(out)
            out.write(b"\n]" + (b",\n" if i < len(lists) - 1 else b"}\n"))


def _image_entry(row: dict, name: str, image_id: int) -> dict:
    return {"id": image_id, "file_name": name + _extension(row["image_uri"]),
            "width": row["width"], "height": row["height"],
            "panoray_image_id": row["image_id"], "image_uri": row["image_uri"]}


def _coco_category(c: dict) -> dict:
    return {"id": c["id"], "name": c["name"], "supercategory": c.get("supercategory", ""),
            "isthing": int(c["isthing"]), "color": c["color"]}


def _with_score(entry: dict, segment: dict) -> dict:
    if segment.get("score") is not None:
        entry["score"] = round(float(segment["score"]), 6)
    return entry


# ------------------------------------------------------------------------------------ formats

class _CocoPanoptic:
    def __init__(self, fs, root: str, label_space: list[dict]):
        self.fs, self.root, self.label_space = fs, root, label_space
        self.images, self.annotations = _JsonList(), _JsonList()
        fs.makedirs(f"{root}/panoptic", exist_ok=True)

    def add(self, row: dict, name: str, image_id: int, files: _Files) -> int:
        files.write(f"{self.root}/panoptic/{name}.png", row["panoptic_png"])
        self.images.add(_image_entry(row, name, image_id))
        segments = [_with_score({"id": s["id"], "category_id": s["category_id"], "iscrowd": 0,
                                 "area": s["area"], "bbox": list(s["bbox"])}, s)
                    for s in row["segments_info"]]
        self.annotations.add({"image_id": image_id, "file_name": f"{name}.png",
                              "segments_info": segments})
        return len(segments)

    def finish(self, info: dict) -> list[str]:
        _write_index(self.fs, f"{self.root}/panoptic.json",
                     {"info": info, "licenses": [],
                      "categories": [_coco_category(c) for c in self.label_space]},
                     {"images": self.images, "annotations": self.annotations})
        return ["panoptic.json"]


class _CocoInstances:
    def __init__(self, fs, root: str, label_space: list[dict]):
        self.fs, self.root = fs, root
        self.things = {c["id"]: c for c in label_space if c["isthing"]}
        self.images, self.annotations = _JsonList(), _JsonList()
        self.next_id = 1
        fs.makedirs(root, exist_ok=True)

    def add(self, row: dict, name: str, image_id: int, files: _Files) -> int:
        self.images.add(_image_entry(row, name, image_id))
        things = [s for s in row["segments_info"] if s["category_id"] in self.things]
        if not things:
            return 0
        masks = encode_segments(decode_panoptic_png(row["panoptic_png"]),
                                [s["id"] for s in things])
        for s in things:
            self.annotations.add(_with_score({
                "id": self.next_id, "image_id": image_id, "category_id": s["category_id"],
                "segmentation": masks[s["id"]], "area": s["area"], "bbox": list(s["bbox"]),
                "iscrowd": 0}, s))
            self.next_id += 1
        return len(things)

    def finish(self, info: dict) -> list[str]:
        _write_index(self.fs, f"{self.root}/instances.json",
                     {"info": info, "licenses": [],
                      "categories": [_coco_category(c) for c in self.things.values()]},
                     {"images": self.images, "annotations": self.annotations})
        return ["instances.json"]


class _SemanticPng:
    FOLDER = "SegmentationClass"

    def __init__(self, fs, root: str, label_space: list[dict]):
        self.fs, self.root = fs, root
        self.classes = [{"index": 0, "id": None, "name": "background", "isthing": False,
                         "color": [0, 0, 0]}]
        self.classes += [{"index": k, "id": c["id"], "name": c["name"],
                          "isthing": bool(c["isthing"]), "color": c["color"]}
                         for k, c in enumerate(label_space, start=1)]
        self.index = {c["id"]: c["index"] for c in self.classes[1:]}
        self.dtype = np.uint8 if len(self.classes) <= 256 else np.uint16
        palette = np.zeros((256, 3), dtype=np.uint8)
        if self.dtype == np.uint8:
            palette[: len(self.classes)] = [c["color"] for c in self.classes]
        self.palette = palette.ravel().tolist()
        self.names, self.manifest = _Lines(), _Lines()
        fs.makedirs(f"{root}/{self.FOLDER}", exist_ok=True)

    def add(self, row: dict, name: str, image_id: int, files: _Files) -> int:
        ids = decode_panoptic_png(row["panoptic_png"])
        segments = row["segments_info"]
        lut_ids = np.array([s["id"] for s in segments], dtype=np.int64)
        lut_values = np.array([self.index[s["category_id"]] for s in segments], dtype=self.dtype)
        top = int(ids.max()) if ids.size else 0
        if top <= 1 << 20:  # a lookup table over the ids (the usual: small ids)
            lut = np.zeros(top + 1, dtype=self.dtype)
            keep = lut_ids <= top
            lut[lut_ids[keep]] = lut_values[keep]
            semantic = lut[ids]
        else:
            present, inverse = np.unique(ids, return_inverse=True)
            mapped = np.zeros(len(present), dtype=self.dtype)
            at = np.searchsorted(present, lut_ids).clip(max=len(present) - 1)
            hit = present[at] == lut_ids
            mapped[at[hit]] = lut_values[hit]
            semantic = mapped[inverse].reshape(ids.shape)
        picture = Image.fromarray(semantic)
        if self.dtype == np.uint8:
            picture.putpalette(self.palette)
        buf = io.BytesIO()
        picture.save(buf, format="PNG", compress_level=3)
        files.write(f"{self.root}/{self.FOLDER}/{name}.png", buf.getvalue())
        self.names.add(name)
        self.manifest.add(_dumps({"file_name": f"{self.FOLDER}/{name}.png",
                                  "image_id": row["image_id"], "image_uri": row["image_uri"],
                                  "width": row["width"], "height": row["height"]}).decode())
        return len(segments)

    def finish(self, info: dict) -> list[str]:
        doc = {"info": info, "format": "semantic-png",
               "pixels": f"class index, {np.dtype(self.dtype).name}; 0 = void (unlabelled)",
               "folder": self.FOLDER, "classes": self.classes}
        self.fs.pipe_file(f"{self.root}/classes.json",
                          json.dumps(doc, indent=1, ensure_ascii=False).encode())
        labelmap = ["# label:color_rgb:parts:actions"] + [
            f"{c['name'].replace(':', '_')}:{','.join(str(v) for v in c['color'])}::"
            for c in self.classes]
        self.fs.pipe_file(f"{self.root}/labelmap.txt", ("\n".join(labelmap) + "\n").encode())
        self.fs.makedirs(f"{self.root}/ImageSets/Segmentation", exist_ok=True)
        with self.fs.open(f"{self.root}/ImageSets/Segmentation/default.txt", "wb") as out:
            self.names.copy_to(out)
        with self.fs.open(f"{self.root}/images.jsonl", "wb") as out:
            self.manifest.copy_to(out)
        return ["classes.json", "labelmap.txt", "ImageSets/Segmentation/default.txt",
                "images.jsonl"]
