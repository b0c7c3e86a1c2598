"""What tinygptv.py promises: the assembled model splices the image where the prompt says, learns only
the answer, generates the same answers batched or alone, round-trips its checkpoints strictly, reads
the official release's naming, survives int8 with a bounded error, and fails politely on bad input."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data
import int8
import tinygptv as tg
from cli import parse_user_prompt
from convert import convert
from layouts import load_model, load_qformer, load_vit, qformer_lavis_key, save_pretrained
from lora import LoRALinear
from phi2 import Phi2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a red circle and a blue square", "what color is the circle", "###Human: ###Assistant: [INST] [/INST]",
         "the green triangle is at the top left", "describe this image in detail", "<Img></Img> {<10><20><30><40>}"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=[tg.BOS],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    t.save(path)
    return tg.load_tokenizer(path)


def randomize(model, seed=0):
    """Non-trivial weights everywhere, so that a wrong wiring cannot hide behind zeros or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_vision.weight",
                                         "LayerNorm.weight", "layernorm.weight")) else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))


def tiny_model(tok, lora=True, seed=0):
    torch.manual_seed(seed)
    model = tg.TinyGPTV(tg.TinyGPTVConfig.tiny(vocab_size=tok.get_vocab_size()))
    if lora:
        model.add_lora()
    randomize(model, seed)
    return model.eval()


def images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


def test_full_preset_is_the_papers_and_builds_on_meta():
    cfg = tg.TinyGPTVConfig.full()
    with torch.device("meta"):
        model = tg.TinyGPTV(cfg)
        model.add_lora()
    assert (cfg.vision.num_hidden_layers, cfg.vision.hidden_size, cfg.qformer.num_query_tokens) == (39, 1408, 32)
    assert (model.llama_proj.in_features, model.llama_proj.out_features) == (768, 4096)
    assert (model.llama_proj2.in_features, model.llama_proj2.out_features) == (4096, 2560)
    assert cfg.llm.qk_layernorm and cfg.llm.post_layernorm and cfg.llm.num_hidden_layers == 32
    lora = {n: p.shape for n, p in model.named_parameters() if ".lora_" in n}
    assert lora["llama_model.layers.0.self_attn.query_key_value.lora_A"] == (64, 2560)
    assert lora["llama_model.layers.0.self_attn.query_key_value.lora_B"] == (7680, 64)
    assert len(lora) == 32 * 2 * 2  # qkv and dense of every layer, A and B; no MLP


def test_forward_backward_and_only_trainables_get_gradients(tok):
    model = tiny_model(tok).train()
    for n, p in model.named_parameters():
        p.requires_grad = tg.is_trainable(n)
    ex = [tg.make_example(tok, 4, tg.instruction_for("vqa", "what color is the circle"), "red"),
          tg.make_example(tok, 3, "describe this image", "a red circle and a blue square")]
    px = torch.stack([tg.preprocess(im, 64) for im in images(2)])
    logits, targets = model(ex, pixel_values=px)
    n_answer = sum(len(e.answer) for e in ex)  # one row per answer token, nothing else
    assert logits.shape == (n_answer, tok.get_vocab_size()) and targets.tolist() == ex[0].answer + ex[1].answer
    loss = tg.lm_loss(logits, targets)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if tg.is_trainable(n)}
    assert any(".lora_A" in n for n in got) and "llama_proj.weight" in got
    assert "llama_model.layers.0.self_attn.q_layernorm.weight" in got
    assert "llama_model.layers.0.self_attn.q_layernorm.bias" not in got  # norm biases stay frozen
    assert not any(n.startswith(("visual_encoder", "qformer")) for n in got)


def test_image_lands_at_the_slot_and_labels_cover_only_the_answer(tok):
    model = tiny_model(tok)
    ins = tg.instruction_for("vqa", "what color")
    ex = tg.make_example(tok, 4, ins, "red")
    before_text, after_text = tg.TEMPLATES[4].format(ins).split("<ImageHere>")
    assert before_text.endswith("<Img>") and after_text.startswith("</Img>")
    img = torch.randn(1, model.config.qformer.num_query_tokens, model.config.llm.hidden_size)
    inputs, mask, labels = model.assemble(img, [ex])
    nb, n_img = len(ex.before), img.shape[1]
    assert ex.before[0] == tok.token_to_id(tg.BOS)
    assert torch.equal(inputs[0, nb:nb + n_img], img[0])
    ids = torch.tensor(ex.before + ex.after + ex.answer)
    text_pos = list(range(nb)) + list(range(nb + n_img, inputs.shape[1]))
    assert torch.equal(inputs[0, text_pos], model.llama_model.embed_tokens(ids))
    answer = tg.encode(tok, "red") + tg.encode(tok, tg.END_MARKERS[4])
    assert labels[0][labels[0] != -100].tolist() == answer
    assert (labels[0, -len(answer):] != -100).all() and mask.all()
    # left padding for generation moves the slot with the padding
    short = tg.make_example(tok, 4, "x", None)
    inputs2, mask2, _ = model.assemble(img.repeat(2, 1, 1), [ex, short], pad_left=True)
    pad = inputs2.shape[1] - (len(short.before) + n_img + len(short.after))
    start2 = pad + len(short.before)
    assert mask2[1, :pad].sum() == 0 and mask2[1, pad:].all()
    assert torch.equal(inputs2[1, start2:start2 + n_img], img[0])


def full_logits(model, ex, px):
    """Logits at every position (B, T, V), as forward computed them before answer_logits, and the
    labels (B, T), -100 off the answers."""
    inputs, mask, labels = model.assemble(model.project(model.encode_queries(px)), ex)
    return model.llama_model(inputs_embeds=inputs, attention_mask=mask), labels


def test_answer_logits_give_the_loss_of_all_positions(tok):
    """forward computes logits at the answer positions only; the loss must be the one over the
    full (B, T, V) logits with every non-answer position ignored."""
    model = tiny_model(tok)
    ex = [tg.make_example(tok, 4, tg.instruction_for("vqa", "what color is the circle"), "red"),
          tg.make_example(tok, 3, "describe this image", "a red circle and a blue square")]
    px = torch.stack([tg.preprocess(im, 64) for im in images(2)])
    with torch.no_grad():
        full, labels = full_logits(model, ex, px)
        expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        got = tg.lm_loss(*model(ex, pixel_values=px))
    assert (labels != -100).sum() < labels.numel() / 2  # most positions are prompt and image
    torch.testing.assert_close(got, expected)


def test_changing_the_image_changes_logits_only_from_the_slot_on(tok):
    model = tiny_model(tok)
    ex = [tg.make_example(tok, 3, "describe this image", "a red circle")]
    px1, px2 = (torch.stack([tg.preprocess(im, 64)]) for im in (images(1, seed=1)[0], images(1, seed=2)[0]))
    with torch.no_grad():
        l1, _ = full_logits(model, ex, px1)
        l2, _ = full_logits(model, ex, px2)
    nb = len(ex[0].before)
    torch.testing.assert_close(l1[:, :nb], l2[:, :nb])  # causal: the text before the image cannot see it
    assert (l1[:, nb:] - l2[:, nb:]).abs().amax(-1).min() > 1e-4  # every later position does


def test_batched_generation_equals_one_at_a_time(tok):
    model = tiny_model(tok)
    ims = images(3)
    ins = [tg.instruction_for("vqa", "what color is the circle"), "describe", tg.instruction_for("refer", "the red square")]
    batched = model.generate(tok, ims, ins, stage=4, max_new_tokens=8)
    alone = [model.generate(tok, [im], [i], stage=4, max_new_tokens=8)[0] for im, i in zip(ims, ins)]
    assert batched == alone
    assert all(isinstance(a, str) for a in batched)


def test_preprocess_any_mode_to_clip_normalized_rgb(tmp_path):
    for mode in ("L", "P", "RGBA", "CMYK"):
        im = Image.new(mode, (30, 20))
        x = tg.preprocess(im, 28)
        assert x.shape == (3, 28, 28)
    white = tg.preprocess(Image.new("RGB", (5, 5), (255, 255, 255)), 14)
    expected = torch.tensor([(1 - m) / s for m, s in zip(tg.CLIP_MEAN, tg.CLIP_STD)])
    torch.testing.assert_close(white[:, 7, 7], expected)
    with pytest.raises(FileNotFoundError, match="image not found"):
        tg.preprocess(data.load_image(str(tmp_path / "nope.png")), 14)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image"):
        tg.preprocess(data.load_image(str(bad)), 14)


def test_checkpoint_round_trip_is_strict(tok, tmp_path):
    model = tiny_model(tok)
    path = str(tmp_path / "stage2.safetensors")
    tg.save_checkpoint(model, path, stage=2)
    cfg, stage = tg.config_from_checkpoint(path)
    assert stage == 2 and cfg == model.config
    fresh = tiny_model(tok, seed=1)
    tg.load_checkpoint(fresh, path)
    ex = [tg.make_example(tok, 4, "x", "y")]
    px = torch.stack([tg.preprocess(images(1)[0], 64)])
    # only what trains was saved: give the fresh model the same frozen backbone, then compare
    frozen = {k: v for k, v in model.state_dict().items() if not tg.is_trainable(k)}
    fresh.load_state_dict(frozen, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ex, pixel_values=px)[0], model(ex, pixel_values=px)[0])
    saved = tg.read_checkpoint(path)[0]
    assert set(saved) == {k for k in model.state_dict() if tg.is_trainable(k)}
    # strictness: a model with another shape, or a file missing a key, is an error naming the key
    from safetensors.torch import save_file
    del saved["llama_proj.bias"]
    save_file(saved, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing tensor .llama_proj.bias."):
        tg.load_checkpoint(fresh, str(tmp_path / "missing.safetensors"))
    (tmp_path / "trunc.safetensors").write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        tg.load_checkpoint(fresh, str(tmp_path / "trunc.safetensors"))
    with pytest.raises(FileNotFoundError):
        tg.load_checkpoint(fresh, str(tmp_path / "none.safetensors"))


def test_stage1_checkpoint_loads_into_a_model_with_fresh_lora(tok, tmp_path):
    stage1 = tiny_model(tok, lora=False)
    path = str(tmp_path / "stage1.safetensors")
    tg.save_checkpoint(stage1, path, stage=1)
    assert not any(".lora_" in k for k in tg.read_checkpoint(path)[0])
    stage2 = tiny_model(tok, lora=False, seed=3)
    stage2.add_lora()
    tg.load_checkpoint(stage2, path)
    torch.testing.assert_close(stage2.llama_proj.weight, stage1.llama_proj.weight)


def test_official_checkpoint_converts_to_identical_logits(tok, tmp_path):
    """A state dict in the official naming (peft prefix, fused head-interleaved qkv), written here
    independently of tinygptv's converter, must convert to exactly our model."""
    model = tiny_model(tok)
    H = model.config.llm.num_attention_heads
    hd = model.config.llm.hidden_size // H
    official = {"llama_proj.weight": model.llama_proj.weight, "llama_proj.bias": model.llama_proj.bias,
                "llama_proj2.weight": model.llama_proj2.weight, "llama_proj2.bias": model.llama_proj2.bias}
    pre = "llama_model.base_model.model.model."
    for i, layer in enumerate(model.llama_model.layers):
        qkv = layer.self_attn.query_key_value
        B = qkv.lora_B.detach()  # rows [q; k; v] -> head-interleaved [h: q k v]
        q, k, v = B.chunk(3)
        inter = torch.cat([torch.cat([q[h * hd:(h + 1) * hd], k[h * hd:(h + 1) * hd], v[h * hd:(h + 1) * hd]])
                           for h in range(H)])
        official[f"{pre}layers.{i}.self_attn.query_key_value.lora_A.weight"] = qkv.lora_A
        official[f"{pre}layers.{i}.self_attn.query_key_value.lora_B.weight"] = inter
        official[f"{pre}layers.{i}.self_attn.dense.lora_A.weight"] = layer.self_attn.dense.lora_A
        official[f"{pre}layers.{i}.self_attn.dense.lora_B.weight"] = layer.self_attn.dense.lora_B
        for norm in ("self_attn.q_layernorm", "self_attn.k_layernorm", "post_layernorm", "input_layernorm"):
            official[f"{pre}layers.{i}.{norm}.weight"] = layer.get_submodule(norm).weight
    official[f"{pre}final_layernorm.weight"] = model.llama_model.final_layernorm.weight
    official["some_unrelated_buffer"] = torch.zeros(1)
    src, dst = str(tmp_path / "TinyGPT-V_for_Stage4.pth"), str(tmp_path / "stage4.safetensors")
    torch.save({"model": {k: v.detach().clone() for k, v in official.items()}}, src)
    converted, unknown = convert(src, dst, num_heads=H)
    assert unknown == ["some_unrelated_buffer"]
    # converted holds only what trains: give it a model with the same frozen weights but different trainables
    other = tiny_model(tok, seed=5)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if not tg.is_trainable(k)}, strict=False)
    from safetensors.torch import load_file
    got = load_file(dst)
    assert set(got) == {k for k in model.state_dict() if tg.is_trainable(k)}
    other.load_state_dict(got, strict=False)
    ex = [tg.make_example(tok, 4, "x", "y")]
    px = torch.stack([tg.preprocess(images(1)[0], 64)])
    with torch.no_grad():
        torch.testing.assert_close(other(ex, pixel_values=px)[0], model(ex, pixel_values=px)[0])


def test_lavis_eva_and_blip2_pickles_merge_into_one_file_that_loads(tok, tmp_path):
    """The README's LAVIS path: a raw EVA pickle (no prefix, no ln_vision) and a BLIP-2 pickle
    (ln_vision, the Q-Former, its queries), converted together, load as the vision side."""
    import dataclasses
    model = tiny_model(tok, lora=False)
    vit_state = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    eva = {k: v for k, v in vit_state.items() if not k.startswith("ln_vision.")}  # as eva_vit_g.pth names them
    blip2 = {k: v for k, v in vit_state.items() if k.startswith("ln_vision.")}
    blip2.update({qformer_lavis_key(k): v.clone() for k, v in model.qformer.state_dict().items()})
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    torch.save({"model": blip2}, tmp_path / "blip2_pretrained.pth")
    dst = str(tmp_path / "blip2.safetensors")
    convert([str(tmp_path / "eva_vit_g.pth"), str(tmp_path / "blip2_pretrained.pth")], dst)
    vit = load_vit(dst, num_attention_heads=model.config.vision.num_attention_heads)
    qformer = load_qformer(dst, **dataclasses.asdict(model.config.qformer))
    for ours, loaded in ((model.visual_encoder, vit), (model.qformer, qformer)):
        for (name, a), (_, b) in zip(ours.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="also in an earlier source"):  # the same tensor twice is refused
        convert([str(tmp_path / "eva_vit_g.pth")] * 2, str(tmp_path / "twice.safetensors"))


def test_quantized_model_logits_close_and_greedy_mostly_unchanged(tok):
    model = tiny_model(tok)
    ims = images(4)
    ins = ["describe this image"] * 4
    ex = [tg.make_example(tok, 3, i, "a red circle and a blue square") for i in ins]
    px = torch.stack([tg.preprocess(im, 64) for im in ims])
    with torch.no_grad():
        ref = model(ex, pixel_values=px)[0]
    before = model.generate(tok, ims, ins, stage=3, max_new_tokens=6)
    llm_bytes = int8.weight_bytes(model.llama_model)
    n = int8.quantize_int8(model)
    assert n == 4 * 4 + 1  # qkv, dense, fc1, fc2 per layer, and lm_head
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        got = model(ex, pixel_values=px)[0]
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel
    after = model.generate(tok, ims, ins, stage=3, max_new_tokens=6)
    assert sum(a == b for a, b in zip(before, after)) >= 3
    assert int8.weight_bytes(model.llama_model) < 0.6 * llm_bytes  # embeddings and norms stay in fp32


def test_user_prompts_and_unknown_tags():
    assert parse_user_prompt("[vqa] what color") == tg.instruction_for("vqa", "what color")
    assert parse_user_prompt("hello there") == "hello there"
    with pytest.raises(ValueError, match=r"unknown task tag \[foo\]"):
        parse_user_prompt("[foo] what")


# -- the command line, end to end on tiny random weights written as a user would have them


@pytest.fixture(scope="module")
def weights(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    model = tiny_model(tok, lora=False)  # the downloads: base weights, no adapters
    for part, name in ((model.llama_model, "phi2"), (model.visual_encoder, "vit"), (model.qformer, "qformer")):
        save_pretrained(part, str(d / name))
    model.add_lora()  # what stages 2-4 trained: non-zero adapters, saved in the stage checkpoint
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    tok.save(str(d / "phi2" / "tokenizer.json"))
    tg.save_checkpoint(model, str(d / "stage4.safetensors"), stage=4)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(d / "red.png")
    (d / "broken.png").write_bytes(b"\x89PNG garbage")
    return d, model


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tinygptv.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_assemble_from_downloads_equals_the_model(tok, weights):
    d, model = weights
    loaded, stage = load_model(str(d / "phi2"), str(d / "vit"), str(d / "qformer"),
                                       checkpoint=str(d / "stage4.safetensors"))
    assert stage == 4
    ex = [tg.make_example(tok, 4, "x", "y")]
    px = torch.stack([tg.preprocess(images(1)[0], 64)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ex, pixel_values=px)[0], model(ex, pixel_values=px)[0])


def test_new_stabilizers_are_reported_unless_a_stage_checkpoint_brings_them(weights, tmp_path, capsys):
    d, model = weights
    c = model.llama_model.config  # a download as microsoft/phi-2 is: no stabilizer norms
    save_pretrained(Phi2(replace(c, qk_layernorm=False, post_layernorm=False)), str(tmp_path / "phi2"))
    parts = str(tmp_path / "phi2"), str(d / "vit"), str(d / "qformer")
    capsys.readouterr()
    load_model(*parts)
    assert "start at weight 1, bias 0" in capsys.readouterr().out  # untrained: said
    loaded, _ = load_model(*parts, checkpoint=str(d / "stage4.safetensors"))
    assert "stabilizer" not in capsys.readouterr().out  # trained ones arrive from the checkpoint
    trained = model.llama_model.layers[0].self_attn.q_layernorm.weight
    assert not torch.equal(trained, torch.ones_like(trained))  # (the fixture's norms are not the fresh ones)
    assert torch.equal(loaded.llama_model.layers[0].self_attn.q_layernorm.weight, trained)


def test_cli_errors_are_one_line(weights):
    d, _ = weights
    real = ["--phi2", str(d / "phi2"), "--blip2", str(d / "vit"), "--qformer", str(d / "qformer"), "--checkpoint", str(d / "stage4.safetensors")]
    cases = [
        (["--image", str(d / "missing.png"), "--prompt", "[vqa] hi"] + real, "image not found"),
        (["--image", str(d / "broken.png"), "--prompt", "[vqa] hi"] + real, "cannot read image"),
        (["--image", str(d / "red.png"), "--prompt", "[vqa] hi", "--phi2", str(d / "nope"), "--blip2", str(d / "vit"),
          "--checkpoint", str(d / "stage4.safetensors")], "nope"),
        (["--image", str(d / "red.png"), "--prompt", "[bogus] hi"] + real, "unknown task tag"),
        (["--image", str(d / "red.png"), "--prompt", "[vqa] " + "circle " * 600] + real, "exceeds the context"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        err = r.stderr.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err, err


def test_cli_answers_from_real_weights_and_int8(weights):
    d, _ = weights
    real = ["--phi2", str(d / "phi2"), "--blip2", str(d / "vit"), "--qformer", str(d / "qformer"), "--checkpoint", str(d / "stage4.safetensors")]
    for extra in ([], ["--int8"]):
        r = cli("--image", str(d / "red.png"), "--prompt", "[vqa] what color", "--max-new-tokens", "4", *real, *extra)
        assert r.returncode == 0, r.stderr


def test_from_pretrained_assembles_the_downloads_as_transformers_saves_them(tmp_path):
    # the core's own loader, for the canonical layout: a Phi-2 and a BLIP-2 directory as transformers
    # writes them (other layouts reach the same components through layouts.load_model)
    from phi2 import Phi2Config
    from test_qformer import make_reference, ref_queries
    ref = make_reference(str(tmp_path / "blip2"))
    torch.manual_seed(0)
    save_pretrained(Phi2(Phi2Config.tiny()), str(tmp_path / "phi2"))
    model, stage = tg.from_pretrained(str(tmp_path / "phi2"), str(tmp_path / "blip2"))
    assert stage == 0 and model.config.llm.qk_layernorm and model.config.llm.post_layernorm
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = ref.vision_model(pixel_values=px).last_hidden_state  # after post_layernorm = ln_vision
        torch.testing.assert_close(model.visual_encoder(px), image)
        torch.testing.assert_close(model.encode_queries(px), ref_queries(ref, image))
