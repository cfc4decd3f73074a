"""`panoray export` and `panoray convert --categories` on the command line: the mistakes are one
sentence (exit status 2, nothing created), the label space file reaches the bundle."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jobs.cli import main
from jobs.demo import SHIPPED_MODEL
from pipeline.segment.commits import OutputStore
from pipeline.segment.schema import encode_result, ok_row, to_table


def _one_sentence(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("panoray "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own mistakes
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    w = tmp_path_factory.mktemp("export-mistakes")
    ids = np.zeros((6, 8), np.int64)
    ids[:3] = 1
    png, segments = encode_result(ids, [{"id": 1, "category_id": 99, "isthing": True}])
    OutputStore(str(w / "out")).commit_shard("s", to_table([ok_row(
        image_id="s/a", image_uri="/x/s#a.jpg", shard="s", width=8, height=6,
        panoptic_png=png, segments_info=segments, model_id="m@0")]))
    (w / "afile.txt").write_text("a file\n")
    (w / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg bytes")
    (w / "nothing_ok.json").write_text(json.dumps([{"id": 1, "name": "a", "isthing": 1}]))
    (w / "bad_entry.json").write_text(json.dumps([{"id": 1, "name": "a"}]))
    return {"w": str(w), "out": str(w / "out"), "bundle": str(SHIPPED_MODEL),
            **{p.name.replace(".", "_"): str(p) for p in w.iterdir() if p.is_file()}}


MISTAKES = [
    ("no-output", "export {w}/noout {w}/x --model {bundle}", ["noout", "panoray segment"]),
    ("dst-a-file", "export {out} {afile_txt} --model {bundle}", ["afile.txt"]),
    ("dst-is-out", "export {out} {out} --model {bundle}", ["segment output itself"]),
    ("no-label-space", "export {out} {w}/x", ["--model", "--categories"]),
    ("both-label-spaces", "export {out} {w}/x --model {bundle} --categories {nothing_ok_json}",
     ["not both"]),
    ("bad-format", "export {out} {w}/x --model {bundle} --format yolo", ["yolo"]),
    ("model-missing", "export {out} {w}/x --model {w}/nobundle", ["nobundle"]),
    ("categories-not-json", "export {out} {w}/x --categories {photo_jpg}",
     ["photo.jpg", "not JSON"]),
    ("categories-bad-entry", "export {out} {w}/x --categories {bad_entry_json}",
     ["bad_entry.json", "category 0", "'isthing'"]),
    ("categories-miss-a-class", "export {out} {w}/x --categories {nothing_ok_json}",
     ["[99]", "does not list"]),
    ("convert-categories-missing", "convert --from detectron2 {photo_jpg} {w}/b --preset tiny "
     "--categories {w}/none.json", ["none.json"]),
    ("convert-categories-bad", "convert --from hf {w} {w}/b --categories {bad_entry_json}",
     ["bad_entry.json", "'isthing'"]),
]


@pytest.mark.parametrize("line, words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_an_export_mistake_is_one_sentence(line, words, world, capsys):
    code, err = _run([part.format(**world) for part in line.split()], capsys)
    _one_sentence(code, err, *(word.format(**world) for word in words))
    assert not os.path.exists(os.path.join(world["w"], "x"))
    assert not os.path.exists(os.path.join(world["w"], "b"))


# ------------------------------------------------------------------- convert --categories FILE

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def unlabelled_hf(tmp_path_factory) -> str:
    """A tiny HF Mask2Former checkpoint with 3 custom labels and no word on which are things."""
    import torch

    torch.manual_seed(0)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = transformers.ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                         layer_type="basic", out_features=stages)  # ResNet-18
    cfg = transformers.Mask2FormerConfig(
        backbone_config=backbone, num_labels=3, num_queries=4, decoder_layers=2,
        encoder_layers=1, hidden_dim=32, feature_size=32, mask_feature_size=32,
        num_attention_heads=4, dim_feedforward=32, encoder_feedforward_dim=32,
        id2label={0: "crack", 1: "rust", 2: "wall"})
    folder = tmp_path_factory.mktemp("hf") / "custom-labels"
    transformers.Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder)
    return str(folder)


CUSTOM = [{"id": 11, "name": "crack", "isthing": True, "color": [255, 0, 0]},
          {"id": 12, "name": "rust", "isthing": True, "color": [200, 100, 0]},
          {"id": 13, "name": "wall", "isthing": False}]


def test_convert_without_categories_names_the_flag(unlabelled_hf, tmp_path, capsys):
    code, err = _run(["convert", "--from", "hf", unlabelled_hf, str(tmp_path / "b")], capsys)
    line = _one_sentence(code, err, "custom-labels", "--categories FILE", "label order")
    assert "Category(" not in line and not (tmp_path / "b").exists()


@pytest.mark.parametrize("form", ["list", "coco"])
def test_convert_takes_the_label_space_from_a_file(form, unlabelled_hf, tmp_path, capsys):
    from model.bundle import read_bundle_config

    doc = CUSTOM if form == "list" else {"images": [], "annotations": [], "categories": CUSTOM}
    (tmp_path / "cats.json").write_text(json.dumps(doc))
    code = main(["convert", "--from", "hf", unlabelled_hf, str(tmp_path / "b"),
                 "--categories", str(tmp_path / "cats.json")])
    assert code == 0, capsys.readouterr().err
    cats = read_bundle_config(str(tmp_path / "b")).config.categories
    assert [(c.id, c.name, c.isthing) for c in cats] == [(11, "crack", True), (12, "rust", True),
                                                         (13, "wall", False)]
    assert cats[0].color == (255, 0, 0) and len(cats[2].color) == 3


def test_convert_with_the_wrong_number_of_categories(unlabelled_hf, tmp_path, capsys):
    (tmp_path / "two.json").write_text(json.dumps(CUSTOM[:2]))
    code, err = _run(["convert", "--from", "hf", unlabelled_hf, str(tmp_path / "b"),
                      "--categories", str(tmp_path / "two.json")], capsys)
    _one_sentence(code, err, "--categories", "two.json", "2 entries", "3 classes")
    assert not (tmp_path / "b").exists()
