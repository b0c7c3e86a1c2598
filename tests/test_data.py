"""What data.py promises: a deterministic shapes world of one object per scene, every one of its 864
scenes reachable, disjoint splits, pictures whose boxes are where the shapes are and as large as
their size says, texts that agree with the scene, and real-data loaders that skip bad images and
name the line of a malformed file.

Answers are checked against the scene by code written here, not by data.py's own helpers."""

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data

COLOR_RGB = {"red": (220, 50, 50), "green": (40, 160, 70), "blue": (50, 90, 220), "yellow": (235, 190, 20),
             "purple": (140, 70, 180), "orange": (245, 135, 25), "pink": (240, 120, 190), "black": (40, 40, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
SIDE = {"small": 14, "medium": 20, "large": 26}  # a box's side in 0-100 coordinates
WHERE = ["top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right"]
BG = np.array((245, 245, 240))


@pytest.fixture(scope="module")
def splits():
    return data.demo_splits(n_train=400, n_val=50, n_test=50, seed=0)


@pytest.fixture(scope="module")
def world():
    """Every scene the world has, once each."""
    return data.make_scenes(8 * 4 * 3 * 9, seed=0)


def sig(scene):
    return tuple(sorted((o.cell, o.color, o.shape, o.size) for o in scene.objects))


def one_of_each_shape_and_size(world):
    """12 scenes: the first of each (shape, size)."""
    first = {}
    for scene in world:
        o = scene.objects[0]
        first.setdefault((o.shape, o.size), scene)
    return list(first.values())


def fits(text, o):
    """Whether a phrase like "the small red circle" can mean the object: no word of it says otherwise."""
    words = set(re.sub(r"[^a-z ]", " ", text.lower()).split())
    return not any(w in words for w in (*COLOR_RGB, *SHAPES, *SIDE) if w not in (o.color, o.shape, o.size))


DESCRIPTION = re.compile(r"The picture shows an? (\w+) (\w+) (\w+)\. It is in the ([a-z ]+)\. "
                         r"The (\w+) is (\w+) on a light background\.")


def check_description(text, scene):
    """Three sentences: the object (size, color, shape), its place, its color on the background."""
    (o,) = scene.objects
    m = DESCRIPTION.fullmatch(text)
    assert m, text
    assert m.groups() == (o.size, o.color, o.shape, WHERE[o.cell], o.shape, o.color), (text, o)


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
        (o,) = s.objects  # exactly one object per scene
        assert o.color in COLOR_RGB and o.shape in SHAPES and o.size in SIDE and 0 <= o.cell < 9
        x1, y1, x2, y2 = o.box
        assert all(isinstance(v, int) and 0 <= v <= 100 for v in o.box)
        assert x2 - x1 == y2 - y1 == SIDE[o.size]
        # the box center is its cell's center (17, 50 or 83 per axis), moved by at most 1
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        assert abs(cx - (17, 50, 83)[o.cell % 3]) <= 1 and abs(cy - (17, 50, 83)[o.cell // 3]) <= 1


def test_jittered_draws_one_scene_at_every_allowed_offset(splits):
    for scene in splits["train"][:20]:
        (o,) = scene.objects
        moved = data.jittered(scene)
        assert len(moved) == 9 and scene in moved  # the scene's own offset is one of the nine
        centers = set()
        for m in moved:
            (p,) = m.objects
            assert (p.shape, p.color, p.size, p.cell) == (o.shape, o.color, o.size, o.cell)
            x1, y1, x2, y2 = p.box
            assert x2 - x1 == y2 - y1 == SIDE[o.size]
            centers.add(((x1 + x2) // 2 - (17, 50, 83)[o.cell % 3], (y1 + y2) // 2 - (17, 50, 83)[o.cell // 3]))
        assert centers == set(itertools.product((-1, 0, 1), repeat=2))


def test_every_combination_is_a_scene_and_no_more(world):
    # 8 colors x 4 shapes x 3 sizes x 9 cells: drawing that many distinct scenes gives each once
    combos = set(itertools.product(range(9), COLOR_RGB, SHAPES, SIDE))
    assert data.NUM_SCENES == len(combos) == 864
    assert {sig(s)[0] for s in world} == combos and len(world) == 864
    with pytest.raises(ValueError, match="cannot draw 865 distinct scenes"):
        data.make_scenes(865, seed=0)
    # the splits can share the whole world out, and then no scene is in two of them
    whole = data.demo_splits(n_train=564, n_val=100, n_test=200, seed=0)
    assert set().union(*({sig(s)[0] for s in v} for v in whole.values())) == combos
    with pytest.raises(ValueError, match="cannot draw"):
        data.demo_splits(n_train=565, n_val=100, n_test=200, seed=0)


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
def test_each_shape_is_drawn_inside_its_box_at_its_size(world, size):
    for scene in one_of_each_shape_and_size(world):
        (o,) = scene.objects
        px = np.asarray(data.render(scene, size)).astype(int)
        assert px.shape == (size, size, 3)
        x1, y1, x2, y2 = (v * size / 100 for v in o.box)
        rgb = np.array(COLOR_RGB[o.color])
        # the box center is the object's color (true of all four shapes)
        assert (px[int((y1 + y2) / 2), int((x1 + x2) / 2)] == rgb).all()
        # the shape fills a good part of its box (a triangle half, a cross 5/9, a circle pi/4)
        inside = (px[int(y1):int(y2), int(x1):int(x2)] == rgb).all(-1).mean()
        assert inside > 0.4, (o, inside)
        # every painted pixel is the object's color and lies in its box (1 px of rounding allowed)
        painted = (px != BG).any(-1)
        assert (px[painted] == rgb).all()
        ys, xs = np.nonzero(painted)
        assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1
        # and the shape spans its box: small, medium and large are 14, 20 and 26 hundredths across
        side = SIDE[o.size] * size / 100
        assert abs(xs.max() + 1 - xs.min() - side) <= 1.5 and abs(ys.max() + 1 - ys.min() - side) <= 1.5, o


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
            (o,) = scene.objects
            assert (s.task, s.query) == ("caption", "")
            assert s.image.size == (32, 32) and s.image.mode == "RGB"
            assert s.answer == data.clean_caption(s.answer) and len(s.answer.split()) <= 50
            assert s.answer == f"a {o.size} {o.color} {o.shape}"


def test_stage_3_samples_describe_the_object_and_its_position(splits):
    scenes = splits["val"][:20]
    samples = data.stage_samples(scenes, 3, image_size=32, seed=0)
    assert len(data.DESCRIBE_INSTRUCTIONS) >= 8
    assert len({s.query for s in data.stage_samples(splits["train"][:100], 3, 8, seed=0)}) > 5  # varied
    assert len(samples) == len(scenes)
    for s, scene in zip(samples, scenes):
        assert s.task == "describe" and s.query in data.DESCRIBE_INSTRUCTIONS
        check_description(s.answer, scene)


def test_stage_4_samples_cover_the_tasks_and_share_one_image_per_scene(splits):
    scenes = splits["val"][:20]
    samples = data.stage_samples(scenes, 4, image_size=48, seed=0)
    assert set(data.TASKS) == {"vqa", "caption", "refer", "identify", "grounding", "describe"}
    assert all(isinstance(s.query, str) and isinstance(s.answer, str) and s.answer for s in samples)
    by_scene = {}
    for s in samples:
        by_scene.setdefault(s.meta["scene"], []).append(s)
        assert s.image.size == (48, 48)
    assert len(by_scene) == len(scenes)
    for mine in by_scene.values():
        assert len({id(s.image) for s in mine}) == 1
        # per scene: one question of each of the four types, and one sample of each other task
        assert Counter(s.task for s in mine) == {"vqa": 4, "caption": 1, "refer": 1, "identify": 1,
                                                 "grounding": 1, "describe": 1}
        assert sorted(s.meta["qtype"] for s in mine if s.task == "vqa") == sorted(
            ["color", "shape", "size", "position"])
    assert data.stage_samples(scenes, 4, 48, seed=0)[5].answer == samples[5].answer  # deterministic
    with pytest.raises(ValueError, match="stage 5"):
        data.stage_samples(scenes, 5, 48, seed=0)


def test_stage_4_holds_an_untagged_description_as_stage_3_writes_it(splits):
    # the paper's stage-4 mixture includes detailed descriptions, so the model keeps what stage 3 taught
    scenes = {s.seed: s for s in splits["val"][:20]}
    described = [s for s in data.stage_samples(list(scenes.values()), 4, None, seed=0) if s.task == "describe"]
    assert len(described) == len(scenes)
    for s in described:
        assert s.query in data.DESCRIBE_INSTRUCTIONS and not s.query.startswith("[")  # no task tag
        check_description(s.answer, scenes[s.meta["scene"]])


def test_every_vqa_answer_agrees_with_the_scene(splits):
    scenes = {s.seed: s for s in splits["train"][:150]}
    samples = [s for s in data.stage_samples(list(scenes.values()), 4, 8, seed=1) if s.task == "vqa"]
    answers = Counter()
    for s in samples:
        scene, q, a, t = scenes[s.meta["scene"]], s.query, s.answer, s.meta["qtype"]
        (o,) = scene.objects
        assert 1 <= len(a.split()) <= 2 and q.endswith("?")
        m = re.fullmatch(r"(what color is|what shape is|what size is|where is) (.+)\?", q)
        assert m and fits(m.group(2), o), (q, o)  # the question names the object
        assert o.color in q.split() or o.shape + "?" in q.split(), q  # by an attribute it does not ask about
        expected = {"color": o.color, "shape": o.shape, "size": o.size, "position": WHERE[o.cell]}[t]
        assert a == expected, (q, a, scene)
        assert not re.search(rf"\b{expected}\b", q), q  # the question does not give its answer away
        answers[t, a] += 1
    # every value of every attribute is asked for somewhere
    for t, values in (("color", COLOR_RGB), ("shape", SHAPES), ("size", SIDE), ("position", WHERE)):
        assert {a for (qt, a) in answers if qt == t} == set(values), t


def test_refer_identify_and_grounding_name_the_object(splits):
    scenes = {s.seed: s for s in splits["train"][:100]}
    for s in data.stage_samples(list(scenes.values()), 4, 8, seed=2):
        scene = scenes[s.meta["scene"]]
        (o,) = scene.objects
        if s.task == "refer":
            # named by color and shape, with or without the size, as a person would name it
            assert s.query in (f"the {o.size} {o.color} {o.shape}", f"the {o.color} {o.shape}"), s.query
            assert data.parse_box(s.answer) == o.box == s.meta["box"]
        elif s.task == "identify":
            assert s.answer == f"the {o.size} {o.color} {o.shape}"
            assert data.parse_box(s.query) == o.box == s.meta["box"]
        elif s.task == "grounding":
            boxes = [tuple(map(int, b)) for b in re.findall(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}", s.answer)]
            assert boxes == [o.box] == s.meta["boxes"]
            assert re.sub(r" \{[^}]*\}", "", s.answer) == data.caption(scene)


def test_clean_caption_rules():
    assert data.clean_caption("A Dog, running!  On the 'beach'...") == "a dog running on the beach"
    assert data.clean_caption("don't_stop") == "dontstop"
    assert data.clean_caption(" ".join(["word"] * 60)) == " ".join(["word"] * 50)


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
        samples = data.load_dataset(write(images / "caps.json", recs, jsonl))
        assert [(s.task, s.query, s.answer) for s in samples] == [("caption", "", "a cat sitting"), ("caption", "", "a dog")]
        assert samples[0].image == str(images / "a.png")
        assert Image.open(samples[1].image).size == (50, 50)
    # image_root: images elsewhere than the data file
    sub = images / "meta"
    sub.mkdir()
    samples = data.load_dataset(write(sub / "caps.json", recs), image_root=str(images))
    assert len(samples) == 2


def test_load_caption_pairs_cc_sbu_align_style(images):
    Image.new("RGB", (8, 8)).save(images / "7.jpg")
    path = images / "filter_cap.json"
    path.write_text(json.dumps({"annotations": [{"image_id": "7", "caption": "A long, detailed description."}]}))
    (s,) = data.load_dataset(path)
    assert s.image == str(images / "7.jpg") and s.task == "describe"
    assert s.query in data.DESCRIBE_INSTRUCTIONS and s.answer == "A long, detailed description."


def test_load_llava_one_sample_per_turn_pair(images):
    recs = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Dark blue."}]}]
    samples = data.load_dataset(write(images / "llava.json", recs))
    assert [(s.task, s.query, s.answer) for s in samples] == [
        ("chat", "What is this?", "A square."), ("chat", "What color?", "Dark blue.")]
    recs[0]["conversations"][1]["from"] = "human"
    with pytest.raises(ValueError, match=r"llava\.json: entry \[0\]: turn 1"):
        data.load_dataset(write(images / "llava.json", recs))


def test_load_vqa_takes_the_most_common_answer(images):
    recs = [{"image": "a.png", "question": "what is it?", "answer": "cat"},
            {"image": "b.jpg", "question": "how many?", "answer": ["2", "3", "2", "two"]}]
    samples = data.load_dataset(write(images / "vqa.json", recs))
    assert [(s.task, s.query, s.answer) for s in samples] == [("vqa", "what is it?", "cat"), ("vqa", "how many?", "2")]


def test_load_refexp_converts_pixel_boxes_to_0_100(images):
    # a.png is 200 x 100: [x, y, w, h] = [20, 10, 50, 40] -> x 10..35, y 10..50 in percent
    recs = [{"image": "a.png", "phrase": "the left thing", "box": [20, 10, 50, 40]}]
    (s,) = data.load_dataset(write(images / "ref.json", recs))
    assert (s.task, s.query, s.answer, s.meta["box"]) == ("refer", "the left thing", "{<10><10><35><50>}", (10, 10, 35, 50))
    # 300 x 100: x 70/300 = 23.3 -> 23, (70 + 100)/300 = 56.7 -> 57; a box past the edge is clipped to 100
    Image.new("RGB", (300, 100)).save(images / "c.png")
    recs = [{"image": "c.png", "phrase": "p", "box": [70, 13, 100, 40]},
            {"image": "c.png", "phrase": "q", "box": [250, 80, 100, 40.5]}]
    assert [s.meta["box"] for s in data.load_dataset(write(images / "ref.json", recs))] == [(23, 13, 57, 53), (83, 80, 100, 100)]


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
        data.load_dataset(bad_jsonl)
    assert "bad.jsonl" in one_line_error(e) and "line 2" in str(e.value)

    no_field = write(images / "nofield.json", [{"image": "a.png", "caption": "x"}, {"image": "a.png"}])
    with pytest.raises(ValueError) as e:
        data.load_dataset(no_field)
    assert "nofield.json" in one_line_error(e) and "entry [1]" in str(e.value) and "'caption'" in str(e.value)

    no_field_jsonl = write(images / "nofield.jsonl", [{"image": "a.png", "question": "q", "answer": "a"},
                                                      {"image": "a.png", "answer": "a"}], jsonl=True)
    with pytest.raises(ValueError) as e:
        data.load_dataset(no_field_jsonl)
    assert "line 2" in one_line_error(e) and "'question'" in str(e.value)

    bad_box = write(images / "box.json", [{"image": "a.png", "phrase": "p", "box": [1, 2, 3]}])
    with pytest.raises(ValueError) as e:
        data.load_dataset(bad_box)
    assert "entry [0]" in one_line_error(e) and "'box'" in str(e.value)


def test_missing_file_is_a_one_line_file_not_found_error(tmp_path):
    for load in (data.load_dataset,):
        with pytest.raises(FileNotFoundError) as e:
            load(tmp_path / "nope.json")
        assert "nope.json" in one_line_error(e)
