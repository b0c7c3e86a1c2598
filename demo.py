"""The built-in demo: everything that exists only because pretrained backbones and real data
cannot be downloaded on the machines this project is built on.

A real user starts TinyGPT-V from a pretrained EVA ViT-g, BLIP-2 Q-Former and Phi-2 and trains
stages 1-4 on LAION, CC, cc_sbu_align and the stage-4 mixture (docs/PAPER.md section 7). Here
none of that can be had offline, so this file brings stand-ins, and train.py then runs the
paper's four stages on them unchanged:

- `scene_words`: a scene written as 32 words, one per Q-Former query (the object's colour, shape,
  size and place, then `none`). It is the link pretraining gives a real BLIP-2 and
  Phi-2 in common: the queries carry what a text would say about the image (docs/PAPER.md
  section 13);
- stage 0 (`build_backbones`): a byte-level BPE tokenizer in which each of those words is one
  token; a tiny Phi-2 trained as a language model on every stage's prompt with the 32 words where
  the image goes; a tiny ViT + Q-Former trained to say the words from the pictures;
- the held-out samples scored after each stage (`evaluate`, with scoring.py's metrics): each task
  with the image and with a blank one, the baseline that shows how much the model uses the picture;
- `load_demo`: the trained demo run, which tinygptv.py's command line answers from by default.
A reader of the paper may skip this file: train.py runs the paper's stages on what it gives.

The world itself (scenes, rendering, every stage's texts) is data.py's: the same `Sample`s a
real data file gives.

Shapes: the stand-in ViT sees 48 px images (96 px in stage 4) in 16 px patches, (B, 1 + 9, 96)
(or 1 + 36); the Q-Former gives (B, 32, 96); the language model is 128 wide.
"""

import functools
import os
import shutil
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
import runs
import scoring
import tinygptv as tg
from checkpoints import file_digest, read_json, write_atomically, write_folder_atomically, write_json
from layouts import load_model, load_phi2, save_pretrained
from phi2 import Phi2
from qformer import QFormer
from vit import VisionTransformer

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_RUN = os.path.join(HERE, "runs", "demo")
PRETRAINED = os.path.join(HERE, "demo_backbones")  # stage 0's output, shipped with the repository
IMAGE_SIZE = tg.TinyGPTVConfig.tiny().vision.image_size  # stages 1-3; stage 4 sees twice it


def log(*a):
    print(*a, flush=True)


# -----------------------------------------------------------------------------
# The scenes, and the 32 words a scene is to the stand-in backbones


@dataclass(frozen=True)
class Split:
    """Which scenes a run trains on and holds out: train.py's --seed, --demo-train, --demo-eval."""
    seed: int = 0
    n_train: int = 560
    n_eval: int = 300

    def scenes(self):
        return _demo_scenes(self.n_train, self.n_eval, self.seed)


@functools.lru_cache(maxsize=2)
def _demo_scenes(n_train, n_eval, seed):
    return data.demo_splits(n_train=n_train, n_val=0, n_test=n_eval, seed=seed)


def stage_samples(split, stage, part="train"):
    """The demo's samples of one stage for `part` ("train" or "test"), drawn at the stage's size."""
    scenes = split.scenes()[part]
    return data.stage_samples(scenes, stage, tg.image_size(IMAGE_SIZE, stage), split.seed + (part != "train"))


def text_corpus(scenes, seed=0):
    """All texts the stages write for these scenes (instructions included), for training the demo
    tokenizer and the stand-in language model of stage 0."""
    texts = list(data.DESCRIBE_INSTRUCTIONS)
    for stage in (1, 3, 4):  # stage 2's texts are stage 1's
        texts += [t for s in data.stage_samples(scenes, stage, None, seed) for t in (s.query, s.answer) if t]
    return texts


NUM_CELL_CLASSES = 1 + len(data.COLORS) * len(data.SHAPES) * len(data.SIZES)  # 0 = empty cell


def object_class(obj):
    """1 + the index of (color, shape, size): 1..96 (0 is "nothing")."""
    c, s, z = list(data.COLORS).index(obj.color), data.SHAPES.index(obj.shape), data.SIZES.index(obj.size)
    return 1 + (c * len(data.SHAPES) + s) * len(data.SIZES) + z


NUM_QUERIES = 32  # the Q-Former's queries (BLIP-2 and TinyGPT-V use 32)
PLACE_WORDS = ("top", "middle", "bottom", "left", "right", "center")
SLOT_WORDS = ("none",) + tuple(data.COLORS) + data.SHAPES + data.SIZES + PLACE_WORDS  # what a query can say


def scene_words(scene):
    """The scene as 32 words, one per Q-Former query: the object's color, shape and size, then its
    place in one or two words ("top left", "center none"), then "none" for the 27 spare queries.
    The demo's stand-in for what pretraining gives a real Q-Former and Phi-2 in common (BLIP-2's
    queries are trained to carry the text that describes the image): its Q-Former learns to say
    query j's word (stage 0), its language model learns every stage's prompt with these words where
    the image goes, and stages 1-4 teach the projections to turn each query into its word's
    embedding, then the model to use them. Each attribute has its own query, so every answer is
    copied from a fixed place, which a small transformer learns quickly."""
    o = scene.objects[0]
    place = data.POSITIONS[o.cell].split()
    words = [o.color, o.shape, o.size] + place + ["none"] * (2 - len(place))
    return words + ["none"] * (NUM_QUERIES - len(words))


def patch_labels(scene, grid):
    """Per patch of a grid x grid patch grid, row-major: the class of the object that covers it
    (its box overlaps the patch by more than a fifth of the smaller of the two), else 0. The
    dense stage-0 target of the ViT: every patch token is told what it shows."""
    w = 100 / grid  # patch side in 0-100 coordinates
    labels = [0] * (grid * grid)
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        for r in range(grid):
            for c in range(grid):
                ix = max(0, min(x2, (c + 1) * w) - max(x1, c * w))
                iy = max(0, min(y2, (r + 1) * w) - max(y1, r * w))
                if ix * iy > 0.2 * min(w * w, (x2 - x1) * (y2 - y1)):
                    labels[r * grid + c] = object_class(o)
    return labels


def slot_text(scene):
    """The scene's 32 words (`scene_words`) as text: one token each, the leading space included."""
    return " " + " ".join(scene_words(scene))


def word_prompt(stage, sample, scene):
    """The stage's prompt for a sample with the scene's 32 words where the image goes: the text
    the demo's language model learns, and reads again when it is checked alone."""
    return tg.TEMPLATES[stage].format(tg.stage_instruction(stage, sample)).replace("<ImageHere>", slot_text(scene))


def lm_texts(scenes, seed):
    """What the demo's language model learns: every stage's prompt with the scene's 32 words where
    the image goes, as (prompt, answer) pairs, the loss on the answer only. A real Phi-2 arrives
    able to read and reason; the tiny one learns here to answer the demo's questions about a scene
    given as words, so that stages 1-4 have to teach only the bridge from the 32 queries to those
    words' embeddings, and the model to use them."""
    pairs = []
    for stage, draws in ((1, 1), (3, 2), (4, 8)):  # each draw phrases [refer] and the instructions anew
        for draw in range(draws):
            for scene in scenes:
                for s in data.stage_samples([scene], stage, None, seed * 1000 + draw):  # texts only, no image
                    pairs.append((word_prompt(stage, s, scene), s.answer + tg.END_MARKERS[stage]))
    return pairs


# -----------------------------------------------------------------------------
# Stage 0: the stand-in backbones


def train_tokenizer(texts, path):
    """Byte-level BPE, Phi-2's (GPT-2's) kind of tokenizer, with <|endoftext|> as bos = eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=[tg.BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    write_atomically(path, tok.save)
    return tok


def pretrain_language_model(cfg, tok, texts, seed, steps, schedule):
    """The demo's Phi-2: a plain Phi-2 (no stabilizers, like microsoft/phi-2) trained on the text.
    schedule(step, steps, peak, warmup) -> the learning rate: train.py's warm-up and cosine."""
    torch.manual_seed(seed)
    # no dropout: a few thousand steps over a small world leave little to regularize
    llm_cfg = replace(cfg.llm, vocab_size=tok.get_vocab_size(), qk_layernorm=False, post_layernorm=False,
                      resid_pdrop=0.0)
    model = Phi2(llm_cfg)
    bos = tok.token_to_id(tg.BOS)
    seqs = [([bos] + tg.encode(tok, q), tg.encode(tok, a)) for q, a in texts]  # (prompt ids, answer ids)
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    bs, T = 16, 160  # a row holds two stage-4 texts (about 70 tokens each)
    t0 = time.time()
    for step in range(steps):
        # Each row packs whole texts drawn at random until the next one would not fit: no text is
        # cut (an answer always sees its question), and few positions are padding.
        ids = torch.full((bs, T), bos, dtype=torch.long)
        labels = torch.full((bs, T), -100, dtype=torch.long)
        for r in range(bs):
            n = 0
            while True:
                prompt, answer = seqs[torch.randint(len(seqs), (1,), generator=g).item()]
                seq = (prompt + answer)[:T]
                if n + len(seq) > T:
                    break
                ids[r, n:n + len(seq)] = torch.tensor(seq)
                labels[r, n + len(prompt):n + len(seq)] = torch.tensor(seq[len(prompt):])  # the answer only
                n += len(seq)
        for group in opt.param_groups:
            group["lr"] = schedule(step, steps, peak=3e-3, warmup=30)
        loss = tg.lm_loss(*tg.answer_logits(model.lm_head, model.hidden_states(ids), labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"stage 0 | language model  step {step:4d}/{steps} | loss {loss.item():.3f} | {time.time() - t0:.0f}s")
    return model


def language_model_alone(llm, tok, split, n=300):
    """Held-out stage-4 VQA answered by the stand-in language model on its own, each image replaced
    by its scene's 32 words: how well the model that stages 1-4 start from can read a scene it is
    handed perfectly, before any image is involved, and so the demo's ceiling.
    -> ({question type: % exact}, questions asked), with "all" for every type together."""
    scenes = {sc.seed: sc for sc in split.scenes()["test"]}
    samples = [s for s in data.stage_samples(list(scenes.values()), 4, None, split.seed + 1) if s.task == "vqa"][:n]
    bos = tok.token_to_id(tg.BOS)
    prompts = [[bos] + tg.encode(tok, word_prompt(4, s, scenes[s.meta["scene"]])) for s in samples]
    T = max(map(len, prompts))
    ids = torch.tensor([[bos] * (T - len(p)) + p for p in prompts])  # left-padded
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    llm.eval()
    answers = llm.generate(ids, attention_mask=mask, max_new_tokens=8, stop_sequences=[[bos]])
    hits = [scoring.exact(tok.decode(a), s.answer) for a, s in zip(answers, samples)]
    return {"all": scoring.percent(hits), **scoring.by_question_type(hits, samples)}, len(samples)


def sincos_positions(grid, dim):
    """2-D sine-cosine position embeddings (MAE's), (grid * grid, dim): dim/4 frequencies per axis."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    freqs = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    angles = [t.flatten()[:, None] * freqs[None] for t in (x, y)]  # 2 x (grid*grid, dim/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def pretrain_vision(cfg, scenes, seed, steps, schedule):
    """The demo's EVA ViT + Q-Former, trained on two supervised targets at once:
    - every patch token of the ViT says which object covers it (`patch_labels`), a dense
      signal that trains the ViT's features quickly;
    - query j of the Q-Former says word j of the scene (`scene_words`: the object's colour, shape,
      size and place), which is what stages 1-4 read from the queries.
    Three steps in four are at stage 4's 96 px and one at the other stages' 48 px, so the tower
    works at both (the real EVA was trained at 224 px and still works at 448 with interpolated
    positions; a tower trained at one size only did not: 0.70 -> 0.07 object accuracy when the size
    doubled). 96 px gets more steps because it generalizes worse: with steps alternating one to one,
    held-out objects had all five words right 97.0% of the time at 48 px and 95.3% at 96 px; with
    three in four, 96.7% at both (docs/LOG.md).
    Each training scene is drawn at all nine offsets its jitter allows (`data.jittered`), not only
    its own. At 96 px a cell's center falls on the corner of four 16 px patches, so every object is
    cut in four, and the one-pixel jitter decides how; seeing every cut of each training object
    took held-out objects from 96.7% to 98.3% (48 px) and 99.0% (96 px)."""
    torch.manual_seed(seed)
    vit, qformer = VisionTransformer(cfg.vision), QFormer(cfg.qformer)
    # Two inits differ from EVA's and BERT's, measured on this task. (1) Linear weights ~ 1/sqrt(fan_in):
    # std 0.02 was set for widths 768-1408; at width 96 it left the Q-Former's output almost
    # independent of the image (0.002 std across images). (2) Positions start as 2-D sine-cosine:
    # at std 0.02 they are drowned by the patch content and the Q-Former cannot tell cells apart.
    for m in list(vit.modules()) + list(qformer.modules()):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    with torch.no_grad():
        vit.pos_embed[0, 1:] = sincos_positions(cfg.vision.grid_size, cfg.vision.hidden_size)
    # One word head shared by all queries: each query then carries its own word in one common code,
    # which is how the language model reads them (the projections are shared too). A head reading
    # all queries at once trained as fast but left the content spread across queries, and stage 4
    # learned to read it slowly.
    word_head = nn.Linear(cfg.qformer.hidden_size, len(SLOT_WORDS))  # both heads are thrown away afterwards
    patch_head = nn.Linear(cfg.vision.hidden_size, NUM_CELL_CLASSES)
    params = [p for m in (vit, qformer, word_head, patch_head) for p in m.parameters()]
    peak = 1e-3  # 2e-3 learned slower; with std 0.02 init even this sat at the label prior
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    sizes = (cfg.vision.image_size, tg.image_size(cfg.vision.image_size, 4))  # stages 1-3, stage 4
    p = cfg.vision.patch_size
    scenes = [v for sc in scenes for v in data.jittered(sc)]  # 9 pictures of each scene, same words
    pixels = {s: torch.stack([tg.preprocess(data.render(sc, s), s) for sc in scenes]) for s in sizes}
    patch_y = {s: torch.tensor([patch_labels(sc, s // p) for sc in scenes]) for s in sizes}  # (N, patches)
    word_y = torch.tensor([[SLOT_WORDS.index(w) for w in scene_words(sc)] for sc in scenes])  # (N, 32)
    g = torch.Generator().manual_seed(seed)
    bs = 32
    t0 = time.time()
    for step in range(steps):
        s = sizes[0] if step % 4 == 3 else sizes[1]
        idx = torch.randint(len(scenes), (bs,), generator=g)
        for group in opt.param_groups:
            group["lr"] = schedule(step, steps, peak=peak, warmup=50)
        feats = vit(pixels[s][idx])  # (B, 1 + patches, D)
        patch_logits = patch_head(feats[:, 1:])  # (B, patches, classes)
        word_logits = word_head(qformer(feats))  # (B, 32, words)
        y = word_y[idx]  # (B, 32)
        loss = F.cross_entropy(patch_logits.flatten(0, 1), patch_y[s][idx].flatten())
        loss = loss + F.cross_entropy(word_logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            right = (word_logits.argmax(-1) == y)[:, :5].all(-1)  # (B,): all five words of the object
            log(f"stage 0 | vision  step {step:4d}/{steps} | {s} px | loss {loss.item():.3f} | objects named "
                f"right {right.float().mean().item():.2f} | {time.time() - t0:.0f}s")
    return vit, qformer


def report_language_model(llm, tok, split):
    """Stage 0's check, printed: the demo's ceiling, the stand-in language model reading each held-out
    scene as its 32 words."""
    scores, asked = language_model_alone(llm, tok, split)
    by_type = ", ".join(f"{t} {v:.0f}" for t, v in scores.items() if t != "all")
    log(f"stage 0 | the language model alone, each test image replaced by its 32 words: VQA exact match "
        f"{scores['all']:.1f}% of {asked} questions ({by_type})")


def world_fingerprint():
    """What stand-in backbones were trained for: the scene words and their order. Backbones of
    another world would read every picture wrongly, so a mismatch is refused, not used."""
    return {"slot_words": list(SLOT_WORDS), "colors": {k: list(v) for k, v in data.COLORS.items()},
            "shapes": list(data.SHAPES), "sizes": data.HALF_SIDE, "positions": list(data.POSITIONS),
            "cell_centers": list(data.CELL_CENTERS), "jitter": data.JITTER, "num_queries": NUM_QUERIES}


def build_backbones(split, root, schedule, lm_steps=2500, vision_steps=3000, report=True):
    """Stage 0 (demo only): write {tokenizer.json, phi2/, vit/, qformer/, DONE} into `root`. DONE
    holds the world they were trained for, and the split whose training scenes they learned.
    schedule: the learning rate by step (train.warmup_cosine); report: print the language model's
    own check (language_model_alone)."""
    log(f"stage 0 | training the demo's stand-in backbones into {os.path.relpath(root)} "
        "(real runs use pretrained EVA, BLIP-2, Phi-2)")
    t0 = time.time()
    # the set replaces `root` only once whole: an interrupted stage 0 leaves the old one as it was
    write_folder_atomically(root, lambda tmp: train_backbones(tmp, split, schedule, lm_steps, vision_steps, report))
    log(f"stage 0 | done in {time.time() - t0:.0f}s")


def train_backbones(root, split, schedule, lm_steps, vision_steps, report):
    os.makedirs(root)
    scenes = split.scenes()["train"]
    texts = lm_texts(scenes, split.seed)
    tok = train_tokenizer(text_corpus(scenes) + [q + a for q, a in texts], os.path.join(root, "tokenizer.json"))
    broken = [w for w in SLOT_WORDS if len(tg.encode(tok, " " + w)) != 1]
    if broken:  # query j must line up with word j of the text the language model learned
        raise ValueError(f"stage 0: the demo tokenizer splits the scene words {broken}; each must be one token")
    cfg = tg.TinyGPTVConfig.tiny(vocab_size=tok.get_vocab_size())
    llm = pretrain_language_model(cfg, tok, texts, split.seed, lm_steps, schedule)
    llm.config = replace(llm.config, resid_pdrop=cfg.llm.resid_pdrop)  # saved as Phi-2's own dropout
    save_pretrained(llm, os.path.join(root, "phi2"))
    if report:
        report_language_model(llm, tok, split)
    vit, qformer = pretrain_vision(cfg, scenes, split.seed, vision_steps, schedule)
    save_pretrained(vit, os.path.join(root, "vit"))
    save_pretrained(qformer, os.path.join(root, "qformer"))
    stamp = {**world_fingerprint(), "seed": split.seed, "demo_train": split.n_train, "demo_eval": split.n_eval,
             "lm_steps": lm_steps, "vision_steps": vision_steps}
    write_atomically(os.path.join(root, "DONE"), lambda tmp: write_json(stamp, tmp))


def retrain_shipped(split, schedule, lm_steps, vision_steps, report, force):
    """`train.py --stage 0 --force`: the shipped backbones trained again, one stage 0 at a time (a lock
    beside them), and replaced only once the new set is whole (build_backbones)."""
    if os.path.isdir(PRETRAINED) and not force:
        raise ValueError(f"--stage 0 would replace the shipped stand-ins in {PRETRAINED}; pass --force")
    lock = runs.take_lock(os.path.dirname(PRETRAINED), ".demo_backbones.lock")
    try:
        build_backbones(split, PRETRAINED, schedule, lm_steps, vision_steps, report)
    finally:
        os.remove(lock)


def read_stamp(where):
    """The DONE stamp of a backbones folder: None if it has none, {} if it is unreadable or does not
    say which split its backbones learned (then no world matches it: it is refused)."""
    done = os.path.join(where, "DONE")
    if not os.path.isfile(done):
        return None
    try:
        stamp = read_json(done)
    except ValueError:
        return {}
    return stamp if {"seed", "demo_train", "demo_eval"} <= set(stamp) else {}


def leak(where, stamp, split):
    """'' or why the backbones in `where` cannot be scored on this run's held-out scenes: they were
    trained on some of them. Stage 0 trains on the training split of its own --seed, --demo-train
    and --demo-eval, which DONE records. Another seed, or a larger held-out split, would score the
    stand-ins on pictures they learned."""
    trained = Split(stamp["seed"], stamp["demo_train"], stamp["demo_eval"])
    learned = {data.signature(sc) for sc in trained.scenes()["train"]}
    seen = sum(data.signature(sc) in learned for sc in split.scenes()["test"])
    if not seen:
        return ""
    return (f"{where} holds stand-in backbones trained on {seen} of this run's {split.n_eval} held-out scenes "
            f"(--seed {trained.seed} --demo-train {trained.n_train} --demo-eval {trained.n_eval}): its held-out "
            "scores would flatter them")


def check_held_out(out, split):
    """`train.py --evaluate`: refuse to score a run whose backbones learned this run's held-out scenes."""
    root = os.path.join(out, "backbones")
    stamp = read_stamp(root)
    why = leak(root, stamp, split) if stamp else ""
    if why:
        raise ValueError(f"{why}; evaluate with the --seed, --demo-train and --demo-eval the run was trained with")


def prepare_backbones(out, split, schedule, held_out=True, report=True, lm_steps=2500, vision_steps=3000):
    """The run's stand-in backbones: already in `out`, or copied from PRETRAINED (stage 0 run once
    for longer and shipped with the repository, as a real user starts from downloaded weights), or,
    without those, or when the shipped ones learned scenes this run holds out, trained now.
    held_out=False: the run scores no demo table (it trains on a user's --data), so any split will do."""
    root = os.path.join(out, "backbones")
    for where in (root, PRETRAINED):
        stamp = read_stamp(where)
        if stamp is None:
            continue
        if {k: stamp.get(k) for k in world_fingerprint()} != world_fingerprint():
            again = "delete it to use the shipped ones" if where == root else "train them again with `python train.py --stage 0 --force`"
            raise ValueError(f"{where} holds stand-in backbones trained for another demo world: {again}")
        why = leak(where, stamp, split) if held_out else ""
        if why and where == root:
            raise ValueError(f"{why}; delete it or choose another --out")
        if why:  # another split than the shipped ones': this run trains its own (about 11 minutes)
            log(f"stage 0 | {why}; training this split's own")
            break
        if where == PRETRAINED and where != root:
            shipped = os.stat(PRETRAINED).st_ino
            write_folder_atomically(root, lambda tmp: shutil.copytree(PRETRAINED, tmp))  # whole, or not at all
            if not os.path.isdir(PRETRAINED) or os.stat(PRETRAINED).st_ino != shipped:  # a `--stage 0 --force`
                shutil.rmtree(root)  # put a new set in their place while they were copied: the copy may mix them
                return prepare_backbones(out, split, schedule, held_out, report, lm_steps, vision_steps)
            log(f"stage 0 | the stand-in backbones come from {os.path.relpath(PRETRAINED)} "
                f"(stage 0 trained once: `python train.py --stage 0 --force` trains them again)")
            if report and os.path.isdir(os.path.join(root, "phi2")):  # (building the model says if it is missing)
                report_language_model(load_phi2(os.path.join(root, "phi2")), tg.load_tokenizer(root), split)
        return
    build_backbones(split, root, schedule, lm_steps, vision_steps, report)


def load_backbones(out, report=True):
    """TinyGPT-V on the run's stand-in backbones, with new projections, and the demo tokenizer."""
    root = os.path.join(out, "backbones")
    model, _ = load_model(os.path.join(root, "phi2"), os.path.join(root, "vit"), os.path.join(root, "qformer"),
                          proj_dim=tg.TinyGPTVConfig.tiny().proj_dim, report=report)
    return model, tg.load_tokenizer(root)


@torch.no_grad()
def encode_all(model, samples, stage, device, batch_size=256):
    """train.py's features of the demo's pictures, which fit in memory: the Q-Former outputs of every
    distinct image, once, since the vision tower is frozen: (images,
    n_query, d), and each sample's row in it (N,); one row per sample would hold stage 4's ~14
    questions per scene as 14 copies (0.85 GB at the demo's size)."""
    row, images = {}, []
    for s in samples:
        if id(s.image) not in row:
            row[id(s.image)] = len(images)
            images.append(s.image)
    out = [model.encode_queries(model.pixels(images[i:i + batch_size], stage).to(device))
           for i in range(0, len(images), batch_size)]  # (b, n_query, d) each
    return torch.cat(out), torch.tensor([row[id(s.image)] for s in samples], device=device)


# -----------------------------------------------------------------------------
# Held-out evaluation: each task with the image, and with a blank one


def evaluate(model, tok, split, taught=4, n=300):
    """Each metric on `n` held-out samples per task (a score's standard error is then about 3
    points), with the prompt the model was last taught for it: captions and descriptions with
    stage 1's and 3's prompts until stage 4, which teaches both in its own `[INST]` format (a
    `[caption]` task and untagged descriptions, as the paper's mixture has them); the stage-4 tasks
    with stage 4's. -> scoring.score's {metric: {"image": %, "blank": %}}."""
    plan = (("caption", 4 if taught >= 4 else 1), ("describe", 4 if taught >= 4 else 3),
            ("vqa", 4), ("refer", 4), ("identify", 4))
    drawn, rows = {}, {}  # stage -> its samples, each picture drawn once for all of that stage's tasks
    for task, stage in plan:
        if stage not in drawn:
            drawn[stage] = stage_samples(split, stage, "test")
        picked = [s for s in drawn[stage] if s.task == task][:n]
        rows.update(scoring.score(model, tok, picked, stage))
    return rows


def table_title(stage):
    return f"stage {stage} | held-out evaluation (% of test samples)"


def table_before(model, tok, out, stage, split, n):
    """Stage N starts as stage N-1 ended (new LoRA adapters have B = 0, so they change nothing):
    its "before" column is stage N-1's "after" when that was measured on the same held-out samples
    and of the very checkpoint stage N starts from (its stageN.eval.json says both), else measured now."""
    path, checkpoint = (os.path.join(out, f"stage{stage - 1}.{kind}") for kind in ("eval.json", "safetensors"))
    if stage > 1 and os.path.isfile(path):
        try:
            saved = read_json(path)
            rows = saved["after"]
            if not all(isinstance(r["image"], (int, float)) and isinstance(r["blank"], (int, float))
                       for r in rows.values()):
                raise TypeError("not a table")
            if saved.get("eval_set") == eval_set(split, n) and saved.get("checkpoint") == file_digest(checkpoint):
                return rows
        except (ValueError, KeyError, TypeError, AttributeError):
            log(f"stage {stage} | {path} is unreadable; measuring the \"before\" column again")
    return evaluate(model, tok, split, stage - 1, n)


def table_after(model, tok, out, stage, split, n, before, held_out=None, eval_data=None):
    """The finished stage's table, printed and written to stageN.eval.json beside the digest of the
    checkpoint it scored: on a user's held-out samples (train.py --eval-data) if given, else on the
    demo's held-out scenes, beside `before`."""
    checkpoint = file_digest(os.path.join(out, f"stage{stage}.safetensors"))
    if held_out is not None:
        result = {"after": scoring.score(model, tok, held_out, stage, progress=True), "eval_data": eval_data}
    else:
        result = {"before": before, "after": evaluate(model, tok, split, stage, n), "eval_set": eval_set(split, n)}
    result["checkpoint"] = checkpoint
    scoring.print_table(table_title(stage), result["after"], result.get("before", {}))
    write_atomically(os.path.join(out, f"stage{stage}.eval.json"), lambda tmp: write_json(result, tmp))


def eval_set(split, n):
    """What a table was measured on: n samples per task of the split's held-out scenes."""
    return [n, split.n_eval, split.n_train, split.seed]


def write_example(out, split):
    """A held-out picture to ask questions about, and the command that asks one."""
    example = os.path.join(out, "example.png")
    scene = split.scenes()["test"][0]
    picture = data.render(scene, tg.image_size(IMAGE_SIZE, 4))
    write_atomically(example, lambda tmp: picture.save(tmp, format="PNG"))
    run = "" if os.path.abspath(out) == DEMO_RUN else f" --run {os.path.relpath(out)}"
    log(f"try: python tinygptv.py --image {os.path.relpath(example)}{run} "
        f"--prompt \"[vqa] what color is the {scene.objects[0].shape}?\"")


# -----------------------------------------------------------------------------
# The trained demo


def load_demo(run_dir=DEMO_RUN, stage=None):
    """The demo's trained model (train.py writes it): tokenizer, stand-in backbones, stage checkpoint."""
    if stage is None:
        done = [s for s in (4, 3, 2, 1) if os.path.isfile(os.path.join(run_dir, f"stage{s}.safetensors"))]
        if not done:
            raise FileNotFoundError(f"no trained demo checkpoint in {run_dir}: run `python train.py` first")
        stage = done[0]
    ckpt = os.path.join(run_dir, f"stage{stage}.safetensors")
    backbones = os.path.join(run_dir, "backbones")
    model, stage = load_model(os.path.join(backbones, "phi2"), os.path.join(backbones, "vit"),
                              os.path.join(backbones, "qformer"), ckpt)
    return model, tg.load_tokenizer(backbones), stage
