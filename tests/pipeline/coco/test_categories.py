"""A label space from a JSON file: a list of categories or a COCO JSON holding one."""

from __future__ import annotations

import json

import pytest

from pipeline.coco.categories import model_categories, parse_categories, read_categories


def test_a_list_and_a_coco_json_give_the_same_label_space(tmp_path):
    cats = [{"id": 7, "name": "crack", "isthing": True, "color": [255, 0, 0]},
            {"id": 3, "name": "wall", "isthing": 0, "supercategory": "building"}]
    (tmp_path / "list.json").write_text(json.dumps(cats))
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": [],
                                                    "categories": cats}))
    a, b = read_categories(str(tmp_path / "list.json")), read_categories(
        str(tmp_path / "coco.json"))
    assert a == b and [c["id"] for c in a] == [7, 3]  # label order kept
    assert a[1]["isthing"] is False and a[1]["supercategory"] == "building"
    assert len(a[1]["color"]) == 3  # a fixed colour for one without
    assert read_categories(str(tmp_path / "list.json"))[1]["color"] == a[1]["color"]
    [crack, wall] = model_categories(a)
    assert (crack.id, crack.name, crack.isthing, crack.color) == (7, "crack", True, (255, 0, 0))
    assert wall.isthing is False


@pytest.mark.parametrize("doc, words", [
    ({"images": []}, "no \"categories\""),
    ([], "holds no categories"),
    (["person"], "category 0 is str"),
    ([{"id": 1, "name": "a"}], "no 'isthing'"),
    ([{"id": "1", "name": "a", "isthing": 1}], "id '1'"),
    ([{"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 0}], "repeats id 1"),
    ([{"id": 1, "name": "", "isthing": 1}], "name ''"),
    ([{"id": 1, "name": "a", "isthing": "yes"}], "isthing 'yes'"),
    ([{"id": 1, "name": "a", "isthing": 1, "color": [300, 0, 0]}], "color [300, 0, 0]"),
])
def test_mistakes_are_one_sentence_naming_the_entry(doc, words):
    with pytest.raises(ValueError, match="cats.json") as error:
        parse_categories(doc, "cats.json")
    assert words in str(error.value) and "\n" not in str(error.value)


def test_not_json_says_so(tmp_path):
    (tmp_path / "x.json").write_bytes(b"\xff\xd8 a jpeg")
    with pytest.raises(ValueError, match="x.json is not JSON"):
        read_categories(str(tmp_path / "x.json"))
