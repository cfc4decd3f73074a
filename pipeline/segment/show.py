"""`panoray show`: overlay pictures and a contact sheet from a segment job's output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from model.bundle import read_bundle_config
from model.storage import get_filesystem, join
from pipeline.coco.overlay import contact_sheet, render_overlay
from pipeline.coco.panoptic_io import decode_panoptic_png
from pipeline.progress import Progress
from pipeline.segment.decode import DecodeError, decode_image
from pipeline.segment.output import image_file_stem, read_output_rows
from pipeline.segment.sources import iter_shard_records, list_shards

log = logging.getLogger(__name__)


@dataclass
class ShowSummary:
    written: list[str]
    skipped: list[str]
    contact_sheet: str | None


def load_categories(*, model: str | None = None, categories: str | None = None) -> dict:
    """category id -> {"name", "color", ...} from a bundle's config.json or a COCO JSON."""
    if model:
        cats = read_bundle_config(model).config.to_dict()["categories"]
    elif categories:
        fs, path = get_filesystem(categories)
        with fs.open(path) as f:
            doc = json.load(f)
        cats = doc["categories"] if isinstance(doc, dict) else doc
    else:
        return {}
    return {int(c["id"]): c for c in cats}


def fetch_images(image_uris: Iterable[str]) -> dict[str, bytes]:
    """Encoded bytes of the inputs behind rows' ``image_uri`` (files, tar or Parquet members)."""
    wanted = set(image_uris)
    containers: dict[str, set[str]] = {}
    for uri in wanted:
        containers.setdefault(uri.split("#", 1)[0], set()).add(uri)
    found: dict[str, bytes] = {}
    for container, uris in containers.items():
        try:
            shards = list_shards(container)
        except (FileNotFoundError, ValueError) as e:
            log.warning("cannot read %s: %s", container, e)
            continue
        for shard in shards:
            for record in iter_shard_records(shard):
                if record["image_uri"] in uris and record.get("data"):
                    found[record["image_uri"]] = record["data"]
    return found


def show(output_uri: str, dst: str, *, model: str | None = None, categories: str | None = None,
         limit: int = 16, columns: int = 4, progress: bool = True) -> ShowSummary:
    """Write overlays of up to `limit` ok rows of `output_uri` into `dst` plus a contact sheet.

    Each overlay is named by :func:`~pipeline.segment.output.image_file_stem` of its row's
    image_id, so every member of a tar or Parquet shard gets its own picture. `progress`: the
    overlays drawn so far (`pipeline.progress`: a line on a terminal, else a log record every
    10 s)."""
    cats = load_categories(model=model, categories=categories)
    rows = [r for r in read_output_rows(output_uri) if r["status"] == "ok"]
    rows.sort(key=lambda r: r["image_id"])
    rows = rows[:limit]
    if progress:
        log.info("show: reading the %d original images", len(rows))
    images = fetch_images(r["image_uri"] for r in rows)
    fs, root = get_filesystem(dst)
    fs.makedirs(root, exist_ok=True)
    pictures, written, skipped = [], [], []
    meter = Progress("show", total=len(rows), unit="overlays", enabled=progress, log=log)
    for row in rows:
        data = images.get(row["image_uri"])
        ids = decode_panoptic_png(row["panoptic_png"]).astype(np.int64)
        try:
            image = decode_image(data).array if data else None
        except DecodeError:
            image = None
        if image is None:
            skipped.append(row["image_uri"])
            image = np.full((*ids.shape, 3), 96, dtype=np.uint8)  # still show the segmentation
        picture = render_overlay(image, ids, row["segments_info"], cats)
        name = image_file_stem(row["image_id"]) + ".png"  # one per image, stable
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        fs.pipe_file(f"{root.rstrip('/')}/{name}", buf.getvalue())
        written.append(join(dst, name))
        pictures.append(picture)
        meter.advance()
    meter.close()
    sheet_uri = None
    if pictures:
        buf = io.BytesIO()
        contact_sheet(pictures, columns=columns).save(buf, format="PNG")
        fs.pipe_file(f"{root.rstrip('/')}/contact_sheet.png", buf.getvalue())
        sheet_uri = join(dst, "contact_sheet.png")
    return ShowSummary(written=written, skipped=skipped, contact_sheet=sheet_uri)
