"""`panoray report`: one static HTML page about a segment job's output.

``DST/report.html`` opens from the file system (no server, nothing fetched from the network:
the CSS and the few lines of JavaScript are inline, every picture is a file beside it):

- the run: images ok / failed, shards, Parquet files, where the output is, the model(s) that
  made the rows, when they were made;
- the error rows (image id, where it came from, the message), the first
  :data:`ERRORS_SHOWN` of them and how many there are, and the commonest messages;
- per class: segments, images with the class, its share of all ok pixels, its mean share in the
  images that hold it, its mean score; a table sorted by segments (a click on a header sorts
  by that column), with the class colour;
- with ground truth: PQ / SQ / RQ (all, things, stuff, per class), computed by
  :func:`pipeline.segment.output.evaluate_output`, what ``panoray evaluate`` prints;
- a gallery of overlays (:func:`pipeline.coco.overlay.render_overlay` over the original images,
  found as ``panoray show`` finds them), :data:`PER_PAGE` to a page: ``DST/overlays/thumbs/``
  holds the thumbnails, ``DST/overlays/<name>.png`` the full-size overlays a click opens,
  ``<name>`` being :func:`~pipeline.segment.output.image_file_stem` of the image_id. Images
  smaller than :data:`MIN_OVERLAY_SIDE` are enlarged (pixels kept sharp) so that class names
  stay legible.

The work splits in two: :func:`prepare_report` reads (the rows' small columns in one streamed
pass, then PQ) and writes nothing, so a mistake in the inputs is found before DST is touched;
:func:`write_report` draws the gallery and writes the page last. :func:`make_report` does both.
"""

from __future__ import annotations

import heapq
import html
import io
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from model.storage import get_filesystem, join, shown_uri
from pipeline.coco.categories import default_color, parse_categories, read_categories
from pipeline.coco.overlay import render_overlay
from pipeline.coco.panoptic_io import decode_panoptic_png, load_coco_panoptic
from pipeline.progress import EVERY_S, Progress
from pipeline.segment.decode import DecodeError, decode_image
from pipeline.segment.output import (
    OutputEvaluation,
    evaluate_output,
    image_file_stem,
    output_files,
)
from pipeline.segment.show import fetch_images

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
OVERLAYS = "overlays"  # DST/overlays/<name>.png; thumbnails in DST/overlays/thumbs/<name>.jpg
DEFAULT_LIMIT = 240  # images in the gallery
PER_PAGE = 24  # gallery images to a page
ERRORS_SHOWN = 1000  # error rows listed (all are counted)
MESSAGES_SHOWN = 8  # commonest error messages
MESSAGES_KEPT = 10_000  # distinct error messages counted before the rest count as "other"
THUMB_SIDE = 320  # the longer side of a thumbnail, about a tile's width on the page
MIN_OVERLAY_SIDE = 512  # smaller images are enlarged by a whole factor to at least this
CHIPS_SHOWN = 5  # class names under a thumbnail

_STATS_COLUMNS = ["image_id", "image_uri", "shard", "width", "height", "status", "error",
                  "segments_info", "model_id", "processed_at"]


@dataclass
class ClassStat:
    """What the ok rows hold of one class."""

    category_id: int
    segments: int = 0
    images: int = 0  # ok rows with at least one segment of the class
    area: int = 0  # pixels, all images
    share_sum: float = 0.0  # sum over those images of the class's share of the image
    score_sum: float = 0.0
    isthing: bool | None = None  # as the rows say (the label space's word comes first)

    @property
    def mean_share(self) -> float:
        return self.share_sum / self.images if self.images else 0.0

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.segments if self.segments else 0.0


@dataclass
class OutputStats:
    """One pass over the small columns of a segment output."""

    rows: int = 0
    ok: int = 0
    errors: int = 0
    files: int = 0
    shards: set[str] = field(default_factory=set)
    shards_failed: set[str] = field(default_factory=set)  # shards with an error row
    model_ids: Counter = field(default_factory=Counter)
    pixels: int = 0  # of all ok images
    segments: int = 0
    empty: int = 0  # ok rows without a segment
    classes: dict[int, ClassStat] = field(default_factory=dict)
    error_rows: list[dict] = field(default_factory=list)  # the first ERRORS_SHOWN
    messages: Counter = field(default_factory=Counter)
    first_at: datetime | None = None
    last_at: datetime | None = None
    min_side: int | None = None
    max_side: int | None = None

    @property
    def labelled(self) -> float:
        """The share of ok pixels some segment covers."""
        return sum(c.area for c in self.classes.values()) / self.pixels if self.pixels else 0.0


@dataclass
class PreparedReport:
    """Everything the page says, read and computed; nothing written yet."""

    output: str
    stats: OutputStats
    categories: dict[int, dict]  # category id -> {"name", "color", "isthing"}
    label_source: str  # where the class names come from, for the page
    gallery: list[tuple[int, str]]  # (file index, image_id) of the ok rows drawn, in order
    fs: Any  # the output's filesystem
    files: list[str]  # its committed Parquet files
    model: dict | None = None  # {"name", "model_id"} of a bundle given
    evaluation: OutputEvaluation | None = None
    gt: str | None = None
    gt_segments: Counter = field(default_factory=Counter)  # category id -> ground-truth segments
    gallery_of: int = 0  # ok rows the gallery was chosen from


@dataclass
class ReportSummary:
    report: str  # the page's URI
    images_ok: int
    images_failed: int
    overlays: int
    skipped: list[str]  # images whose original could not be read (drawn over grey)

    def render(self) -> str:
        line = (f"wrote {self.report}: {self.images_ok} ok, {self.images_failed} failed, "
                f"{self.overlays} overlays")
        if self.skipped:
            line += f" ({len(self.skipped)} originals could not be read; drawn over grey)"
        return line


# ----------------------------------------------------------------------------- reading

def label_space(*, model: str | None = None, categories: str | None = None,
                gt_categories: Mapping[int, dict] | None = None, gt: str = "the ground truth"
                ) -> tuple[dict[int, dict], str, dict | None]:
    """(category id -> {"name", "color", "isthing"}, where they come from, the bundle's
    {"name", "model_id"}): a bundle's config.json, a categories JSON, or the ground truth's
    categories; ({}, "", None) when none is given (classes are then named by id)."""
    if model and categories:
        raise ValueError("pass the label space once: --model or --categories, not both")
    bundle = None
    if model:
        from model.bundle import read_bundle_config  # torch: only when a bundle names them

        info = read_bundle_config(model)
        cats = parse_categories(info.config.to_dict()["categories"],
                                f"the bundle {shown_uri(model)}")
        source = f"the bundle {shown_uri(model)}"
        bundle = {"name": info.name, "model_id": info.model_id}
    elif categories:
        cats, source = read_categories(categories), shown_uri(categories)
    elif gt_categories:
        cats = parse_categories(list(gt_categories.values()), shown_uri(gt))
        source = f"the ground truth {shown_uri(gt)}"
    else:
        return {}, "", None
    return {int(c["id"]): c for c in cats}, source, bundle


def _iter_rows(fs, files: list[str], columns: list[str], *,
               only: Mapping[int, set[str]] | None = None) -> Iterator[tuple[int, dict]]:
    """(file index, row) of every committed row; with `only`, the rows of those files whose
    image_id is listed (the other files are not opened)."""
    for index, path in enumerate(files):
        if only is not None and index not in only:
            continue
        with fs.open(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
                for row in batch.to_pylist():
                    if only is None or row["image_id"] in only[index]:
                        yield index, row


def _add_row(stats: OutputStats, row: dict) -> None:
    stats.rows += 1
    stats.shards.add(row["shard"])
    stats.model_ids[row["model_id"]] += 1
    at = row.get("processed_at")
    if at is not None:
        stats.first_at = at if stats.first_at is None else min(stats.first_at, at)
        stats.last_at = at if stats.last_at is None else max(stats.last_at, at)
    if row["status"] != "ok":
        stats.errors += 1
        stats.shards_failed.add(row["shard"])
        message = " ".join(str(row.get("error") or "failed").split())
        if message in stats.messages or len(stats.messages) < MESSAGES_KEPT:
            stats.messages[message] += 1
        else:
            stats.messages["(other messages)"] += 1
        if len(stats.error_rows) < ERRORS_SHOWN:
            stats.error_rows.append({"image_id": row["image_id"], "image_uri": row["image_uri"],
                                     "error": message})
        return
    stats.ok += 1
    width, height = int(row["width"] or 0), int(row["height"] or 0)
    pixels = width * height
    stats.pixels += pixels
    side = max(width, height)
    stats.min_side = side if stats.min_side is None else min(stats.min_side, side)
    stats.max_side = side if stats.max_side is None else max(stats.max_side, side)
    segments = row["segments_info"] or []
    stats.segments += len(segments)
    if not segments:
        stats.empty += 1
    in_image: dict[int, int] = {}
    for s in segments:
        cat = int(s["category_id"])
        c = stats.classes.get(cat)
        if c is None:
            c = stats.classes[cat] = ClassStat(cat, isthing=s.get("isthing"))
        c.segments += 1
        c.area += int(s.get("area") or 0)
        c.score_sum += float(s.get("score") or 0.0)
        in_image[cat] = in_image.get(cat, 0) + int(s.get("area") or 0)
    for cat, area in in_image.items():
        c = stats.classes[cat]
        c.images += 1
        c.share_sum += area / pixels if pixels else 0.0


def prepare_report(output_uri: str, *, model: str | None = None,
                   categories: str | None = None, gt: str | None = None,
                   gt_folder: str | None = None, limit: int = DEFAULT_LIMIT,
                   progress: bool = True, progress_every_s: float = EVERY_S
                   ) -> PreparedReport:
    """Read what the report of `output_uri` says: counts, classes, PQ against `gt` (when given)
    and which ok rows the gallery shows (the first `limit` by image_id). Writes nothing.
    `progress`: the rows read so far (`pipeline.progress`: a line on a terminal, else a log
    record every `progress_every_s`)."""
    truth = load_coco_panoptic(gt) if gt else None
    cats, source, bundle = label_space(model=model, categories=categories,
                                       gt_categories=truth.categories if truth else None,
                                       gt=gt or "")
    fs, files = output_files(output_uri)  # FileNotFoundError: no output there
    stats = OutputStats(files=len(files))
    chosen: list[tuple[_Reversed, int]] = []  # (image_id, file index), largest id on top
    with Progress("report, reading", unit="rows", enabled=progress, every_s=progress_every_s,
                  log=log) as meter:
        for index, row in _iter_rows(fs, files, _STATS_COLUMNS):
            _add_row(stats, row)
            if row["status"] == "ok" and limit > 0:
                key = (_Reversed(row["image_id"]), index)
                if len(chosen) < limit:
                    heapq.heappush(chosen, key)
                elif row["image_id"] < chosen[0][0].text:
                    heapq.heapreplace(chosen, key)
            meter.note = f"{stats.errors} errors"
            meter.advance()
    gallery = sorted(((index, key.text) for key, index in chosen), key=lambda g: g[1])
    prepared = PreparedReport(output=output_uri, stats=stats, categories=cats,
                              label_source=source, gallery=gallery, fs=fs, files=files,
                              model=bundle, gallery_of=stats.ok)
    if truth is not None:
        prepared.gt = gt
        prepared.evaluation = evaluate_output(output_uri, gt, gt_folder)
        prepared.gt_segments = Counter(int(s["category_id"]) for ann in
                                       truth.annotations.values()
                                       for s in ann.get("segments_info", ()))
        for cat_id, cat in truth.categories.items():  # names for PQ rows the labels lack
            if int(cat_id) not in cats:
                prepared.categories = {**prepared.categories, int(cat_id): {
                    "id": int(cat_id), "name": cat.get("name", str(cat_id)),
                    "isthing": bool(cat.get("isthing")),
                    "color": list(cat.get("color") or default_color(int(cat_id)))}}
    return prepared


class _Reversed:
    """A string ordered backwards, so that heapq's min-heap keeps the `limit` smallest ids."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __lt__(self, other: _Reversed) -> bool:
        return self.text > other.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.text == other.text


# ----------------------------------------------------------------------------- writing

def make_report(output_uri: str, dst: str, **options: Any) -> ReportSummary:
    """:func:`prepare_report` then :func:`write_report` (options: those of both)."""
    shown = {k: options[k] for k in ("progress", "progress_every_s") if k in options}
    return write_report(prepare_report(output_uri, **options), dst, **shown)


def write_report(prepared: PreparedReport, dst: str, *, progress: bool = True,
                 progress_every_s: float = EVERY_S) -> ReportSummary:
    """Draw the gallery into DST/overlays/ and write DST/report.html (last). `progress`: the
    overlays drawn so far, as :func:`prepare_report` shows the rows read."""
    fs, root = get_filesystem(dst)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/{OVERLAYS}/thumbs", exist_ok=True)
    with Progress("report, drawing", total=len(prepared.gallery), unit="overlays",
                  enabled=progress, every_s=progress_every_s, log=log) as meter:
        tiles, skipped = _draw_gallery(prepared, fs, root, meter)
    page = render_html(prepared, tiles)
    fs.pipe_file(f"{root}/{REPORT_FILE}", page.encode("utf-8"))
    summary = ReportSummary(report=shown_uri(join(dst, REPORT_FILE)),
                            images_ok=prepared.stats.ok, images_failed=prepared.stats.errors,
                            overlays=len(tiles), skipped=skipped)
    log.debug("%s", summary.render())
    return summary


@dataclass
class _Tile:
    image_id: str
    name: str  # file stem
    width: int
    height: int
    thumb: tuple[int, int]  # thumbnail size
    classes: list[tuple[int, int]]  # (category id, pixels), largest first
    segments: int
    original: bool  # False: the original could not be read, drawn over grey


def _colors(cats: Mapping[int, dict], stats: OutputStats) -> dict[int, dict]:
    """The label space, plus a name and colour for every class the rows use that it lacks."""
    out = dict(cats)
    for cat_id, c in stats.classes.items():
        if cat_id not in out:
            out[cat_id] = {"id": cat_id, "name": f"class {cat_id}", "isthing": bool(c.isthing),
                           "color": default_color(cat_id), "unknown": bool(cats)}
    return out


def _sized(ids: np.ndarray, image: np.ndarray, side: int, *, enlarge_only: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """(ids, image) with the longer side about `side`: enlarged by a whole factor (pixels kept
    sharp), or made smaller (ids: nearest, image: Lanczos) unless `enlarge_only`."""
    longer = max(ids.shape)
    if longer == 0:
        return ids, image
    if longer < side:
        k = max(side // longer, 1) if not enlarge_only else math.ceil(side / longer)
        return ids.repeat(k, 0).repeat(k, 1), image.repeat(k, 0).repeat(k, 1)
    if enlarge_only or longer == side:
        return ids, image
    scale = side / longer
    size = (max(1, round(ids.shape[1] * scale)), max(1, round(ids.shape[0] * scale)))
    small_ids = np.asarray(Image.fromarray(ids.astype(np.int32)).resize(
        size, Image.Resampling.NEAREST)).astype(np.int64)
    small_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    return small_ids, small_image


def _draw_gallery(prepared: PreparedReport, fs, root: str,
                  meter: Progress) -> tuple[list[_Tile], list[str]]:
    if not prepared.gallery:
        return [], []
    cats = _colors(prepared.categories, prepared.stats)
    wanted: dict[int, set[str]] = {}
    for index, image_id in prepared.gallery:
        wanted.setdefault(index, set()).add(image_id)
    columns = ["image_id", "image_uri", "width", "height", "status", "panoptic_png",
               "segments_info"]
    rows = {row["image_id"]: row for _, row in _iter_rows(prepared.fs, prepared.files, columns,
                                                         only=wanted) if row["status"] == "ok"}
    if meter.enabled:
        log.info("report: reading the %d original images", len(rows))
    images = fetch_images(row["image_uri"] for row in rows.values())
    tiles, skipped, seen = [], [], set()
    for _, image_id in prepared.gallery:
        row = rows.get(image_id)
        name = image_file_stem(image_id)
        if row is None or name in seen:
            continue
        seen.add(name)
        ids = decode_panoptic_png(row["panoptic_png"]).astype(np.int64)
        data = images.get(row["image_uri"])
        try:
            image = decode_image(data).array if data else None
        except DecodeError:
            image = None
        original = image is not None
        if image is None:
            skipped.append(row["image_uri"])
            image = np.full((*ids.shape, 3), 96, dtype=np.uint8)  # still show the segmentation
        elif image.shape[:2] != ids.shape:
            image = np.asarray(Image.fromarray(image).resize(ids.shape[::-1],
                                                             Image.Resampling.BILINEAR))
        segments = row["segments_info"] or []
        full_ids, full_image = _sized(ids, image, MIN_OVERLAY_SIDE, enlarge_only=True)
        buf = io.BytesIO()
        render_overlay(full_image, full_ids, segments, cats).save(buf, format="PNG")
        fs.pipe_file(f"{root}/{OVERLAYS}/{name}.png", buf.getvalue())
        # the thumbnail is drawn at its own size: outlines one pixel, names at the tile's scale
        thumb_ids, thumb_image = _sized(ids, image, THUMB_SIDE)
        thumb = render_overlay(thumb_image, thumb_ids, segments, cats)
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=88)
        fs.pipe_file(f"{root}/{OVERLAYS}/thumbs/{name}.jpg", buf.getvalue())
        per_class: Counter = Counter()
        for s in segments:
            per_class[int(s["category_id"])] += int(s.get("area") or 0)
        tiles.append(_Tile(image_id=image_id, name=name, width=int(row["width"]),
                           height=int(row["height"]), thumb=thumb.size,
                           classes=per_class.most_common(), segments=len(segments),
                           original=original))
        meter.advance()
    return tiles, skipped


# ----------------------------------------------------------------------------- the page

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _int(n: int) -> str:
    return f"{n:,}"


def _pct(x: float, digits: int = 1) -> str:
    if x > 0 and 100 * x < 10 ** -digits:
        return f"&lt;{10 ** -digits:.{digits}f}%"
    return f"{100 * x:.{digits}f}%"


def _rgb(color) -> str:
    r, g, b = (int(v) for v in color)
    return f"rgb({r},{g},{b})"


def _swatch(cat: Mapping) -> str:
    return f'<i class="sw" style="background:{_rgb(cat["color"])}"></i>'


def _class_cell(cat_id: int, cats: Mapping[int, dict]) -> str:
    cat = cats[cat_id]
    note = (' <span class="tag warn" title="not in the label space">unknown</span>'
            if cat.get("unknown") else "")
    return (f'<td class="cls" data-v="{_e(cat["name"]).lower()}">{_swatch(cat)}'
            f'<span class="name" title="{_e(cat["name"])} (id {cat_id})">{_e(cat["name"])}'
            f'</span>{note}</td>')


def _bar(x: float, color: str | None = None) -> str:
    style = f"width:{max(0.0, min(1.0, x)) * 100:.2f}%" + (f";background:{color}" if color else "")
    return f'<span class="bar"><i style="{style}"></i></span>'


def _when(at: datetime | None) -> str:
    if at is None:
        return "—"
    return at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _card(key: str, label: str, value: str, data: Any, *, cls: str = "",
          sub: str = "") -> str:
    sub_html = f'<span class="sub">{sub}</span>' if sub else ""
    return (f'<div class="card {cls}" id="stat-{key}" data-value="{_e(data)}">'
            f'<span class="label">{label}</span><b>{value}</b>{sub_html}</div>')


def _summary(p: PreparedReport) -> str:
    s = p.stats
    cards = [
        _card("images", "Images", _int(s.rows), s.rows, sub=f"in {_int(s.files)} Parquet files"),
        _card("ok", "OK", _int(s.ok), s.ok, cls="good",
              sub=_pct(s.ok / s.rows) if s.rows else ""),
        _card("failed", "Failed", _int(s.errors), s.errors, cls="bad" if s.errors else "",
              sub=_pct(s.errors / s.rows) if s.rows else ""),
        _card("shards", "Shards", _int(len(s.shards)), len(s.shards),
              sub=f"{_int(len(s.shards_failed))} with errors" if s.shards_failed else "all clean"),
        _card("segments", "Segments", _int(s.segments), s.segments,
              sub=f"{s.segments / s.ok:.1f} per image" if s.ok else ""),
    ]
    if p.evaluation is not None:
        pq_all = p.evaluation.results["All"]["pq"]
        cards.append(_card("pq", "PQ", f"{100 * pq_all:.1f}", pq_all, cls="accent",
                           sub=f"on {_int(p.evaluation.images_gt)} ground-truth images"))
    models = ", ".join(f"{_e(m)}" + (f" ({_int(n)} rows)" if len(s.model_ids) > 1 else "")
                       for m, n in s.model_ids.most_common()) or "—"
    details = [("Output", f"<code>{_e(shown_uri(p.output))}</code>"),
               ("Model", f'<span id="model-ids">{models}</span>')]
    if p.model and set(s.model_ids) == {p.model["model_id"]}:
        details[-1] = ("Model", f'{details[-1][1]} <span class="tag thing">the bundle given'
                       '</span>')
    elif p.model:
        details.append(("Bundle given", f"{_e(p.model['model_id'])} <span class=\"tag warn\">"
                        "not the model the rows were made with</span>"))
    details += [
        ("Class names", _e(p.label_source) if p.label_source else
         "none given (pass --model or --categories): classes are named by id"),
        ("Processed", f"{_when(s.first_at)} — {_when(s.last_at)}"),
        ("Image size", "—" if s.min_side is None else
         f"longer side {s.min_side} px" if s.min_side == s.max_side else
         f"longer side {s.min_side} – {s.max_side} px"),
        ("Labelled pixels", f"{_pct(s.labelled)} of all ok pixels "
         f"({_int(s.empty)} ok images without a segment)"),
        ("Report made", _when(datetime.now(timezone.utc))),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in details)
    return (f'<section id="summary"><div class="cards">{"".join(cards)}</div>'
            f'<table class="details">{rows}</table></section>')


def _quality(p: PreparedReport, cats: Mapping[int, dict]) -> str:
    ev = p.evaluation
    if ev is None:
        return ('<section id="quality"><h2>Quality</h2><p class="muted">No ground truth given: '
                'pass <code>--gt panoptic.json</code> for PQ, SQ and RQ.</p></section>')
    res = ev.results
    head = "<tr><th></th><th>PQ</th><th>SQ</th><th>RQ</th><th>classes</th></tr>"
    body = "".join(
        f'<tr data-group="{g}"><th>{g}</th>' + "".join(
            f'<td class="num" data-v="{res[g][k]!r}">{100 * res[g][k]:.1f}</td>'
            for k in ("pq", "sq", "rq")) + f'<td class="num">{res[g]["n"]}</td></tr>'
        for g in ("All", "Things", "Stuff"))
    per = res["per_class"]
    # a class neither in the ground truth nor predicted is left out (PQ's averages leave it out)
    present = [c for c in per if p.gt_segments.get(int(c), 0) or
               (int(c) in p.stats.classes and p.stats.classes[int(c)].segments)]
    absent = len(per) - len(present)
    order = sorted(present, key=lambda c: (-per[c]["pq"], cats[int(c)]["name"]))
    lines = []
    for cat_id in order:
        c, cat_id = per[cat_id], int(cat_id)
        kind = "thing" if cats[cat_id].get("isthing") else "stuff"
        cells = "".join(f'<td class="num" data-v="{c[k]!r}">{100 * c[k]:.1f}</td>'
                        for k in ("pq", "sq", "rq"))
        lines.append(f'<tr data-category="{cat_id}">{_class_cell(cat_id, cats)}'
                     f'<td data-v="{kind}"><span class="tag {kind}">{kind}</span></td>{cells}'
                     f'<td class="barcell" data-v="{c["pq"]!r}">'
                     f'{_bar(c["pq"], _rgb(cats[cat_id]["color"]))}</td>'
                     f'<td class="num" data-v="{p.gt_segments.get(cat_id, 0)}">'
                     f'{_int(p.gt_segments.get(cat_id, 0))}</td></tr>')
    note = (f"{_int(ev.images_matched)} of {_int(ev.images_gt)} ground-truth images predicted; "
            f"{_int(len(ev.images_missing))} missing or failed (scored as empty); "
            f"{_int(ev.rows_unmatched)} output rows not in the ground truth." +
            (f" {_int(absent)} classes with neither ground truth nor predictions are not "
             "listed." if absent else ""))
    return (f'<section id="quality"><h2>Quality <span class="muted">against '
            f'{_e(shown_uri(p.gt or ""))}</span></h2>'
            f'<div class="split"><table class="pq" id="pq-summary">{head}{body}</table>'
            f'<p class="muted">PQ, SQ and RQ in percent, as <code>panoray evaluate</code> '
            f'(panopticapi) computes them. {note}</p></div>'
            f'<div class="scroll"><table class="sortable" id="pq-classes"><thead><tr>'
            f'<th data-sort="text">Class</th><th data-sort="text">Kind</th>'
            f'<th data-sort="num">PQ</th><th data-sort="num">SQ</th><th data-sort="num">RQ</th>'
            f'<th data-sort="num" class="barhead"></th>'
            f'<th data-sort="num">GT segments</th></tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table></div></section>')


def _classes(p: PreparedReport, cats: Mapping[int, dict]) -> str:
    s = p.stats
    if not s.classes:
        return ('<section id="classes"><h2>Classes</h2><p class="muted">No segments in the '
                'output.</p></section>')
    order = sorted(s.classes.values(), key=lambda c: (-c.segments, -c.area, c.category_id))
    top = max(c.area for c in order) / s.pixels if s.pixels else 0.0
    lines = []
    for c in order:
        cat = cats[c.category_id]
        isthing = cat.get("isthing") if "isthing" in cat else c.isthing
        kind = "thing" if isthing else "stuff"
        share = c.area / s.pixels if s.pixels else 0.0
        per_segment = c.area / c.segments if c.segments else 0.0
        lines.append(
            f'<tr data-category="{c.category_id}">{_class_cell(c.category_id, cats)}'
            f'<td data-v="{kind}"><span class="tag {kind}">{kind}</span></td>'
            f'<td class="num" data-v="{c.segments}">{_int(c.segments)}</td>'
            f'<td class="num" data-v="{c.images}">{_int(c.images)}'
            f'<span class="muted"> · {_pct(c.images / s.ok if s.ok else 0, 0)}</span></td>'
            f'<td class="num" data-v="{share!r}">{_pct(share, 2)}</td>'
            f'<td class="barcell" data-v="{share!r}">'
            f'{_bar(share / top if top else 0, _rgb(cat["color"]))}</td>'
            f'<td class="num" data-v="{c.mean_share!r}">{_pct(c.mean_share, 1)}</td>'
            f'<td class="num" data-v="{per_segment!r}">{_int(round(per_segment))}</td>'
            f'<td class="num" data-v="{c.mean_score!r}">{c.mean_score:.2f}</td></tr>')
    return (f'<section id="classes"><h2>Classes <span class="muted">{_int(len(order))} found in '
            f'{_int(s.ok)} ok images</span></h2>'
            f'<div class="scroll"><table class="sortable" id="class-table"><thead><tr>'
            f'<th data-sort="text">Class</th><th data-sort="text">Kind</th>'
            f'<th data-sort="num" title="segments of the class, all images">Segments</th>'
            f'<th data-sort="num" title="ok images with at least one segment of the class">'
            f'Images</th>'
            f'<th data-sort="num" title="the class\'s pixels over all ok pixels">Pixel share</th>'
            f'<th data-sort="num" class="barhead"></th>'
            f'<th data-sort="num" title="mean share of the image, over the images with the '
            f'class">Mean share where present</th>'
            f'<th data-sort="num" title="pixels per segment">Mean segment px</th>'
            f'<th data-sort="num" title="the model\'s mean confidence">Mean score</th>'
            f'</tr></thead><tbody>{"".join(lines)}</tbody></table></div>'
            f'<p class="muted">Sorted by segments; click a column to sort by it. Pixel share: the '
            f'class\'s pixels over all {_int(s.pixels)} pixels of the ok images '
            f'({_pct(1 - s.labelled)} are void).</p></section>')


def _errors(p: PreparedReport) -> str:
    s = p.stats
    if not s.errors:
        return ('<section id="errors"><h2>Errors</h2><p class="ok-note">No error rows: every '
                'image was segmented.</p></section>')
    shown = len(s.error_rows)
    capped = (f"the first {_int(shown)} of {_int(s.errors)} (all of them: the rows with "
              "<code>status = 'error'</code>)" if shown < s.errors else
              f"all {_int(s.errors)}")
    messages = "".join(f'<li><b class="n">{_int(n)}</b> <span class="msg">{_e(m)}</span></li>'
                       for m, n in s.messages.most_common(MESSAGES_SHOWN))
    rows = "".join(
        f'<tr><td class="num">{i}</td><td class="id"><code>{_e(r["image_id"])}</code></td>'
        f'<td class="uri"><code>{_e(r["image_uri"])}</code></td><td class="msg">'
        f'{_e(r["error"])}</td></tr>' for i, r in enumerate(s.error_rows, 1))
    return (f'<section id="errors"><h2>Errors <span class="count bad" id="error-count">'
            f'{_int(s.errors)}</span></h2>'
            f'<h3>Commonest messages</h3><ul class="messages">{messages}</ul>'
            f'<h3>Error rows <span class="muted">({capped})</span></h3>'
            f'<div class="scroll tall"><table id="error-table"><thead><tr><th>#</th>'
            f'<th>Image id</th><th>From</th><th>Message</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></div></section>')


def _tile(t: _Tile, cats: Mapping[int, dict], eager: bool) -> str:
    head, _, last = t.image_id.rpartition("/")
    chips = "".join(
        f'<span class="chip" title="{_e(cats[c]["name"])}: {_int(a)} px">{_swatch(cats[c])}'
        f'{_e(cats[c]["name"])}</span>' for c, a in t.classes[:CHIPS_SHOWN])
    if len(t.classes) > CHIPS_SHOWN:
        rest = ", ".join(cats[c]["name"] for c, _ in t.classes[CHIPS_SHOWN:])
        chips += (f'<span class="chip more" title="{_e(rest)}">'
                  f'+{len(t.classes) - CHIPS_SHOWN}</span>')
    grey = "" if t.original else ' <span class="tag warn">original unreadable</span>'
    return (f'<figure class="tile" data-image-id="{_e(t.image_id)}">'
            f'<a href="{OVERLAYS}/{t.name}.png" target="_blank" title="open the full-size '
            f'overlay of {_e(t.image_id)}"><img src="{OVERLAYS}/thumbs/{t.name}.jpg" '
            f'width="{t.thumb[0]}" height="{t.thumb[1]}" alt="{_e(t.image_id)}"'
            f'{"" if eager else " loading=lazy"}></a><figcaption>'
            f'<div class="fname" title="{_e(t.image_id)}">{_e(last)}</div>'
            f'<div class="where" title="{_e(t.image_id)}">{_e(head) or "&nbsp;"}</div>'
            f'<div class="meta">{t.width}×{t.height} · {t.segments} segment'
            f'{"" if t.segments == 1 else "s"}{grey}</div>'
            f'<div class="chips">{chips}</div></figcaption></figure>')


def _gallery(p: PreparedReport, tiles: list[_Tile], cats: Mapping[int, dict]) -> str:
    if not tiles:
        why = ("no ok rows" if not p.stats.ok else "the gallery is off (--limit 0)")
        return (f'<section id="gallery"><h2>Gallery</h2><p class="muted">No overlays: {why}.'
                '</p></section>')
    pages = [tiles[i:i + PER_PAGE] for i in range(0, len(tiles), PER_PAGE)]
    aspect = float(np.median([t.width / t.height for t in tiles if t.height])) or 4 / 3
    aspect = min(max(aspect, 0.5), 2.5)
    nav = ""
    if len(pages) > 1:
        links = "".join(f'<a href="#page-{k}" data-page="{k}">{k}</a>'
                        for k in range(1, len(pages) + 1))
        nav = (f'<nav class="pager"><a href="#page-1" class="prev" rel="prev">‹ prev</a>'
               f'{links}<a href="#page-2" class="next" rel="next">next ›</a></nav>')
    body = "".join(
        f'<section class="page{" current" if k == 1 else ""}" id="page-{k}" data-page="{k}">'
        + (f'<h3 class="page-head">Page {k} of {len(pages)}</h3>' if len(pages) > 1 else "")
        + '<div class="grid">'
        + "".join(_tile(t, cats, eager=k == 1) for t in page) + "</div></section>"
        for k, page in enumerate(pages, 1))
    of = (f"the first {_int(len(tiles))} of {_int(p.gallery_of)} ok images by image id"
          if len(tiles) < p.gallery_of else f"all {_int(len(tiles))} ok images")
    return (f'<section id="gallery" style="--tile-aspect:{aspect:.3f}"><h2>Gallery '
            f'<span class="muted">{of}{f", {PER_PAGE} to a page" if len(pages) > 1 else ""}; '
            f'a click opens the full-size overlay</span></h2>{nav}<div class="pages">{body}'
            f'</div>{nav}</section>')


def render_html(p: PreparedReport, tiles: list[_Tile]) -> str:
    """The whole page, self-contained (inline CSS and script, relative picture links)."""
    cats = _colors(p.categories, p.stats)
    title = f"panoray report · {shown_uri(p.output)}"
    s = p.stats
    failed = f'<a href="#errors" class="pill bad">{_int(s.errors)} failed</a>' if s.errors else \
        '<span class="pill good">no errors</span>'
    toc = "".join(f'<a href="#{k}">{v}</a>' for k, v in (
        ("summary", "Summary"), ("quality", "Quality"), ("classes", "Classes"),
        ("errors", "Errors"), ("gallery", "Gallery")))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="panoray report">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body>
<header><div class="wrap"><div class="brand">panoray <span>report</span></div>
<div class="where"><code>{_e(shown_uri(p.output))}</code> {failed}</div>
<nav class="toc">{toc}</nav></div></header>
<main class="wrap">
{_summary(p)}
{_quality(p, cats)}
{_classes(p, cats)}
{_errors(p)}
{_gallery(p, tiles, cats)}
</main>
<footer class="wrap muted">Made by <code>panoray report</code>: a static page, nothing is
fetched from the network; the pictures are in <code>{OVERLAYS}/</code> beside it.</footer>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
:root{--bg:#f6f7f9;--panel:#fff;--ink:#1d2330;--muted:#6b7385;--line:#e3e6eb;--accent:#2f6fdb;
--good:#1f9d55;--bad:#d64545;--warn:#b7791f;--thumb:#1c1f26;--radius:10px;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue","DejaVu Sans",Arial,
sans-serif;font-size:15px;color:var(--ink);background:var(--bg)}
@media (prefers-color-scheme:dark){:root{--bg:#14171c;--panel:#1c2027;--ink:#e6e9ef;
--muted:#98a1b3;--line:#2c323c;--accent:#6b9cff;--thumb:#0d0f13}}
*{box-sizing:border-box}body{margin:0;line-height:1.45}
.wrap{max-width:1320px;margin:0 auto;padding:0 24px}
code{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono",Menlo,monospace;
font-size:.88em;overflow-wrap:anywhere}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
header{background:var(--panel);border-bottom:1px solid var(--line);position:sticky;top:0;
z-index:5}
header .wrap{display:flex;align-items:center;gap:18px;min-height:56px;flex-wrap:wrap}
.brand{font-weight:700;font-size:18px;letter-spacing:.2px}.brand span{color:var(--accent)}
header .where{flex:1;min-width:0;display:flex;gap:10px;align-items:center;color:var(--muted)}
header .where code{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.toc{display:flex;gap:14px;font-size:14px}
.pill{font-size:12px;font-weight:600;padding:2px 9px;border-radius:99px;white-space:nowrap}
.pill.good{background:#e3f5eb;color:var(--good)}.pill.bad{background:#fde8e8;color:var(--bad)}
main section{margin:26px 0}
h2{font-size:19px;margin:0 0 12px}h2 .muted,h3 .muted{font-weight:400;font-size:14px}
h3{font-size:15px;margin:16px 0 8px}
.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);
padding:12px 16px;display:flex;flex-direction:column;border-top:3px solid var(--line)}
.card .label{font-size:12px;text-transform:uppercase;letter-spacing:.6px;color:var(--muted)}
.card b{font-size:28px;font-variant-numeric:tabular-nums;line-height:1.2}
.card .sub{font-size:12.5px;color:var(--muted)}
.card.good{border-top-color:var(--good)}.card.bad{border-top-color:var(--bad)}
.card.bad b{color:var(--bad)}.card.accent{border-top-color:var(--accent)}
table{border-collapse:collapse;width:100%;background:var(--panel);font-size:14px}
th,td{padding:7px 12px;text-align:left;border-bottom:1px solid var(--line);vertical-align:middle}
thead th{position:sticky;top:0;background:var(--panel);font-size:12px;text-transform:uppercase;
letter-spacing:.5px;color:var(--muted);white-space:nowrap;z-index:1}
tbody tr:nth-child(even){background:rgba(127,127,127,.05)}
tbody tr:hover{background:rgba(47,111,219,.07)}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.details{margin-top:12px;border:1px solid var(--line);border-radius:var(--radius)}
table.details th{width:170px;color:var(--muted);font-weight:500}
.scroll{overflow:auto;border:1px solid var(--line);border-radius:var(--radius);
max-height:620px}.scroll.tall{max-height:480px}
.scroll table{border:0}
table.sortable th[data-sort]{cursor:pointer;user-select:none}
table.sortable th[data-sort]:hover{color:var(--ink)}
th.sorted-asc::after{content:" ▲"}th.sorted-desc::after{content:" ▼"}
.cls{white-space:nowrap;max-width:280px}.cls .name{display:inline-block;max-width:220px;
overflow:hidden;text-overflow:ellipsis;vertical-align:middle}
.sw{display:inline-block;width:14px;height:14px;border-radius:4px;margin-right:8px;
vertical-align:middle;box-shadow:inset 0 0 0 1px rgba(0,0,0,.18)}
.tag{font-size:11.5px;padding:1px 7px;border-radius:99px;background:rgba(127,127,127,.14);
color:var(--muted);white-space:nowrap}
.tag.thing{background:rgba(47,111,219,.12);color:var(--accent)}
.tag.warn{background:rgba(183,121,31,.15);color:var(--warn)}
.barcell{width:22%;min-width:120px}.barhead{min-width:120px}
.bar{display:block;height:10px;border-radius:99px;background:rgba(127,127,127,.13);
overflow:hidden}.bar i{display:block;height:100%;border-radius:99px;background:var(--accent)}
.split{display:grid;grid-template-columns:minmax(320px,460px) 1fr;gap:18px;align-items:start;
margin-bottom:14px}
@media (max-width:760px){.split{grid-template-columns:1fr}}
table.pq{border:1px solid var(--line);border-radius:var(--radius)}
table.pq th,table.pq td{padding:8px 14px}table.pq tr:first-child th{color:var(--muted);
font-size:12px}table.pq td{font-size:17px;font-weight:600}
.ok-note{background:#e3f5eb;color:var(--good);padding:10px 14px;border-radius:var(--radius);
display:inline-block;font-weight:500}
.count{font-size:13px;padding:2px 10px;border-radius:99px;vertical-align:middle}
.count.bad{background:#fde8e8;color:var(--bad)}
ul.messages{margin:0;padding:0;list-style:none;display:flex;flex-direction:column;gap:5px}
ul.messages li{display:flex;gap:10px;align-items:baseline}
ul.messages b.n{min-width:44px;text-align:right;font-variant-numeric:tabular-nums;
font-size:12.5px;padding:1px 8px;border-radius:99px;background:#fde8e8;color:var(--bad)}
#error-table td.msg{color:var(--bad)}#error-table td{font-size:13px}
#error-table td.id,#error-table td.uri{max-width:360px}
.pager{display:flex;flex-wrap:wrap;gap:6px;margin:12px 0}
.pager a{min-width:34px;text-align:center;padding:5px 10px;border-radius:8px;
background:var(--panel);border:1px solid var(--line);font-variant-numeric:tabular-nums}
.pager a[aria-current]{background:var(--accent);border-color:var(--accent);color:#fff}
.pager a.disabled{opacity:.4;pointer-events:none}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:16px}
.tile{margin:0;background:var(--panel);border:1px solid var(--line);border-radius:var(--radius);
overflow:hidden;display:flex;flex-direction:column;transition:box-shadow .15s}
.tile:hover{box-shadow:0 4px 18px rgba(0,0,0,.12)}
.tile a{display:block;background:var(--thumb)}
.tile img{display:block;width:100%;height:auto;aspect-ratio:var(--tile-aspect,1.333);
object-fit:contain}
.tile.broken a::after{content:"picture missing";color:#fff;display:block;padding:8px}
figcaption{padding:8px 11px 10px;min-width:0}
.fname,.where{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.fname{font-weight:600;font-size:14px}.where{font-size:12px;color:var(--muted)}
.meta{font-size:12px;color:var(--muted);margin-top:2px}
.chips{display:flex;flex-wrap:wrap;gap:4px;margin-top:6px}
.chip{font-size:11.5px;padding:1px 8px 1px 5px;border-radius:99px;border:1px solid var(--line);
white-space:nowrap;max-width:100%;overflow:hidden;text-overflow:ellipsis}
.chip .sw{width:9px;height:9px;margin-right:4px;border-radius:50%}
.chip.more{padding-left:8px;color:var(--muted)}
.paged .page{display:none}.paged .page.current{display:block}.paged .page-head{display:none}
.page-head{color:var(--muted);font-weight:500}
footer{padding:18px 24px 40px;font-size:13px}
"""

_JS = """
(function(){
var gallery=document.getElementById('gallery');
var pages=[].slice.call(document.querySelectorAll('#gallery .page'));
function current(){var m=/^#page-(\\d+)$/.exec(location.hash||'');
var n=m?parseInt(m[1],10):1;return Math.min(Math.max(n,1),pages.length||1);}
function show(n){
pages.forEach(function(p){var on=+p.dataset.page===n;p.classList.toggle('current',on);
if(on){[].forEach.call(p.querySelectorAll('img'),function(i){i.loading='eager';});}});
[].forEach.call(document.querySelectorAll('.pager'),function(nav){
[].forEach.call(nav.querySelectorAll('a[data-page]'),function(a){
if(+a.dataset.page===n){a.setAttribute('aria-current','page');}
else{a.removeAttribute('aria-current');}});
var prev=nav.querySelector('.prev'),next=nav.querySelector('.next');
prev.href='#page-'+Math.max(n-1,1);next.href='#page-'+Math.min(n+1,pages.length);
prev.classList.toggle('disabled',n<=1);next.classList.toggle('disabled',n>=pages.length);});}
if(pages.length>1){gallery.classList.add('paged');show(current());
window.addEventListener('hashchange',function(){if(/^#page-/.test(location.hash)){
show(current());}});
document.addEventListener('keydown',function(e){if(e.target.closest&&
e.target.closest('input,textarea'))return;var n=current();
if(e.key==='ArrowRight'&&n<pages.length){location.hash='#page-'+(n+1);}
if(e.key==='ArrowLeft'&&n>1){location.hash='#page-'+(n-1);}});}
[].forEach.call(document.querySelectorAll('table.sortable'),function(table){
var heads=[].slice.call(table.querySelectorAll('th[data-sort]'));
heads.forEach(function(th,col){th.addEventListener('click',function(){
var desc=!th.classList.contains('sorted-desc');
heads.forEach(function(h){h.classList.remove('sorted-asc','sorted-desc');});
th.classList.add(desc?'sorted-desc':'sorted-asc');
var body=table.tBodies[0],rows=[].slice.call(body.rows),num=th.dataset.sort==='num';
rows.sort(function(a,b){var x=a.cells[col].dataset.v,y=b.cells[col].dataset.v;
var c=num?parseFloat(x)-parseFloat(y):String(x).localeCompare(String(y));
return desc?-c:c;});rows.forEach(function(r){body.appendChild(r);});});});});
function settle(){var scope=document.querySelector('#gallery .page.current')||document;
var imgs=[].slice.call(scope.querySelectorAll('img'));var left=imgs.length;
function done(){var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;});
imgs.forEach(function(i){if(!(i.naturalWidth>0)){i.closest('figure').classList.add('broken');}});
document.documentElement.setAttribute('data-images-shown',imgs.length);
document.documentElement.setAttribute('data-images-loaded',ok.length);}
if(!left){done();return;}
imgs.forEach(function(i){if(i.complete){if(--left===0)done();}else{
var once=function(){i.removeEventListener('load',once);i.removeEventListener('error',once);
if(--left===0)done();};i.addEventListener('load',once);i.addEventListener('error',once);}});}
if(document.readyState==='complete'){settle();}else{window.addEventListener('load',settle);}
})();
"""

