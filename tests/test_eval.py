"""What eval.py promises: each benchmark is read in its released format and scored with the official
code's metric and, where that differs, the benchmark's own, both checked here against values worked
out by hand; our own data is scored as the demo's table scores it; bad input is one line and exit
code 2; a missing or corrupt image is skipped and counted.

Most tests answer through a stand-in model whose answers are written in the test, keyed by the exact
prompt the official code sends, so a wrong prompt fails too. The last ones train a tiny demo run.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as ev
import tinygptv as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VQA = "[vqa] Based on the image, respond to this question with a short answer: {}"  # the official texts
VIZWIZ = ("[vqa] The question is '{}' Based on the image, answer the question with a single word or phrase. "
          "and reply 'unanswerable' when the provided information is insufficient")
VSR = "[vqa] Based on the image, is this statement true or false? {}"
HM = "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:"


def picture(path, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(path)


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
        return [self.blank if isinstance(im, Image.Image) else self.answers[q] for im, q in zip(images, instructions)]


def run(monkeypatch, tmp_path, model, *argv):
    monkeypatch.setattr(ev, "load_model", lambda args: (model, None, 4))
    result = ev.main([*argv, "--out", str(tmp_path / "results.json")])
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


def test_auroc_counts_ordered_pairs_and_half_the_ties():
    # positives 0.9, 0.4; negatives 0.8, 0.3, 0.6: 0.9 beats all three, 0.4 beats 0.3 only: 4 of 6
    assert ev.auroc([0.9, 0.8, 0.4, 0.3, 0.6], [1, 0, 1, 0, 0]) == pytest.approx(4 / 6)
    assert ev.auroc([0.5, 0.5], [1, 0]) == 0.5
    assert ev.auroc([0.1, 0.9], [1, 0]) == 0.0


# -----------------------------------------------------------------------------
# Each benchmark, from its released format

def test_gqa_exact_match_next_to_substring_and_a_missing_image_skipped(tmp_path, monkeypatch, capsys):
    for image in ("n1", "n2", "n3", "n4", "n5"):
        picture(str(tmp_path / "images" / f"{image}.jpg"))
    (tmp_path / "images" / "n7.jpg").write_bytes(b"not a jpeg")
    labels = {"q1": ("n1", "left"), "q2": ("n2", "left"), "q3": ("n3", "no"), "q4": ("n4", "yes"),
              "q5": ("n5", "red"), "q6": ("n6", "blue"), "q7": ("n7", "blue")}  # n6 missing, n7 corrupt
    questions = {q: {"imageId": im, "question": f"question {q}?", "answer": a, "fullAnswer": "..."}
                 for q, (im, a) in labels.items()}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    model = StandIn({VQA.format("question q1?"): "left", VQA.format("question q2?"): "On the left.",
                     VQA.format("question q3?"): "not sure", VQA.format("question q4?"): "Yes.",
                     VQA.format("question q5?"): "blue"})
    r = run(monkeypatch, tmp_path, model, "--task", "gqa", "--data", str(tmp_path / "testdev_balanced_questions.json"),
            "--images", str(tmp_path / "images"))
    # substring: left, "left" in "on the left.", "no" in "not sure", "yes" in "yes." -> 4 of 5;
    # exact: left and "Yes." -> 2 of 5
    assert r["scores"] == {"substring of the answer (official)": 80.0, "exact match (GQA's own)": 40.0}
    assert (r["scored"], r["skipped"]) == (5, 2)
    out = capsys.readouterr()
    assert "skipped 2 of 7 samples: 1 missing, 1 corrupt" in out.out
    assert "ETA" in out.err  # the progress line
    assert model.calls == [(4, 20)]  # one batch, the stage-4 template, 20 new tokens
    r = run(monkeypatch, tmp_path, model, "--task", "gqa", "--data", str(tmp_path / "testdev_balanced_questions.json"),
            "--images", str(tmp_path / "images"), "--limit", "2")
    assert r["scored"] == 2 and r["scores"]["exact match (GQA's own)"] == 50.0


def test_vsr_double_counts_officially_and_once_by_its_own_accuracy(tmp_path, monkeypatch):
    rows = [("The cat is on the mat.", 1, "True"), ("The dog is under the car.", 1, "yes, true"),
            ("The cup is left of the plate.", 0, "no"), ("The bus is behind the tree.", 0, "true"),
            ("The bird is above the cat.", 0, "I do not know")]
    with open(tmp_path / "test.jsonl", "w") as f:
        for i, (caption, label, _) in enumerate(rows):
            image = f"{i:012d}.jpg"
            picture(str(tmp_path / "coco" / ("val2017" if i == 2 else "train2017") / image))
            f.write(json.dumps({"image": image, "caption": caption, "label": label, "relation": "on"}) + "\n")
    model = StandIn({VSR.format(c): a for c, _, a in rows})
    r = run(monkeypatch, tmp_path, model, "--task", "vsr", "--data", str(tmp_path / "test.jsonl"), "--images",
            str(tmp_path / "coco"))
    # official: 1 ("true"), 2 ("true" and "yes"), 1 ("no"), 0, 1 ("no" inside "not"): 5 of 5 answers
    # once: right, right (yes first), right, wrong, wrong (no verdict): 3 of 5
    assert r["scores"] == {"true/false + yes/no, can pass 100 (official)": 100.0, "each answer counted once": 60.0}
    assert r["skipped"] == 0  # images found in train2017/ and val2017/


def test_vizwiz_official_substring_score_next_to_vqa_accuracy(tmp_path, monkeypatch):
    questions = [("What is this?", ["unanswerable"] * 4 + ["blurry"] * 6, "unanswerable"),
                 ("What color is it?", ["red"] * 2 + ["dark red"] * 8, "Red."),
                 ("How many?", ["2"] * 3 + ["3"] * 7, "Two."),
                 ("Is it on?", ["yes"] * 10, "")]
    records = []
    for i, (q, humans, _) in enumerate(questions):
        picture(str(tmp_path / "val" / f"VizWiz_val_{i:08d}.jpg"))
        records.append({"image": f"VizWiz_val_{i:08d}.jpg", "question": q, "answerable": 1,
                        "answers": [{"answer": h, "answer_confidence": "yes"} for h in humans]})
    (tmp_path / "val.json").write_text(json.dumps(records))
    model = StandIn({VIZWIZ.format(q): a for q, _, a in questions})
    r = run(monkeypatch, tmp_path, model, "--task", "vizwiz", "--data", str(tmp_path / "val.json"), "--images",
            str(tmp_path / "val"))
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
    model = StandIn({VQA.format("How many?"): "Two", VQA.format("What vehicle is this?"): "The fire truck."})
    r = run(monkeypatch, tmp_path, model, "--task", "okvqa", "--data", str(tmp_path / "questions.json"),
            "--annotations", str(tmp_path / "annotations.json"), "--images", str(tmp_path / "coco"))
    assert r["scores"] == {"VQA accuracy (official = OK-VQA's own)": pytest.approx(100 * (0.3 + 1.0) / 2)}


def test_hateful_memes_official_accuracy_auroc_and_accuracy_of_p_yes(tmp_path, monkeypatch):
    memes = [(42, 1, "Yes, it is."), (43, 0, "no"), (44, 1, "No."), (45, 0, "I am not sure"), (46, 0, "yes")]
    with open(tmp_path / "dev.jsonl", "w") as f:
        for i, label, _ in memes:
            picture(str(tmp_path / "img" / f"{i}.png"))
            f.write(json.dumps({"id": i, "img": f"img/{i}.png", "label": label, "text": f"meme {i}"}) + "\n")
    p_yes = {42: 0.9, 43: 0.8, 44: 0.4, 45: 0.3, 46: 0.6}
    monkeypatch.setattr(ev, "yes_probability", lambda model, tok, b: [p_yes[s.meta["id"]] for s in b])
    model = StandIn({HM.format(f"meme {i}"): a for i, _, a in memes})
    r = run(monkeypatch, tmp_path, model, "--task", "hm", "--data", str(tmp_path / "dev.jsonl"))
    # official: yes->1 right, no->0 right, no->0 wrong, "not" holds "no"->0 right, yes->1 wrong: 3 of 5
    # AUROC as in the test above: 4 of 6 pairs; P(yes) > 0.5 says 1 1 0 0 1 against 1 0 1 0 0: 2 of 5
    assert r["scores"] == {"yes/no substring accuracy (official)": 60.0, "AUROC of P(yes) (HM's own)": pytest.approx(400 / 6),
                           "accuracy at P(yes) > 0.5 (HM's own)": 40.0}
    assert [p["p_yes"] for p in r["predictions"]] == [0.9, 0.8, 0.4, 0.3, 0.6]


def test_iconqa_ranks_the_choices_of_its_split_by_loss(tmp_path, monkeypatch):
    problems = {"101": {"question": "Which is bigger?", "choices": ["cat", "dog"], "answer": 1, "ques_type": "choose_txt", "split": "val"},
                "102": {"question": "How many?", "choices": ["1", "2", "3"], "answer": 0, "ques_type": "choose_txt", "split": "val"},
                "103": {"question": "Fill in.", "answer": "4", "ques_type": "fill_in_blank", "split": "val"},
                "104": {"question": "Which?", "choices": ["a", "b"], "answer": 0, "ques_type": "choose_txt", "split": "test"}}
    for pid, p in problems.items():
        picture(str(tmp_path / "iconqa" / p["split"] / p["ques_type"] / pid / "image.png"))
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    losses = {"101": [0.5, 0.2], "102": [0.9, 0.1, 0.3]}  # picks 1 (right) and 1 (wrong: the answer is 0)
    asked = []

    def fake_losses(model, tok, batch):
        asked.extend((s.meta["id"], s.query, s.meta["choices"]) for s in batch)
        return [losses[s.meta["id"]] for s in batch]

    monkeypatch.setattr(ev, "choice_losses", fake_losses)
    r = run(monkeypatch, tmp_path, StandIn({}), "--task", "iconqa", "--data", str(tmp_path / "problems.json"))
    assert r["scores"] == {"top-1 of the loss ranking (official = IconQA's own)": 50.0}
    assert asked == [("101", VQA.format("Which is bigger?"), ["cat", "dog"]), ("102", VQA.format("How many?"), ["1", "2", "3"])]


def test_refcoco_scores_each_split_by_iou_officially_and_by_the_refer_toolkit(tmp_path, monkeypatch):
    picture(str(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg"), size=(20, 20))
    instances = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 20, "height": 20}],
                 "annotations": [{"id": 10, "image_id": 5, "bbox": [0, 0, 10, 10], "category_id": 1},
                                 {"id": 11, "image_id": 5, "bbox": [10, 10, 10, 10], "category_id": 1}]}
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 5, "split": "val", "sentences": [{"sent": "top left"}, {"sent": "upper left"}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 5, "split": "testA", "sentences": [{"sent": "bottom right"}, {"sent": "other"}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 5, "split": "train", "sentences": [{"sent": "not scored"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    ask = "[refer] give me the location of {}"
    # in pixels (0-100 of 20 px = /5): (0,0,10,10) exact; (0,0,4.8,10): IoU 48/100 = 0.48, but counting
    # pixels inclusive (5.8 * 11) / (11 * 11) = 0.527 > 0.5; (10,10,20,20) exact; no box at all
    model = StandIn({ask.format("top left"): "{<0><0><50><50>}", ask.format("upper left"): "{<0><0><24><50>}",
                     ask.format("bottom right"): "{<50><50><100><100>}", ask.format("other"): "at the bottom right"})
    r = run(monkeypatch, tmp_path, model, "--task", "refcoco", "--data", str(tmp_path / "refs.json"), "--images",
            str(tmp_path / "train2014"))
    assert r["scores"] == {"testA IoU > 0.5, inclusive pixels (official)": 50.0, "testA IoU >= 0.5 (refer toolkit)": 50.0,
                           "val IoU > 0.5, inclusive pixels (official)": 100.0, "val IoU >= 0.5 (refer toolkit)": 50.0}


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
    rows = ev.evaluate_samples(model, None, samples, stage=4)
    assert rows == {"vqa": {"image": 50.0, "blank": 0.0}, "refer": {"image": pytest.approx(200 / 3), "blank": pytest.approx(200 / 3)}}
    assert model.training  # its mode is given back
    assert {c for c in model.calls} == {(4, 24)}  # the demo's 24 new tokens in stage 4
    ev.print_table("held out", rows)
    table = capsys.readouterr().out
    assert "  VQA exact match                50.0        0.0" in table
    assert "  [refer] IoU >= 0.5             66.7       66.7" in table


# -----------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any model is loaded

@pytest.mark.parametrize("name, content, argv, expected", [
    ("val.json", [{"image": "a.jpg", "question": "q", "answers": [{"answer": "x"}] * 10}, {"image": "b.jpg", "question": "q"}],
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

TINY = ["--demo-train", "48", "--demo-eval", "8", "--lm-steps", "10", "--vision-steps", "8", "--no-eval",
        "--steps", "2", "--batch-size", "8", "--ckpt-every", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import train
    out = tmp_path_factory.mktemp("demo")
    args = train.parse_args(["--out", str(out), *TINY])
    train.run(args)  # stage 0, then stages 1-4 for two steps each
    return out, args


def test_the_demo_model_scores_on_a_file_as_in_the_demo_table(demo_run, tmp_path):
    import demo
    out, args = demo_run
    model, tok, stage = demo.load_demo(str(out))
    want = demo.evaluate(model, tok, args, n=16)["vqa"]
    samples = [s for s in demo.stage_samples(args, 4, split="test") if s.task == "vqa"][:16]
    names, rows = {}, []
    for s in samples:  # the same samples as a VQA file of ours, each scene's picture as a (lossless) PNG
        if id(s.image) not in names:
            names[id(s.image)] = f"scene{len(names)}.png"
            s.image.save(tmp_path / names[id(s.image)])
        rows.append({"image": names[id(s.image)], "question": s.query, "answer": s.answer})
    (tmp_path / "vqa.json").write_text(json.dumps(rows))
    common = ["--task", "vqa", "--data", str(tmp_path / "vqa.json"), "--batch-size", "64", "--device", "cpu"]
    got = ev.main([*common, "--run", str(out), "--out", str(tmp_path / "demo.json")])
    assert got["scores"]["vqa"] == want
    direct = model.generate(tok, [s.image for s in samples], [VQA.format(s.query) for s in samples], stage=4, max_new_tokens=24)
    assert [p["answer"] for p in got["predictions"] if p["column"] == "image"] == direct
    # the same weights given as a checkpoint on real-weight options score the same
    phi2 = tmp_path / "phi2"
    shutil.copytree(out / "backbones" / "phi2", phi2)
    shutil.copy(out / "backbones" / "tokenizer.json", phi2)
    real = ev.main([*common, "--checkpoint", str(out / "stage4.safetensors"), "--phi2", str(phi2),
                    "--blip2", str(out / "backbones" / "vit"), "--qformer", str(out / "backbones" / "qformer"),
                    "--out", str(tmp_path / "real.json")])
    assert real["scores"] == got["scores"] and real["predictions"] == got["predictions"]


def test_choice_losses_and_p_yes_are_the_models_own_per_sample(demo_run):
    import data
    import demo
    model, tok, _ = demo.load_demo(str(demo_run[0]))
    scenes = list({id(s.image): s.image for s in demo.stage_samples(demo_run[1], 4, split="test")}.values())[:2]
    batch = [data.Sample(scenes[0], "iconqa", VQA.format("what shape?"), "0", {"choices": ["circle", "red square"]}),
             data.Sample(scenes[1], "iconqa", VQA.format("how many?"), "0", {"choices": ["one", "two", "three"]})]
    got = ev.choice_losses(model, tok, batch)
    for s, losses in zip(batch, got):  # each choice alone, its loss averaged over its answer tokens
        px = tg.preprocess(s.image, model.image_size(3))[None]
        for c, loss in zip(s.meta["choices"], losses):
            logits, targets = model([tg.make_example(tok, 3, s.query, c)], pixel_values=px)
            assert loss == pytest.approx(tg.lm_loss(logits, targets).item(), rel=1e-4)
    p = ev.yes_probability(model, tok, batch)
    for s, prob in zip(batch, p):  # the first answer position, yes against no in four spellings each
        logits, _ = model([tg.make_example(tok, 4, s.query, "no")], pixel_values=tg.preprocess(s.image, model.image_size(4))[None])
        first = torch.softmax(logits[0].float(), -1)
        ids = lambda w: {tg.encode(tok, v)[0] for v in (w, " " + w, w.title(), " " + w.title())}
        yes, no = sum(first[i] for i in ids("yes")), sum(first[i] for i in ids("no"))
        assert prob == pytest.approx((yes / (yes + no)).item(), rel=1e-4)
