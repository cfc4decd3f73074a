"""A label space from a file: a JSON list of categories, or a COCO JSON that holds one.

Both forms name each class as COCO panoptic does, ``{"id", "name", "isthing", "color"}``, in
label order (class index k of a model is entry k). ``color`` may be left out (a fixed colour
per id is chosen); other keys (``supercategory``) are kept. Used by ``panoray convert
--categories`` (a Hugging Face checkpoint's label space) and ``panoray export``.
"""

from __future__ import annotations

import json
from typing import Any

from model.config import Category
from model.storage import shown_uri
from pipeline.coco.panoptic_io import read_bytes

_FORMS = ('a JSON list of {"id", "name", "isthing", "color"} in label order, or a COCO JSON '
          'holding "categories"')


def read_categories(uri: str) -> list[dict[str, Any]]:
    """The categories of the JSON file at ``uri`` (see :func:`parse_categories`)."""
    shown = shown_uri(uri)
    data = read_bytes(uri)  # FileNotFoundError naming the file
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{shown} is not JSON ({e}); pass {_FORMS}") from None
    return parse_categories(doc, shown)


def parse_categories(doc: Any, source: str = "the categories") -> list[dict[str, Any]]:
    """Checked categories (``isthing`` a bool, ``color`` three ints) from a parsed JSON.

    Raises ValueError, one sentence naming ``source`` and the entry, for anything else.
    """
    if isinstance(doc, dict):
        if "categories" not in doc:
            raise ValueError(f"{source} has no \"categories\"; pass {_FORMS}")
        doc = doc["categories"]
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{source} holds no categories; pass {_FORMS}")
    out, seen = [], set()
    for i, entry in enumerate(doc):
        where = f"{source}: category {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is {type(entry).__name__}, not an object with id, name, "
                             "isthing and color")
        missing = [key for key in ("id", "name", "isthing") if key not in entry]
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r}")
        cat_id, name, isthing = entry["id"], entry["name"], entry["isthing"]
        if isinstance(cat_id, bool) or not isinstance(cat_id, int) or cat_id < 0:
            raise ValueError(f"{where} has id {cat_id!r}; ids are integers >= 0")
        if cat_id in seen:
            raise ValueError(f"{where} repeats id {cat_id}; give each category its own id")
        seen.add(cat_id)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where} (id {cat_id}) has name {name!r}; names are non-empty text")
        if isthing not in (0, 1) or isinstance(isthing, float):
            raise ValueError(f"{where} ({name!r}) has isthing {isthing!r}; use true/false or 1/0")
        color = entry.get("color")
        if color is None:
            color = default_color(cat_id)
        elif (not isinstance(color, list | tuple) or len(color) != 3
              or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                         for v in color)):
            raise ValueError(f"{where} ({name!r}) has color {color!r}; use [r, g, b], 0..255")
        out.append({**entry, "id": cat_id, "name": name, "isthing": bool(isthing),
                    "color": [int(v) for v in color]})
    return out


def default_color(cat_id: int) -> list[int]:
    """A fixed, well-spread colour for a category without one (the same for an id, always)."""
    h = (int(cat_id) * 2654435761) & 0xFFFFFFFF
    return [64 + (h & 0xBF), 64 + ((h >> 8) & 0xBF), 64 + ((h >> 16) & 0xBF)]


def model_categories(categories: list[dict[str, Any]]) -> tuple[Category, ...]:
    """Checked categories -> the model config's label space, in the same order."""
    return tuple(Category(id=c["id"], name=c["name"], isthing=bool(c["isthing"]),
                          color=tuple(c["color"])) for c in categories)
