"""What demo.py promises: each scene is 32 words with every attribute in a fixed query; the stand-in
language model, trained on a small world, reads its answers from those words (and a model that
looks nothing up does not pass the same check); the held-out evaluation scores each task and each
question type with the image and with a blank one, and each stage writes it as stageN.eval.json in
one layout; backbones trained for another world are refused, matching ones are copied into the run.

Words, classes and priors are computed here from the scene, not by demo.py's own helpers."""

import dataclasses
import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

import data
import demo
import tinygptv as tg
import train

COLOR_RGB = {"red": (220, 50, 50), "green": (40, 160, 70), "blue": (50, 90, 220), "yellow": (235, 190, 20),
             "purple": (140, 70, 180), "orange": (245, 135, 25), "pink": (240, 120, 190), "black": (40, 40, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "medium", "large")
# each cell's place in two words, "none" where one word says it
PLACE = [("top", "left"), ("top", "middle"), ("top", "right"), ("middle", "left"), ("center", "none"),
         ("middle", "right"), ("bottom", "left"), ("bottom", "middle"), ("bottom", "right")]
CLASSES = [(c, s, z) for c in COLOR_RGB for s in SHAPES for z in SIZES]  # object_class k is CLASSES[k - 1]

# a miniature demo (as tests/test_train.py's): tiny data, short stage 0, a handful of steps per stage
SMALL = ["--demo-train", "48", "--demo-eval", "8", "--lm-steps", "10", "--vision-steps", "8", "--no-eval",
         "--steps", "6", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"]


def args_for(out, *extra):
    return train.parse_args(["--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from a second thread, and on a busy two-core machine
    a second thread waiting for a core made the language model's training 9x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    return data.demo_splits(n_train=200, n_val=0, n_test=50, seed=0)


# -----------------------------------------------------------------------------
# The scene as the stand-ins see it


def test_scene_words_put_each_attribute_in_a_fixed_query(scenes):
    # 32 words, one per Q-Former query: color, shape, size, then the place in two words, then
    # "none"; so the answer to each question type is always the word at the same query
    assert demo.NUM_QUERIES == 32
    assert len(set(demo.SLOT_WORDS)) == len(demo.SLOT_WORDS)
    assert set(demo.SLOT_WORDS) == {"none", *COLOR_RGB, *SHAPES, *SIZES, "top", "middle", "bottom", "left",
                                    "right", "center"}
    for scene in scenes["train"] + scenes["test"]:
        (o,) = scene.objects
        words = demo.scene_words(scene)
        assert words == [o.color, o.shape, o.size, *PLACE[o.cell]] + ["none"] * 27, (o, words)
        assert demo.slot_text(scene) == " " + " ".join(words)


def test_object_class_numbers_each_kind(scenes):
    assert demo.NUM_CELL_CLASSES == 1 + len(CLASSES) == 97  # 0 is "nothing here"
    for scene in scenes["train"]:
        (o,) = scene.objects
        assert demo.object_class(o) == 1 + CLASSES.index((o.color, o.shape, o.size))


def cell_classes(scene):
    """Per cell of the 3x3 grid: 0 if empty, else 1 + the index of its object's (color, shape, size)."""
    expected = [0] * 9
    for o in scene.objects:
        expected[o.cell] = 1 + CLASSES.index((o.color, o.shape, o.size))
    return expected


def test_patch_labels_name_the_object_under_each_patch(scenes):
    # On a 3x3 patch grid each patch is one cell, so the patch labels are the cell classes.
    for scene in scenes["test"]:
        assert demo.patch_labels(scene, 3) == cell_classes(scene)
    # On a 6x6 grid (stage 4's doubled image), a labelled patch shows its object's colour when
    # drawn (a small triangle's empty corner leaves as few as 4 pixels of it), the object labels at
    # least one patch, and the other cells' patches are background.
    for scene in scenes["test"]:
        labels, pix = demo.patch_labels(scene, 6), np.asarray(data.render(scene, 96))
        (o,) = scene.objects
        cls = cell_classes(scene)[o.cell]
        assert cls in labels and set(labels) == {0, cls}
        for k, label in enumerate(labels):
            patch = pix[16 * (k // 6):16 * (k // 6 + 1), 16 * (k % 6):16 * (k % 6 + 1)].reshape(-1, 3)
            if label:
                assert (patch == COLOR_RGB[o.color]).all(-1).sum() > 0
            elif (k // 6 // 2) * 3 + (k % 6) // 2 != o.cell:
                assert (patch == data.BACKGROUND).all()


def test_text_corpus_holds_every_text_of_the_stages(scenes):
    some = scenes["test"][:10]
    corpus = set(demo.text_corpus(some, seed=3))
    assert set(data.DESCRIBE_INSTRUCTIONS) <= corpus
    for scene in some:
        assert data.caption(scene) in corpus and data.description(scene) in corpus
    for stage in (3, 4):
        for s in data.stage_samples(some, stage, 8, seed=3):
            assert s.answer in corpus and (s.query in corpus or s.query == "")
    assert "" not in corpus


# -----------------------------------------------------------------------------
# The stand-in language model reads the scene


ASKED = ("color", "shape", "size")  # the types the small model below is taught


def question_type(prompt):
    m = re.search(r"what (color|shape|size) is|where is", prompt)
    return {"where is": "position"}.get(m.group(0), m.group(1)) if m else None


def priors(samples):
    """Per question type: the most common answer among the training answers, and its share (%)."""
    by_type = {}
    for s in samples:
        by_type.setdefault(s.meta["qtype"], Counter())[s.answer] += 1
    return {t: (c.most_common(1)[0][0], 100.0 * c.most_common(1)[0][1] / sum(c.values())) for t, c in by_type.items()}


def reads_the_scene(scores, prior):
    """The check: each taught type answered 40 points above its prior. Measured for the model below
    (seeds 0-3): color 88-98%, shape and size 100%, over priors of 15-20, 28-42 and 37-43%."""
    return all(scores[t] >= prior[t][1] + 40 for t in ASKED)


class Guesser:
    """A language model that looks nothing up: it reads the question, not the scene, and answers
    its type's most common training answer."""

    def __init__(self, tok, prior):
        self.tok, self.prior = tok, prior

    def eval(self):
        return self

    def generate(self, ids, attention_mask, **kw):
        prompts = [self.tok.decode(row[mask.bool()].tolist()) for row, mask in zip(ids, attention_mask)]
        return [tg.encode(self.tok, self.prior[question_type(p)][0]) for p in prompts]


def test_the_language_model_answers_from_the_scene_words_not_the_prior(tmp_path):
    # A small world: 60 training scenes and their color, shape and size questions only (amid all
    # of stage 0's texts these three took ~800 steps, too long for the suite), a language model half
    # the demo's width and depth, 400 steps (~30 s on one busy core). Held out: 60 other scenes.
    args = train.parse_args(["--demo-train", "60", "--demo-eval", "60", "--lm-steps", "400", "--device", "cpu"])
    train_scenes = args.split.scenes()["train"]
    texts = [(q, a) for q, a in demo.lm_texts(train_scenes, args.seed) if question_type(q) in ASKED]
    tok = demo.train_tokenizer(demo.text_corpus(train_scenes) + [q + a for q, a in texts], str(tmp_path / "tok.json"))
    assert all(len(tg.encode(tok, " " + w)) == 1 for w in demo.SLOT_WORDS)  # word j is at query j's place
    cfg = tg.TinyGPTVConfig.tiny(vocab_size=tok.get_vocab_size())
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=128))
    llm = demo.pretrain_language_model(cfg, tok, texts, args.seed, args.lm_steps, train.warmup_cosine)
    prior = priors([s for s in data.stage_samples(train_scenes, 4, None, args.seed) if s.task == "vqa"])

    scores, asked = demo.language_model_alone(llm, tok, args.split, n=300)
    assert asked == 60 * len(data.VQA_TYPES)  # every question of the 60 held-out scenes
    assert reads_the_scene(scores, prior), (scores, prior)

    # the same check fails for a model that answers without looking: it scores about the prior
    guessed, _ = demo.language_model_alone(Guesser(tok, prior), tok, args.split, n=300)
    assert not reads_the_scene(guessed, prior), (guessed, prior)
    assert all(abs(guessed[t] - prior[t][1]) < 20 for t in ASKED), (guessed, prior)


# -----------------------------------------------------------------------------
# The held-out evaluation


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Stage 0 once for the module; each test copies it into its own run directory."""
    out = tmp_path_factory.mktemp("run")
    a = args_for(out)
    demo.build_backbones(a.split, str(out / "backbones"), train.warmup_cosine, a.lm_steps, a.vision_steps, a.eval)
    return out / "backbones"


def test_each_stage_writes_its_evaluation_in_one_layout(tmp_path, backbones):
    # stageN.eval.json: the table before and after the stage, each task with the image and with a
    # blank one, VQA also per question type, and which test set it was measured on
    out = tmp_path / "run"
    shutil.copytree(backbones, out / "backbones")
    rows = {"caption", "describe", "vqa", "refer", "identify", *(f"vqa {t}" for t in data.VQA_TYPES)}
    saved = {}
    for stage in (1, 2):
        args = args_for(out, "--stage", str(stage), "--steps", "2", "--eval-samples", "10")
        args.eval = True  # SMALL turns the tables off
        train.run(args)
        path = out / f"stage{stage}.eval.json"
        saved[stage] = json.loads(path.read_text())
        assert set(saved[stage]) == {"before", "after", "eval_set", "checkpoint"}
        assert saved[stage]["eval_set"] == demo.eval_set(args.split, args.eval_samples) == [10, 8, 48, 0]
        for column in ("before", "after"):
            table = saved[stage][column]
            assert set(table) == rows, (stage, column)
            for task, r in table.items():
                assert set(r) == {"image", "blank"} and all(0.0 <= v <= 100.0 for v in r.values()), (task, r)
        if stage == 1:  # mark stage 1's scores, to see them come back as stage 2's "before"
            saved[1]["after"] = {task: {"image": 42.0, "blank": 4.2} for task in rows}
            path.write_text(json.dumps(saved[1]))
    # stage 2 starts where stage 1 ended (its new LoRA changes nothing yet): its "before" is read
    # from stage 1's "after", measured on the same test set
    assert saved[2]["before"] == saved[1]["after"]


def test_a_table_of_another_checkpoint_is_never_read_as_this_ones(tmp_path, backbones):
    # stage 1 trained again without its table (--restart --no-eval): the old stage1.eval.json scored
    # another checkpoint, so stage 2's "before" is measured, not read from it
    out = tmp_path / "run"
    shutil.copytree(backbones, out / "backbones")
    first = args_for(out, "--stage", "1", "--steps", "2", "--eval-samples", "10")
    first.eval = True
    train.run(first)
    path = out / "stage1.eval.json"
    saved = json.loads(path.read_text())
    saved["after"] = {task: {"image": 42.0, "blank": 4.2} for task in saved["after"]}  # marked, as above
    path.write_text(json.dumps(saved))
    train.run(args_for(out, "--stage", "1", "--steps", "3", "--restart"))  # a new stage 1, no table
    second = args_for(out, "--stage", "2", "--steps", "1", "--eval-samples", "10")
    second.eval = True
    train.run(second)
    before = json.loads((out / "stage2.eval.json").read_text())["before"]
    assert before != saved["after"] and all(r["image"] != 42.0 for r in before.values())


def test_a_resumed_stage_scores_its_start_as_before(tmp_path, backbones, monkeypatch):
    # the "before" column is the model the stage starts from, also when the stage is resumed half way:
    # the weights it is measured on are the start's, not the resumed ones
    seen = []
    monkeypatch.setattr(demo, "table_before", lambda model, *a: seen.append(model.llama_proj.weight.clone()) or {})
    out = tmp_path / "run"
    shutil.copytree(backbones, out / "backbones")
    for extra in (["--stop-after", "2"], ["--resume"]):
        args = args_for(out, "--stage", "1", "--steps", "4", *extra)
        args.eval = True
        train.run(args)
    start, resumed = seen
    assert torch.equal(resumed, start)
    trained = train.build_model(args_for(out, "--stage", "2"), 2)[0].llama_proj.weight  # after the stage
    assert not torch.equal(trained, start)  # (so the check above could tell them apart)


class Knower:
    """A model that answers right where `knows(sample)` says, from the held-out samples' own answers
    keyed by picture and instruction, and says nothing otherwise (to a blank picture above all)."""

    def __init__(self, args, knows):
        self.answers, self.calls = {}, []
        for stage in (1, 3, 4):
            size = demo.IMAGE_SIZE * (2 if stage == 4 else 1)
            for s in data.stage_samples(args.split.scenes()["test"], stage, size, args.seed + 1):
                if knows(s):
                    self.answers[s.image.tobytes(), tg.stage_instruction(stage, s)] = s.answer

    training = False

    def train(self, mode=True):
        return self

    def eval(self):
        return self

    def image_size(self, stage):
        return tg.image_size(demo.IMAGE_SIZE, stage)

    def generate(self, tok, images, instructions, stage, max_new_tokens):
        self.calls.append((stage, instructions[0]))
        return [self.answers.get((im.tobytes(), q), "") for im, q in zip(images, instructions)]


def test_evaluate_scores_each_task_and_each_question_type_with_the_image_and_without():
    args = train.parse_args(["--demo-train", "40", "--demo-eval", "20", "--eval-samples", "30", "--device", "cpu"])
    model = Knower(args, lambda s: s.task in ("caption", "identify") or s.meta.get("qtype") == "shape")
    rows = demo.evaluate(model, None, args.split, taught=4, n=args.eval_samples)
    assert set(rows) == {"caption", "describe", "vqa", "refer", "identify", *(f"vqa {t}" for t in data.VQA_TYPES)}
    assert all(r["blank"] == 0.0 for r in rows.values())
    assert {task: r["image"] for task, r in rows.items() if task != "vqa"} == {
        "caption": 100.0, "identify": 100.0, "describe": 0.0, "refer": 0.0,
        "vqa shape": 100.0, "vqa color": 0.0, "vqa size": 0.0, "vqa position": 0.0}
    # the VQA row is the first 30 held-out questions, of which the shape questions are right
    questions = [s for s in data.stage_samples(args.split.scenes()["test"], 4, None, args.seed + 1)
                 if s.task == "vqa"][:30]
    assert rows["vqa"]["image"] == pytest.approx(100.0 * sum(s.meta["qtype"] == "shape" for s in questions) / 30)
    # captions and descriptions are asked with the prompt last taught for them: stage 1's and 3's
    # until stage 4 teaches both in its own format
    for taught, caption_stage, describe_stage in ((3, 1, 3), (4, 4, 4)):
        model.calls.clear()
        demo.evaluate(model, None, args.split, taught=taught, n=args.eval_samples)
        assert {stage for stage, q in model.calls if q in ("", tg.TASK_INSTRUCTIONS["caption"])} == {caption_stage}
        assert {stage for stage, q in model.calls if q in data.DESCRIBE_INSTRUCTIONS} == {describe_stage}


# -----------------------------------------------------------------------------
# The shipped backbones


def prepare(args):
    """What train.py does before stage 1 of a demo run."""
    demo.prepare_backbones(args.out, args.split, train.warmup_cosine, not args.data, args.eval, args.lm_steps,
                           args.vision_steps)


def backbones_dir(path, **changes):
    """A backbones folder whose DONE says it was trained for this world, or for one with `changes`."""
    os.makedirs(path)
    (path / "tokenizer.json").write_text("{}")
    (path / "DONE").write_text(json.dumps({**demo.world_fingerprint(), "seed": 0, "demo_train": 560, "demo_eval": 300,
                                             **changes}))
    return path


def test_backbones_for_another_world_are_refused(tmp_path, monkeypatch):
    args = train.parse_args(["--out", str(tmp_path / "run"), "--device", "cpu"])
    # shipped ones trained when sizes were small and large only
    shipped = backbones_dir(tmp_path / "shipped", sizes=["small", "large"])
    monkeypatch.setattr(demo, "PRETRAINED", str(shipped))
    with pytest.raises(ValueError) as e:
        prepare(args)
    assert "\n" not in str(e.value) and str(shipped) in str(e.value) and "train.py --stage 0" in str(e.value)
    assert not (tmp_path / "run" / "backbones").exists()  # nothing copied, nothing trained
    # a run's own backbones with the older, empty DONE marker: refused too, by name
    own = tmp_path / "run" / "backbones"
    os.makedirs(own)
    (own / "DONE").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(own))):
        prepare(args)


def test_backbones_trained_on_held_out_scenes_are_never_scored_on_them(tmp_path, monkeypatch, capsys):
    shipped = backbones_dir(tmp_path / "shipped", demo_train=560, demo_eval=300)  # trained on seed 0's split
    monkeypatch.setattr(demo, "PRETRAINED", str(shipped))
    built = []
    monkeypatch.setattr(demo, "build_backbones", lambda split, root, *rest: built.append(root))
    run = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    own = str(tmp_path / "run" / "backbones")
    for extra in (["--seed", "1"], ["--demo-train", "400", "--demo-eval", "400"]):
        # the shipped ones learned some of this run's held-out scenes: the run trains its own
        built.clear()
        prepare(train.parse_args(run + extra))
        assert built == [own] and "held-out" in capsys.readouterr().out
        assert not os.path.exists(own)  # nothing copied
    # the same seed with fewer held-out scenes holds out a part of the same ones: the shipped are used
    built.clear()
    prepare(train.parse_args(run + ["--demo-eval", "200"]))
    assert built == [] and os.path.isfile(os.path.join(own, "DONE"))
    # a run's own backbones that learned them are refused, and so is evaluating on them
    args = train.parse_args(run + ["--seed", "1"])
    for call in (prepare, lambda a: demo.check_held_out(a.out, a.split)):
        with pytest.raises(ValueError) as e:
            call(args)
        assert "\n" not in str(e.value) and own in str(e.value) and "held-out" in str(e.value)
    a = train.parse_args(run)
    demo.check_held_out(a.out, a.split)  # the split they were trained for: fine


def test_matching_backbones_are_copied_into_the_run(tmp_path, monkeypatch, capsys):
    args = train.parse_args(["--out", str(tmp_path / "run"), "--device", "cpu"])
    shipped = backbones_dir(tmp_path / "shipped")
    monkeypatch.setattr(demo, "PRETRAINED", str(shipped))
    prepare(args)
    own = tmp_path / "run" / "backbones"
    assert sorted(os.listdir(own)) == ["DONE", "tokenizer.json"]
    assert (own / "DONE").read_text() == (shipped / "DONE").read_text()
    assert "come from" in capsys.readouterr().out
    # from then on the run uses its own copy, whatever is shipped
    (shipped / "DONE").write_text(json.dumps({**demo.world_fingerprint(), "colors": ["red"]}))
    prepare(args)
    assert capsys.readouterr().out == ""


def test_backbones_replaced_while_they_are_copied_are_copied_again(tmp_path, monkeypatch):
    # a `--stage 0 --force` puts a new set in place (a rename) while a run copies the shipped one: the
    # run's copy could hold files of both, so it is made again from the new set
    args = train.parse_args(["--out", str(tmp_path / "run"), "--device", "cpu"])
    shipped = backbones_dir(tmp_path / "shipped")
    monkeypatch.setattr(demo, "PRETRAINED", str(shipped))
    copy, calls = shutil.copytree, []

    def copy_then_replace(src, dst, *a, **k):
        calls.append(src)
        out = copy(src, dst, *a, **k)
        if len(calls) == 1:  # the new set, one file different, renamed into place as write_folder_atomically does
            copy(shipped, tmp_path / "new")
            (tmp_path / "new" / "tokenizer.json").write_text("the new one")
            os.rename(shipped, tmp_path / "old")
            os.rename(tmp_path / "new", shipped)
        return out
    monkeypatch.setattr(shutil, "copytree", copy_then_replace)
    prepare(args)
    assert len(calls) == 2 and (tmp_path / "run" / "backbones" / "tokenizer.json").read_text() == "the new one"
