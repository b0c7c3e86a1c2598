"""What train.py promises: each stage learns and trains exactly its parameter set, a run interrupted
and resumed ends where an uninterrupted one does, two processes take the same step as one, a missing
stage is built first, a NaN stops without harming the last checkpoint, and bad data is reported."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import demo
import fastpaths
import loader
import scoring
import tinygptv as tg
import train
from layouts import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a miniature demo: tiny data, short stage 0, a handful of steps per stage
SMALL = ["--demo-train", "48", "--demo-eval", "8", "--lm-steps", "10", "--vision-steps", "8", "--no-eval",
         "--steps", "6", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"]


def args_for(out, *extra):
    return train.parse_args(["--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Stage 0 once for the module; each test copies it into its own run directory."""
    out = tmp_path_factory.mktemp("run")
    a = args_for(out)
    demo.build_backbones(a.split, str(out / "backbones"), train.warmup_cosine, a.lm_steps, a.vision_steps, a.eval)
    return out / "backbones"


def new_run(tmp_path, backbones, name="run"):
    out = tmp_path / name
    shutil.copytree(backbones, out / "backbones")
    return out


def test_stage0_writes_loadable_backbones(backbones):
    for part in ("tokenizer.json", "phi2", "vit", "qformer", "DONE"):
        assert (backbones / part).exists()
    model, _ = load_model(str(backbones / "phi2"), str(backbones / "vit"), str(backbones / "qformer"))
    assert model.config.llm.qk_layernorm and model.config.llm.post_layernorm  # added for TinyGPT-V


def test_stage0_language_model_reads_one_token_per_query(backbones):
    # The text the stand-in language model learns has the scene's 32 words where the image goes, one
    # token each, so that word j sits where query j's embedding will.
    tok = tg.load_tokenizer(str(backbones))
    scenes = args_for(backbones.parent).split.scenes()["train"]
    for scene in scenes:
        assert len(tg.encode(tok, demo.slot_text(scene))) == 32
    for scene in scenes[:3]:
        pairs = demo.lm_texts([scene], seed=0)
        assert all(f"<Img>{demo.slot_text(scene)}</Img>" in prompt for prompt, _ in pairs)
        assert all(answer.endswith(tuple(tg.END_MARKERS.values())) for _, answer in pairs)


def test_language_model_alone_scores_its_answers_in_order(backbones):
    # stage 0's check of the language model on the scene as words: a model that answers every
    # question right scores 100, one that answers them shifted by one scores far less
    from phi2 import Phi2
    args = args_for(backbones.parent)
    tok, llm = tg.load_tokenizer(str(backbones)), Phi2.from_pretrained(str(backbones / "phi2"))
    scenes = args.split.scenes()["test"]
    want = [s.answer for s in data.stage_samples(scenes, 4, None, args.seed + 1) if s.task == "vqa"][:300]
    for shift, expected in ((0, 100.0), (1, None)):
        answers = [tg.encode(tok, a) for a in want[shift:] + want[:shift]]
        llm.generate = lambda ids, **kw: answers[:ids.shape[0]]
        scores, n = demo.language_model_alone(llm, tok, args.split)
        assert n == len(want)
        score = scores["all"]
        assert score == expected if expected is not None else score < 60.0
        if expected is not None:  # and so is every question type
            assert set(scores) == {"all", *data.VQA_TYPES} and set(scores.values()) == {100.0}


def test_each_stage_trains_its_exact_set_and_its_loss_falls(tmp_path, backbones):
    out = new_run(tmp_path, backbones)
    for stage in (1, 2, 3, 4):
        args = args_for(out, "--steps", "12")
        model, _ = train.build_model(args, stage)
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        norms = {n for n in got if n.endswith(tg.NORM_WEIGHTS)}
        lora = {n for n in got if ".lora_" in n}
        proj = {"llama_proj.weight", "llama_proj.bias", "llama_proj2.weight", "llama_proj2.bias"}
        L = model.config.llm.num_hidden_layers
        assert got == proj | norms | lora
        # the demo's projections have the tiny config's width, not the paper's 4096
        assert model.llama_proj.out_features == model.config.proj_dim == tg.TinyGPTVConfig.tiny().proj_dim
        assert len(norms) == 4 * L + 1  # q, k, post, input layernorm per layer + final
        assert len(lora) == (0 if stage == 1 else 4 * L)  # the paper: no LoRA in stage 1
        assert all(".self_attn.query_key_value." in n or ".self_attn.dense." in n for n in lora)
        losses, finished = train.train_stage(args, stage)
        assert finished and len(losses) == 12
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (stage, losses)
        assert (out / f"stage{stage}.safetensors").exists()


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, backbones):
    a = new_run(tmp_path, backbones, "a")
    b = new_run(tmp_path, backbones, "b")
    # dropout on (the demo's stages run without it), so the resumed run must also restore the RNG
    train.run(args_for(a, "--stage", "1", "--dropout", "0.1"))
    train.run(args_for(b, "--stage", "1", "--stop-after", "3", "--dropout", "0.1"))
    assert not (b / "stage1.safetensors").exists() and (b / "stage1.state.pt").exists()
    train.run(args_for(b, "--stage", "1", "--resume", "--dropout", "0.1"))
    wa, wb = load_file(str(a / "stage1.safetensors")), load_file(str(b / "stage1.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_demo_stages_train_without_dropout_and_the_papers_keep_it(tmp_path, backbones):
    out = new_run(tmp_path, backbones)
    rates = lambda args: {m.p for m in train.build_model(args, 1)[0].modules() if isinstance(m, torch.nn.Dropout)}
    assert rates(args_for(out)) == {0.0}
    assert rates(args_for(out, "--paper")) == {0.1}  # Phi-2's residual dropout (stage 1 has no LoRA)


def test_missing_previous_stage_is_built_first(tmp_path, backbones, capsys):
    out = new_run(tmp_path, backbones)
    train.run(args_for(out, "--stage", "2", "--steps", "2"))
    log = capsys.readouterr().out
    assert "stage 1 | needed by stage 2 and missing: building it first" in log
    assert log.count("start at weight 1, bias 0") == 1  # stage 1 starts the stabilizers; stage 2 loads them
    assert (out / "stage1.safetensors").exists() and (out / "stage2.safetensors").exists()
    train.run(args_for(out, "--steps", "2"))  # all stages: 1 and 2 are skipped, 3 and 4 run
    log = capsys.readouterr().out
    assert "stage 1 | already finished" in log and "stage 2 | already finished" in log
    assert (out / "stage4.safetensors").exists()
    # the command line answers from the finished demo run by default (here: its --run directory)
    r = subprocess.run([sys.executable, "tinygptv.py", "--run", str(out), "--image", str(out / "example.png"),
                        "--prompt", "[vqa] what shape is the blue object?", "--max-new-tokens", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # (after 2 steps the answer itself is noise)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, backbones, monkeypatch):
    out = new_run(tmp_path, backbones)
    args = args_for(out, "--stage", "1", "--steps", "8")
    real_loss, real_lr, now = tg.lm_loss, train.lr_at, {"step": 0}

    def lr_at(step, sc):  # called once per step: tells the loss which step it is in
        now["step"] = step
        return real_lr(step, sc)

    def poisoned(logits, labels, reduction="mean"):  # (a step may compute it per micro-batch)
        loss = real_loss(logits, labels, reduction)
        return loss * float("nan") if now["step"] >= 5 else loss

    monkeypatch.setattr(train, "lr_at", lr_at)
    monkeypatch.setattr(tg, "lm_loss", poisoned)
    with pytest.raises(ValueError, match="loss is nan at step 5"):
        train.run(args)
    state = torch.load(out / "stage1.state.pt", weights_only=True)
    assert state["step"] == 4  # the checkpoint of step 4 (ckpt every 2) survived, untouched
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "stage1.safetensors").exists()


@pytest.mark.parametrize("shards", [None, (), "rank 1's first share"], ids=["demo", "shards", "a rank's pictures all fail"])
def test_two_processes_take_the_same_step_as_one(tmp_path, backbones, shards):
    one = new_run(tmp_path, backbones, "one")
    two = new_run(tmp_path, backbones, "two")
    # dropout off: two processes draw different dropout masks than one (the only legitimate difference);
    # with shards each process decodes only its own share of each step's pictures. When every picture
    # of rank 1's share of step 1 is corrupt, rank 0 trains on its own and rank 1 must still join in
    if shards == "rank 1's first share":
        shards = set(train.batch_indices(0, 20, 8, seed=0 + 1)[1::2])
    real = ["--data", write_shards(tmp_path / "shards", corrupt=shards), "--workers", "1"] if shards is not None else []
    common = ["train.py", *SMALL, "--stage", "1", "--steps", "2", "--dropout", "0", *real]  # later flags win
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, *common, "--out", str(one)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r1.returncode == 0, r1.stderr
    with socket.socket() as free:  # a port nobody holds now (a fixed one can still be in use by an earlier run)
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                         *common, "--out", str(two)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    w1, w2 = load_file(str(one / "stage1.safetensors")), load_file(str(two / "stage1.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:  # the same update up to the order of float additions in the all-reduce
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    assert "step     2/2" in r2.stdout and r2.stdout.count("step     2/2") == 1  # rank 0 alone logs


def test_real_data_skips_bad_images_and_rejects_malformed_files(tmp_path, backbones):
    out = new_run(tmp_path, backbones)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    rows = [{"image": "ok.png", "caption": "a red square"}] * 8 + [{"image": "gone.png", "caption": "x"},
                                                                   {"image": "corrupt.png", "caption": "y"}]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    cmd = [sys.executable, "train.py", "--stage", "1", *SMALL, "--out", str(out), "--image-root", str(tmp_path)]
    r = subprocess.run(cmd + ["--data", str(tmp_path / "pairs.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "skipped 2 of 10" in r.stdout + r.stderr
    (tmp_path / "bad.json").write_text('[{"image": "ok.png", "caption": "a"}, {"image": ')
    r = subprocess.run(cmd + ["--data", str(tmp_path / "bad.json"), "--restart"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "bad.json" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_schedule_warms_up_then_follows_the_cosine():
    sc = train.StageConfig(lr=1e-4, min_lr=8e-5, warmup=10, steps=110, batch_size=1, lora=False)
    assert train.lr_at(0, sc) == pytest.approx(1e-6)
    assert train.lr_at(5, sc) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert train.lr_at(10, sc) == pytest.approx(1e-4)
    assert train.lr_at(60, sc) == pytest.approx(9e-5)  # half way down the cosine
    assert train.lr_at(110, sc) == pytest.approx(8e-5)


def test_sentence_f1_gives_partial_credit_for_descriptions():
    ref = "There are two shapes on a light background. A small red circle is in the top left. A large blue cross is in the center."
    assert scoring.sentence_f1(ref, ref) == 1.0
    assert scoring.sentence_f1("", ref) == 0.0
    # two of three sentences right, nothing extra: precision 1, recall 2/3
    half = "There are two shapes on a light background. A small red circle is in the top left."
    assert abs(scoring.sentence_f1(half, ref) - 0.8) < 1e-9
    # order and case do not matter; a wrong sentence costs precision
    assert scoring.sentence_f1(ref.upper(), ref) == 1.0
    wrong = half + " A large green cross is in the center."
    assert abs(scoring.sentence_f1(wrong, ref) - 2 / 3) < 1e-9


def test_length_split_takes_the_batch_step_with_less_padding(tmp_path, backbones):
    # a stage-4 batch of mixed lengths: the two micro-batches are the batch, pad fewer tokens than
    # any other cut of the sorted batch and than the batch itself, and give the batch's own gradient
    args = args_for(new_run(tmp_path, backbones), "--dropout", "0")
    model, tok = train.build_model(args, 1)  # stage 1's trainable set: no stage-3 checkpoint needed
    samples, _ = train.stage_data(args, 4)  # (and the order of its steps)
    examples = [tg.make_example(tok, 4, tg.stage_instruction(4, s), s.answer) for s in samples]
    lengths = [len(e.before) + len(e.after) + len(e.answer) for e in examples]
    idx = [i for i, s in enumerate(samples) if s.task in ("vqa", "identify")][:10]
    idx += sorted(range(len(samples)), key=lambda i: -lengths[i])[:2]  # the two longest
    parts = loader.split_by_length(idx, lengths)
    assert len(parts) == 2 and sorted(parts[0] + parts[1]) == sorted(idx)
    padded = lambda groups: sum(len(g) * max(lengths[i] for i in g) for g in groups)
    by_len = sorted(idx, key=lambda i: lengths[i])
    assert padded(parts) == min(padded([by_len[:c], by_len[c:]]) for c in range(1, len(idx)))
    assert padded(parts) < padded([idx])

    pixels = torch.stack([tg.preprocess(samples[i].image, model.image_size(4)) for i in idx])
    row = {i: r for r, i in enumerate(idx)}
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(groups):
        model.zero_grad()
        for g in groups:
            logits, labels = model([examples[i] for i in g], pixel_values=pixels[[row[i] for i in g]])
            tg.lm_loss(logits, labels, reduction="sum").backward()
        return [p.grad.clone() for p in params]

    for whole, split in zip(grads([idx]), grads(parts)):
        torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads(parts))


def test_evaluate_reloads_a_finished_stage_and_scores_it_as_training_did(tmp_path, backbones, capsys):
    out = new_run(tmp_path, backbones)
    args = args_for(out, "--stage", "1", "--steps", "3")
    args.eval = True  # SMALL turns the tables off; this test wants stage 1's
    train.run(args)
    with open(out / "stage1.eval.json") as f:
        after = json.load(f)["after"]
    capsys.readouterr()
    train.run(args_for(out, "--evaluate", "1"))  # from the checkpoint on disk, nothing trained
    table = capsys.readouterr().out
    assert "start at weight 1" not in table  # the checkpoint's trained norms are what is scored
    for task, r in after.items():
        row = next(line for line in table.splitlines() if line.strip().startswith(scoring.metric_name(task).strip()))
        assert row.split()[-2:] == [f"{r['image']:.1f}", f"{r['blank']:.1f}"], (task, row)
    assert not (out / "stage2.safetensors").exists()
    r = subprocess.run([sys.executable, "train.py", "--out", str(out), "--evaluate", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "python train.py --stage 2" in r.stderr, r.stderr


def test_eval_data_scores_a_held_out_file_after_the_stage(tmp_path, backbones):
    # a user's held-out VQA file: after the stage the table is printed and stage1.eval.json holds
    # the image and blank-image scores of its task, in the demo's layout
    out = new_run(tmp_path, backbones)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": "what color is it?", "answer": "red"}] * 3
    (tmp_path / "held.json").write_text(json.dumps(rows))
    r = subprocess.run([sys.executable, "train.py", "--stage", "1", *SMALL, "--out", str(out),
                        "--eval-data", str(tmp_path / "held.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(out / "stage1.eval.json") as f:
        saved = json.load(f)
    assert set(saved["after"]) == {"vqa"} and set(saved["after"]["vqa"]) == {"image", "blank"}
    assert all(0.0 <= v <= 100.0 for v in saved["after"]["vqa"].values())
    assert "VQA exact match" in r.stdout


# -----------------------------------------------------------------------------
# The paper's scale: its recipe, its memory plan


def real_weights(backbones, tmp_path):
    """The stand-ins as a user's downloads: a Phi-2 directory holding its tokenizer, the ViT, the Q-Former."""
    phi2 = tmp_path / "phi-2"
    shutil.copytree(backbones / "phi2", phi2)
    shutil.copy(backbones / "tokenizer.json", phi2)
    return ["--phi2", str(phi2), "--blip2", str(backbones / "vit"), "--qformer", str(backbones / "qformer")]


def test_real_weights_train_with_the_papers_table_and_the_demo_with_its_own(tmp_path, backbones):
    real = real_weights(backbones, tmp_path)
    assert train.parse_args(["--device", "cpu", *real]).stages == train.PAPER_STAGES
    assert train.parse_args(["--device", "cpu"]).stages == train.DEMO_STAGES
    assert train.parse_args(["--device", "cpu", *real, "--recipe", "demo"]).stages == train.DEMO_STAGES
    assert train.parse_args(["--device", "cpu", "--paper"]).stages == train.PAPER_STAGES
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--recipe" in help_text and "paper" in help_text


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_frozen_real_weights_are_bf16_where_the_device_computes_in_bf16(tmp_path, backbones, monkeypatch, fast_bf16):
    # the paper's memory plan: frozen matrices in bf16 where the CPU (or GPU) multiplies bf16 at full
    # speed, else fp32; what trains, every vector and AdamW's state in fp32
    monkeypatch.setattr(fastpaths, "CPU_BF16_MATMUL", fast_bf16)
    out = tmp_path / "run"
    args = train.parse_args(["--out", str(out), "--device", "cpu", *real_weights(backbones, tmp_path), "--stage", "2",
                             "--steps", "1", "--batch-size", "2", "--no-eval"])
    tg.save_checkpoint(train.build_model(args, 1)[0], str(out / "stage1.safetensors"), 1)
    model, _ = train.build_model(args, 2)
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dim() >= 2}
    assert frozen == ({torch.bfloat16} if fast_bf16 else {torch.float32})
    assert {p.dtype for p in model.parameters() if p.requires_grad or p.dim() == 1} == {torch.float32}
    assert fastpaths.mixed_precision(args.device, args.amp, real=True)[0] == (torch.bfloat16 if fast_bf16 else None)
    losses, finished = train.train_stage(args, 2)  # one step, bf16 autocast over the mixed dtypes
    assert finished and all(torch.isfinite(torch.tensor(losses)))
    # the demo's stand-ins keep training in fp32
    assert fastpaths.compute_dtype("cpu", "auto", real=False) == torch.float32


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = tg.TinyGPTV(tg.TinyGPTVConfig.tiny(vocab_size=300))
    model.add_lora()
    for name, p in model.named_parameters():
        p.requires_grad_(tg.is_trainable(name))
        if ".lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter
    examples = [tg.Example([1, 2, 3], [4, 5], [6, 7, 8]), tg.Example([1, 9], [4], [6, 7])]
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    results = []
    for checkpointing in (False, True):
        model.llama_model.grad_checkpointing = checkpointing
        model.train()  # dropout on: checkpointing must replay the same masks
        model.zero_grad()
        torch.manual_seed(2)
        loss = tg.lm_loss(*model(examples, pixel_values=pixels))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0)
    assert any(g.abs().sum() > 0 for g in grads0)


def test_stage4_on_real_weights_checkpoints_activations_by_default(tmp_path, backbones):
    real = real_weights(backbones, tmp_path)
    out = tmp_path / "run"
    args = train.parse_args(["--out", str(out), "--device", "cpu", *real, "--no-eval"])
    model = train.build_model(args, 1)[0]
    assert not model.llama_model.grad_checkpointing
    for stage in (1, 2, 3):
        tg.save_checkpoint(model if stage == 1 else train.build_model(args, stage)[0],
                           str(out / f"stage{stage}.safetensors"), stage)
    assert train.build_model(args, 4)[0].llama_model.grad_checkpointing
    off = train.parse_args(["--out", str(out), "--device", "cpu", *real, "--grad-checkpoint", "off"])
    assert not train.build_model(off, 4)[0].llama_model.grad_checkpointing


# -----------------------------------------------------------------------------
# Real data as the paper's stages read it: webdataset shards, mixtures, decoded in workers


def write_shards(folder, n_shards=2, per_shard=10, corrupt=()):
    """img2dataset-style shards {i}.tar of {key}.jpg + {key}.txt; the sample numbers in `corrupt` (in
    load order) get a JPEG cut in half, whose header reads fine."""
    import io
    import tarfile
    folder.mkdir(exist_ok=True)
    k = 0
    for i in range(n_shards):
        with tarfile.open(folder / f"{i:05d}.tar", "w") as tf:
            for j in range(per_shard):
                buf = io.BytesIO()
                Image.new("RGB", (40, 40), (20 * j % 256, 10 * i, 255 - 20 * j % 256)).save(buf, "JPEG")
                raw = buf.getvalue() if k not in corrupt else buf.getvalue()[:len(buf.getvalue()) // 2]
                text = f"picture {k} of shard {i}".encode()
                for name, payload in ((f"{k:06d}.jpg", raw), (f"{k:06d}.txt", text)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                k += 1
    return str(folder / ("{%05d..%05d}.tar" % (0, n_shards - 1)))


def test_shards_read_by_brace_pattern_and_mixtures_drawn_by_weight(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    assert data.expand_braces("a/{00008..00011}.tar") == ["a/00008.tar", "a/00009.tar", "a/00010.tar", "a/00011.tar"]
    samples = data.load_dataset(pattern)
    assert len(samples) == 20 and all(s.task == "caption" for s in samples)
    assert samples[13].answer == "picture 13 of shard 1"
    assert data.load_image(samples[13].image).size == (40, 40)  # read from inside the shard
    # three sources weighted 1 : 3 : 6, drawn 200 steps x 32: each within 3 standard deviations
    sizes, weights = [7, 50, 3], [1.0, 3.0, 6.0]
    counts = [0, 0, 0]
    for step in range(200):
        for i in loader.mixture_indices(step, sizes, weights, 32, seed=5):
            counts[0 if i < 7 else 1 if i < 57 else 2] += 1
    n = 200 * 32
    for c, w in zip(counts, weights):
        p = w / sum(weights)
        assert abs(c - n * p) < 3 * (n * p * (1 - p)) ** 0.5, (counts, weights)
    assert loader.mixture_indices(7, sizes, weights, 32, seed=5) == loader.mixture_indices(7, sizes, weights, 32, seed=5)


def test_workers_hand_over_the_same_pictures_as_the_training_process_decodes(tmp_path):
    # the workers write into a ring of shared batch buffers, reused every workers * prefetch + 1 steps:
    # 30 steps go round the ring of 2 * 2 + 1 several times, every batch is kept until the end, and
    # each must still hold its own pictures, in the order decoding them here gives
    samples = data.load_dataset(write_shards(tmp_path / "shards", corrupt={3}))
    order = lambda step: train.batch_indices(step, len(samples), 4, seed=1)
    here = list(loader.stream(samples, 24, order, 2, 32, workers=0))
    there = list(loader.stream(samples, 24, order, 2, 32, workers=2, prefetch=2))
    assert len(here) == len(there) == 30 and sum(f for _, _, f in here) > 0
    for (i0, p0, f0), (i1, p1, f1) in zip(here, there):
        assert i0 == i1 and f0 == f1
        assert p0.shape == p1.shape == (len(i0), 3, 24, 24) and torch.equal(p0, p1)
        expected = torch.stack([torch.from_numpy(np.array(data.load_image(samples[i].image).resize((24, 24), Image.BICUBIC)))
                                for i in i0]).permute(0, 3, 1, 2)
        assert torch.equal(p1, expected)


def test_a_corrupt_picture_in_a_shard_is_skipped_where_met_and_a_resume_across_it_is_exact(tmp_path, backbones):
    first = train.batch_indices(0, 20, 8, seed=0 + 1)[0]  # stage 1's first step draws this sample
    pattern = write_shards(tmp_path / "shards", corrupt={first})
    runs = {}
    for name, parts in (("whole", [[]]), ("resumed", [["--stop-after", "3"], ["--resume"]])):
        out = new_run(tmp_path, backbones, name)
        for extra in parts:
            r = subprocess.run([sys.executable, "train.py", "--stage", "1", *SMALL, "--out", str(out), "--data", pattern,
                                "--workers", "2", *extra], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = load_file(str(out / "stage1.safetensors"))
        if name == "whole":
            assert "skipped 1 pictures" in r.stdout and "data wait" in r.stdout, r.stdout
    assert runs["whole"].keys() == runs["resumed"].keys()
    for k in runs["whole"]:
        assert torch.equal(runs["whole"][k], runs["resumed"][k]), k


def test_stage1_starts_from_minigpt4s_projection_when_asked(tmp_path, backbones):
    # the paper (v3, section 3.1): llama_proj from MiniGPT-4's released projection, llama_proj2 from a
    # Gaussian; the release is a pickle, converted first without running code
    from convert import convert
    g = torch.Generator().manual_seed(0)
    released = {"llama_proj.weight": torch.randn(4096, 96, generator=g), "llama_proj.bias": torch.randn(4096, generator=g)}
    torch.save({"model": released}, tmp_path / "pretrained_minigpt4_7b.pth")
    convert([str(tmp_path / "pretrained_minigpt4_7b.pth")], str(tmp_path / "minigpt4.safetensors"))
    args = train.parse_args(["--out", str(tmp_path / "run"), "--device", "cpu", *real_weights(backbones, tmp_path),
                             "--init-proj", str(tmp_path / "minigpt4.safetensors")])
    model = train.build_model(args, 1)[0]
    assert torch.equal(model.llama_proj.weight, released["llama_proj.weight"])
    assert torch.equal(model.llama_proj.bias, released["llama_proj.bias"])
    assert abs(model.llama_proj2.weight.std().item() - 0.02) < 0.002 and not model.llama_proj2.bias.any()
    # a file of another kind is refused, naming it
    tg.save_checkpoint(model, str(tmp_path / "stage1.safetensors"), 1)
    args.init_proj = str(tmp_path / "stage1.safetensors")
    with pytest.raises(ValueError, match="stage1.safetensors: not a converted MiniGPT-4 projection"):
        train.build_model(args, 1)
