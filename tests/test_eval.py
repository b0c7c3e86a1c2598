"""What eval.py promises: each benchmark is read in its released format and scored with the official
code's metric and, where that differs, the benchmark's own, both checked here against values worked
out by hand; our own data is scored as the demo's table scores it; bad input is one line and exit
code 2; a missing or corrupt image is skipped and counted.

Most tests answer through stand-ins whose answers are written in the test, keyed by the exact text
the official code sends, so a wrong prompt fails too. The last ones train a tiny demo run and check
the functions the stand-ins replace against the model's own generate and loss.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as ev
import scoring
import tinygptv as tg
from int8 import Int8Linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQA = "[vqa] Based on the image, respond to this question with a short answer: {}"  # the official texts
VIZWIZ = ("[vqa] The question is '{}' Based on the image, answer the question with a single word or phrase. "
          "and reply 'unanswerable' when the provided information is insufficient")
VSR = "[vqa] Based on the image, is this statement true or false? {}"
HM = "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:"
WRAP = "###Human: <Img><ImageHere></Img> {}###Assistant: "  # eval_vqa.py's prepare_texts, TinyGPT-V's conversation


def picture(path, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path)


BLANK = (245, 245, 240)  # data.BACKGROUND, the whole of data.blank_image


class StandIn:
    """Answers each instruction from a table (a blank image gets `blank`) and records every call."""
    training = False

    def __init__(self, answers, blank=""):
        self.answers, self.blank, self.calls = answers, blank, []

    def image_size(self, stage):
        return 16

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def generate(self, tok, images, instructions, stage=4, max_new_tokens=20):
        self.calls.append((stage, max_new_tokens))
        # the blank picture is the demo's background colour; the data's own pictures are red
        return [self.blank if im.getpixel((0, 0)) == BLANK else self.answers[q] for im, q in zip(images, instructions)]


def run(monkeypatch, tmp_path, raw, *argv):
    """eval.py's command line, the benchmark's texts answered from the table `raw` (text -> what the
    model writes); returns the results JSON, and the wrapping each batch was sent in."""
    templates = []

    def generate_raw(model, tok, batch, template):
        templates.append(template)
        return [raw[s.query] for s in batch]

    monkeypatch.setattr(ev, "generate_raw", generate_raw)
    monkeypatch.setattr(ev, "load_model", lambda args: (StandIn({}), None, 4))
    result = ev.main([*argv, "--out", str(tmp_path / "results.json"), "--force"])  # (a test may run twice)
    result["templates"] = templates
    assert json.loads((tmp_path / "results.json").read_text())["scores"] == result["scores"]
    return result


# -----------------------------------------------------------------------------
# The metrics, as pure functions

def test_answers_are_normalized_as_the_vqa_evaluation_does():
    assert ev.normalize_answer("Two.") == "2"
    assert ev.normalize_answer("The dog!") == "dog"
    assert ev.normalize_answer("a red, shiny car") == "red shiny car"
    assert ev.normalize_answer("dont know") == "don't know"
    assert ev.normalize_answer("3.5 meters") == "3.5 meters"  # a period before a digit stays
    assert ev.normalize_answer("1,000") == "1000"  # a comma inside a number drops all punctuation
    assert ev.normalize_answer("yes/no") == "yes no"


def test_vqa_accuracy_is_min_matches_over_3_averaged_over_ten_leave_one_outs():
    # n of the ten humans agree: the 9-human subsets without one of them see n - 1, the others n
    others = ["3"] * 9
    assert ev.vqa_accuracy("Two", ["2"] + others) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert ev.vqa_accuracy("two", ["2"] * 2 + others[:8]) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert ev.vqa_accuracy("2", ["2"] * 3 + others[:7]) == pytest.approx((3 * (2 / 3) + 7) / 10)  # 0.9
    assert ev.vqa_accuracy("2", ["2"] * 4 + others[:6]) == 1.0
    assert ev.vqa_accuracy("4", ["2"] * 4 + others[:6]) == 0.0
    # the human answers are cleaned only when they disagree: unanimous ones are compared as released
    assert ev.vqa_accuracy("yes", ["yes."] * 10) == 0.0
    assert ev.vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)


def test_auroc_counts_ordered_pairs_and_half_the_ties():
    # positives 0.9, 0.4; negatives 0.8, 0.3, 0.6: 0.9 beats all three, 0.4 beats 0.3 only: 4 of 6
    assert ev.auroc([0.9, 0.8, 0.4, 0.3, 0.6], [1, 0, 1, 0, 0]) == pytest.approx(4 / 6)
    assert ev.auroc([0.5, 0.5], [1, 0]) == 0.5
    assert ev.auroc([0.1, 0.9], [1, 0]) == 0.0


# -----------------------------------------------------------------------------
# Each benchmark, from its released format

def test_gqa_exact_match_next_to_substring_and_bad_images_skipped(tmp_path, monkeypatch, capsys):
    for image in ("n1", "n2", "n3", "n4", "n5", "n8"):
        picture(str(tmp_path / "images" / f"{image}.jpg"))
    (tmp_path / "images" / "n7.jpg").write_bytes(b"not a jpeg")
    labels = {"q1": ("n1", "left"), "q2": ("n2", "left"), "q3": ("n3", "no"), "q4": ("n4", "yes"), "q5": ("n5", "red"),
              "q6": ("n6", "blue"), "q7": ("n7", "blue"), "q8": ("n8", "red")}  # n6 is missing, n7 corrupt
    questions = {q: {"imageId": im, "question": f"question {q}?", "answer": a, "fullAnswer": "...", "isBalanced": True}
                 for q, (im, a) in labels.items()}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    raw = {VQA.format("question q1?"): "left", VQA.format("question q2?"): "On the left.",
           VQA.format("question q3?"): "not sure", VQA.format("question q4?"): "Yes.", VQA.format("question q5?"): "blue",
           VQA.format("question q8?"): "blue###Human: is it red?"}  # the official code reads on past "###"
    argv = ["--task", "gqa", "--data", str(tmp_path / "testdev_balanced_questions.json"),
            "--images", str(tmp_path / "images")]
    r = run(monkeypatch, tmp_path, raw, *argv)
    # substring: left, "left" in "on the left.", "no" in "not sure", "yes" in "yes.", "red" after "###": 5 of 6
    # exact match of the answer before "###": left and "Yes." (its final period dropped): 2 of 6
    assert r["scores"] == {"substring of the answer (official)": pytest.approx(500 / 6),
                           "exact match (GQA's own)": pytest.approx(200 / 6)}
    assert (r["scored"], r["skipped"]) == (6, 2) and r["templates"] == [WRAP]
    out = capsys.readouterr()
    assert "skipped 2 of 8 samples: 1 missing, 1 corrupt" in out.out
    assert "ETA" in out.err  # the progress line
    r = run(monkeypatch, tmp_path, raw, *argv, "--limit", "2", "--template", "stage4")
    assert r["scored"] == 2 and r["scores"]["exact match (GQA's own)"] == 50.0
    assert r["templates"] == ["[INST] <Img><ImageHere></Img> {} [/INST]"]


def test_vsr_double_counts_officially_and_once_by_its_own_accuracy(tmp_path, monkeypatch):
    rows = [("The cat is on the mat.", 1, "True"), ("The dog is under the car.", 1, "yes, true"),
            ("The cup is left of the plate.", 0, "no"), ("The bus is behind the tree.", 0, "true"),
            ("The bird is above the cat.", 0, "I do not know")]
    with open(tmp_path / "test.jsonl", "w") as f:
        for i, (caption, label, _) in enumerate(rows):
            image = f"{i:012d}.jpg"
            picture(str(tmp_path / "coco" / ("val2017" if i == 2 else "train2017") / image))
            f.write(json.dumps({"image": image, "caption": caption, "label": label, "relation": "on"}) + "\n")
    r = run(monkeypatch, tmp_path, {VSR.format(c): a for c, _, a in rows}, "--task", "vsr", "--data",
            str(tmp_path / "test.jsonl"), "--images", str(tmp_path / "coco"))
    # official: 1 ("true"), 2 ("true" and "yes"), 1 ("no"), 0, 1 ("no" inside "not"): 5 of 5 answers
    # once: right, right (yes first), right, wrong, wrong (no verdict): 3 of 5
    assert r["scores"] == {"true/false + yes/no, can pass 100 (official)": 100.0, "each answer counted once": 60.0}
    assert r["skipped"] == 0  # images found in train2017/ and val2017/


def test_vizwiz_official_substring_score_next_to_vqa_accuracy(tmp_path, monkeypatch):
    questions = [("What is this?", ["unanswerable"] * 4 + ["blurry"] * 6, "unanswerable"),
                 ("What color is it?", ["red"] * 2 + ["dark red"] * 8, "Red.###"),
                 ("How many?", ["2"] * 3 + ["3"] * 7, "Two."),
                 ("Is it on?", ["yes"] * 10, "###Human: is it?")]  # an empty answer
    records = []
    for i, (q, humans, _) in enumerate(questions):
        picture(str(tmp_path / "val" / f"VizWiz_val_{i:08d}.jpg"))
        records.append({"image": f"VizWiz_val_{i:08d}.jpg", "question": q, "answerable": 1, "answer_type": "other",
                        "answers": [{"answer": h, "answer_confidence": "yes"} for h in humans]})
    (tmp_path / "val.json").write_text(json.dumps(records))
    r = run(monkeypatch, tmp_path, {VIZWIZ.format(q): a for q, _, a in questions}, "--task", "vizwiz", "--data",
            str(tmp_path / "val.json"), "--images", str(tmp_path / "val"))
    # official: 4 equal -> 1; "red" in "red." twice -> 2/3; "two." matches nothing -> 0; "" is in every answer -> 1
    # VQA accuracy: 4 of 10 -> 1; "red" 2 of 10 -> 0.6; "2" 3 of 10 -> 0.9; nothing -> 0
    assert r["scores"]["substring both ways, min(n/3, 1) (official)"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4)
    assert r["scores"]["VQA accuracy (VizWiz's own)"] == pytest.approx(100 * (1 + 0.6 + 0.9 + 0) / 4)


def test_okvqa_reads_vqa_v2_questions_and_annotations(tmp_path, monkeypatch):
    picture(str(tmp_path / "coco" / "COCO_val2014_000000000001.jpg"))
    picture(str(tmp_path / "coco" / "000000000002.jpg"))  # the official code's file names work too
    questions = {"questions": [{"image_id": 1, "question": "How many?", "question_id": 11},
                               {"image_id": 2, "question": "What vehicle is this?", "question_id": 12}]}
    humans = {11: ["2"] + ["3"] * 9, 12: ["fire truck"] * 5 + ["firetruck"] * 5}
    annotations = {"annotations": [{"question_id": q, "image_id": q - 10, "question_type": "other",
                                    "answers": [{"answer": h, "answer_id": i + 1} for i, h in enumerate(hs)]}
                                   for q, hs in humans.items()]}
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    raw = {VQA.format("How many?"): "Two", VQA.format("What vehicle is this?"): "The fire truck.###Human: ok"}
    r = run(monkeypatch, tmp_path, raw, "--task", "okvqa", "--data", str(tmp_path / "questions.json"),
            "--annotations", str(tmp_path / "annotations.json"), "--images", str(tmp_path / "coco"))
    # "2" agrees with 1 of 10 -> 0.3; "fire truck" with 5 -> 1
    assert r["scores"] == {"VQA accuracy (official = OK-VQA's own)": pytest.approx(100 * (0.3 + 1.0) / 2)}


def test_hateful_memes_official_accuracy_auroc_and_accuracy_of_p_yes(tmp_path, monkeypatch):
    memes = [(42, 1, "Yes, it is."), (43, 0, "no"), (44, 1, "No."), (45, 0, "I am not sure"), (46, 0, "yes"),
             (47, 1, "yes, but not kind")]
    with open(tmp_path / "dev.jsonl", "w") as f:
        for i, label, _ in memes:
            picture(str(tmp_path / "img" / f"{i}.png"))
            f.write(json.dumps({"id": i, "img": f"img/{i}.png", "label": label, "text": f"meme {i}"}) + "\n")
    p_yes, asked = {42: 0.9, 43: 0.8, 44: 0.4, 45: 0.3, 46: 0.6, 47: 0.85}, []

    def yes_probability(model, tok, batch, template):
        asked.append(template)
        return [p_yes[s.meta["id"]] for s in batch]

    monkeypatch.setattr(ev, "yes_probability", yes_probability)
    r = run(monkeypatch, tmp_path, {HM.format(f"meme {i}"): a for i, _, a in memes}, "--task", "hm", "--data",
            str(tmp_path / "dev.jsonl"))
    # official: yes->1 right, no->0 right, no->0 wrong, "not" holds "no"->0 right, yes->1 wrong, yes (before
    # "no" in "not")->1 right: 4 of 6. AUROC: positives 0.9, 0.4, 0.85 against negatives 0.8, 0.3, 0.6 win
    # 3 + 1 + 3 of 9 pairs; P(yes) > 0.5 says 1 1 0 0 1 1 against 1 0 1 0 0 1: 3 of 6
    assert r["scores"] == {"yes/no substring accuracy (official)": pytest.approx(400 / 6),
                           "AUROC of P(yes) (HM's own)": pytest.approx(700 / 9), "accuracy at P(yes) > 0.5 (HM's own)": 50.0}
    assert [p["p_yes"] for p in r["predictions"]] == [0.9, 0.8, 0.4, 0.3, 0.6, 0.85] and asked == [WRAP]


def test_iconqa_ranks_the_choices_of_its_split_by_loss(tmp_path, monkeypatch):
    problem = lambda q, choices, answer, kind="choose_txt", split="val": {
        "question": q, "choices": choices, "answer": answer, "ques_type": kind, "split": split, "grade": "prek"}
    problems = {"101": problem("Which is bigger?", ["cat", "dog"], 1), "102": problem("How many?", ["1", "2", "3"], 0),
                "103": problem("Fill in.", None, "4", kind="fill_in_blank"),
                "104": problem("Which?", ["a", "b"], 0, split="test")}  # only the val multi-text-choice ones count
    for pid, p in problems.items():
        picture(str(tmp_path / "iconqa" / p["split"] / p["ques_type"] / pid / "image.png"))
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    losses = {"101": [0.5, 0.2], "102": [0.9, 0.1, 0.3]}  # picks 1 (right) and 1 (wrong: the answer is 0)
    asked = []

    def choice_losses(model, tok, batch, stage):
        asked.extend((s.meta["id"], s.query, s.meta["choices"], stage) for s in batch)
        return [losses[s.meta["id"]] for s in batch]

    monkeypatch.setattr(ev, "choice_losses", choice_losses)
    r = run(monkeypatch, tmp_path, {}, "--task", "iconqa", "--data", str(tmp_path / "problems.json"))
    assert r["scores"] == {"top-1 of the loss ranking (official = IconQA's own)": 50.0} and r["skipped"] == 0
    # stage 3's template: "###Human: <Img><ImageHere></Img> {} ###Assistant: ", as eval_vqa.py's multi_select
    assert asked == [("101", VQA.format("Which is bigger?"), ["cat", "dog"], 3),
                     ("102", VQA.format("How many?"), ["1", "2", "3"], 3)]


def test_refcoco_scores_each_split_by_iou_officially_and_by_the_refer_toolkit(tmp_path, monkeypatch):
    picture(str(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg"), size=(20, 20))
    instances = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 20, "height": 20}],
                 "annotations": [{"id": 10, "image_id": 5, "bbox": [0, 0, 10, 10], "category_id": 1},
                                 {"id": 11, "image_id": 5, "bbox": [10, 10, 10, 10], "category_id": 1},
                                 {"id": 12, "image_id": 5, "bbox": [0, 0, 9, 9], "category_id": 1}]}
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 5, "split": "val",
             "sentences": [{"sent": "top left"}, {"sent": "upper left"}, {"sent": "left corner"}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 5, "split": "testA",
             "sentences": [{"sent": "bottom right"}, {"sent": "other"}]},
            {"ref_id": 2, "ann_id": 12, "image_id": 5, "split": "testA", "sentences": [{"sent": "small corner"}]},
            {"ref_id": 3, "ann_id": 11, "image_id": 5, "split": "train", "sentences": [{"sent": "not scored"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    ask = "[refer] give me the location of {}"
    # in pixels (0-100 of 20 px = /5): (0,0,10,10) exact; (0,0,4.8,10): IoU 48/100 = 0.48, but counting
    # pixels inclusive (5.8 * 11) / (11 * 11) = 0.527 > 0.5; (0,0,5,10): IoU 0.5 exactly, inclusive
    # 66/121 = 0.545; (10,10,20,20) exact; no box at all; (0,0,4,9) in (0,0,9,9): IoU 36/81, inclusive
    # 50/100 = 0.5, not above it
    raw = {ask.format("top left"): "{<0><0><50><50>}", ask.format("upper left"): "{<0> <0> <24> <50>}",
           ask.format("left corner"): "{<0><0><25><50>}", ask.format("small corner"): "{<0><0><20><45>}",
           ask.format("bottom right"): "{<50><50><100><100>}", ask.format("other"): "at the bottom right"}
    r = run(monkeypatch, tmp_path, raw, "--task", "refcoco", "--data", str(tmp_path / "refs.json"), "--images",
            str(tmp_path / "train2014"))
    assert r["scores"] == {"testA IoU > 0.5, inclusive pixels (official)": pytest.approx(100 / 3),
                           "testA IoU >= 0.5 (refer toolkit)": pytest.approx(100 / 3),
                           "val IoU > 0.5, inclusive pixels (official)": 100.0,
                           "val IoU >= 0.5 (refer toolkit)": pytest.approx(200 / 3)}


# -----------------------------------------------------------------------------
# Our own data, as train.py --eval-data scores it

def test_own_formats_score_as_the_demo_table_with_a_blank_image_column(tmp_path, capsys):
    import data
    picture(str(tmp_path / "a.png"), size=(20, 20))
    (tmp_path / "refer.json").write_text(json.dumps([
        {"image": "a.png", "phrase": "the red square", "box": [0, 0, 10, 10]},  # 0-100: (0, 0, 50, 50)
        {"image": "a.png", "phrase": "the red block", "box": [0, 0, 10, 10]},
        {"image": "a.png", "phrase": "the corner", "box": [10, 10, 10, 10]}]))  # (50, 50, 100, 100)
    (tmp_path / "vqa.json").write_text(json.dumps([{"image": "a.png", "question": "what color?", "answer": "red"},
                                                   {"image": "a.png", "question": "what shape?", "answer": "square"}]))
    samples = data.load_dataset(str(tmp_path / "refer.json")) + data.load_dataset(str(tmp_path / "vqa.json"))
    refer = "[refer] give me the location of {}"
    # IoU 25 * 50 / (50 * 50) = 0.5 hits; 24 * 50 / 2500 = 0.48 misses; the corner exact: 2 of 3
    model = StandIn({refer.format("the red square"): "{<0><0><25><50>}", refer.format("the red block"): "{<0><0><24><50>}",
                     refer.format("the corner"): "{<50><50><100><100>}",
                     VQA.format("what color?"): " Red ", VQA.format("what shape?"): "circle"}, blank="{<0><0><50><50>}")
    model.train()
    rows = scoring.score(model, None, samples, stage=4)
    assert rows == {"vqa": {"image": 50.0, "blank": 0.0},
                    "refer": {"image": pytest.approx(200 / 3), "blank": pytest.approx(200 / 3)}}
    assert model.training  # its mode is given back
    assert set(model.calls) == {(4, 24)}  # the demo's 24 new tokens in stage 4
    with pytest.raises(ValueError, match=r"vqa.json: no 'caption' samples \(it holds \{'vqa': 2\}\)"):
        ev.main(["--task", "caption", "--data", str(tmp_path / "vqa.json")])
    scoring.print_table("held out", rows)
    table = capsys.readouterr().out
    assert "  VQA exact match                50.0        0.0" in table
    assert "  [refer] IoU >= 0.5             66.7       66.7" in table


# -----------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any model is loaded

@pytest.mark.parametrize("name, content, argv, expected", [
    ("val.json", [{"image": "a.jpg", "question": "q", "answers": [{"answer": "x"}] * 10},
                  {"image": "b.jpg", "question": "q"}],
     ["--task", "vizwiz"], "val.json: entry [1]: missing field 'answers'"),
    ("dev.jsonl", [{"id": 1, "img": "img/1.png", "label": 0, "text": "t"}, {"id": 2, "img": "img/2.png", "text": "t"}],
     ["--task", "hm"], "dev.jsonl: line 2: missing field 'label'"),
    ("q.json", {"201": {"imageId": "n1", "question": "q", "answer": "a"}, "202": {"question": "q", "answer": "a"}},
     ["--task", "gqa"], "q.json: question 202: missing field 'imageId'"),
    ("q.json", {}, ["--task", "coco"], "unknown task 'coco'"),
    ("q.json", [], ["--task", "gqa"], "q.json: expected a JSON object, found list"),
])
def test_bad_input_is_one_line_naming_the_file_and_record(tmp_path, name, content, argv, expected):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in content) if name.endswith(".jsonl") else json.dumps(content))
    r = subprocess.run([sys.executable, "eval.py", *argv, "--data", str(path), "--run", str(tmp_path / "no_run")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# A tiny trained demo run: the real model behind the same functions

TINY = ["--demo-train", "48", "--demo-eval", "8", "--lm-steps", "2", "--vision-steps", "2", "--no-eval",
        "--steps", "1", "--batch-size", "8", "--ckpt-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import train
    out = tmp_path_factory.mktemp("demo")
    args = train.parse_args(["--out", str(out), *TINY])
    train.run(args)  # stage 0, then stages 1-4 for one step each: their answers are noise, the same either way
    return out, args


def test_the_demo_model_scores_on_a_file_as_in_the_demo_table(demo_run, tmp_path, monkeypatch):
    import demo
    out, args = demo_run
    calls, generate = [], tg.TinyGPTV.generate

    def recorded(self, tok, images, instructions, stage=4, max_new_tokens=20, **kw):  # what the model is asked
        pixels = torch.stack([tg.preprocess(im, self.image_size(stage)) for im in images])
        calls.append((list(instructions), stage, max_new_tokens, pixels))
        return generate(self, tok, images, instructions, stage, max_new_tokens, **kw)

    monkeypatch.setattr(tg.TinyGPTV, "generate", recorded)
    model, tok, _ = demo.load_demo(str(out))
    want = demo.evaluate(model, tok, args.split, n=8)["vqa"]
    asked = [c for c in calls if c[0][0].startswith("[vqa]")]  # the table's VQA rows: image, then blank
    samples = [s for s in demo.stage_samples(args.split, 4, "test") if s.task == "vqa"][:8]
    names, rows = {}, []
    for s in samples:  # the same samples as a VQA file of ours, each scene's picture as a (lossless) PNG
        if id(s.image) not in names:
            names[id(s.image)] = f"scene{len(names)}.png"
            s.image.save(tmp_path / names[id(s.image)])
        rows.append({"image": names[id(s.image)], "question": s.query, "answer": s.answer})
    (tmp_path / "vqa.json").write_text(json.dumps(rows))
    calls.clear()
    got = ev.main(["--task", "vqa", "--data", str(tmp_path / "vqa.json"), "--run", str(out), "--batch-size", "64",
                   "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert got["scores"]["vqa"] == want
    assert len(calls) == len(asked) == 2  # the same prompts, pixels, stage and lengths, in one batch each
    for (q1, stage1, n1, px1), (q2, stage2, n2, px2) in zip(calls, asked):
        assert (q1, stage1, n1) == (q2, stage2, n2) and torch.equal(px1, px2)


def test_weight_options_load_the_demo_run_as_its_default_does(demo_run, tmp_path):
    out = demo_run[0]
    phi2 = tmp_path / "phi2"  # a Phi-2 directory holds its tokenizer
    shutil.copytree(out / "backbones" / "phi2", phi2)
    shutil.copy(out / "backbones" / "tokenizer.json", phi2)
    options = dict(run=None, checkpoint=None, phi2=None, blip2=None, qformer=None, int8=False, device="cpu")
    demo_model, demo_tok, demo_stage = ev.load_model(argparse.Namespace(**{**options, "run": str(out)}))
    real = {**options, "checkpoint": str(out / "stage4.safetensors"), "phi2": str(phi2),
            "blip2": str(out / "backbones" / "vit"), "qformer": str(out / "backbones" / "qformer")}
    model, tok, stage = ev.load_model(argparse.Namespace(**real))
    assert stage == demo_stage == 4 and tok.get_vocab() == demo_tok.get_vocab()
    want = demo_model.state_dict()
    assert model.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    int8, _, _ = ev.load_model(argparse.Namespace(**{**real, "int8": True}))
    assert any(isinstance(m, Int8Linear) for m in int8.modules())
    with pytest.raises(ValueError, match="--checkpoint needs --phi2 and --blip2"):
        ev.load_model(argparse.Namespace(**{**options, "checkpoint": real["checkpoint"]}))


def test_generation_losses_and_p_yes_agree_with_the_models_own(demo_run):
    import data
    import demo
    model, tok, _ = demo.load_demo(str(demo_run[0]))
    found = demo.stage_samples(demo_run[1].split, 4, "test")
    scenes = list({id(s.image): s.image for s in found}.values())[:2]  # two different pictures
    # raw generation in stage 4's own template is what TinyGPTV.generate answers, before its strip()
    asked = [data.Sample(s.image, s.task, tg.stage_instruction(4, s), "", {})
             for s in found if s.task in ("vqa", "refer", "caption")][:6]
    raw = ev.generate_raw(model, tok, asked, tg.TEMPLATES[4])
    assert [r.strip() for r in raw] == model.generate(tok, [s.image for s in asked], [s.query for s in asked], stage=4)
    batch = [data.Sample(scenes[0], "iconqa", VQA.format("what shape?"), "0", {"choices": ["circle", "red square"]}),
             data.Sample(scenes[1], "iconqa", VQA.format("how many?"), "0", {"choices": ["one", "two", "three"]})]
    px = [tg.preprocess(im, model.image_size(4))[None] for im in scenes]  # 448 px at full size, for every benchmark
    for stage in (3, 4):
        for s, x, losses in zip(batch, px, ev.choice_losses(model, tok, batch, stage)):
            for c, loss in zip(s.meta["choices"], losses):  # each choice alone, its loss averaged over its tokens
                logits, targets = model([tg.make_example(tok, stage, s.query, c)], pixel_values=x)
                assert loss == pytest.approx(tg.lm_loss(logits, targets).item(), rel=1e-4)
    bos = tok.token_to_id(tg.BOS)
    for s, x, prob in zip(batch, px, ev.yes_probability(model, tok, batch, WRAP)):
        before, after = WRAP.format(s.query).split("<ImageHere>")  # the next token after the official prompt
        example = tg.Example([bos] + tg.encode(tok, before), tg.encode(tok, after), tg.encode(tok, "no"))
        logits, _ = model([example], pixel_values=x)
        first = torch.softmax(logits[0].float(), -1)
        ids = lambda w: {tg.encode(tok, v)[0] for v in (w, " " + w, w.title(), " " + w.title())}
        yes, no = sum(first[i] for i in ids("yes")), sum(first[i] for i in ids("no"))
        assert prob == pytest.approx((yes / (yes + no)).item(), rel=1e-4)
