"""Evaluation: the paper's zero-shot benchmarks scored as the official code scores them, next to
each benchmark's own metric, and held-out scores on your own data. A reader of the paper may skip
this file: it measures the model, it is not part of it.

    python eval.py --task gqa --data testdev_balanced_questions.json --images gqa/images
    python eval.py --task vqa --data held_out.json --limit 200            # the demo run, our format
    python eval.py --task vizwiz --data val.json --images val --checkpoint stage4.safetensors \\
        --phi2 phi-2/ --blip2 blip2/ --device cuda

The paper's claim is a table of zero-shot scores on GQA, VSR, IconQA, VizWiz and Hateful Memes
(section 5; docs/PAPER.md section 11), made by the official eval_vqa.py and eval_ref.py. This file
follows their protocol (docs/PAPER.md section 12):
- each dataset's text (PROMPTS) is sent as `###Human: <Img><ImageHere></Img> {}###Assistant: `,
  the official wrapping, although stage 4 trains on `[INST] {} [/INST]` (`--template stage4` sends
  that); 448 px images; greedy decoding of at most 20 new tokens (every dataset's max_new_tokens in
  the official eval_configs/benchmark_evaluation.yaml), stopping only at end-of-text, because the
  official stop at "###" is commented out;
- IconQA ranks its choices by the model's loss on each (the official multi_select), in stage 3's
  `###Human: ... ###Assistant: `;
- each official metric reads what the official code reads: GQA, VSR and RefCOCO the whole text,
  the others the answer before "###" (`cut`), which every benchmark's own metric reads.

    benchmark  official metric                        benchmark's own
    gqa        the label is a substring of the text   exact match
    vsr        true/false, then yes/no, each counted  each answer counted once
               as a substring: it can pass 100%
    vizwiz     min(#answers equal, or either a        VQA accuracy of the normalized answer
               substring of the other / 3, 1)
    hm         yes/no substring accuracy              AUROC of P(yes); accuracy at P(yes) > 0.5
    refcoco    IoU > 0.5, pixels counted inclusive    IoU >= 0.5 (the refer toolkit's)
    okvqa      VQA accuracy                           the same
    iconqa     top-1 of the loss ranking              the same

The files, as each benchmark releases them:
- gqa: testdev_balanced_questions.json, {question id: {imageId, question, answer}}; {imageId}.jpg
- vsr: cambridgeltl/visual-spatial-reasoning's data/splits/zeroshot/test.jsonl, {image, caption,
  label}; COCO 2017 images in --images, or in its train2017/ or val2017/
- vizwiz: val.json, [{image, question, answers: ten {answer}}]
- iconqa: iconqa_data/problems.json, {pid: {question, choices, answer (an index), ques_type,
  split}}: the "choose_txt" problems of --split (default val, the official code's), their images
  at iconqa/{split}/choose_txt/{pid}/image.png in --images (default: beside problems.json)
- hm: dev.jsonl or test_seen.jsonl, {id, img, label, text}
- okvqa: VQA v2's format, the questions {questions: [{question_id, image_id, question}]} as --data
  and the annotations {annotations: [{question_id, answers: ten {answer}}]} as --annotations;
  COCO val2014 images
- refcoco (RefCOCO, RefCOCO+, RefCOCOg): the refer toolkit's refs(unc).p / refs(umd).p as JSON, a
  list of {ann_id, split, sentences: [{sent}]}, with COCO's instances.json (--annotations, default
  beside it) for each ann_id's [x, y, w, h] box in pixels and its image. The refs ship as a pickle,
  which this file never opens: convert the copy you downloaded yourself,
      python -c "import json, pickle; json.dump(pickle.load(open('refs(unc).p', 'rb')), open('refs.json', 'w'))"
  Every sentence is scored, one score per split but train (or only --split), as eval_ref.py scores
  val, testA and testB;
- ours, --task vqa | refer | caption | describe | identify: any file data.load_dataset reads, scored
  as the demo's table and train.py --eval-data are, by scoring.py, with a blank image as the
  baseline column.

A missing or unreadable image skips its record, counted and printed; a record without a field it
needs is a one-line error naming the file and the record.
"""

import argparse
import os
import re
from collections import Counter

import torch

import data
import scoring
import tinygptv as tg
from checkpoints import output_file, read_json, write_atomically, write_json
from cli import ArgumentParser, add_weight_options, at_least, device_option, load_for_inference, run_cli
from fastpaths import decoder_for
from scoring import batches, percent

MAX_NEW_TOKENS = 20  # every dataset's in the official eval_configs/benchmark_evaluation.yaml
# eval_vqa.py and eval_ref.py wrap each text with prepare_texts in TinyGPT-V's CONV_VISION_minigptv2
# (system "", roles "Human: " / "Assistant: ", separator "###"); not MiniGPT-v2's [INST] of stage 4
OFFICIAL_TEMPLATE = "###Human: <Img><ImageHere></Img> {}###Assistant: "
# The dataset texts, verbatim from the official vqa_datasets.py; gqa, okvqa and iconqa use the
# [vqa] instruction of tinygptv.TASK_INSTRUCTIONS, refcoco the [refer] one.
PROMPTS = {
    "vizwiz": "[vqa] The question is '{}' Based on the image, answer the question with a single word or "
              "phrase. and reply 'unanswerable' when the provided information is insufficient",
    "vsr": "[vqa] Based on the image, is this statement true or false? {}",
    "hm": "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:",  # (sic)
}

# -----------------------------------------------------------------------------
# The standard VQA answer normalization (the VQA v2 evaluation code, vqaEval.py), which OK-VQA
# and VizWiz score with.

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
PERIOD = re.compile(r"\.(?!\d)")  # vqaEval's "(?!<=\d)(\.)(?!\d)": its look-behind is a mistyped look-ahead
COMMA_IN_NUMBER = re.compile(r"\d,\d")
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = ("a", "an", "the")
# vqaEval's contractions table: each form below with one of its apostrophes left out maps to it
# ("dont" -> "don't", "couldnt've" -> "couldn't've"), plus one entry that maps the wrong way.
CONTRACTIONS = {f[:i] + f[i + 1:]: f for f in """ain't aren't can't could've couldn't couldn't've didn't
    doesn't don't hadn't hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've
    it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at
    shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
    someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
    there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
    what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
    why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
    you're you've""".split() for i, c in enumerate(f) if c == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"  # (sic)


def strip_punctuation(text):
    """Drop punctuation next to a space (or anywhere, if a comma sits inside a number), turn the
    rest into spaces, and drop periods that do not precede a digit ("3.5" keeps its point)."""
    out = text
    for p in PUNCTUATION:
        drop = p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text)
        out = out.replace(p, "" if drop else " ")
    return PERIOD.sub("", out)


def normalize_answer(text):
    """"Two." -> "2", "The dog!" -> "dog", "dont" -> "don't": lower case, number words as digits,
    no articles, contractions spelled out."""
    text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(answer, humans):
    """VQA accuracy of one answer against the (ten) human answers: min(#humans who gave it / 3, 1),
    averaged over the ten ways of leaving one human out, as vqaEval does (1, 2, 3, 4+ matches of ten
    score 0.3, 0.6, 0.9, 1). vqaEval cleans the humans' punctuation only when they disagree (it takes
    released answers to be clean), and so does this."""
    a = normalize_answer(answer)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(h) for h in humans]
    accs = [min(1.0, sum(h == a for h in humans[:i] + humans[i + 1:]) / 3) for i in range(len(humans))]
    return sum(accs) / len(accs)


# -----------------------------------------------------------------------------
# The other metrics, official and the benchmarks' own. Each scores one answer (or one set of scores).

def gqa_official(answer, label):
    return label in answer.lower()  # "no" is found in "not sure"


def gqa_exact(answer, label):
    return answer.strip().lower().rstrip(".") == label.strip().lower()


def vsr_official(answer, label):
    """1 for the label as a substring, and 1 more for its yes/no: one answer can count twice."""
    a = answer.lower()
    return (label in a) + ({"true": "yes", "false": "no"}[label] in a)


def vsr_verdict(answer):
    """The answer's first true/yes or false/no word as "true" / "false", or None."""
    for w in re.findall(r"[a-z]+", answer.lower()):
        if w in ("true", "yes", "false", "no"):
            return "true" if w in ("true", "yes") else "false"
    return None


def vizwiz_official(answer, humans):
    """min(#humans equal to the answer or either a substring of the other / 3, 1), lower-cased only:
    an empty answer is in every human answer and scores 1. (The official code also joins the ten
    with "_" and splits them again, which breaks an answer holding one; not copied.)"""
    a = answer.lower()
    return min(1.0, sum(h.lower() == a or h.lower() in a or a in h.lower() for h in humans) / 3)


def hm_official(answer):
    """1 if "yes" is in the answer, else 0 if "no" is (also in "not"), else None (counted wrong)."""
    a = answer.lower()
    return 1 if "yes" in a else 0 if "no" in a else None


def auroc(scores, labels):
    """The area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (Mann-Whitney)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return float("nan")
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def iou_inclusive(a, b):
    """eval_ref.py's computeIoU: (x1, y1, x2, y2) boxes whose corner pixels both count (+1)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = w * h
    return inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter)


def refcoco_hits(raw, answer, box_xywh, width, height):
    """(official, standard) hits of a {<x1><y1><x2><y2>} in 0-100, scaled to pixels, on the pixel
    box [x, y, w, h]. Official (eval_ref.py): the raw text, spaces removed, must start with the box
    and hold no other number (others are re-asked only with its --resample), IoU > 0.5 counting
    pixels inclusive. Standard: the answer's first box, IoU >= 0.5."""
    x, y, w, h = box_xywh
    gt = (x, y, x + w, y + h)
    to_px = lambda b: (b[0] / 100 * width, b[1] / 100 * height, b[2] / 100 * width, b[3] / 100 * height)
    text = raw.replace(" ", "")
    ints = [int(v) for v in re.findall(r"\d+", text)]
    official = bool(re.match(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}", text)) and len(ints) == 4 \
        and iou_inclusive(to_px(ints), gt) > 0.5
    box = data.parse_box(answer)
    return official, box is not None and data.iou(to_px(box), gt) >= 0.5


# -----------------------------------------------------------------------------
# Reading each benchmark's released files into `data.Sample`s: the image path, the benchmark as
# task, the full instruction as query, the label as answer, and what scoring needs in meta. A
# .jsonl file reads as (line number, record) pairs (checkpoints.read_json).

def first_file(root, *names):
    """The first of these files under root that exists (else the first, to be counted missing)."""
    paths = [os.path.join(root, n) for n in names]
    return next((p for p in paths if os.path.isfile(p)), paths[0])


def read_gqa(path, root, args):
    out = []
    for qid, q in read_json(path, dict).items():
        image, question, answer = (data.need(path, f"question {qid}", q, k) for k in ("imageId", "question", "answer"))
        out.append(data.Sample(os.path.join(root, image + ".jpg"), "gqa", tg.instruction_for("vqa", question),
                               answer, {"id": qid}))
    return out


def read_vsr(path, root, args):
    out = []
    for n, r in read_json(path, list):
        image, caption = data.need(path, f"line {n}", r, "image"), data.need(path, f"line {n}", r, "caption")
        label = "true" if data.need(path, f"line {n}", r, "label", int) == 1 else "false"  # as the official code
        image = first_file(root, image, os.path.join("train2017", image), os.path.join("val2017", image))
        out.append(data.Sample(image, "vsr", PROMPTS["vsr"].format(caption), label, {"id": n}))
    return out


def read_vizwiz(path, root, args):
    out = []
    for i, r in enumerate(read_json(path, list)):
        where = f"entry [{i}]"
        image, question = data.need(path, where, r, "image"), data.need(path, where, r, "question")
        humans = [data.need(path, where, a, "answer") for a in data.need(path, where, r, "answers", list)]
        out.append(data.Sample(os.path.join(root, image), "vizwiz", PROMPTS["vizwiz"].format(question), "",
                               {"id": image, "answers": humans}))
    return out


def read_iconqa(path, root, args):
    split, out = args.split or "val", []
    for pid, p in read_json(path, dict).items():
        where = f"problem {pid}"
        if data.need(path, where, p, "ques_type") != "choose_txt" or data.need(path, where, p, "split") != split:
            continue
        question, choices = data.need(path, where, p, "question"), data.need(path, where, p, "choices", list)
        answer = str(data.need(path, where, p, "answer", int))
        image = os.path.join(root, "iconqa", split, "choose_txt", pid, "image.png")
        out.append(data.Sample(image, "iconqa", tg.instruction_for("vqa", question), answer,
                               {"id": pid, "choices": [str(c) for c in choices]}))
    return out


def read_hm(path, root, args):
    out = []
    for n, r in read_json(path, list):
        where = f"line {n}"
        image, text = data.need(path, where, r, "img"), data.need(path, where, r, "text")
        label = data.need(path, where, r, "label", int)
        out.append(data.Sample(os.path.join(root, image), "hm", PROMPTS["hm"].format(text), str(label),
                               {"id": data.need(path, where, r, "id", (int, str)), "label": label}))
    return out


def companion(path, what, read):
    """A second file in a well-known format (COCO's, VQA v2's), read whole: one-line errors."""
    try:
        return read(read_json(path, dict))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not {what} (missing {e})") from None


def read_okvqa(path, root, args):
    if not args.annotations:
        raise ValueError("okvqa needs --annotations (VQA v2-format annotations: mscoco_val2014_annotations.json)")
    humans = companion(args.annotations, "VQA v2's annotations format", lambda d: {
        a["question_id"]: [h["answer"] for h in a["answers"]] for a in d["annotations"]})
    out = []
    for i, q in enumerate(data.need(path, "the top level", read_json(path, dict), "questions", list)):
        where = f"questions [{i}]"
        qid, image_id = data.need(path, where, q, "question_id", int), data.need(path, where, q, "image_id", int)
        if qid not in humans:
            raise ValueError(f"{path}: {where}: question {qid} has no annotation in {args.annotations}")
        image = first_file(root, f"COCO_val2014_{image_id:012d}.jpg", f"{image_id:012d}.jpg")
        out.append(data.Sample(image, "okvqa", tg.instruction_for("vqa", data.need(path, where, q, "question")), "",
                               {"id": qid, "answers": humans[qid]}))
    return out


def read_refcoco(path, root, args):
    instances = args.annotations or os.path.join(os.path.dirname(os.path.abspath(path)), "instances.json")
    def boxes(coco):  # ann id -> (its [x, y, w, h] box, its image's record)
        images = {im["id"]: im for im in coco["images"]}
        return {a["id"]: (a["bbox"], images[a["image_id"]]) for a in coco["annotations"]}

    anns = companion(instances, "COCO's instances format", boxes)
    out = []
    for i, ref in enumerate(read_json(path, list)):
        where = f"ref [{i}]"
        split, ann_id = data.need(path, where, ref, "split"), data.need(path, where, ref, "ann_id", int)
        if split == "train" or (args.split and split != args.split):
            continue
        if ann_id not in anns:
            raise ValueError(f"{path}: {where}: ann_id {ann_id} is not in {instances}")
        box, im = anns[ann_id]
        meta = {"id": ann_id, "split": split, "box": box, "width": im["width"], "height": im["height"]}
        for s in data.need(path, where, ref, "sentences", list):
            query = tg.instruction_for("refer", data.need(path, where, s, "sent"))
            out.append(data.Sample(os.path.join(root, im["file_name"]), "refcoco", query, "", meta))
    return out


READERS = {"gqa": read_gqa, "vsr": read_vsr, "vizwiz": read_vizwiz, "iconqa": read_iconqa, "hm": read_hm,
           "okvqa": read_okvqa, "refcoco": read_refcoco}
# Each generating benchmark's metrics but HM's and RefCOCO's, official first: hit(whole text, answer, sample).
METRICS = {
    "gqa": {"substring of the answer (official)": lambda r, a, s: gqa_official(r, s.answer),
            "exact match (GQA's own)": lambda r, a, s: gqa_exact(a, s.answer)},
    "vsr": {"true/false + yes/no, can pass 100 (official)": lambda r, a, s: vsr_official(r, s.answer),
            "each answer counted once": lambda r, a, s: vsr_verdict(a) == s.answer},
    "vizwiz": {"substring both ways, min(n/3, 1) (official)": lambda r, a, s: vizwiz_official(a, s.meta["answers"]),
               "VQA accuracy (VizWiz's own)": lambda r, a, s: vqa_accuracy(a, s.meta["answers"])},
    "okvqa": {"VQA accuracy (official = OK-VQA's own)": lambda r, a, s: vqa_accuracy(a, s.meta["answers"])},
}


# -----------------------------------------------------------------------------
# Running the model: the official wrapping, raw greedy text, the loss of each choice, P(yes)

def pixels(model, samples):
    """Every benchmark at stage 4's size (448 px at full size), as the official eval processor."""
    return model.pixels([data.load_image(s.image) for s in samples], 4)


@torch.no_grad()
def generate_raw(model, tok, samples, template):
    """Greedy text after each query wrapped in `template`, up to MAX_NEW_TOKENS or end-of-text,
    as eval_vqa.py generates it: its stop at "###" is commented out, so the text can run on past
    the answer, and its GQA and VSR scores search that too."""
    examples = [tg.make_example(tok, 4, s.query, template=template) for s in samples]
    out = model.generate_ids(pixels(model, samples), examples, MAX_NEW_TOKENS,
                             stop_sequences=[[tok.token_to_id(tg.BOS)]], decoder=decoder_for(model.llama_proj.weight.device))
    return [tok.decode(ids) for ids in out]


def cut(raw):
    """The answer proper: up to the "###" the official model ends answers with, after any
    "Assistant:" (eval_vqa.py's cleaning for OK-VQA, VizWiz and HM)."""
    return raw.split("###")[0].split("Assistant:")[-1].strip()


@torch.no_grad()
def choice_losses(model, tok, samples, stage=3):
    """Per sample, the mean loss of each of meta["choices"] as the answer, its tokens and the end
    marker (stage 3's "###"), as the official multi_select's forward: the lowest is the pick. (The
    official code joins the choices with "_" and splits them again, which breaks a choice holding
    one; not copied.)"""
    queries = model.encode_queries(pixels(model, samples))  # (B, n_query, d): once per image
    rows = [i for i, s in enumerate(samples) for _ in s.meta["choices"]]
    examples = [tg.make_example(tok, stage, s.query, c) for s in samples for c in s.meta["choices"]]
    logits, targets = model(examples, queries=queries[rows])  # (N, V), (N,): the answer positions in order
    per_token = tg.lm_loss(logits, targets, "none").split([len(e.answer) for e in examples])
    losses = iter(t.mean().item() for t in per_token)
    return [[next(losses) for _ in s.meta["choices"]] for s in samples]


@torch.no_grad()
def yes_probability(model, tok, samples, template):
    """P(yes) / (P(yes) + P(no)) for the first answer token, each word in four spellings ("yes",
    " yes", "Yes", " Yes"; its first token): the score AUROC needs, which generated text lacks."""
    ids = lambda w: sorted({tg.encode(tok, v)[0] for v in (w, " " + w, w.capitalize(), " " + w.capitalize())})
    examples = [tg.make_example(tok, 4, s.query, template=template) for s in samples]
    for e in examples:
        e.answer = ids("yes")[:1]  # one answer token, no end marker: its position's logits are read
    logits, _ = model(examples, pixel_values=pixels(model, samples))  # (B, V): the first answer position
    logp = logits.float().log_softmax(-1)
    return torch.sigmoid(logp[:, ids("yes")].logsumexp(-1) - logp[:, ids("no")].logsumexp(-1)).tolist()


# -----------------------------------------------------------------------------
# Scoring a benchmark, and our own data

def run_benchmark(task, model, tok, samples, batch_size, template=OFFICIAL_TEMPLATE):
    """-> ({metric: %}, per-sample predictions). With the stage-4 template (what this project's
    stage 4 trains on) IconQA scores its choices under it too, instead of stage 3's."""
    if task == "iconqa":
        stage = 3 if template == OFFICIAL_TEMPLATE else 4
        losses = [l for b in batches(samples, batch_size, task) for l in choice_losses(model, tok, b, stage)]
        picks = [min(range(len(l)), key=l.__getitem__) for l in losses]
        preds = [{"id": s.meta["id"], "losses": l, "pick": p, "label": int(s.answer)}
                 for s, l, p in zip(samples, losses, picks)]
        right = [p == int(s.answer) for s, p in zip(samples, picks)]
        return {"top-1 of the loss ranking (official = IconQA's own)": percent(right)}, preds
    raw = [text for b in batches(samples, batch_size, task) for text in generate_raw(model, tok, b, template)]
    preds = [{"id": s.meta["id"], "raw": r, "answer": cut(r), "label": s.answer} for s, r in zip(samples, raw)]
    triples = [(r, cut(r), s) for r, s in zip(raw, samples)]  # (the whole text, the answer, the sample)
    if task in METRICS:
        return {name: percent(hit(*t) for t in triples) for name, hit in METRICS[task].items()}, preds
    if task == "hm":
        scores = [p for b in batches(samples, batch_size, "hm P(yes)") for p in yes_probability(model, tok, b, template)]
        labels = [s.meta["label"] for s in samples]
        for p, score in zip(preds, scores):
            p["p_yes"] = score
        return {"yes/no substring accuracy (official)": percent(hm_official(a) == y for (r, a, s), y in zip(triples, labels)),
                "AUROC of P(yes) (HM's own)": 100.0 * auroc(scores, labels),
                "accuracy at P(yes) > 0.5 (HM's own)": percent((p > 0.5) == y for p, y in zip(scores, labels))}, preds
    hits = {}  # refcoco: two scores per split
    for r, a, s in triples:
        official, standard = refcoco_hits(r, a, s.meta["box"], s.meta["width"], s.meta["height"])
        hits.setdefault(f"{s.meta['split']} IoU > 0.5, inclusive pixels (official)", []).append(official)
        hits.setdefault(f"{s.meta['split']} IoU >= 0.5 (refer toolkit)", []).append(standard)
    return {k: percent(v) for k, v in sorted(hits.items())}, preds


def print_scores(title, scores):
    """A benchmark's {metric: %}."""
    print(f"\n{title}")
    width = max(len(k) for k in scores)
    for name, v in scores.items():
        print(f"  {name:{width}s} {v:6.1f}")
    print(flush=True)


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"one of {', '.join([*READERS, *scoring.METRICS])}")
    p.add_argument("--data", required=True, help="the benchmark's file (see above), or one of our data files")
    p.add_argument("--images", help="the folder image names are relative to (default: the data file's)")
    p.add_argument("--annotations", help="okvqa: the annotations file; refcoco: instances.json")
    p.add_argument("--split", help="iconqa: the split (default val); refcoco: only this split")
    p.add_argument("--limit", type=at_least(1), help="score only the first N records")
    p.add_argument("--batch-size", type=at_least(1), default=16)
    p.add_argument("--template", choices=("official", "stage4"), default="official", help="benchmarks: the "
                   "official code's ###Human wrapping, or the [INST] one this project's stage 4 trains on")
    p.add_argument("--out", help="the results JSON (default: eval_TASK.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_weight_options(p)
    p.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    task, root = args.task, args.images or os.path.dirname(os.path.abspath(args.data))
    if task not in READERS and task not in scoring.METRICS:
        raise ValueError(f"unknown task '{task}': expected one of {', '.join([*READERS, *scoring.METRICS])}")
    out = output_file(args.out or f"eval_{task}.json", args.force, "the results")  # refused before any work
    skipped = 0  # (our own loaders skip and count bad images themselves)
    if task in READERS:  # a missing or undecodable image is skipped and counted, as in training
        records = READERS[task](args.data, root, args)[:args.limit]
        samples = data.keep_readable(args.data, records)[0]
        skipped = len(records) - len(samples)
    else:
        found = data.load_dataset(args.data, root)
        samples = [s for s in found if s.task == task][:args.limit]
        if not samples:
            held = dict(Counter(s.task for s in found)) or "none"
            raise ValueError(f"{args.data}: no '{task}' samples (it holds {held})")
    if not samples:
        raise ValueError(f"{args.data}: nothing left to score")
    model, tok, stage = load_model(args)
    preds = []
    if task in READERS:
        template = OFFICIAL_TEMPLATE if args.template == "official" else tg.TEMPLATES[4]
        scores, preds = run_benchmark(task, model, tok, samples, args.batch_size, template)
        print_scores(f"{task} | {len(samples)} scored, {skipped} skipped | {args.data}", scores)
    else:
        scores = scoring.score(model, tok, samples, stage, args.batch_size, preds, progress=True)
        scoring.print_table(f"{task} | {len(samples)} scored, {skipped} skipped | {args.data}", scores)
    result = {"task": task, "data": args.data, "scored": len(samples), "skipped": skipped, "stage": stage,
              "weights": args.checkpoint or (args.run or "demo"), "scores": scores, "predictions": preds}
    write_atomically(out, lambda tmp: write_json(result, tmp))
    print(f"wrote {out}")
    return result


def load_model(args):
    return load_for_inference(args, answers="many")


if __name__ == "__main__":
    run_cli(main)
