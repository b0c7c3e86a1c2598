"""Held-out scores on this project's own tasks: the demo's table after each stage, `train.py
--eval-data` and `eval.py --task vqa|refer|caption|...` on a user's file, all scored here.

A reader of the paper may skip this file. Each task is scored twice, with each sample's image and
with a blank one: the blank column is the baseline that shows how much the model uses the picture.
- caption, VQA, [identify]: exact match (case and surrounding spaces ignored); VQA also by question
  type where the samples have the demo's types ("vqa color", ...);
- [refer]: the answer's first box against the sample's, IoU >= 0.5 (boxes in 0-100);
- descriptions: F1 between the answer's sentences and the reference's, since each sentence says
  one thing and a long answer should get partial credit.
"""

import sys
import time
from collections import Counter

import torch

import data
import tinygptv as tg

METRICS = {"caption": "caption exact match", "describe": "description sentence F1", "vqa": "VQA exact match",
           "refer": "[refer] IoU >= 0.5", "identify": "[identify] exact match"}


def exact(a, b):
    return a.strip().lower() == b.strip().lower()


def sentence_f1(answer, reference):
    """F1 between the sentences of two descriptions (each says one thing about the object):
    partial credit for a long answer, where exact match is all or nothing."""
    split = lambda text: {t.strip().lower() for t in text.split(".") if t.strip()}
    got, want = split(answer), split(reference)
    right = len(got & want)
    return 2 * right / (len(got) + len(want)) if got or want else 1.0


def hit(answer, sample):
    """One answer's score in [0, 1], by its sample's task."""
    if sample.task == "refer":
        return data.iou(data.parse_box(answer) or (0, 0, 0, 0), sample.meta["box"]) >= 0.5
    if sample.task == "describe":
        return sentence_f1(answer, sample.answer)
    return exact(answer, sample.answer)


def by_question_type(hits, samples):
    """{VQA question type: % of its samples right}, for the demo's types present."""
    scores = {}
    for qtype in data.VQA_TYPES:
        mine = [h for h, s in zip(hits, samples) if s.meta.get("qtype") == qtype]
        if mine:
            scores[qtype] = percent(mine)
    return scores


def percent(values):
    values = list(values)
    return 100.0 * sum(values) / len(values)


def batches(items, size, what=None):
    """Yield items in batches; with `what`, a progress line (and ETA) on stderr at most every 10 s."""
    t0 = last = time.time()
    for i in range(0, len(items), size):
        yield items[i:i + size]
        done, now = min(i + size, len(items)), time.time()
        if what and (done == len(items) or now - last > 10):
            last, rate = now, done / max(now - t0, 1e-9)
            print(f"{what}: {done}/{len(items)} | {rate:.1f}/s | ETA {(len(items) - done) / rate:.0f}s",
                  file=sys.stderr, flush=True)


@torch.no_grad()
def score(model, tok, samples, stage, batch_size=64, predictions=None, progress=False):
    """-> {metric: {"image": %, "blank": %}} for each task of METRICS among `samples` (in that
    order), each answered under stage `stage`'s prompt, and "vqa TYPE" rows for the demo's question
    types. Other tasks have no metric here: they are counted in one line. Per-sample answers are
    appended to `predictions` if a list is given."""
    was_training, rows = model.training, {}
    model.eval()
    for task in METRICS:
        picked = [s for s in samples if s.task == task]
        if not picked:
            continue
        for column in ("image", "blank"):
            answers = []
            for b in batches(picked, batch_size, f"{task} ({column})" if progress else None):
                images = [data.blank_image(model.image_size(stage)) if column == "blank" else data.load_image(s.image)
                          for s in b]
                answers += model.generate(tok, images, [tg.stage_instruction(stage, s) for s in b], stage=stage,
                                          max_new_tokens=64 if task == "describe" or stage == 3 else 24)
            hits = [hit(a, s) for a, s in zip(answers, picked)]
            rows.setdefault(task, {})[column] = percent(hits)
            for qtype, v in (by_question_type(hits, picked) if task == "vqa" else {}).items():
                rows.setdefault(f"vqa {qtype}", {})[column] = v
            if predictions is not None:
                predictions += [{"task": task, "column": column, "answer": a, "label": s.answer}
                                for a, s in zip(answers, picked)]
    model.train(was_training)
    skipped = Counter(s.task for s in samples if s.task not in METRICS)
    if skipped:
        print(f"not scored (no metric for these tasks): {dict(skipped)}", flush=True)
    return rows


def metric_name(task):
    """A table row's name: METRICS', or a VQA question type ("vqa color"), indented under VQA."""
    return METRICS.get(task) or "  " + task.removeprefix("vqa ")


def print_table(title, after, before=None):
    """Rows of `score`: with `before` (the model before the stage), a before and an after column."""
    print(f"\n{title}")
    print(f"  {'metric':26s}" + (f" {'before':>8s} {'after':>8s}" if before is not None else f" {'image':>8s}")
          + f" {'blank img':>10s}")
    for task, r in after.items():
        b = "" if before is None else f" {before[task]['image']:8.1f}" if task in before else f" {'-':>8s}"
        print(f"  {metric_name(task):26s}{b} {r['image']:8.1f} {r['blank']:10.1f}")
    print(flush=True)
