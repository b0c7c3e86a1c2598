"""What qformer.py promises, checked against transformers' BLIP-2 Q-Former as the independent reference.

Every reference is a tiny random transformers BLIP-2 (a Blip2ForConditionalGeneration or Blip2Model
with a tiny OPT as its language model) with EVERY parameter re-randomized: BLIP-2 configs draw
some weights with initializer_range 1e-10 and leave LayerNorms at 1 / 0 and the query tokens at 0,
so an untouched reference would be nearly constant and any parity test would pass. Eager attention,
eval mode, written with its own save_pretrained and read back with layouts.load_qformer, which hands it to qformer.py's loader. The
reference output is `qformer(query_tokens, image).last_hidden_state`. Nothing is downloaded.
"""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Model, Blip2QFormerConfig,
                          Blip2QFormerModel)

from layouts import load_qformer, save_pretrained
from qformer import QFormer, QFormerConfig

IMAGE_TOKENS = 17  # a 56 px image in 14 px patches: 4 x 4 + CLS


def randomize(model, seed):
    """Non-trivial values for every parameter: norms' weights around 1, everything else noise.
    Uniform, drawn in place: the cheapest draw at BLIP-2's real widths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.uniform_(0.6, 1.4, generator=g)
            else:
                a = 0.2 if p.dim() == 1 else 0.09  # std 0.12 / 0.05
                p.uniform_(-a, a, generator=g)


def blip2_config(cfg: QFormerConfig, text_input=False):
    """A transformers Blip2Config whose Q-Former is `cfg`; the vision tower's width is
    cfg.encoder_hidden_size (Blip2Config copies it into qformer_config), the LM a tiny OPT."""
    return Blip2Config(
        vision_config=dict(hidden_size=cfg.encoder_hidden_size, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=56, patch_size=14),
        qformer_config=dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                            cross_attention_frequency=cfg.cross_attention_frequency,
                            use_qformer_text_input=text_input),
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16),
        num_query_tokens=cfg.num_query_tokens, attn_implementation="eager")


def make_reference(directory, cfg=None, model_class=Blip2ForConditionalGeneration, text_input=False, seed=0):
    """A random transformers BLIP-2 saved to `directory`; returns it in eval mode."""
    torch.manual_seed(seed)
    ref = model_class(blip2_config(cfg or QFormerConfig.tiny(), text_input))
    randomize(ref, seed)
    ref.save_pretrained(directory)
    return ref.eval()


def ref_queries(ref, image_embeds, image_attention_mask=None):
    """The reference Q-Former's output for the checkpoint's own query tokens."""
    queries = ref.query_tokens.expand(image_embeds.shape[0], -1, -1)
    return ref.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=image_attention_mask).last_hidden_state


def images(cfg, B=2, S=IMAGE_TOKENS, seed=1):
    return torch.randn(B, S, cfg.encoder_hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """(reference, its directory, our model loaded from it): tiny config, no text branch."""
    d = str(tmp_path_factory.mktemp("blip2"))
    ref = make_reference(d)
    return ref, d, load_qformer(d).eval()


# -----------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("cfg", [
    QFormerConfig.tiny(),  # head dim 12; cross-attention on layers 0 and 2 of 3
    QFormerConfig.tiny(hidden_size=60, num_attention_heads=6, num_hidden_layers=4, cross_attention_frequency=3,
                       num_query_tokens=5, encoder_hidden_size=24),  # head dim 10; cross on 0 and 3
], ids=["hd12", "hd10-freq3"])
def test_outputs_match_transformers(tmp_path, cfg):
    ref = make_reference(str(tmp_path), cfg)
    model = load_qformer(str(tmp_path)).eval()
    assert model.config == cfg  # read from the Blip2Config's qformer_config and num_query_tokens
    x = images(cfg)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, cfg.num_query_tokens, cfg.hidden_size)
        torch.testing.assert_close(out, ref_queries(ref, x))


def test_cross_attention_every_second_layer_from_zero(blip2):
    _, _, model = blip2
    assert [layer.has_cross_attention for layer in model.layers] == [True, False, True]
    assert [hasattr(layer, "crossattention") for layer in model.layers] == [True, False, True]
    assert model.layers[0].crossattention.key.weight.shape == (48, 40)  # image width 40 -> 48


def test_blip2_model_image_to_queries(tmp_path):
    # The whole BLIP-2 path: the reference's own get_qformer_features(pixels) equals our Q-Former on
    # the reference's vision output; a Blip2Model directory loads like a Blip2ForConditionalGeneration one.
    ref = make_reference(str(tmp_path), model_class=Blip2Model)
    model = load_qformer(str(tmp_path)).eval()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        image_embeds = ref.vision_model(pixels).last_hidden_state  # (2, 17, 40)
        expected = ref.get_qformer_features(pixels)
        expected = getattr(expected, "last_hidden_state", expected)  # an output object before transformers 5
        torch.testing.assert_close(model(image_embeds), expected)


def test_image_attention_mask_matches_transformers(blip2):
    ref, _, model = blip2
    x = images(model.config)
    mask = torch.ones(2, IMAGE_TOKENS, dtype=torch.long)
    mask[1, 11:] = 0  # the second image has 6 padding tokens
    with torch.no_grad():
        out = model(x, mask)
        torch.testing.assert_close(out, ref_queries(ref, x, mask))
        # padding is as if absent: the second image's queries equal those for its 11 real tokens
        torch.testing.assert_close(out[1:], model(x[1:, :11]))
        assert not torch.allclose(out[1:], model(x[1:]))


def test_queries_are_per_image(blip2):
    # the same learned queries for every image: a row's output does not depend on the batch
    _, _, model = blip2
    x = images(model.config, B=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]))


def test_real_widths_match_transformers(tmp_path):
    # BLIP-2's own widths (768 wide, 12 heads of 64, FFN 3072, 32 queries, a 1408-wide image of 257
    # tokens), 4 of the 12 layers to keep CPU time low: a transformers Blip2QFormerModel and query
    # tokens, saved under the names and in the config.json a BLIP-2 directory has
    cfg = QFormerConfig.blip2(num_hidden_layers=4)
    with torch.device("meta"):  # randomize() sets every parameter: skip transformers' own init
        ref = Blip2QFormerModel(Blip2QFormerConfig(num_hidden_layers=4, attn_implementation="eager"))
    ref.to_empty(device="cpu")
    randomize(ref, 0)
    ref.eval()
    query_tokens = 0.5 * torch.randn(1, 32, 768, generator=torch.Generator().manual_seed(1))
    Blip2Config(qformer_config=ref.config.to_dict(), num_query_tokens=32).to_json_file(str(tmp_path / "config.json"))
    save_file({"query_tokens": query_tokens, **{"qformer." + k: v for k, v in ref.state_dict().items()}},
              str(tmp_path / "model.safetensors"))
    model = load_qformer(str(tmp_path)).eval()
    assert model.config == cfg
    x = torch.randn(2, 257, 1408, generator=torch.Generator().manual_seed(2))  # 224 px: 16 x 16 patches + CLS
    with torch.no_grad():
        expected = ref(query_embeds=query_tokens.expand(2, -1, -1), encoder_hidden_states=x).last_hidden_state
        torch.testing.assert_close(model(x), expected)


# -----------------------------------------------------------------------------
# The text branch and LAVIS names


def test_transformers_text_branch_is_skipped_with_one_line(tmp_path, capsys):
    # use_qformer_text_input makes transformers write the text FFN (intermediate / output) of each layer
    ref = make_reference(str(tmp_path), text_input=True)
    keys = load_file(str(tmp_path / "model.safetensors"))
    assert "qformer.encoder.layer.0.intermediate.dense.weight" in keys
    model = load_qformer(str(tmp_path)).eval()
    report = capsys.readouterr().out.strip().splitlines()
    assert len(report) == 1 and "skipped 18 text-branch tensors" in report[0]  # 3 layers x 6
    x = images(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_queries(ref, x))


def transformers_to_lavis(state):
    """transformers BLIP-2 names -> LAVIS names, written here independently of qformer.py."""
    out = {}
    for k, v in state.items():
        if k == "query_tokens":
            out[k] = v
        elif k.startswith("qformer.layernorm."):
            out["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("qformer.encoder.layer."):
            # attention.attention.query -> attention.self.query; crossattention.attention -> crossattention.self
            out[k.replace("qformer.encoder.", "Qformer.bert.encoder.").replace("attention.attention.",
                                                                              "attention.self.")] = v
    return out


def lavis_file(blip2, directory):
    """The reference's Q-Former as a MiniGPT-4-style LAVIS file: LAVIS names, the text branch LAVIS
    keeps (embeddings, text FFN, LM head), and other parts (ViT, ln_vision, llama_proj)."""
    ref, d, model = blip2
    cfg = model.config
    state = transformers_to_lavis(load_file(os.path.join(d, "model.safetensors")))
    C, I = cfg.hidden_size, cfg.intermediate_size
    text = {"Qformer.bert.embeddings.word_embeddings.weight": torch.randn(50, C),
            "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(20, C),
            "Qformer.bert.embeddings.position_ids": torch.arange(20)[None],
            "Qformer.cls.predictions.bias": torch.randn(50),
            "Qformer.cls.predictions.transform.dense.weight": torch.randn(C, C)}
    for i in range(cfg.num_hidden_layers):
        p = f"Qformer.bert.encoder.layer.{i}."
        text.update({p + "intermediate.dense.weight": torch.randn(I, C), p + "intermediate.dense.bias": torch.randn(I),
                     p + "output.dense.weight": torch.randn(C, I), p + "output.dense.bias": torch.randn(C),
                     p + "output.LayerNorm.weight": torch.randn(C), p + "output.LayerNorm.bias": torch.randn(C)})
    others = {"visual_encoder.cls_token": torch.randn(1, 1, cfg.encoder_hidden_size),
              "ln_vision.weight": torch.randn(cfg.encoder_hidden_size), "llama_proj.weight": torch.randn(8, C)}
    path = os.path.join(directory, "blip2_lavis.safetensors")
    save_file({**state, **text, **others}, path)
    return path, len(text)


def test_lavis_names_load_to_identical_outputs(blip2, tmp_path, capsys):
    _, _, model = blip2
    path, n_text = lavis_file(blip2, str(tmp_path))
    capsys.readouterr()
    # no config.json beside a LAVIS file: the sizes come as overrides (real BLIP-2 needs none)
    lavis = load_qformer(path, **dataclasses.asdict(model.config)).eval()
    report = capsys.readouterr().out.strip().splitlines()
    assert len(report) == 1 and f"skipped {n_text} text-branch tensors" in report[0] and path in report[0]
    for (name, ours), (name2, theirs) in zip(model.state_dict().items(), lavis.state_dict().items()):
        assert name == name2 and torch.equal(ours, theirs), name
    x = images(model.config)
    with torch.no_grad():
        assert torch.equal(lavis(x), model(x))


def test_lavis_file_without_config_is_real_blip2(blip2, tmp_path):
    # a LAVIS file with no config.json beside it is taken as BLIP-2's real sizes; a tiny one then
    # fails on its first tensor, by name and shape, rather than loading wrongly
    path, _ = lavis_file(blip2, str(tmp_path))
    with pytest.raises(ValueError, match=r"'query_tokens' has shape \(1, 8, 48\), expected \(1, 32, 768\)"):
        load_qformer(path)


# -----------------------------------------------------------------------------
# Config, construction, our own checkpoints


def test_config_presets_and_json():
    c = QFormerConfig.blip2()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.encoder_hidden_size,
            c.num_query_tokens, c.cross_attention_frequency, c.layer_norm_eps) == (768, 12, 12, 3072, 1408, 32, 2,
                                                                                    1e-12)
    assert c.head_dim == 64
    t = QFormerConfig.tiny(num_query_tokens=4)
    assert t.num_query_tokens == 4 and t.head_dim == 12
    assert QFormerConfig(**json.loads(json.dumps(dataclasses.asdict(t)))) == t
    with pytest.raises(ValueError, match="not a multiple of 5 heads"):
        QFormerConfig.tiny(num_attention_heads=5)


def test_full_size_on_meta_matches_transformers_parameter_count():
    with torch.device("meta"):
        model = QFormer(QFormerConfig.blip2())
        ref = Blip2QFormerModel(Blip2QFormerConfig())  # no text branch: use_qformer_text_input False
    assert model.query_tokens.shape == (1, 32, 768) and model.query_tokens.is_meta
    assert [i for i, layer in enumerate(model.layers) if layer.has_cross_attention] == [0, 2, 4, 6, 8, 10]
    assert model.layers[0].crossattention.value.weight.shape == (768, 1408)
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) + 32 * 768 == 105_162_240


def test_save_pretrained_round_trip(blip2, tmp_path):
    _, _, model = blip2
    d = str(tmp_path / "ours")
    save_pretrained(model, d)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # no temporary files left
    assert QFormerConfig(**json.load(open(os.path.join(d, "config.json")))) == model.config
    again = load_qformer(d).eval()
    x = images(model.config)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    half = load_qformer(d, dtype=torch.bfloat16)
    assert half.query_tokens.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(half(x.bfloat16()).float(), model(x), atol=0.1, rtol=0.05)


# -----------------------------------------------------------------------------
# Bad checkpoints: one-line errors that name the tensor or file


def broken_copy(blip2, directory, edit):
    """The reference directory with its model.safetensors edited by edit(dict)."""
    _, d, _ = blip2
    state = load_file(os.path.join(d, "model.safetensors"))
    edit(state)
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(d, "config.json")) as f, open(os.path.join(directory, "config.json"), "w") as g:
        g.write(f.read())
    return directory


L1 = "qformer.encoder.layer.1."


@pytest.mark.parametrize("edit, error, message", [
    (lambda s: s.pop(L1 + "output_query.dense.bias"), ValueError, f"missing tensor '{L1}output_query.dense.bias'"),
    # cross-attention on layer 1: a checkpoint made with cross_attention_frequency 1
    (lambda s: s.update({L1 + "crossattention.attention.query.weight": torch.zeros(48, 48)}), ValueError,
     f"unexpected tensor '{L1}crossattention.attention.query.weight'"),
    (lambda s: s.update(query_tokens=torch.zeros(1, 9, 48)), ValueError,
     r"'query_tokens' has shape \(1, 9, 48\), expected \(1, 8, 48\)"),
], ids=["missing", "extra", "shape"])
def test_bad_tensors_are_named(blip2, tmp_path, edit, error, message):
    d = broken_copy(blip2, str(tmp_path / "bad"), edit)
    with pytest.raises(error, match=message) as e:
        load_qformer(d)
    assert "\n" not in str(e.value)


def test_bad_files_are_named(blip2, tmp_path):
    _, d, _ = blip2
    truncated = broken_copy(blip2, str(tmp_path / "truncated"), lambda s: None)
    f = os.path.join(truncated, "model.safetensors")
    with open(f, "r+b") as h:
        h.truncate(os.path.getsize(f) // 2)
    cases = [(truncated, ValueError, f),
             (str(tmp_path / "nowhere"), FileNotFoundError, str(tmp_path / "nowhere")),
             (str(tmp_path), FileNotFoundError, os.path.join(str(tmp_path), "config.json"))]
    for path, error, named in cases:
        with pytest.raises(error) as e:
            load_qformer(path)
        assert named in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="unknown QFormerConfig fields in overrides: hiden_size"):
        load_qformer(d, hiden_size=64)
