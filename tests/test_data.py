"""What data.py promises: a deterministic shapes world with disjoint splits, pictures whose boxes are
where the shapes are, texts that agree with the scene, and real-data loaders that skip bad images
and name the line of a malformed file.

Answers are checked against the scene by code written here, not by data.py's own helpers."""

import json
import re

import numpy as np
import pytest
from PIL import Image

import data
import demo

COLOR_RGB = {"red": (220, 50, 50), "green": (40, 160, 70), "blue": (50, 90, 220),
             "yellow": (235, 190, 20), "purple": (140, 70, 180)}
WHERE = ["top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right"]
NUMBER = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
BG = np.array((245, 245, 240))


@pytest.fixture(scope="module")
def splits():
    return data.demo_splits(n_train=400, n_val=50, n_test=50, seed=0)


def sig(scene):
    return tuple(sorted((o.cell, o.color, o.shape, o.size) for o in scene.objects))


def matches(text, scene):
    """The objects a phrase like "the small red circle in the top left" can mean, read from the words."""
    text = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "
    pos = [i for i, w in enumerate(WHERE) if f" in the {w} " in text]
    text = re.sub(r" in the (" + "|".join(WHERE) + ") ", " ", text)
    words = set(text.split())
    found = []
    for o in scene.objects:
        if any(c in words and c != o.color for c in COLOR_RGB):
            continue
        if any(s in words and s != o.shape for s in ("circle", "square", "triangle", "cross")):
            continue
        if any(z in words and z != o.size for z in ("small", "large")):
            continue
        if pos and pos[0] != o.cell:
            continue
        found.append(o)
    return found


# -----------------------------------------------------------------------------
# The world


def test_scenes_are_deterministic_per_seed():
    a, b, c = data.make_scenes(30, seed=5), data.make_scenes(30, seed=5), data.make_scenes(30, seed=6)
    assert a == b
    assert [sig(s) for s in a] != [sig(s) for s in c]
    assert all(data.make_scene(s.seed) == s for s in a)  # a scene's seed rebuilds it
    assert data.demo_splits(40, 10, 10, seed=1) == data.demo_splits(40, 10, 10, seed=1)


def test_scenes_follow_the_world_rules(splits):
    for s in splits["train"]:
        assert 1 <= len(s.objects) <= 4
        assert len({o.cell for o in s.objects}) == len(s.objects)
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)  # "the red circle" is unique
        for o in s.objects:
            x1, y1, x2, y2 = o.box
            assert all(isinstance(v, int) and 0 <= v <= 100 for v in o.box)
            assert x2 - x1 == y2 - y1 == {"small": 14, "large": 26}[o.size]
            # the box center lies in the object's own cell of the 3x3 grid
            assert int((x1 + x2) / 2 // (100 / 3)) == o.cell % 3 and int((y1 + y2) / 2 // (100 / 3)) == o.cell // 3


def test_splits_are_disjoint_and_test_is_stable(splits):
    sets = {k: {sig(s) for s in v} for k, v in splits.items()}
    assert {k: len(v) for k, v in sets.items()} == {"train": 400, "val": 50, "test": 50}  # no repeats inside
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    # the held-out scenes do not depend on how much training data is asked for
    assert data.demo_splits(n_train=100, n_val=50, n_test=50, seed=0)["test"] == splits["test"]
    assert data.demo_splits(n_train=400, n_val=50, n_test=50, seed=1)["test"] != splits["test"]


# -----------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("size", [224, 448])
def test_each_shape_is_drawn_inside_its_box(splits, size):
    for scene in splits["test"][:10]:
        px = np.asarray(data.render(scene, size)).astype(int)
        assert px.shape == (size, size, 3)
        ys, xs = np.nonzero((px != BG).any(-1))
        for o in scene.objects:
            x1, y1, x2, y2 = (v * size / 100 for v in o.box)
            rgb = np.array(COLOR_RGB[o.color])
            # the box center is the object's color (true of all four shapes)
            assert (px[int((y1 + y2) / 2), int((x1 + x2) / 2)] == rgb).all()
            # the shape fills a good part of its box (a triangle half, a cross 5/9, a circle pi/4)
            inside = (px[int(y1):int(y2), int(x1):int(x2)] == rgb).all(-1).mean()
            assert inside > 0.4, (o, inside)
        # every painted pixel is the color of a box it lies in (1 px of rounding allowed)
        for y, x in zip(ys, xs):
            owners = [o for o in scene.objects
                      if o.box[0] * size / 100 - 1 <= x <= o.box[2] * size / 100 + 1
                      and o.box[1] * size / 100 - 1 <= y <= o.box[3] * size / 100 + 1]
            assert any((px[y, x] == COLOR_RGB[o.color]).all() for o in owners), (x, y)


def test_a_scene_looks_the_same_at_224_and_448(splits):
    for scene in splits["test"][:5]:
        small = np.asarray(data.render(scene, 224))
        big = np.asarray(data.render(scene, 448).resize((224, 224), Image.NEAREST))
        assert (small == big).all(-1).mean() > 0.98


def test_blank_image_is_the_bare_background():
    img = data.blank_image(64)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert (np.asarray(img) == BG).all()


# -----------------------------------------------------------------------------
# Boxes


def test_box_text_and_parse_box_round_trip():
    assert data.box_text((3, 14, 59, 100)) == "{<3><14><59><100>}"
    for box in [(0, 0, 100, 100), (3, 14, 59, 92), (50, 50, 51, 51)]:
        assert data.parse_box(data.box_text(box)) == box
    assert data.parse_box("the box is {<1><2><3><4>} there") == (1, 2, 3, 4)
    assert data.parse_box("{<1><2><3>}") is None
    assert data.parse_box("{<1><2><3><101>}") is None
    assert data.parse_box("no box at all") is None


def test_iou_of_known_boxes():
    assert data.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert data.iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)  # 5x5 over 100+100-25
    assert data.iou((0, 0, 10, 10), (0, 0, 20, 20)) == pytest.approx(100 / 400)
    assert data.iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert data.iou((0, 0, 10, 10), (50, 50, 60, 60)) == 0.0
    assert data.iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # no area, no division by zero


# -----------------------------------------------------------------------------
# The stages' samples


def test_stage_1_and_2_samples_are_clean_captions(splits):
    scenes = splits["val"][:20]
    for stage in (1, 2):
        samples = data.stage_samples(scenes, stage, image_size=32, seed=0)
        assert len(samples) == len(scenes)
        for s, scene in zip(samples, scenes):
            assert (s.task, s.query) == ("caption", "")
            assert s.image.size == (32, 32) and s.image.mode == "RGB"
            assert s.answer == data.clean_caption(s.answer) and len(s.answer.split()) <= 50
            assert s.answer.count(" and ") == len(scene.objects) - 1
            for part in s.answer.split(" and "):
                assert part.startswith("a ") and len(matches(part, scene)) == 1


def test_stage_3_samples_describe_every_object_with_its_position(splits):
    scenes = splits["val"][:20]
    samples = data.stage_samples(scenes, 3, image_size=32, seed=0)
    assert len(data.DESCRIBE_INSTRUCTIONS) >= 8
    assert len({s.query for s in data.stage_samples(splits["train"][:100], 3, 8, seed=0)}) > 5  # varied
    for s, scene in zip(samples, scenes):
        assert s.task == "describe" and s.query in data.DESCRIBE_INSTRUCTIONS
        for o in scene.objects:
            assert f"{o.size} {o.color} {o.shape} is in the {WHERE[o.cell]}" in s.answer


def test_stage_4_samples_cover_the_tasks_and_share_one_image_per_scene(splits):
    scenes = splits["val"][:20]
    samples = data.stage_samples(scenes, 4, image_size=48, seed=0)
    assert {s.task for s in samples} == set(data.TASKS)
    assert all(isinstance(s.query, str) and isinstance(s.answer, str) and s.answer for s in samples)
    by_scene = {}
    for s in samples:
        by_scene.setdefault(s.meta["scene"], set()).add(id(s.image))
        assert s.image.size == (48, 48)
    assert len(by_scene) == len(scenes) and all(len(ids) == 1 for ids in by_scene.values())
    qtypes = {s.meta["qtype"] for s in samples if s.task == "vqa"}
    assert {"color", "shape", "count", "position", "yes/no"} <= qtypes
    assert data.stage_samples(scenes, 4, 48, seed=0)[5].answer == samples[5].answer  # deterministic
    with pytest.raises(ValueError, match="stage 5"):
        data.stage_samples(scenes, 5, 48, seed=0)


def test_every_vqa_answer_agrees_with_the_scene(splits):
    scenes = {s.seed: s for s in splits["train"][:150]}
    samples = [s for s in data.stage_samples(list(scenes.values()), 4, 8, seed=1) if s.task == "vqa"]
    answers = {"yes/no": set(), "count": set()}
    for s in samples:
        scene, q, a, t = scenes[s.meta["scene"]], s.query, s.answer, s.meta["qtype"]
        assert 1 <= len(a.split()) <= 2 and q.endswith("?")
        if t == "count":
            m = re.fullmatch(r"how many (\w+ )?(shapes|circles|squares|triangles|crosses) are there\?", q)
            color, kind = (m.group(1) or "").strip(), m.group(2)
            n = sum((not color or o.color == color) and (kind == "shapes" or kind.startswith(o.shape))
                    for o in scene.objects)
            assert NUMBER[a] == n, (q, a, scene)
            answers["count"].add(a)
        elif t == "yes/no":
            m = re.fullmatch(r"is there an? (.+)\?", q)
            if m:
                truth = len(matches(m.group(1), scene)) == 1
            else:  # "is the red circle in the top left?": the object named without position, then its cell
                m = re.fullmatch(r"is (.+) in the (.+)\?", q)
                (o,) = matches(m.group(1), scene)
                truth = WHERE[o.cell] == m.group(2)
            assert a == ("yes" if truth else "no"), (q, a, scene)
            answers["yes/no"].add(a)
        else:
            m = re.fullmatch(r"(what color is|what shape is|what size is|where is) (.+)\?", q)
            found = matches(m.group(2), scene)
            assert len(found) == 1, (q, scene)  # the question names exactly one object
            o = found[0]
            expected = {"color": o.color, "shape": o.shape, "size": o.size, "position": WHERE[o.cell]}[t]
            assert a == expected, (q, a, scene)
            if t == "color":
                assert o.color not in q  # the question does not give its answer away
            if t == "shape":
                assert o.shape not in q
    assert answers["yes/no"] == {"yes", "no"} and len(answers["count"]) >= 4


def test_refer_identify_and_grounding_name_one_object_each(splits):
    scenes = {s.seed: s for s in splits["train"][:100]}
    for s in data.stage_samples(list(scenes.values()), 4, 8, seed=2):
        scene = scenes[s.meta["scene"]]
        if s.task == "refer":
            (o,) = matches(s.query, scene)  # unambiguous
            assert data.parse_box(s.answer) == o.box == s.meta["box"]
        elif s.task == "identify":
            (o,) = matches(s.answer, scene)
            assert data.parse_box(s.query) == o.box == s.meta["box"]
        elif s.task == "grounding":
            boxes = [tuple(map(int, b)) for b in re.findall(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}", s.answer)]
            assert boxes == [o.box for o in scene.objects] == s.meta["boxes"]
            assert re.sub(r" \{[^}]*\}", "", s.answer) == data.caption(scene)


def test_clean_caption_rules():
    assert data.clean_caption("A Dog, running!  On the 'beach'...") == "a dog running on the beach"
    assert data.clean_caption("don't_stop") == "dontstop"
    assert data.clean_caption(" ".join(["word"] * 60)) == " ".join(["word"] * 50)


CLASSES = [(c, s, z) for c in COLOR_RGB for s in ("circle", "square", "triangle", "cross") for z in ("small", "large")]


def cell_classes(scene):
    """Per cell of the 3x3 grid: 0 if empty, else 1 + the index of its object's (color, shape, size)."""
    expected = [0] * 9
    for o in scene.objects:
        expected[o.cell] = 1 + CLASSES.index((o.color, o.shape, o.size))
    return expected


def test_object_class_numbers_each_kind(splits):
    assert data.NUM_CELLS == 9 and demo.NUM_CELL_CLASSES == 1 + len(CLASSES)
    for scene in splits["val"]:
        for o in scene.objects:
            assert demo.object_class(o) == 1 + CLASSES.index((o.color, o.shape, o.size))


def test_scene_words_give_each_query_one_word(splits):
    # 32 words: cell k (reading order) is words 3k..3k+2 = colour, shape, size, or "none" x 3
    # when empty; word 27 is the count; the 4 spare queries say "none"
    counts = ["one", "two", "three", "four"]
    for scene in splits["val"][:50]:
        words = demo.scene_words(scene)
        assert len(words) == 32 == demo.NUM_QUERIES and set(words) <= set(demo.SLOT_WORDS)
        by_cell = {o.cell: o for o in scene.objects}
        for k in range(9):
            o = by_cell.get(k)
            assert words[3 * k:3 * k + 3] == ([o.color, o.shape, o.size] if o else ["none"] * 3)
        assert words[27] == counts[len(scene.objects) - 1]
        assert words[28:] == ["none"] * 4


def test_patch_labels_name_the_object_under_each_patch(splits):
    # On a 3x3 patch grid each patch is one cell, so the patch labels are the cell classes.
    for scene in splits["val"]:
        assert demo.patch_labels(scene, 3) == cell_classes(scene)
    # On a 6x6 grid (stage 4's doubled image), a labelled patch shows its object's colour when
    # drawn, every object labels at least one patch, and empty cells label none.
    for scene in splits["val"][:20]:
        labels, pix = demo.patch_labels(scene, 6), np.asarray(data.render(scene, 96))
        cells = cell_classes(scene)
        for o in scene.objects:
            assert cells[o.cell] in labels
        for k, label in enumerate(labels):
            patch = pix[16 * (k // 6):16 * (k // 6 + 1), 16 * (k % 6):16 * (k % 6 + 1)].reshape(-1, 3)
            if label:
                obj = next(o for o in scene.objects if cells[o.cell] == label)
                assert (patch == COLOR_RGB[obj.color]).all(-1).sum() > 5
            else:
                cell = (k // 6 // 2) * 3 + (k % 6) // 2
                if cells[cell] == 0:
                    assert (patch == data.BACKGROUND).all()


def test_text_corpus_holds_every_text_of_the_stages(splits):
    scenes = splits["val"][:10]
    corpus = set(demo.text_corpus(scenes, seed=3))
    assert set(data.DESCRIBE_INSTRUCTIONS) <= corpus
    for scene in scenes:
        assert data.caption(scene) in corpus and data.description(scene) in corpus
    for stage in (3, 4):
        for s in data.stage_samples(scenes, stage, 8, seed=3):
            assert s.answer in corpus and (s.query in corpus or s.query == "")
    assert "" not in corpus


# -----------------------------------------------------------------------------
# Real-data loaders


def write(path, obj, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in obj) if jsonl else json.dumps(obj, indent=1))
    return path


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 50), (10, 20, 30)).save(tmp_path / "b.jpg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return tmp_path


def test_load_caption_pairs_json_and_jsonl(images):
    recs = [{"image": "a.png", "caption": "A Cat, Sitting!"}, {"image": "b.jpg", "caption": "a dog."}]
    for jsonl in (False, True):
        samples = data.load_caption_pairs(write(images / "caps.json", recs, jsonl))
        assert [(s.task, s.query, s.answer) for s in samples] == [("caption", "", "a cat sitting"), ("caption", "", "a dog")]
        assert samples[0].image == str(images / "a.png")
        assert Image.open(samples[1].image).size == (50, 50)
    # image_root: images elsewhere than the data file
    sub = images / "meta"
    sub.mkdir()
    samples = data.load_caption_pairs(write(sub / "caps.json", recs), image_root=str(images))
    assert len(samples) == 2


def test_load_caption_pairs_cc_sbu_align_style(images):
    Image.new("RGB", (8, 8)).save(images / "7.jpg")
    path = images / "filter_cap.json"
    path.write_text(json.dumps({"annotations": [{"image_id": "7", "caption": "A long, detailed description."}]}))
    (s,) = data.load_caption_pairs(path)
    assert s.image == str(images / "7.jpg") and s.task == "describe"
    assert s.query in data.DESCRIBE_INSTRUCTIONS and s.answer == "A long, detailed description."


def test_load_llava_one_sample_per_turn_pair(images):
    recs = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Dark blue."}]}]
    samples = data.load_llava(write(images / "llava.json", recs))
    assert [(s.task, s.query, s.answer) for s in samples] == [
        ("chat", "What is this?", "A square."), ("chat", "What color?", "Dark blue.")]
    recs[0]["conversations"][1]["from"] = "human"
    with pytest.raises(ValueError, match=r"llava\.json: entry \[0\]: turn 1"):
        data.load_llava(write(images / "llava.json", recs))


def test_load_vqa_takes_the_most_common_answer(images):
    recs = [{"image": "a.png", "question": "what is it?", "answer": "cat"},
            {"image": "b.jpg", "question": "how many?", "answer": ["2", "3", "2", "two"]}]
    samples = data.load_vqa(write(images / "vqa.json", recs))
    assert [(s.task, s.query, s.answer) for s in samples] == [("vqa", "what is it?", "cat"), ("vqa", "how many?", "2")]


def test_load_refexp_converts_pixel_boxes_to_0_100(images):
    # a.png is 200 x 100: [x, y, w, h] = [20, 10, 50, 40] -> x 10..35, y 10..50 in percent
    recs = [{"image": "a.png", "phrase": "the left thing", "box": [20, 10, 50, 40]}]
    (s,) = data.load_refexp(write(images / "ref.json", recs))
    assert (s.task, s.query, s.answer, s.meta["box"]) == ("refer", "the left thing", "{<10><10><35><50>}", (10, 10, 35, 50))
    # 300 x 100: x 70/300 = 23.3 -> 23, (70 + 100)/300 = 56.7 -> 57; a box past the edge is clipped to 100
    Image.new("RGB", (300, 100)).save(images / "c.png")
    recs = [{"image": "c.png", "phrase": "p", "box": [70, 13, 100, 40]},
            {"image": "c.png", "phrase": "q", "box": [250, 80, 100, 40.5]}]
    assert [s.meta["box"] for s in data.load_refexp(write(images / "ref.json", recs))] == [(23, 13, 57, 53), (83, 80, 100, 100)]


def test_load_dataset_picks_the_format(images):
    files = {
        "caption": write(images / "1.json", [{"image": "a.png", "caption": "x"}]),
        "chat": write(images / "2.json", [{"image": "a.png", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]),
        "vqa": write(images / "3.json", [{"image": "a.png", "question": "q", "answer": "a"}], jsonl=True),
        "refer": write(images / "4.json", [{"image": "a.png", "phrase": "p", "box": [0, 0, 10, 10]}]),
    }
    for task, path in files.items():
        (s,) = data.load_dataset(path)
        assert s.task == task
    with pytest.raises(ValueError, match="cannot tell the format"):
        data.load_dataset(write(images / "5.json", [{"image": "a.png", "text": "?"}]))


def test_missing_and_corrupt_images_are_skipped_and_counted(images, capsys):
    recs = [{"image": "a.png", "caption": "ok"}, {"image": "gone.png", "caption": "missing"},
            {"image": "bad.png", "caption": "corrupt"}, {"image": "b.jpg", "caption": "ok too"}]
    samples = data.load_dataset(write(images / "caps.json", recs))
    assert [s.answer for s in samples] == ["ok", "ok too"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("skipped 2 of 4 samples: 1 missing, 1 corrupt images")
    data.load_dataset(write(images / "caps.json", recs[:1]))
    assert capsys.readouterr().out == ""  # nothing skipped, nothing printed


def one_line_error(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_malformed_files_raise_one_line_errors_naming_file_and_place(images):
    bad_json = images / "bad.json"
    bad_json.write_text('[\n {"image": "a.png", "caption": "x"},\n {"image": "a.png" "caption": "y"}\n]')
    with pytest.raises(ValueError) as e:
        data.load_dataset(bad_json)
    assert "bad.json" in one_line_error(e) and "line 3" in str(e.value)

    bad_jsonl = images / "bad.jsonl"
    bad_jsonl.write_text('{"image": "a.png", "caption": "x"}\n{"image": "a.png", "caption": }\n')
    with pytest.raises(ValueError) as e:
        data.load_caption_pairs(bad_jsonl)
    assert "bad.jsonl" in one_line_error(e) and "line 2" in str(e.value)

    no_field = write(images / "nofield.json", [{"image": "a.png", "caption": "x"}, {"image": "a.png"}])
    with pytest.raises(ValueError) as e:
        data.load_caption_pairs(no_field)
    assert "nofield.json" in one_line_error(e) and "entry [1]" in str(e.value) and "'caption'" in str(e.value)

    no_field_jsonl = write(images / "nofield.jsonl", [{"image": "a.png", "question": "q", "answer": "a"},
                                                      {"image": "a.png", "answer": "a"}], jsonl=True)
    with pytest.raises(ValueError) as e:
        data.load_vqa(no_field_jsonl)
    assert "line 2" in one_line_error(e) and "'question'" in str(e.value)

    bad_box = write(images / "box.json", [{"image": "a.png", "phrase": "p", "box": [1, 2, 3]}])
    with pytest.raises(ValueError) as e:
        data.load_refexp(bad_box)
    assert "entry [0]" in one_line_error(e) and "'box'" in str(e.value)


def test_missing_file_is_a_one_line_file_not_found_error(tmp_path):
    for load in (data.load_dataset, data.load_caption_pairs, data.load_llava, data.load_vqa, data.load_refexp):
        with pytest.raises(FileNotFoundError) as e:
            load(tmp_path / "nope.json")
        assert "nope.json" in one_line_error(e)
