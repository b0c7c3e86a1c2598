"""The data of the four stages: a built-in "shapes world" for the demo, and loaders for real files.

TinyGPT-V trains on LAION/CC/SBU captions (stages 1-2), MiniGPT-4's cc_sbu_align descriptions
(stage 3) and a multi-task mix of LLaVA, RefCOCO, VQAv2, GQA... (stage 4; docs/PAPER.md section 7).
None of that can be downloaded here, so this file brings a procedural world small enough for a
tiny model to learn on two CPU cores, and writes every stage's texts from it. Real files of the
same kinds load behind the same `Sample` interface. A reader of the paper may skip this file: it
is what the stages are fed, not what they do.

The chapter, top to bottom:
- the world: one object per scene, of 8 colors, 4 shapes and 3 sizes, in one cell of a 3x3 grid;
  `make_scenes`, `demo_splits` (train/val/test with no scene in common);
- rendering with Pillow in relative coordinates, so a scene looks the same at 224 and 448 px;
- the texts: `caption` (stages 1-2), `description` + `DESCRIBE_INSTRUCTIONS` (stage 3);
- the stage-4 tasks `[vqa] [caption] [refer] [identify] [grounding]` and untagged descriptions
  (questions of four types: color, shape, size, position), boxes as `{<x1><y1><x2><y2>}`
  in integers 0-100 of the image size (MiniGPT-v2's format), `stage_samples`; an answer's boxes
  read (`parse_boxes`) and drawn on its picture (`draw_boxes`);
- loaders for caption pairs, LLaVA conversations, VQA and referring expressions.

Shapes in and out: `render(scene, size)` -> RGB PIL image (size, size); boxes are 4-tuples of
ints (x1, y1, x2, y2) in 0-100; every sample is a `Sample(image, task, query, answer, meta)`.
"""

import io
import json
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from checkpoints import read_json, regular_file

# -----------------------------------------------------------------------------
# The world. Deliberately small: one object per picture, in one cell of a 3x3 grid, with few and
# clearly distinct values of each attribute. Every question is then about the object there is, and
# its answer is one attribute of it: the kind of lookup a language model of a million parameters
# learns in minutes (docs/LOG.md has what several objects per picture cost: lookups by content that
# the stand-ins never learned on a CPU budget).

COLORS = {"red": (220, 50, 50), "green": (40, 160, 70), "blue": (50, 90, 220), "yellow": (235, 190, 20),
          "purple": (140, 70, 180), "orange": (245, 135, 25), "pink": (240, 120, 190), "black": (40, 40, 40)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "medium", "large")
BACKGROUND = (245, 245, 240)  # light and plain; also the whole of the blank-image baseline
POSITIONS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")  # cell 0..8 in reading order
NUM_CELLS = 9
NUM_SCENES = len(COLORS) * len(SHAPES) * len(SIZES) * NUM_CELLS  # 864 distinct pictures, up to jitter
CELL_CENTERS = (17, 50, 83)  # centers of the three columns (rows) in 0-100 coordinates
HALF_SIDE = {"small": 7, "medium": 10, "large": 13}  # half the box side, 0-100 coordinates
JITTER = 1  # objects move up to this far from the cell center. Small enough that the cell's
# canonical box still has IoU >= 0.5 with the true one (12 * 12 / (2 * 196 - 144) = 0.58 for a small
# shape off by 2 in x and y), so [refer] is learnable by a tiny model.


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, reading order
    box: tuple  # (x1, y1, x2, y2) ints in 0-100; the drawn shape fills exactly this box


@dataclass
class Scene:
    objects: list  # of Obj, sorted by cell
    seed: int  # make_scene(seed) rebuilds this scene


def box_at(cell, size, dx, dy):
    """The box of an object of `size` in `cell`, its center moved (dx, dy) from the cell's."""
    h = HALF_SIDE[size]
    cx, cy = CELL_CENTERS[cell % 3] + dx, CELL_CENTERS[cell // 3] + dy
    return (cx - h, cy - h, cx + h, cy + h)


def make_scene(seed):
    """One scene from its own seed: one object of a random color, shape and size in a random cell."""
    rng = random.Random(seed)
    cell, color, shape, size = rng.randrange(NUM_CELLS), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES)
    dx, dy = rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)
    return Scene([Obj(shape, color, size, cell, box_at(cell, size, dx, dy))], seed)


def jittered(scene):
    """The same scene at every offset the jitter allows, (2 * JITTER + 1) ** 2 of them: the same
    objects, and so the same words, each drawn slightly elsewhere in its cell. (They keep the
    scene's seed, which rebuilds only the scene's own offset.)"""
    offsets = range(-JITTER, JITTER + 1)
    return [replace(scene, objects=[replace(o, box=box_at(o.cell, o.size, dx, dy)) for o in scene.objects])
            for dx in offsets for dy in offsets]


def signature(scene):
    """What makes two scenes "the same" for the splits: the objects, not the jitter."""
    return tuple((o.cell, o.color, o.shape, o.size) for o in scene.objects)


def _draw_unique(n, rng, seen):
    scenes, tries = [], 0
    while len(scenes) < n:
        tries += 1
        if tries > 100 * n + 10000:
            raise ValueError(f"cannot draw {n} distinct scenes (the world has {NUM_SCENES}, some already drawn)")
        scene = make_scene(rng.getrandbits(32))
        if signature(scene) not in seen:
            seen.add(signature(scene))
            scenes.append(scene)
    return scenes


def make_scenes(n, seed):
    """n distinct scenes, the same ones for the same seed."""
    return _draw_unique(n, random.Random(seed), set())


def demo_splits(n_train=500, n_val=0, n_test=300, seed=0):
    """Disjoint train/val/test scenes: no picture of a held-out split is in another, up to jitter,
    so held-out scores are on combinations of color, shape, size and place never trained on. The
    held-out splits are drawn first, so they stay the same when n_train changes."""
    rng, seen = random.Random(seed), set()
    test = _draw_unique(n_test, rng, seen)
    val = _draw_unique(n_val, rng, seen)
    return {"train": _draw_unique(n_train, rng, seen), "val": val, "test": test}


# -----------------------------------------------------------------------------
# Rendering. Geometry lives in 0-100 coordinates and is scaled to the canvas, so the boxes in the
# texts are the drawn shapes' bounding boxes at any size. No anti-aliasing: colors stay exact.

def render(scene, size):
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x1, y1, x2, y2 = (round(v * size / 100) for v in o.box)
        x2, y2 = max(x1, x2 - 1), max(y1, y2 - 1)  # Pillow's bounds are inclusive: stay inside
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        elif o.shape == "triangle":
            draw.polygon(((x1 + x2) / 2, y1, x1, y2, x2, y2), fill=fill)
        else:  # cross: two bars a third of the box thick
            t, cx, cy = (x2 - x1) / 6, (x1 + x2) / 2, (y1 + y2) / 2
            draw.rectangle((x1, cy - t, x2, cy + t), fill=fill)
            draw.rectangle((cx - t, y1, cx + t, y2), fill=fill)
    return img


def blank_image(size):
    """The baseline input: the scene's background with nothing on it."""
    return Image.new("RGB", (size, size), BACKGROUND)


# -----------------------------------------------------------------------------
# The texts of stages 1-3. Captions follow the paper's cleaning (lower case, no punctuation,
# at most 50 words); descriptions are longer and say where each object is.


# Our own list: the official stage-3 prompt file is missing from the TinyGPT-V repository.
DESCRIBE_INSTRUCTIONS = [
    "Describe this image in detail.",
    "What do you see in this picture?",
    "Give a detailed description of the image.",
    "Tell me what is in this image and where each thing is.",
    "Explain what this picture shows.",
    "Write a few sentences about this image.",
    "List the objects in the image and their positions.",
    "Please describe the scene.",
    "What does this image contain? Be specific.",
    "Look at the picture and describe everything you notice.",
]


def clean_caption(text):
    """Lower-case, strip punctuation, keep at most 50 words (docs/PAPER.md section 6)."""
    words = re.sub(r"[^\w\s]|_", "", text.lower()).split()
    return " ".join(words[:50])


def phrase(obj):
    """The full name of an object, e.g. "the small red circle" (the [identify] answer)."""
    return f"the {obj.size} {obj.color} {obj.shape}"


def caption(scene):
    o = scene.objects[0]
    return f"a {o.size} {o.color} {o.shape}"


def description(scene):
    """Three sentences: the object, where it is, and its color again with the background."""
    o = scene.objects[0]
    return (f"The picture shows a {o.size} {o.color} {o.shape}. It is in the {POSITIONS[o.cell]}. "
            f"The {o.shape} is {o.color} on a light background.")


# -----------------------------------------------------------------------------
# The stage-4 tasks (MiniGPT-v2's tags). `query` is the task's free text; tinygptv.py wraps it in
# the tag's instruction and the [INST] template.

TASKS = ("vqa", "caption", "refer", "identify", "grounding", "describe")
# No yes/no: a comparison of the question's word with the picture's, which the demo's stand-in
# language model did not learn in its budget, unlike the copies the other types are (docs/LOG.md).
VQA_TYPES = ("color", "shape", "size", "position")


def box_text(box):
    return "{" + "".join(f"<{int(v)}>" for v in box) + "}"


BOX = re.compile(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}")  # how an answer writes a box


def parse_box(text):
    """The first `{<x1><y1><x2><y2>}` in text as a tuple of ints, or None (none, or out of 0-100)."""
    m = BOX.search(text)
    if m is None:
        return None
    box = tuple(int(v) for v in m.groups())
    return box if all(v <= 100 for v in box) else None


def parse_boxes(text):
    """Every whole `{<x1><y1><x2><y2>}` in an answer, corners in order, as tuples of ints; boxes with a
    coordinate above 100 and half-written ones are left out (a model can write either)."""
    boxes = []
    for m in BOX.finditer(text):
        x1, y1, x2, y2 = (int(v) for v in m.groups())
        if max(x1, y1, x2, y2) <= 100:
            boxes.append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return boxes


def draw_boxes(image, boxes, color=(255, 0, 0)):
    """A copy of a PIL image with each 0-100 box outlined, as the official stage-4 demo shows grounding
    answers; the line is about 1% of the image's size, at least 2 px."""
    out = to_rgb(image).copy()
    w, h = out.size
    pen = ImageDraw.Draw(out)
    for x1, y1, x2, y2 in boxes:
        pen.rectangle([x1 * (w - 1) / 100, y1 * (h - 1) / 100, x2 * (w - 1) / 100, y2 * (h - 1) / 100],
                      outline=color, width=max(2, round(min(w, h) / 100)))
    return out


def iou(a, b):
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when either has no area."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def vqa_question(scene, qtype, rng):
    """One (question, answer) of the given type; answers are one or two words. Each question names
    the object by the attributes it does not ask about, as a person would."""
    o = scene.objects[0]
    if qtype == "color":
        return f"what color is the {o.shape}?", o.color
    if qtype == "shape":
        return f"what shape is the {o.color} object?", o.shape
    if qtype == "size":
        return f"what size is the {o.color} {o.shape}?", o.size
    if qtype == "position":
        return f"where is the {o.color} {o.shape}?", POSITIONS[o.cell]
    raise ValueError(f"unknown VQA question type '{qtype}': expected one of {', '.join(VQA_TYPES)}")


def grounded_caption(scene):
    """The caption with each object's box after its name (the [grounding] answer)."""
    return " and ".join(f"a {o.size} {o.color} {o.shape} {box_text(o.box)}" for o in scene.objects)


@dataclass
class Sample:
    image: object  # a PIL image (demo) or a file path (real data; opened lazily)
    task: str  # "caption", "describe", one of TASKS, or "chat" (real conversations)
    query: str  # the task's free text, without template or tag
    answer: str  # the target text
    meta: dict = field(default_factory=dict)  # what evaluation needs: box, qtype, ...


def _scene_samples(scene, stage, image, rng):
    meta = {"scene": scene.seed}
    if stage in (1, 2):
        return [Sample(image, "caption", "", caption(scene), dict(meta))]
    if stage == 3:
        return [Sample(image, "describe", rng.choice(DESCRIBE_INSTRUCTIONS), description(scene), dict(meta))]
    out = [Sample(image, "vqa", q, a, {**meta, "qtype": t}) for t in VQA_TYPES for q, a in [vqa_question(scene, t, rng)]]
    out.append(Sample(image, "caption", "", caption(scene), dict(meta)))
    for o in scene.objects:
        # refer names the object with or without its size: both are unambiguous in the scene
        name = phrase(o) if rng.random() < 0.5 else f"the {o.color} {o.shape}"
        out.append(Sample(image, "refer", name, box_text(o.box), {**meta, "box": o.box}))
        out.append(Sample(image, "identify", box_text(o.box), phrase(o), {**meta, "box": o.box}))
    out.append(Sample(image, "grounding", "", grounded_caption(scene),
                      {**meta, "boxes": [o.box for o in scene.objects]}))
    # stage 4's mixture also holds detailed descriptions (LLaVA's, in the paper), untagged
    out.append(Sample(image, "describe", rng.choice(DESCRIBE_INSTRUCTIONS), description(scene), dict(meta)))
    return out


def stage_samples(scenes, stage, image_size, seed):
    """The training (or evaluation) samples of one stage. Stage 4 gives, per scene, one question of
    each VQA type, a caption, a [refer], an [identify], a [grounding] and a description. One image is
    rendered per scene and shared by its samples; image_size None renders none (texts only)."""
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"unknown stage {stage}: expected 1, 2, 3 or 4")
    out = []
    for scene in scenes:
        rng = random.Random(seed * 2**32 + scene.seed)  # a scene's texts don't depend on its neighbors
        out += _scene_samples(scene, stage, render(scene, image_size) if image_size else None, rng)
    return out


# -----------------------------------------------------------------------------
# Reading an image file: any mode Pillow opens, as RGB, or a one-line error


def to_rgb(im, name="image"):
    """Any image Pillow opens -> RGB, fully decoded. 16- and 32-bit grey ("I;16", "I") are scaled
    from 0-65535 to 0-255: Pillow's own convert clips them, and most greys come out white."""
    if im.mode.startswith("I;16") or (im.mode == "I" and np.asarray(im).max() > 255):
        grey = (np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode == "F":
        raise ValueError(f"{name}: a floating-point image (mode F) has no agreed 0-255 range; save it as 8-bit")
    try:
        return im.convert("RGB")  # L, P, RGBA, CMYK, YCbCr, ...; forces a full decode
    except ValueError as e:  # a mode Pillow cannot turn into RGB (LAB, ...)
        raise ValueError(f"{name}: cannot convert mode {im.mode} to RGB ({e})") from None


def load_image(image):
    """A path or a PIL image -> an RGB PIL image; a one-line error for a missing, corrupt, truncated
    or oversized file (Pillow's decompression-bomb limit)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, TarMember):  # a picture inside a webdataset shard: just its bytes
        with open(image.shard, "rb") as f:
            f.seek(image.offset)
            source = io.BytesIO(f.read(image.size))
    else:
        source = regular_file(image, "image")
    try:
        with Image.open(source) as im:
            return to_rgb(im, str(image))
    except Image.DecompressionBombError as e:
        raise ValueError(f"{image}: refused: {e}") from None
    except Exception as e:  # Pillow raises many kinds for a bad file (OSError, SyntaxError, EOFError, zlib.error...)
        raise ValueError(f"cannot read image {image}: {e}") from None


# -----------------------------------------------------------------------------
# Real data behind the same interface. Each file is a JSON list (or a JSON object holding an
# "annotations" list) or JSONL. Images are checked up front (decoded, or for training their headers
# only): a missing or unreadable one is skipped and counted, so a long run doesn't die on its 10,000th
# sample; a malformed file is an error.

def _read_records(path):
    """-> [(where, record)], where = "entry [i]" (a JSON list, or an object holding an "annotations"
    list, or one record) or "line n" (JSON lines), for error messages."""
    data = read_json(path, None)
    if isinstance(data, list) and data and isinstance(data[0], tuple):  # JSON lines: (line number, record)
        records = [(f"line {n}", r) for n, r in data]
    else:
        if isinstance(data, dict):
            data = data["annotations"] if "annotations" in data else [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (or JSONL)")
        records = [(f"entry [{i}]", r) for i, r in enumerate(data)]
    for where, r in records:
        if not isinstance(r, dict):
            raise ValueError(f"{path}: {where}: expected a JSON object, got {type(r).__name__}")
    return records


def need(path, where, record, name, types=str):
    """record[name], which must be there and of `types`; one-line errors naming file, record, field."""
    if not isinstance(record, dict) or name not in record:
        raise ValueError(f"{path}: {where}: missing field '{name}'")
    if not isinstance(record[name], types):
        raise ValueError(f"{path}: {where}: field '{name}' has the wrong type ({type(record[name]).__name__})")
    return record[name]


def _image_status(file, decode=True):
    """-> ("ok", (w, h)), ("missing", None) or ("corrupt", None)."""
    if not os.path.isfile(file):
        return "missing", None
    try:
        with Image.open(file) as im:
            size = im.size
            if decode:
                im.load()  # a full decode: verify() would pass a truncated JPEG, which then fails mid-stage
    except Exception:  # Pillow raises many kinds (OSError, SyntaxError, struct.error...) for bad files
        return "corrupt", None
    return "ok", size


def keep_readable(path, samples, decode=True):
    """Drop samples whose image is missing or corrupt, print the count; -> (kept, {file: size}).
    decode=False reads each image's header only (a missing file, or one that is no image at all), not
    its pixels: training leaves the decoding to its loader's workers, which skip and count what
    fails there (a truncated JPEG)."""
    status, kept, skipped = {}, [], Counter()
    for s in samples:
        if s.image not in status:
            status[s.image] = _image_status(s.image, decode)
        state, _ = status[s.image]
        if state == "ok":
            kept.append(s)
        else:
            skipped[state] += 1
    if skipped:
        print(f"skipped {sum(skipped.values())} of {len(samples)} samples: {skipped['missing']} missing, "
              f"{skipped['corrupt']} corrupt images ({path})", flush=True)
    return kept, {f: size for f, (state, size) in status.items() if state == "ok"}


def _caption_samples(path, records, root, decode=True):
    """{"image", "caption"} pairs -> caption samples, cleaned as the paper's stage 1-2 captions.
    MiniGPT-4's cc_sbu_align ({"image_id", "caption"} under "annotations") is stage-3 data: its
    long descriptions stay as written and become "describe" samples with one of our instructions."""
    out = []
    for i, (where, r) in enumerate(records):
        if "image" not in r and "image_id" in r:
            image = str(need(path, where, r, "image_id", (str, int))) + ".jpg"
            text = need(path, where, r, "caption").strip()
            query = DESCRIBE_INSTRUCTIONS[i % len(DESCRIBE_INSTRUCTIONS)]
            out.append(Sample(os.path.join(root, image), "describe", query, text, {}))
        else:
            image, text = need(path, where, r, "image"), need(path, where, r, "caption")
            out.append(Sample(os.path.join(root, image), "caption", "", clean_caption(text), {}))
    return keep_readable(path, out, decode)[0]


def _llava_samples(path, records, root, decode=True):
    """One "chat" sample per (human, gpt) turn pair; the `<image>` marker is dropped from the
    question because the template places the image."""
    out = []
    for where, r in records:
        image = os.path.join(root, need(path, where, r, "image"))
        turns = need(path, where, r, "conversations", list)
        if len(turns) % 2:
            raise ValueError(f"{path}: {where}: odd number of conversation turns ({len(turns)})")
        for t in range(0, len(turns), 2):
            pair = []
            for turn, speaker in zip(turns[t:t + 2], ("human", "gpt")):
                if not isinstance(turn, dict) or turn.get("from") != speaker or not isinstance(turn.get("value"), str):
                    raise ValueError(f"{path}: {where}: turn {t + len(pair)} should be "
                                     f"{{\"from\": \"{speaker}\", \"value\": text}}")
                pair.append(turn["value"])
            query = pair[0].replace("<image>", "").strip()
            out.append(Sample(image, "chat", query, pair[1].strip(), {"turn": t // 2}))
    return keep_readable(path, out, decode)[0]


def _vqa_samples(path, records, root, decode=True):
    """{"image", "question", "answer"}; a list of answers (VQAv2's ten) trains on the most common."""
    out = []
    for where, r in records:
        image, question = need(path, where, r, "image"), need(path, where, r, "question")
        answers = need(path, where, r, "answer", (str, list))
        answers = [answers] if isinstance(answers, str) else [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}: {where}: field 'answer' should be a text or a non-empty list of texts")
        best = Counter(answers).most_common(1)[0][0]  # ties: the first one given
        out.append(Sample(os.path.join(root, image), "vqa", question.strip(), best.strip(),
                          {"qtype": r.get("question_type", "real"), "answers": answers}))
    return keep_readable(path, out, decode)[0]


def _refexp_samples(path, records, root, decode=True):
    """{"image", "phrase", "box": [x, y, w, h] in pixels} -> [refer] samples with the box in 0-100
    of the image's size, which is read from the file."""
    out = []
    for where, r in records:
        image, text = need(path, where, r, "image"), need(path, where, r, "phrase")
        box = need(path, where, r, "box", list)
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"{path}: {where}: field 'box' should be [x, y, w, h] with w, h > 0")
        out.append(Sample(os.path.join(root, image), "refer", text.strip(), "", {"box_px": tuple(box)}))
    kept, sizes = keep_readable(path, out, decode)  # (the box needs the image's size: its header, at least)
    for s in kept:
        (w, h), (x, y, bw, bh) = sizes[s.image], s.meta.pop("box_px")
        box = tuple(min(100, max(0, round(100 * v / d))) for v, d in ((x, w), (y, h), (x + bw, w), (y + bh, h)))
        s.answer, s.meta["box"] = box_text(box), box
    return kept


def _root(path, image_root):
    return image_root if image_root is not None else os.path.dirname(os.path.abspath(path))


def load_dataset(path, image_root=None, decode=True):
    """Any of the four formats, told apart by the first record's fields. Image paths are relative
    to image_root (default: the data file's folder). decode=False: images are checked by their headers
    only (keep_readable); webdataset shards (`.tar`, a brace pattern) read as `load_shards` does."""
    if str(path).endswith(".tar") or "{" in str(path):
        return load_shards(path)
    records = _read_records(path)
    keys = set(records[0][1]) if records else set()
    if "conversations" in keys:
        load = _llava_samples
    elif "phrase" in keys and "box" in keys:
        load = _refexp_samples
    elif "question" in keys:
        load = _vqa_samples
    elif "caption" in keys:
        load = _caption_samples
    else:
        raise ValueError(f"{path}: cannot tell the format from the first record's fields {sorted(keys)}: expected "
                         "caption pairs (image, caption), LLaVA (image, conversations), VQA (image, question, "
                         "answer) or referring expressions (image, phrase, box)")
    return load(path, records, _root(path, image_root), decode)


# -----------------------------------------------------------------------------
# webdataset tar shards (img2dataset's output, the official stages 1-2 data): each sample is the
# members {key}.jpg (or .png, .webp) and {key}.txt (its caption) or {key}.json (with "caption").
# Only the headers and the small text members are read up front; a picture is read where it is used.


@dataclass(frozen=True)
class TarMember:
    """A picture inside a tar shard: where its bytes are, so that a worker reads just them."""
    shard: str
    name: str
    offset: int
    size: int

    def __str__(self):
        return f"{self.shard}:{self.name}"


def expand_braces(pattern):
    """'laion/{00000..00002}.tar' -> ['laion/00000.tar', 'laion/00001.tar', 'laion/00002.tar'] (webdataset's
    notation: numbered ranges keep their zero padding; 'a{b,c}' lists alternatives)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    items = ([str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r
             else body.split(","))
    return [p for item in items for p in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def load_shards(pattern):
    """Caption samples from webdataset tar shards (a file, or a brace pattern): see above."""
    out = []
    for shard in expand_braces(str(pattern)):
        regular_file(shard, "shard")
        pictures, texts = {}, {}
        try:
            with tarfile.open(shard) as tf:
                for m in tf:
                    key, _, ext = m.name.rpartition(".")
                    if not m.isfile() or not key:
                        continue
                    if ext.lower() in ("jpg", "jpeg", "png", "webp"):
                        pictures[key] = TarMember(shard, m.name, m.offset_data, m.size)
                    elif ext in ("txt", "json"):
                        raw = tf.extractfile(m).read().decode("utf-8", errors="replace")
                        text = raw if ext == "txt" else json.loads(raw).get("caption")
                        if isinstance(text, str):
                            texts[key] = text
        except (tarfile.TarError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{shard}: not a readable webdataset shard ({e})") from None
        out += [Sample(pictures[k], "caption", "", clean_caption(texts[k]), {"key": k}) for k in pictures if k in texts]
    return out
