"""What vit.py promises, checked against transformers' Blip2VisionModel as the independent reference.

Every reference is a tiny random BLIP-2 (a Blip2ForConditionalGeneration or Blip2Model with a tiny
OPT language model) with EVERY parameter re-randomized: Blip2VisionConfig's initializer_range of
1e-10 would leave a model of near-zeros that any code matches. Eager attention, eval mode, written
with its own save_pretrained and read back with layouts.load_vit, which hands it to vit.py's loader. Nothing is
downloaded. The LAVIS-named files are made here by a rename written independently of vit.py's.
"""

import copy
import json
import os
import re
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Model, Blip2VisionConfig,
                          Blip2VisionModel, OPTConfig)

import fastpaths
from fastpaths import float32_blocks
from layouts import config_from_lavis_shapes, load_vit, save_pretrained
from vit import VisionConfig, VisionTransformer


def randomize_(model, seed):
    """Every parameter non-trivial: LayerNorm weights ~1 + noise, biases and matrices noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"(layer_?norm|LayerNorm)\d?\.weight$", name):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)  # also class/position embeddings and query tokens


def make_reference(directory, hidden=48, heads=4, layers=2, mlp=100, image=32, patch=8, cls=Blip2ForConditionalGeneration,
                   seed=0):
    """A random transformers BLIP-2 saved to `directory`; returns it in eval mode."""
    vision = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=mlp,
                  image_size=image, patch_size=patch)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   encoder_hidden_size=hidden, vocab_size=64)
    text = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                     word_embed_proj_dim=16, max_position_embeddings=64).to_dict()
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                      attn_implementation="eager")
    ref = cls(cfg)
    randomize_(ref, seed)
    ref.save_pretrained(directory)
    return ref.eval()


def pixels(B=2, H=32, W=None, seed=1):
    return torch.randn(B, 3, H, W or H, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(reference, its directory, our model loaded from it): width 48, 4 heads of 12, 32 px, patch 8."""
    d = str(tmp_path_factory.mktemp("blip2"))
    ref = make_reference(d)
    return ref, d, load_vit(d).eval()


# -----------------------------------------------------------------------------
# Parity with transformers


def test_matches_transformers_last_hidden_state(tiny):
    ref, _, model = tiny
    x = pixels()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1 + 4 * 4, 48)  # CLS + a 4x4 patch grid
        torch.testing.assert_close(out, ref.vision_model(x).last_hidden_state)


def test_config_read_from_the_blip2_directory(tiny):
    _, _, model = tiny
    assert model.config == VisionConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=100, layer_norm_eps=1e-6,
                                        ln_vision_eps=1e-6)  # transformers' post_layernorm eps


def test_the_k_bias_has_no_effect(tiny):
    # The reference's qkv.bias is random in all three thirds, k included; we keep only q and v, yet
    # the outputs above agree: adding q.b_k to a whole row of scores leaves the softmax unchanged.
    ref, _, model = tiny
    D = 48
    k_bias = ref.vision_model.encoder.layers[0].self_attn.qkv.bias[D:2 * D]
    assert k_bias.abs().min() > 0
    qkv_bias = ref.vision_model.encoder.layers[0].self_attn.qkv.bias
    torch.testing.assert_close(model.blocks[0].attn.q_bias, qkv_bias[:D], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[0].attn.v_bias, qkv_bias[2 * D:], rtol=0, atol=0)


def test_bf16_tower_computes_its_blocks_in_float32(tiny):
    # bf16 weights widened block by block: the same as the reference's blocks in float32 with the
    # weights rounded to bf16, to float32 precision (bf16 arithmetic would be off by about 1e-2)
    ref, _, model = tiny
    rounded = copy.deepcopy(ref).to(torch.bfloat16).float()
    h = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = float32_blocks(copy.deepcopy(model).to(torch.bfloat16)).blocks_in_float32(h)
        expected = rounded.vision_model.encoder(inputs_embeds=h).last_hidden_state
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_inference_attention_matches_transformers(tiny):
    # fastpaths.inference_attention (every answering command's tower) in float32: torch's fused kernel in
    # place of the written-out softmax, held against the reference as vit.py is
    ref, _, model = tiny
    fused = fastpaths.inference_attention(copy.deepcopy(model))
    assert all(type(b.attn) is fastpaths.InferenceAttention for b in fused.blocks)
    with torch.no_grad():
        x = pixels()
        torch.testing.assert_close(fused(x), ref.vision_model(x).last_hidden_state)
        x = pixels(H=64)  # 81 tokens, the position embedding resized: against vit.py's written-out attention
        torch.testing.assert_close(fused(x), model(x))


def test_inference_attention_head_by_head_in_bf16(tiny):
    # On a CPU in bf16 the attention is computed one head at a time: held against vit.py's written-out
    # attention in float32 and in bf16. The tiny model's scores are near 0 (every softmax near uniform, so a
    # wrong scale would pass): its q, k and v weights are scaled up first, to make the attention peaked.
    _, _, model = tiny
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        for block in peaked.blocks:
            block.attn.qkv.weight.mul_(4)
    bf16 = copy.deepcopy(peaked).to(torch.bfloat16)
    heads = fastpaths.inference_attention(copy.deepcopy(bf16))
    x = pixels()
    with torch.no_grad():
        out = heads(x.bfloat16()).float()
        expected = peaked(x)
        written_out = bf16(x.bfloat16()).float()
    # written out in bf16: 0.7% from float32 here; head by head with the scale off by 10%: 4.4%
    assert (out - expected).norm() / expected.norm() < 1.5e-2
    assert (out - written_out).norm() / written_out.norm() < 1.5e-2


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_tower_on_the_cpu_takes_float32_blocks_only_without_fast_bf16(tiny, monkeypatch, fast_bf16):
    ref, _, model = tiny
    model = float32_blocks(copy.deepcopy(model).to(torch.bfloat16))
    monkeypatch.setattr(fastpaths, "CPU_BF16_MATMUL", fast_bf16)
    calls = []
    widen = model.blocks_in_float32
    monkeypatch.setattr(model, "blocks_in_float32", lambda x: calls.append(x.dtype) or widen(x))
    rounded = copy.deepcopy(ref).to(torch.bfloat16).float()
    x = pixels()
    with torch.no_grad():
        out = model(x)
        expected = rounded.vision_model(x).last_hidden_state
    assert calls == ([] if fast_bf16 else [torch.bfloat16])
    assert out.dtype == torch.bfloat16  # what the bf16 Q-Former takes
    torch.testing.assert_close(out.float(), expected, rtol=0.03, atol=0.03)


@pytest.mark.parametrize("cls", [Blip2ForConditionalGeneration, Blip2Model])
@pytest.mark.parametrize("hidden,heads", [(40, 4), (176, 2)])  # head dims 10 and 88 (ViT-g's)
def test_head_dims_that_are_not_powers_of_two(tmp_path, cls, hidden, heads):
    ref = make_reference(str(tmp_path), hidden=hidden, heads=heads, mlp=3 * hidden, cls=cls, seed=2)
    model = load_vit(str(tmp_path)).eval()
    assert model.config.head_dim == hidden // heads
    x = pixels(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.vision_model(x).last_hidden_state)


@pytest.mark.parametrize("H,W", [(64, 64), (48, 48), (64, 40), (16, 64), (16, 16)])
def test_other_image_sizes_resize_the_position_embedding(tiny, H, W):
    # Trained at 32 px (a 4x4 grid), run at 64 px (8x8) as stage 4 runs 224 -> 448, and at sizes
    # between, non-square and smaller: bicubic resizing as in interpolate_pos_encoding=True.
    ref, _, model = tiny
    x = pixels(H=H, W=W, seed=4)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1 + (H // 8) * (W // 8), 48)
        torch.testing.assert_close(out, ref.vision_model(x, interpolate_pos_encoding=True).last_hidden_state)


def test_image_size_not_a_multiple_of_the_patch_is_an_error(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="30x32 is not a multiple of the patch size 8"):
        model(pixels(H=30, W=32))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        model(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        VisionConfig.tiny(image_size=30)


def test_real_widths_match_transformers(tmp_path):
    # ViT-g's real block (width 1408, 16 heads of 88, MLP 6144, patch 14, 224 px: 257 tokens), one of
    # them, from a transformers Blip2VisionModel directory; the whole tower is checked on meta below.
    ref = Blip2VisionModel(Blip2VisionConfig(num_hidden_layers=1, attn_implementation="eager"))
    randomize_(ref, 5)
    ref.save_pretrained(str(tmp_path))
    model = load_vit(str(tmp_path)).eval()
    assert model.config == VisionConfig.eva_vit_g(num_hidden_layers=1, ln_vision_eps=1e-6)
    x = pixels(B=1, H=224, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x).last_hidden_state)


def test_full_size_tower_on_meta_has_the_reference_shapes():
    with torch.device("meta"):  # how bench.py and tinygptv.py build it: no memory
        model = VisionTransformer(VisionConfig.eva_vit_g())
        ref = Blip2VisionModel(Blip2VisionConfig())
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    theirs = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert len(model.blocks) == 39 and ours["pos_embed"] == (1, 257, 1408)
    assert ours["blocks.0.attn.qkv.weight"] == (4224, 1408) and ours["blocks.0.mlp.fc1.weight"] == (6144, 1408)
    # the same parameter count once transformers' qkv.bias (3D) stands for our q_bias + v_bias (2D)
    assert sum(map(_numel, ours.values())) + 39 * 1408 == sum(map(_numel, theirs.values())) == 985_952_256


def _numel(shape):
    return torch.Size(shape).numel()


# -----------------------------------------------------------------------------
# LAVIS names


def to_lavis(ref_state):
    """transformers BLIP-2 state dict -> LAVIS names, written out here independently of vit.py."""
    renames = [(r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
               (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
               (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
               (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
               (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"visual_encoder.blocks.\1.attn.qkv.weight"),
               (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
               (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
               (r"^vision_model\.post_layernorm\.", "ln_vision.")]
    out = {}
    for k, v in ref_state.items():
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", k)
        if m:
            q, _, vb = v.chunk(3)
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q.clone()
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = vb.clone()
            continue
        for pattern, repl in renames:
            if re.search(pattern, k):
                out[re.sub(pattern, repl, k)] = v.clone()
                break
    # the rest of a BLIP-2 / MiniGPT-4 checkpoint, which the ViT leaves alone
    out["query_tokens"] = torch.zeros(1, 4, 32)
    out["Qformer.bert.embeddings.LayerNorm.weight"] = torch.ones(32)
    out["llama_proj.weight"] = torch.zeros(8, 32)
    return out


def test_lavis_file_loads_to_identical_outputs(tiny, tmp_path, capsys):
    ref, _, model = tiny
    file = str(tmp_path / "blip2_lavis.safetensors")
    save_file(to_lavis(ref.state_dict()), file)
    lavis = load_vit(file, num_attention_heads=4).eval()
    assert lavis.config.ln_vision_eps == 1e-5 and lavis.config.layer_norm_eps == 1e-6  # LAVIS's eps
    assert lavis.config == VisionConfig(**{**asdict(model.config), "ln_vision_eps": 1e-5})
    same_eps = load_vit(file, num_attention_heads=4, ln_vision_eps=1e-6).eval()
    x = pixels(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(same_eps(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(lavis(x), model(x), rtol=1e-3, atol=1e-3)  # only ln_vision's eps differs
    assert "40 blocks" not in capsys.readouterr().out


def test_lavis_file_needs_the_head_count_unless_it_is_vit_g(tiny, tmp_path):
    ref, _, _ = tiny
    file = str(tmp_path / "lavis.safetensors")
    save_file(to_lavis(ref.state_dict()), file)
    with pytest.raises(ValueError, match="pass num_attention_heads="):
        load_vit(file)


def test_lavis_shapes_of_the_released_eva_vit_g_mean_the_real_config():
    shapes = {"visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14), "visual_encoder.pos_embed": (1, 257, 1408),
              "visual_encoder.blocks.0.mlp.fc1.weight": (6144, 1408)}
    shapes.update({f"visual_encoder.blocks.{i}.norm1.weight": (1408,) for i in range(40)})
    assert VisionConfig(**config_from_lavis_shapes(shapes)) == VisionConfig.eva_vit_g()


def test_forty_block_eva_file_loads_its_first_39(tmp_path, capsys):
    full = VisionTransformer(VisionConfig.tiny(num_hidden_layers=40))
    randomize_(full, 8)
    file = str(tmp_path / "eva_vit_g.safetensors")
    sd = {("" if k.startswith("ln_vision") else "visual_encoder.") + k: v for k, v in full.state_dict().items()}
    save_file(sd, file)
    model = load_vit(file, num_attention_heads=4)
    assert "40 blocks" in capsys.readouterr().out
    assert len(model.blocks) == 39 and model.config.num_hidden_layers == 39
    full.blocks = full.blocks[:39]  # BLIP-2: the penultimate block's features
    loaded, expected = model.state_dict(), full.state_dict()
    assert loaded.keys() == expected.keys()
    for k in expected:  # the same tensors, so the same outputs (a 39-block forward is slow to test here)
        torch.testing.assert_close(loaded[k], expected[k], rtol=0, atol=0)
    # asked for explicitly, all 40 load
    assert len(load_vit(file, num_attention_heads=4, num_hidden_layers=40).blocks) == 40


# -----------------------------------------------------------------------------
# Our own directories


def test_save_pretrained_round_trip(tiny, tmp_path):
    _, _, model = tiny
    d = str(tmp_path / "vit")
    save_pretrained(model, d)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # no temporary files left
    assert json.load(open(os.path.join(d, "config.json"))) == asdict(model.config)
    again = load_vit(d).eval()
    assert again.config == model.config
    x = pixels(seed=10)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    half = load_vit(d, dtype=torch.bfloat16)
    assert half.pos_embed.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(half(x).float(), model(x), rtol=0.1, atol=0.1)


def test_sharded_blip2_directory(tiny, tmp_path):
    ref, _, model = tiny
    ref.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    sharded = load_vit(str(tmp_path)).eval()
    x = pixels(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(sharded(x), model(x), rtol=0, atol=0)


def test_tiny_preset_and_config_json():
    c = VisionConfig.tiny(hidden_size=96)
    assert (c.image_size, c.patch_size, c.hidden_size, c.head_dim) == (32, 8, 96, 24)
    assert VisionConfig(**json.loads(json.dumps(asdict(c)))) == c
    model = VisionTransformer(c)
    assert model(pixels(B=1)).shape == (1, 17, 96)


# -----------------------------------------------------------------------------
# Bad checkpoints: one-line errors naming what is wrong


def broken_copy(src, dst, edit):
    """Copy a BLIP-2 directory, applying edit(state dict) to its weights."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    return dst


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_missing_tensor(tiny, tmp_path):
    _, src, _ = tiny
    d = broken_copy(src, str(tmp_path / "d"), lambda sd: sd.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(ValueError, match="missing tensor 'vision_model.encoder.layers.1.mlp.fc2.bias'") as e:
        load_vit(d)
    one_line(e)


def test_unexpected_tensor(tiny, tmp_path):
    _, src, _ = tiny
    d = broken_copy(src, str(tmp_path / "d"),
                    lambda sd: sd.update({"vision_model.encoder.layers.2.layer_norm1.weight": torch.ones(48)}))
    with pytest.raises(ValueError, match="unexpected tensor 'vision_model.encoder.layers.2.layer_norm1.weight'") as e:
        load_vit(d)
    one_line(e)


def test_wrong_shape(tiny, tmp_path):
    _, src, _ = tiny
    key = "vision_model.embeddings.position_embedding"
    d = broken_copy(src, str(tmp_path / "d"), lambda sd: sd.update({key: torch.zeros(1, 26, 48)}))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(1, 26, 48\), expected \(1, 17, 48\)") as e:
        load_vit(d)
    one_line(e)


def test_truncated_file(tiny, tmp_path):
    _, src, _ = tiny
    d = str(tmp_path / "d")
    shutil.copytree(src, d)
    file = os.path.join(d, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors") as e:
        load_vit(d)
    one_line(e)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vit(str(tmp_path / "nowhere"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vit(str(tmp_path))
    with pytest.raises(ValueError, match="missing tensor 'visual_encoder.patch_embed.proj.weight'"):
        load_vit(str(tmp_path / "model.safetensors"))


def test_raw_eva_file_without_ln_vision_is_refused(tmp_path):
    model = VisionTransformer(VisionConfig.tiny())
    file = str(tmp_path / "eva.safetensors")
    save_file({"visual_encoder." + k: v for k, v in model.state_dict().items() if not k.startswith("ln_vision")}, file)
    with pytest.raises(ValueError, match="missing tensor 'ln_vision.weight'"):
        load_vit(file, num_attention_heads=4)


def test_unknown_override(tiny):
    _, src, _ = tiny
    with pytest.raises(ValueError, match="unknown VisionConfig fields in overrides: hidden"):
        load_vit(src, hidden=3)
