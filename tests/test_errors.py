"""What every entry point promises when its input is wrong or it is interrupted.

One rule for `python tinygptv.py`, `python tinygptv.py convert` and `python train.py`: an expected
failure (a bad option, a missing or broken file, a refused overwrite) prints ONE line on stderr,
starting with `error: ` and naming the option, file or record, and exits with code 2, never with
a traceback; Ctrl-C prints one line and exits with 130; and every file that existed before is
byte-identical afterwards. Each entry point has one table of bad inputs below, a row each: what is
wrong, the command line, the exit code and what the line must name.

Then what the tables cannot show: every image mode reaches the model as its own colours, an
official checkpoint converts and answers through the command line, a pickle that would run code
is never run, and train.py neither loses nor mixes up work: an interrupted stage is not silently
restarted, a resume must match the run it continues, one process writes a run directory at a
time, a killed run's leftovers are cleared, and one undecodable image does not stop a stage.
"""

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import data
import demo
import tinygptv as tg
import train
from cli import parse_user_prompt
from layouts import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a miniature demo, as in test_train.py: tiny data, a short stage 0, a handful of steps per stage
SMALL = ["--demo-train", "48", "--demo-eval", "8", "--lm-steps", "10", "--vision-steps", "8", "--no-eval",
         "--steps", "6", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"]
HEADS = str(tg.TinyGPTVConfig.tiny().llm.num_attention_heads)  # the demo's Phi-2: 4 heads of 32
OFFICIAL = "llama_model.base_model.model.model."  # the official release's peft prefix, written out here
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
STEP_LINE = re.compile(r"step +\d+/\d+")  # a training step's log line, stage 0's included


# -----------------------------------------------------------------------------
# Running an entry point as a user does, and checking the one line

# Every command below is a process of its own (its PID, exit status, stdout and stderr), forked
# from one interpreter that has already imported torch and the project: a fresh `python` costs
# 2-4 s of imports on this machine (the first model built on the meta device 4 s more), and the
# tables hold some sixty rows. The child runs the script as `python SCRIPT ARGS` would (as
# __main__, atexit handlers at the end); `interrupt` replaces one function ("module:name") by a
# Ctrl-C, to interrupt the run at a known point.
SERVER = r"""
import atexit, importlib, json, os, runpy, sys, time, traceback
sys.path.insert(0, os.getcwd())
import torch, data, demo, tinygptv, train  # what every row imports
from PIL import Image
Image.init()  # Pillow's file-format plugins
with torch.device("meta"):  # torch imports the code of meta tensors (4 s) on their first use; no data,
    torch.nn.Embedding(2, 2)  # no thread: this process stays single-threaded, safe to fork
while True:
    line = sys.stdin.readline()
    if not line:
        break
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, job["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, job["stderr"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(name, flags), fd)
        sys.argv = [job["script"], *job["args"]]
        if job["interrupt"]:
            module, name = job["interrupt"].split(":")
            def ctrl_c(*args, **kwargs):
                raise KeyboardInterrupt
            setattr(importlib.import_module(module), name, ctrl_c)
        code = 0
        try:
            runpy.run_path(job["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1]
        except BaseException as e:  # what Python itself does with an uncaught exception
            traceback.print_exc()
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    deadline, status = time.time() + job["timeout"], None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
        elif time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.02)
    sys.stdout.write(json.dumps({"rc": status}) + "\n")
    sys.stdout.flush()
"""

Ran = namedtuple("Ran", "rc out err")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """cli("train.py", *args) -> Ran(exit code, stdout, stderr) of `python train.py ARGS`."""
    logs = tmp_path_factory.mktemp("cli")
    # one thread each: on two cores shared with other jobs, two threads per process ran 3-5x slower
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    count = itertools.count()

    def run(script, *args, timeout=90, interrupt=None):
        n = next(count)
        out, err = logs / f"{n}.out", logs / f"{n}.err"
        job = {"script": os.path.join(ROOT, script), "args": [str(a) for a in args], "stdout": str(out),
               "stderr": str(err), "timeout": timeout, "interrupt": interrupt}
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        reply = server.stdout.readline()
        assert reply, "the process server died"
        rc = json.loads(reply)["rc"]
        text = out.read_text(errors="replace"), err.read_text(errors="replace")
        if rc == "timeout":
            return Ran(None, text[0], text[1] + f"\n(killed after {timeout} s)")
        return Ran(rc, *text)

    yield run
    server.stdin.close()
    server.wait(timeout=30)


class Not(str):
    """In a row's names: a text the line must NOT contain."""


def assert_one_line(r, code, names=()):
    """The row's promise: this exit code, no traceback, one line on stderr (`error: ...` for code 2)
    naming each of `names`."""
    err = r.err.strip()
    assert r.rc == code, f"exit {r.rc}, expected {code}; stderr:\n{r.err[-3000:]}"
    assert "Traceback" not in r.err, r.err[-3000:]
    assert len(err.splitlines()) == 1, f"{len(err.splitlines())} lines on stderr:\n{err[-3000:]}"
    if code == 2:
        assert err.startswith("error: "), err
    for name in (names,) if isinstance(names, str) else names:
        if isinstance(name, Not):
            assert name not in err, f"{name!r} should not be in: {err}"
        else:
            assert name in err, f"{name!r} is not named in: {err}"


def snapshot(root):
    """{file: sha256} of everything under root."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_unchanged(before):
    changed = [str(p) for p, h in before.items() if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != h]
    assert not changed, f"changed or removed: {changed}"


def row_ids(rows):
    """A table's test ids: each row's first column, "what is wrong" (a pytest.param holds it in .values)."""
    return [r.values[0] if hasattr(r, "marks") else r[0] for r in rows]


def fill(args, **where):
    """Put the test's folders into a row's "{d}/..." placeholders."""
    return [type(a)(a.format(**where)) if isinstance(a, str) else a for a in args]  # (a Not stays a Not)


_immutable = []


def read_only(path):
    """Make a directory one that nobody, root included, can create files in: chmod is no obstacle
    to root (these tests run as root here), so root gets the immutable attribute instead."""
    if os.geteuid() != 0:
        os.chmod(path, 0o500)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root, and `chattr +i` is not available to make a read-only directory")
    _immutable.append(path)
    return path


@pytest.fixture(autouse=True)
def writable_again():
    yield  # so that pytest can delete its temporary folders
    while _immutable:
        path = _immutable.pop()
        if os.geteuid() != 0:
            os.chmod(path, 0o700)
        else:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def folder(path):
    path.mkdir()
    return path


def noise_jpeg(size=256, seed=0):
    """The bytes of a JPEG of random pixels (which compress little: half the file is half the image)."""
    g = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# -----------------------------------------------------------------------------
# The demo's backbones, a tiny run directory on them, and the bad files the tables point at


def args_for(out, *extra):
    return train.parse_args(["--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Stage 0 once for the module; each test copies it into its own run directory."""
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the server's children: 14 s here instead of 37 s with two
    try:
        a = args_for(out)
        demo.build_backbones(a.split, str(out / "backbones"), train.warmup_cosine, a.lm_steps, a.vision_steps, a.eval)
    finally:
        torch.set_num_threads(threads)
    return out / "backbones"


def new_run(tmp_path, backbones, name="run"):
    out = tmp_path / name
    shutil.copytree(backbones, out / "backbones")
    return out


@pytest.fixture(scope="module")
def d(backbones, tmp_path_factory):
    """A demo run directory (backbones + an untrained stage-4 checkpoint: the answers are noise, the
    errors are not), the Phi-2 directory with its tokenizer as a download has it, and bad files."""
    d = tmp_path_factory.mktemp("ask")
    b = d / "backbones"
    shutil.copytree(backbones, b)
    shutil.copy(b / "tokenizer.json", b / "phi2" / "tokenizer.json")
    model, _ = load_model(str(b / "phi2"), str(b / "vit"), str(b / "qformer"),
                                  proj_dim=tg.TinyGPTVConfig.tiny().proj_dim)
    model.add_lora()
    tg.save_checkpoint(model, str(d / "stage4.safetensors"), stage=4)
    Image.new("RGB", (48, 48), (200, 10, 10)).save(d / "red.png")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    jpeg = noise_jpeg()
    (d / "half.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    # checkpoints broken in one way each
    tensors = load_file(str(d / "stage4.safetensors"))
    with safe_open(str(d / "stage4.safetensors"), "pt") as f:
        meta = f.metadata()
    (d / "text.safetensors").write_text("these are not tensors\n")
    ints = dict(tensors, **{"llama_proj.bias": torch.zeros(tensors["llama_proj.bias"].shape, dtype=torch.int64)})
    save_file(ints, str(d / "int.safetensors"), metadata=meta)
    save_file(tensors, str(d / "seven.safetensors"), metadata={**meta, "stage": "7"})
    save_file(tensors, str(d / "bad-config.safetensors"), metadata={**meta, "config": "{not json"})
    # a "sharded" Phi-2 whose index lists its shards instead of mapping tensors to them
    s = d / "sharded-phi2"
    s.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(b / "phi2" / name, s / name)
    (s / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-00001-of-00001.safetensors"]}))
    shutil.copy(b / "phi2" / "model.safetensors", s / "model-00001-of-00001.safetensors")
    # a Phi-2 whose tokenizer has more tokens than its embedding table has rows
    v = d / "big-vocab-phi2"
    shutil.copytree(b / "phi2", v)
    big = Tokenizer.from_file(str(b / "tokenizer.json"))
    big.add_tokens([f"<extra_{i}>" for i in range(8)])
    big.save(str(v / "tokenizer.json"))
    # a checkpoint that records the tokenizer it was trained with (train.py's do), and a Phi-2 directory
    # with another valid tokenizer of the same size: two of its tokens trade ids
    tok = Tokenizer.from_file(str(b / "tokenizer.json"))
    tg.save_checkpoint(model, str(d / "recorded.safetensors"), stage=4, extra={"tokenizer": tg.tokenizer_digest(tok)})
    other = d / "other-tokenizer-phi2"
    shutil.copytree(b / "phi2", other)
    spec = json.loads((b / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a_, b_ = sorted(vocab)[-2:]
    vocab[a_], vocab[b_] = vocab[b_], vocab[a_]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    os.mkfifo(d / "pipe.png")
    (d / "held.json").write_text(json.dumps([{"image": "red.png", "question": "what color?", "answer": "red"}]))
    return d


# -----------------------------------------------------------------------------
# python tinygptv.py: asking about an image

ASK = ["--image", "{d}/red.png", "--prompt", "[vqa] what color is the circle", "--max-new-tokens", "3"]
RUN = ["--run", "{d}"]  # the demo's layout: backbones/ and stageN.safetensors in one folder
REAL = ["--phi2", "{d}/backbones/phi2", "--blip2", "{d}/backbones/vit", "--qformer", "{d}/backbones/qformer"]
CKPT = REAL + ["--checkpoint", "{d}/stage4.safetensors"]
VIT_AS_PHI2 = ["--phi2", "{d}/backbones/vit", "--blip2", "{d}/backbones/vit", "--qformer", "{d}/backbones/qformer",
               "--checkpoint", "{d}/stage4.safetensors"]

# what is wrong, the arguments after ASK (later options win), the exit code, what the line names
TINYGPTV_ROWS = [
    ("negative temperature", RUN + ["--temperature", "-1"], 2, "--temperature"),
    ("temperature nan", RUN + ["--temperature", "nan"], 2, "--temperature"),
    ("top-p 0 keeps no token", RUN + ["--top-p", "0"], 2, "--top-p"),
    ("top-p above 1", RUN + ["--top-p", "2"], 2, "--top-p"),
    ("negative new tokens", RUN + ["--max-new-tokens", "-5"], 2, "--max-new-tokens"),
    ("no new tokens", RUN + ["--max-new-tokens", "0"], 2, "--max-new-tokens"),
    ("more new tokens than the context", RUN + ["--max-new-tokens", "100000"], 2, "--max-new-tokens"),
    ("empty prompt", RUN + ["--prompt", ""], 2, "prompt"),
    ("unknown task tag", RUN + ["--prompt", "[bogus] x"], 2, "[bogus]"),
    ("missing image", RUN + ["--image", "{d}/missing.png"], 2, "{d}/missing.png"),
    ("image file of garbage", RUN + ["--image", "{d}/garbage.png"], 2, "{d}/garbage.png"),
    ("truncated JPEG", RUN + ["--image", "{d}/half.jpg"], 2, "{d}/half.jpg"),
    ("real weights, no checkpoint: untrained projections", REAL, 2, "--checkpoint"),
    pytest.param("CUDA without CUDA", RUN + ["--device", "cuda"], 2, "cuda", marks=NO_CUDA),
    ("checkpoint that is not safetensors", REAL + ["--checkpoint", "{d}/text.safetensors"], 2, "{d}/text.safetensors"),
    ("checkpoint holding an integer tensor", REAL + ["--checkpoint", "{d}/int.safetensors"], 2, "llama_proj.bias"),
    ("checkpoint of stage 7", REAL + ["--checkpoint", "{d}/seven.safetensors"], 2, ("seven.safetensors", "stage")),
    ("checkpoint config not JSON", REAL + ["--checkpoint", "{d}/bad-config.safetensors"], 2, "{d}/bad-config.safetensors"),
    ("ViT directory as --phi2", VIT_AS_PHI2, 2, ("Phi-2", Not("rotary_dim"))),
    ("sharded index with a list for weight_map", CKPT + ["--phi2", "{d}/sharded-phi2"], 2, "weight_map"),
    ("tokenizer larger than the vocabulary", CKPT + ["--phi2", "{d}/big-vocab-phi2"], 2, "tokenizer"),
    ("another tokenizer than the checkpoint's", REAL + ["--checkpoint", "{d}/recorded.safetensors",
                                                        "--phi2", "{d}/other-tokenizer-phi2"], 2, "tokenizer"),
    ("--device mps", RUN + ["--device", "mps"], 2, ("--device", "mps")),
    ("--device xpu", RUN + ["--device", "xpu"], 2, ("--device", "xpu")),
    ("--device meta", RUN + ["--device", "meta"], 2, ("--device", "meta")),
    ("a prompt that is not UTF-8", RUN + ["--prompt", "[vqa] what caf\udce9 color"], 2, "--prompt"),
    ("<ImageHere> in the prompt", RUN + ["--prompt", "[vqa] what is <ImageHere> here"], 2, "<ImageHere>"),
    ("a directory as the image", RUN + ["--image", "{d}/backbones"], 2, ("{d}/backbones", "directory",
                                                                        Not("not found"))),
    ("a FIFO as the image", RUN + ["--image", "{d}/pipe.png"], 2, ("{d}/pipe.png", "FIFO", Not("not found"))),
    ("a device as the image", RUN + ["--image", "/dev/zero"], 2, ("/dev/zero", "not a regular file")),
    ("a directory as the checkpoint", REAL + ["--checkpoint", "{d}/backbones"], 2, ("{d}/backbones", "directory")),
    ("a FIFO as the checkpoint", REAL + ["--checkpoint", "{d}/pipe.png"], 2, ("{d}/pipe.png", "FIFO")),
    ("a FIFO as the Phi-2 weights", CKPT + ["--phi2", "{d}/pipe.png"], 2, ("{d}/pipe.png", "FIFO")),
    ("a checkpoint name that is not UTF-8", REAL + ["--checkpoint", "{d}/st\udce9ge4.safetensors"], 2,
     ("--checkpoint", Not("corrupt"))),
    ("a stage checkpoint as --model", ["--model", "{d}/stage4.safetensors"], 2, ("{d}/stage4.safetensors", "--checkpoint")),
    ("a text file as --model", ["--model", "{d}/text.safetensors"], 2, "{d}/text.safetensors"),
    ("--model beside the weights it replaces", CKPT + ["--model", "{d}/stage4.safetensors"], 2, "--model"),
]


def test_the_tables_commands_answer_when_nothing_is_wrong(cli, d):
    # each row below changes one thing in one of these, so its failure is that thing's
    for args in (ASK + RUN, ASK + CKPT):
        r = cli("tinygptv.py", *fill(args, d=d))
        assert r.rc == 0 and "Traceback" not in r.err, r.err[-3000:]


def refuses_in_one_line(cli, d, script, args, code, names):
    """A row's promise for a command that reads the folder d: one line, the exit code, d untouched."""
    before = snapshot(d)
    r = cli(script, *fill(args, d=d))
    assert_one_line(r, code, fill([names] if isinstance(names, str) else list(names), d=d))
    assert_unchanged(before)


@pytest.mark.parametrize("what, args, code, names", TINYGPTV_ROWS, ids=row_ids(TINYGPTV_ROWS))
def test_tinygptv_refuses_in_one_line(cli, d, what, args, code, names):
    refuses_in_one_line(cli, d, "tinygptv.py", ASK + args, code, names)


# -----------------------------------------------------------------------------
# python eval.py: what it writes never replaces what a user has without --force

EVAL = ["--task", "vqa", "--data", "{d}/held.json", "--run", "{d}", "--device", "cpu"]
EVAL_ROWS = [
    ("--out is the data file", ["--out", "{d}/held.json"], 2, ("{d}/held.json", "--force")),
    ("--out is a stage checkpoint", ["--out", "{d}/stage4.safetensors"], 2, ("{d}/stage4.safetensors", "--force")),
    ("--out is a directory", ["--out", "{d}/backbones"], 2, ("{d}/backbones", "directory")),
    ("--out in a missing directory", ["--out", "{d}/nowhere/r.json"], 2, "{d}/nowhere"),
    ("--device mps", ["--device", "mps", "--out", "{d}/r.json"], 2, ("--device", "mps")),
]


@pytest.mark.parametrize("what, args, code, names", EVAL_ROWS, ids=row_ids(EVAL_ROWS))
def test_eval_refuses_in_one_line(cli, d, what, args, code, names):
    refuses_in_one_line(cli, d, "eval.py", EVAL + args, code, names)


def test_eval_replaces_its_output_with_force(cli, d, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("an earlier result\n")
    r = cli("eval.py", *fill(EVAL, d=d), "--out", out, "--force")
    assert r.rc == 0, r.err[-3000:]
    assert json.loads(out.read_text())["task"] == "vqa"


# -----------------------------------------------------------------------------
# Images: every mode Pillow opens reaches the model as the colours it shows, or is refused in one
# line. The mode, the file format that keeps it, the pixel value, the RGB the model must see.
MODES = [
    ("1", "png", 1, (255, 255, 255)),
    ("L", "png", 100, (100, 100, 100)),
    ("LA", "png", (100, 255), (100, 100, 100)),
    ("P", "png", 1, (10, 200, 30)),  # palette index 1
    ("RGBA", "png", (10, 200, 30, 255), (10, 200, 30)),
    ("CMYK", "tiff", (0, 255, 255, 0), (255, 0, 0)),  # no cyan, full magenta and yellow: red
    # 16-bit grey: 32896 = 128 * 257 is mid-grey on the 0-65535 scale (Pillow's own convert clips it to white)
    ("I;16", "png", 32896, (128, 128, 128)),
    ("I;16B", "tiff", 32896, (128, 128, 128)),
    ("I", "tiff", 32896, (128, 128, 128)),  # 32-bit integers, holding a 16-bit file's values
]


@pytest.mark.parametrize("mode, fmt, value, rgb", MODES, ids=[m[0] for m in MODES])
def test_every_image_mode_reaches_the_model_as_its_colours(tmp_path, mode, fmt, value, rgb):
    im = Image.new(mode, (8, 8), value)
    if mode == "P":
        im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    path = tmp_path / f"image.{fmt}"
    im.save(path)
    with Image.open(path) as check:
        assert check.mode == mode  # the file really holds this mode
    got = data.load_image(str(path))
    assert got.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(got.getpixel((3, 3)), rgb)), (got.getpixel((3, 3)), rgb)


def test_an_image_mode_with_no_rgb_is_refused_in_one_line(tmp_path):
    path = tmp_path / "float.tiff"
    Image.new("F", (8, 8), 0.5).save(path)  # floats: no agreed 0-255 range (Pillow's convert gives black)
    with pytest.raises(ValueError) as e:
        data.load_image(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_an_image_past_the_decompression_bomb_limit_is_refused_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over 2x the limit, Pillow's error
    with pytest.raises(Exception) as e:
        data.load_image(str(path))
    assert type(e.value) is not Image.DecompressionBombError and isinstance(e.value, ValueError), repr(e.value)
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


# -----------------------------------------------------------------------------
# python tinygptv.py convert SOURCE... DESTINATION [--force] [--stage N] [--num-heads N]

R, P = 8, 192  # LoRA rank and projection width: neither the tiny config's (64, 256) nor the paper's


@pytest.fixture(scope="module")
def official(backbones):
    """A model on the demo's backbones with trained-looking weights, and its stage state dict in the
    official release's naming (peft prefix, head-interleaved fused qkv), written out independently
    of tinygptv's converter. Rank R and width P can only come from the tensors."""
    b = backbones
    model, _ = load_model(str(b / "phi2"), str(b / "vit"), str(b / "qformer"), proj_dim=P)
    model.config.lora_r = R
    model.add_lora()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if tg.is_trainable(name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))  # LoRA's B too, which starts at 0
    H = model.config.llm.num_attention_heads
    hd = model.config.llm.hidden_size // H
    sd = {k: v for k, v in model.state_dict().items() if k.startswith(("llama_proj.", "llama_proj2."))}
    for i, layer in enumerate(model.llama_model.layers):
        qkv = layer.self_attn.query_key_value
        q, k, v = qkv.lora_B.chunk(3)  # rows [q; k; v] -> head-interleaved [h: q k v]
        sd[f"{OFFICIAL}layers.{i}.self_attn.query_key_value.lora_A.weight"] = qkv.lora_A
        sd[f"{OFFICIAL}layers.{i}.self_attn.query_key_value.lora_B.weight"] = torch.cat(
            [torch.cat([q[h * hd:(h + 1) * hd], k[h * hd:(h + 1) * hd], v[h * hd:(h + 1) * hd]]) for h in range(H)])
        sd[f"{OFFICIAL}layers.{i}.self_attn.dense.lora_A.weight"] = layer.self_attn.dense.lora_A
        sd[f"{OFFICIAL}layers.{i}.self_attn.dense.lora_B.weight"] = layer.self_attn.dense.lora_B
        for norm in ("self_attn.q_layernorm", "self_attn.k_layernorm", "post_layernorm", "input_layernorm"):
            sd[f"{OFFICIAL}layers.{i}.{norm}.weight"] = layer.get_submodule(norm).weight
    sd[f"{OFFICIAL}final_layernorm.weight"] = model.llama_model.final_layernorm.weight
    return model.eval(), {k: v.detach().clone() for k, v in sd.items()}


def pth(t, obj, name="TinyGPT-V_for_Stage4.pth"):
    torch.save(obj, t / name)
    return str(t / name)


def existing(path, text="a trained checkpoint\n"):
    path.write_text(text)
    return str(path)


def safetensors_file(path):
    save_file({"llama_proj.bias": torch.ones(3)}, str(path), metadata={"stage": "4"})
    return str(path)


QKV_B = f"{OFFICIAL}layers.0.self_attn.query_key_value.lora_B.weight"


def with_misshaped_qkv(sd):
    return {**sd, QKV_B: torch.zeros(sd[QKV_B].shape[0] + 1, R)}  # rows no longer 3 x heads x head_dim


# what is wrong, the arguments (given the test's folder t and the official state dict), exit code, names
CONVERT_ROWS = [
    ("destination exists", lambda t, sd: [pth(t, {"model": sd}), existing(t / "stage4.safetensors")], 2, "--force"),
    ("arguments swapped", lambda t, sd: [safetensors_file(t / "stage4.safetensors"), pth(t, {"model": sd})],
     2, "not a torch"),
    ("arguments swapped, with --force", lambda t, sd: [safetensors_file(t / "stage4.safetensors"),
                                                       pth(t, {"model": sd}), "--force"], 2, "not a torch"),
    ("a list, not a state dict", lambda t, sd: [pth(t, [torch.zeros(2)]), str(t / "out.safetensors")],
     2, "{t}/TinyGPT-V_for_Stage4.pth"),
    ("an integer key", lambda t, sd: [pth(t, {"model": {1: torch.zeros(2)}}), str(t / "out.safetensors")],
     2, "{t}/TinyGPT-V_for_Stage4.pth"),
    ("a value that is not a tensor", lambda t, sd: [pth(t, {"model": {**sd, "llama_proj.bias": "hello"}}),
                                                    str(t / "out.safetensors")], 2, "llama_proj.bias"),
    ("a qkv whose rows are not 3 x heads", lambda t, sd: [pth(t, {"model": with_misshaped_qkv(sd)}),
                                                          str(t / "out.safetensors")],
     2, "layers.0.self_attn.query_key_value.lora_B"),
    ("--num-heads 0", lambda t, sd: [pth(t, {"model": sd}), str(t / "out.safetensors"), "--num-heads", "0"],
     2, "--num-heads"),
    ("destination in a missing directory", lambda t, sd: [pth(t, {"model": sd}), str(t / "nowhere" / "out.safetensors")],
     2, "{t}/nowhere"),
    ("destination is a directory", lambda t, sd: [pth(t, {"model": sd}), str(folder(t / "out.safetensors"))],
     2, "{t}/out.safetensors"),
    ("destination in a read-only directory", lambda t, sd: [pth(t, {"model": sd}),
                                                            str(read_only(folder(t / "ro")) / "out.safetensors")],
     2, "{t}/ro"),
]


@pytest.mark.parametrize("what, setup, code, names", CONVERT_ROWS, ids=[r[0] for r in CONVERT_ROWS])
def test_convert_refuses_in_one_line(cli, tmp_path, official, what, setup, code, names):
    args = setup(tmp_path, official[1])
    before = snapshot(tmp_path)
    r = cli("tinygptv.py", "convert", *args[:2], "--num-heads", HEADS, *args[2:])  # the row's own options win
    assert_one_line(r, code, fill([names], t=tmp_path))
    assert_unchanged(before)


def test_convert_with_force_replaces_the_destination(cli, tmp_path, official):
    src, dst = pth(tmp_path, {"model": official[1]}), existing(tmp_path / "stage4.safetensors")
    r = cli("tinygptv.py", "convert", src, dst, "--num-heads", HEADS, "--force")
    assert r.rc == 0, r.err[-3000:]
    assert set(load_file(dst)) == {k for k in official[0].state_dict() if tg.is_trainable(k)}


def test_convert_never_runs_code_from_a_pickle(cli, tmp_path):
    marker = tmp_path / "ran"

    class Payload:  # unpickling it would call open(marker, "w"): code, where weights are expected
        def __reduce__(self):
            return open, (str(marker), "w")

    src = pth(tmp_path, {"model": {"llama_proj.bias": Payload()}})
    before = snapshot(tmp_path)
    r = cli("tinygptv.py", "convert", src, str(tmp_path / "out.safetensors"))
    # torch's advice to unpickle it anyway, in either of its phrasings, never reaches a user
    assert_one_line(r, 2, [src, Not("weights_only=False"), Not("`weights_only` set to `False`"), Not("likely succeed")])
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    assert_unchanged(before)


def test_a_converted_official_checkpoint_answers_through_the_command_line(cli, tmp_path, backbones, official):
    model, sd = official
    b = tmp_path / "backbones"
    shutil.copytree(backbones, b)
    shutil.copy(b / "tokenizer.json", b / "phi2" / "tokenizer.json")  # a Phi-2 download has its tokenizer
    src, dst = pth(tmp_path, {"model": sd}), str(tmp_path / "stage4.safetensors")
    r = cli("tinygptv.py", "convert", src, dst, "--num-heads", HEADS)
    assert r.rc == 0, r.err[-3000:]
    # the config it converted: the stage from the file name, the width and rank from the tensors
    with safe_open(dst, "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    assert meta["stage"] == "4" and config["proj_dim"] == P and config["lora_r"] == R, meta
    Image.new("RGB", (48, 48), (10, 10, 200)).save(tmp_path / "blue.png")
    r = cli("tinygptv.py", "--phi2", b / "phi2", "--blip2", b / "vit", "--qformer", b / "qformer", "--checkpoint", dst,
            "--image", tmp_path / "blue.png", "--prompt", "[vqa] what color", "--max-new-tokens", "3")
    assert r.rc == 0 and "Traceback" not in r.err, r.err[-3000:]
    # and it is the model the official file came from: the same greedy answer
    tok = tg.load_tokenizer(str(backbones))
    with torch.no_grad():
        want = model.generate(tok, [data.load_image(str(tmp_path / "blue.png"))],
                              [parse_user_prompt("[vqa] what color")], stage=4, max_new_tokens=3)[0]
    assert r.out.split("\n")[-2:] == [want, ""], (r.out, want)  # the answer is the last line printed
    # a file name that does not say the stage: --stage does
    src3 = pth(tmp_path, {"model": sd}, name="weights.pth")
    r = cli("tinygptv.py", "convert", src3, tmp_path / "stage3.safetensors", "--num-heads", HEADS, "--stage", "3")
    assert r.rc == 0, r.err[-3000:]
    with safe_open(str(tmp_path / "stage3.safetensors"), "pt") as f:
        assert f.metadata()["stage"] == "3"


# -----------------------------------------------------------------------------
# python train.py

TRAIN = [*SMALL, "--stage", "1", "--steps", "4", "--out", "{out}"]


@pytest.fixture(scope="module")
def stopped(cli, backbones, tmp_path_factory):
    """An interrupted stage 1: 2 of its 4 steps taken, its state in stage1.state.pt."""
    out = tmp_path_factory.mktemp("stopped")
    shutil.copytree(backbones, out / "backbones")
    r = cli("train.py", *fill(TRAIN, out=out), "--stop-after", "2")
    assert r.rc == 0 and (out / "stage1.state.pt").is_file() and not (out / "stage1.safetensors").exists(), r.err
    return out


def state(edit=None):
    """A row's setup: the interrupted stage's state file in the row's run, edited (raw bytes in, bytes out)."""
    def setup(out, request):
        raw = (request.getfixturevalue("stopped") / "stage1.state.pt").read_bytes()
        (out / "stage1.state.pt").write_bytes(edit(raw) if edit else raw)
    return setup


def state_model(change):
    """A row's setup: the state file with its "model" dict changed by change(dict)."""
    def edit(raw):
        st = torch.load(io.BytesIO(raw), weights_only=True)
        change(st["model"])
        buf = io.BytesIO()
        torch.save(st, buf)
        return buf.getvalue()
    return state(edit)


def lock_held_by_a_live_process(out, request):
    holder = subprocess.Popen(["sleep", "30"])
    request.addfinalizer(lambda: (holder.kill(), holder.wait()))
    started = Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # as train.py writes it
    (out / ".lock").write_text(f"{holder.pid} {started}\n")
    return {"pid": holder.pid}


def out_under_a_file(out, request):
    (out / "file.txt").write_text("a file, not a folder\n")


def fifo_data(out, request):
    os.mkfifo(out / "pipe.json")  # reading it would wait for a writer forever


def read_only_out(out, request):
    read_only(out)  # the backbones are in it: only what train.py would write is refused


# what is wrong, a setup of the run directory (or None), the arguments after TRAIN, exit code, names
TRAIN_ROWS = [
    ("zero steps", None, ["--steps", "0"], 2, "--steps"),
    ("zero micro-batches", None, ["--grad-accum", "0"], 2, "--grad-accum"),
    ("a checkpoint every 0 steps", None, ["--ckpt-every", "0"], 2, "--ckpt-every"),
    ("a log line every 0 steps", None, ["--log-every", "0"], 2, "--log-every"),
    ("an empty batch", None, ["--batch-size", "0"], 2, "--batch-size"),
    ("more micro-batches than samples", None, ["--grad-accum", "16", "--batch-size", "8"], 2, "--grad-accum"),
    pytest.param("CUDA without CUDA", None, ["--device", "cuda"], 2, "cuda", marks=NO_CUDA),
    ("--resume with nothing to resume", None, ["--resume"], 2, "nothing to resume"),
    ("an interrupted stage started again without --resume or --restart", state(), [], 2, ("--resume", "--restart")),
    ("--resume with other --steps", state(), ["--resume", "--steps", "5"], 2, "--steps"),
    ("--resume with other --batch-size", state(), ["--resume", "--batch-size", "4"], 2, "--batch-size"),
    # seed 2's 8 held-out scenes are none of seed 0's 48 training ones, so the backbones pass and the state is read
    ("--resume with other --seed", state(), ["--resume", "--seed", "2"], 2, "--seed is 2 now but was 0"),
    ("truncated state file", state(lambda raw: raw[:len(raw) // 2]), ["--resume"], 2, "{out}/stage1.state.pt"),
    ("state file of garbage", state(lambda raw: b"garbage" * 100), ["--resume"], 2, "{out}/stage1.state.pt"),
    # strict resume: every trained tensor (all named llama_proj* or llama_model.*) must be in the state
    ("state with no weights", state_model(lambda m: m.clear()), ["--resume"], 2, "llama_"),
    ("state missing a tensor", state_model(lambda m: m.pop("llama_proj2.bias")), ["--resume"], 2, "llama_proj2.bias"),
    ("state with a mis-shaped tensor", state_model(lambda m: m.update({"llama_proj2.bias": torch.zeros(3)})),
     ["--resume"], 2, "llama_proj2.bias"),
    ("a lock held by a live process", lock_held_by_a_live_process, [], 2, "{pid}"),
    ("--out under a regular file", out_under_a_file, ["--out", "{out}/file.txt/run"], 2, "{out}/file.txt"),
    ("a read-only --out", read_only_out, [], 2, "{out}"),
    ("--resume with other --dropout", state(), ["--resume", "--dropout", "0.3"], 2, "--dropout"),
    ("a FIFO as --data", fifo_data, ["--data", "{out}/pipe.json"], 2, ("{out}/pipe.json", "FIFO")),
    ("--device mps", None, ["--device", "mps"], 2, ("--device", "mps")),
    ("--data named in another encoding", None, ["--data", "{out}/d\udce9.json"], 2, ("--data", Not("Traceback"))),
    ("--stage 0 over the shipped backbones without --force", None, ["--stage", "0"], 2, ("--force", "demo_backbones")),
]


@pytest.mark.parametrize("what, setup, args, code, names", TRAIN_ROWS, ids=row_ids(TRAIN_ROWS))
def test_train_refuses_in_one_line_before_any_step(cli, tmp_path, backbones, request, what, setup, args, code, names):
    out = new_run(tmp_path, backbones)
    extra = setup(out, request) if setup else None  # (a setup may add placeholders: the lock holder's pid)
    where = {"out": out, **(extra or {})}
    before = snapshot(tmp_path)
    r = cli("train.py", *fill(TRAIN + args, **where), timeout=60)
    assert_one_line(r, code, fill([names] if isinstance(names, str) else list(names), **where))
    assert not STEP_LINE.search(r.out), r.out  # refused up front: no step (nor stage 0) was taken first
    assert_unchanged(before)


def test_restart_starts_the_interrupted_stage_over(cli, tmp_path, backbones, stopped):
    out = new_run(tmp_path, backbones)
    shutil.copy(stopped / "stage1.state.pt", out)
    r = cli("train.py", *fill(TRAIN, out=out), "--restart")
    assert r.rc == 0, r.err[-3000:]
    steps = re.findall(r"step +(\d+)/4", r.out)
    assert steps[0] == "1" and steps[-1] == "4", r.out  # from step 0, not from the saved step 2
    assert "resumed" not in r.out and (out / "stage1.safetensors").is_file()


def test_a_killed_runs_lock_and_temporaries_are_cleared_at_the_next_start(cli, tmp_path, backbones):
    out = new_run(tmp_path, backbones)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a PID whose process has exited: what `kill -9` mid-write leaves behind
    (out / ".lock").write_text(f"{gone.pid}\n")
    tmp = out / f".stage1.safetensors.tmp{gone.pid}"
    tmp.write_bytes(b"half a checkpoint")
    r = cli("train.py", *fill(TRAIN, out=out), "--steps", "2")
    assert r.rc == 0, r.err[-3000:]
    assert not tmp.exists() and (out / "stage1.safetensors").is_file()


@pytest.mark.parametrize("text", ["{", '{"after": [1, 2]}', '{"after": {"vqa": 5}, "eval_set": []}'],
                         ids=["cut short", "a list for a table", "a number for a row"])
def test_an_unreadable_eval_file_does_not_block_the_next_stage(cli, tmp_path, backbones, text):
    out = new_run(tmp_path, backbones)
    args = args_for(out, "--stage", "1")
    tg.save_checkpoint(train.build_model(args, 1)[0], str(out / "stage1.safetensors"), 1)  # stage 1, untrained
    (out / "stage1.eval.json").write_text(text)  # cut short, as a killed plain write would leave it, or of another shape
    small_with_eval = [a for a in SMALL if a != "--no-eval"]
    r = cli("train.py", *small_with_eval, "--eval-samples", "2", "--stage", "2", "--steps", "1", "--out", out)
    assert "Traceback" not in r.err, r.err[-3000:]
    said = [line for line in (r.out + r.err).splitlines() if "stage1.eval.json" in line]
    assert len(said) == 1, r.out + r.err  # either way, one line names the file
    if r.rc != 0:
        assert_one_line(r, 2, str(out / "stage1.eval.json"))


def test_a_truncated_jpeg_in_the_data_is_skipped_and_the_stage_finishes(cli, tmp_path, backbones):
    out = new_run(tmp_path, backbones)
    rows = []
    for i in range(20):
        Image.new("RGB", (32, 32), (12 * i, 0, 255 - 12 * i)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"picture number {i}"})
    jpeg = noise_jpeg()
    (tmp_path / "late.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # its header reads fine; its pixels stop half way
    first = train.batch_indices(0, 21, 8, seed=0 + 1)  # stage 1's first batch (seed = --seed + stage)
    rows.insert(first[0], {"image": "late.jpg", "caption": "a cut-off picture"})  # step 1 draws it, if it is kept
    (tmp_path / "late.json").write_text(json.dumps(rows))
    r = cli("train.py", *fill(TRAIN, out=out), "--steps", "6", "--data", tmp_path / "late.json",
            "--image-root", tmp_path, "--ckpt-every", "1")
    assert r.rc == 0 and "Traceback" not in r.err, r.err[-3000:]
    assert "skipped" in r.out + r.err, r.out + r.err
    assert (out / "stage1.safetensors").is_file()


@pytest.mark.parametrize("lock", ["1", "1 99999999"], ids=["pid 1 alone", "pid 1 started at another time"])
def test_a_lock_of_another_process_under_the_holders_pid_is_taken_over(cli, tmp_path, backbones, lock):
    # A train.py killed as a container's PID 1 leaves `1 START` (`1` from an older train.py). PID 1 here
    # is another process, not a train.py and not started then: the lock is stale and taken over.
    out = new_run(tmp_path, backbones)
    (out / ".lock").write_text(lock + "\n")
    r = cli("train.py", *fill(TRAIN, out=out), "--steps", "1")
    assert r.rc == 0 and "in use" not in r.err, r.err[-3000:]
    assert (out / "stage1.safetensors").is_file() and not (out / ".lock").exists()


def test_an_interrupted_stage0_leaves_the_shipped_backbones_whole_and_in_use(cli, tmp_path, backbones):
    shipped = Path(demo.PRETRAINED)
    before = snapshot(shipped)
    # stage 0 for real, into the shipped folder, killed (SIGKILL, as a time limit does) while it trains
    r = cli("train.py", "--stage", "0", "--force", "--lm-steps", "100000", "--demo-train", "48",
            "--demo-eval", "8", "--no-eval", "--device", "cpu", "--out", tmp_path / "run0", timeout=20)
    assert r.rc is None, (r.out, r.err)  # killed, not finished
    try:
        assert_unchanged(before)
        assert snapshot(shipped).keys() == before.keys()  # nothing added either
        # and a new run uses them as they are
        out = tmp_path / "run"
        r = cli("train.py", *fill(TRAIN, out=out), "--steps", "1")
        assert r.rc == 0 and "come from" in r.out, r.err[-3000:]
        assert (out / "backbones" / "DONE").read_text() == (shipped / "DONE").read_text()
    finally:  # what the killed stage 0 left beside the shipped set: its lock and its unfinished folder
        for left in list(shipped.parent.glob("demo_backbones.tmp*")):
            shutil.rmtree(left)
        (shipped.parent / ".demo_backbones.lock").unlink(missing_ok=True)


def test_stage_checkpoints_have_the_permissions_of_every_other_file(cli, tmp_path, backbones):
    out = new_run(tmp_path, backbones)
    r = cli("train.py", *fill(TRAIN, out=out), "--steps", "2")
    assert r.rc == 0, r.err[-3000:]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("stage1.safetensors", "stage1.state.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0"),
    __import__("safetensors").SafetensorError("No space left on device (os error 28)"),
], ids=["OSError", "torch's RuntimeError", "SafetensorError"])
def test_a_full_disk_is_one_line_naming_the_file_and_leaves_it_whole(tmp_path, error):
    from checkpoints import write_atomically, write_folder_atomically
    target = existing(tmp_path / "stage1.state.pt", "the last good state\n")

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise error

    with pytest.raises(OSError) as e:
        write_atomically(target, fail)
    assert target in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert Path(target).read_text() == "the last good state\n" and os.listdir(tmp_path) == ["stage1.state.pt"]
    # a folder of files that belong together: the old set stays whole
    folder = tmp_path / "backbones"
    folder.mkdir()
    (folder / "DONE").write_text("{}")
    before = snapshot(folder)

    def fail_half_way(tmp):
        os.makedirs(tmp)
        (Path(tmp) / "DONE").write_text("{}")
        raise error

    with pytest.raises(OSError) as e:
        write_folder_atomically(str(folder), fail_half_way)
    assert str(folder) in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert_unchanged(before)
    assert sorted(os.listdir(tmp_path)) == ["backbones", "stage1.state.pt"]


# -----------------------------------------------------------------------------
# Ctrl-C: one line and exit code 130, from every entry point; nothing that existed is touched


CTRL_C = [  # the entry point and its arguments, and where the Ctrl-C lands
    ("tinygptv.py", RUN + ASK, "PIL.Image:open"),  # while the image is read
    ("tinygptv.py", ["convert", "{t}/TinyGPT-V_for_Stage4.pth", "{t}/out.safetensors", "--num-heads", HEADS],
     "torch:load"),
    ("train.py", TRAIN, "tinygptv:lm_loss"),  # in the first step
]


@pytest.mark.parametrize("script, args, where", CTRL_C, ids=["ask", "convert", "train"])
def test_ctrl_c_is_one_line_and_exit_130(cli, tmp_path, d, backbones, official, script, args, where):
    out = new_run(tmp_path, backbones)
    pth(tmp_path, {"model": official[1]})
    before = {**snapshot(tmp_path), **snapshot(d)}
    r = cli(script, *fill(args, d=d, t=tmp_path, out=out), interrupt=where)
    assert_one_line(r, 130)
    assert_unchanged(before)
