"""Config dataclasses, presets and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model.config import (
    PRESETS,
    Category,
    Mask2FormerConfig,
    coco_panoptic_categories,
    get_config,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_a_json_round_trip(name):
    cfg = get_config(name)
    text = json.dumps(cfg.to_dict())
    back = Mask2FormerConfig.from_dict(json.loads(text))
    assert back == cfg
    assert isinstance(back.categories[0], Category)
    assert isinstance(back.categories[0].color, tuple)


def test_r50_preset_matches_the_reference_defaults():
    cfg = get_config("r50-coco-panoptic")
    assert cfg.num_classes == 133
    assert sum(c.isthing for c in cfg.categories) == 80
    assert cfg.categories[0] == Category(id=1, name="person", isthing=True, color=(220, 20, 60))
    assert cfg.categories[-1].id == 200 and not cfg.categories[-1].isthing
    td, pd = cfg.transformer_decoder, cfg.pixel_decoder
    assert (td.num_queries, td.num_layers, td.hidden_dim, td.num_heads, td.dim_feedforward) == (
        100, 9, 256, 8, 2048)
    assert (pd.num_layers, pd.num_heads, pd.num_points, pd.dim_feedforward) == (6, 8, 4, 1024)
    assert pd.in_features == ("res3", "res4", "res5")
    assert cfg.inference.object_mask_threshold == 0.8 and cfg.size_divisibility == 32


def test_swin_large_uses_200_queries_and_window_12():
    cfg = get_config("swin-l-coco-panoptic")
    assert cfg.transformer_decoder.num_queries == 200
    bb = cfg.backbone
    assert (bb.kind, bb.embed_dim, bb.window_size) == ("swin", 192, 12)
    assert get_config("swin-b-coco-panoptic").backbone.embed_dim == 128


def test_unknown_preset_error_lists_valid_names():
    with pytest.raises(KeyError) as err:
        get_config("r51-coco")
    assert "r51-coco" in str(err.value) and "r50-coco-panoptic" in str(err.value)


def test_from_dict_rejects_unknown_keys_naming_them():
    data = get_config("tiny").to_dict()
    data["pixel_decoder"]["num_pointz"] = 4
    with pytest.raises(ValueError, match="num_pointz") as err:
        Mask2FormerConfig.from_dict(data)
    assert "pixel_decoder" in str(err.value)
    data = get_config("tiny").to_dict()
    data["colour"] = 1
    with pytest.raises(ValueError, match="colour"):
        Mask2FormerConfig.from_dict(data)


def test_replacing_categories_changes_num_classes():
    cats = coco_panoptic_categories()[:3]
    cfg = dataclasses.replace(get_config("tiny"), categories=cats)
    assert cfg.num_classes == 3
    with pytest.raises(ValueError, match="unique"):
        dataclasses.replace(cfg, categories=(cats[0], cats[0]))
