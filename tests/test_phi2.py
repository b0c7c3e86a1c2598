"""What phi2.py promises, checked against transformers' PhiForCausalLM as the independent reference.

Every reference is a tiny random PhiForCausalLM with EVERY parameter re-randomized (LayerNorm
weights ~1 + noise, biases noise, matrices N(0, 0.05)), eager attention, eval mode, written with
its own save_pretrained and read back with Phi2.from_pretrained. Nothing is downloaded.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PhiConfig, PhiForCausalLM

from fastpaths import CUDAGraphDecoder
from layouts import load_phi2, save_pretrained
from phi2 import KVCache, Phi2, RMSNorm

VOCAB = 256


def make_reference(directory, hidden=64, heads=4, layers=2, intermediate=128, qk_layernorm=False, seed=0):
    """A random transformers Phi saved to `directory`; returns it in eval mode."""
    torch.manual_seed(seed)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                    intermediate_size=intermediate, partial_rotary_factor=0.4,  # 5.x defaults to 0.5
                    qk_layernorm=qk_layernorm, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.1, attn_implementation="eager")
    ref = PhiForCausalLM(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    ref.save_pretrained(directory)
    return ref.eval()


def ref_greedy(ref, ids, n, **kw):
    """The reference's own generate, greedy, never stopping early."""
    # an explicit all-ones mask: otherwise transformers treats every id equal to pad_token_id as padding
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, eos_token_id=None, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(reference, its directory, our model loaded from it), stabilizers off."""
    d = str(tmp_path_factory.mktemp("plain"))
    ref = make_reference(d)
    return ref, d, Phi2.from_pretrained(d).eval()


def ids_for(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_logits_match_transformers(tmp_path, qk_layernorm):
    ref = make_reference(str(tmp_path), qk_layernorm=qk_layernorm)
    model = Phi2.from_pretrained(str(tmp_path)).eval()
    assert model.config.qk_layernorm == qk_layernorm
    assert hasattr(model.layers[0].self_attn, "q_layernorm") == qk_layernorm
    ids = ids_for(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits)


def test_partial_rotary_where_it_is_not_half_the_head(tmp_path):
    # head_dim 20: int(0.4 * 20) = 8 rotary dims, not 10. The config.json written by transformers 5
    # keeps partial_rotary_factor inside rope_parameters; it must still be read.
    ref = make_reference(str(tmp_path), hidden=80, heads=4)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved.get("rope_parameters", saved).get("partial_rotary_factor") == 0.4
    model = Phi2.from_pretrained(str(tmp_path)).eval()
    assert (model.config.head_dim, model.config.rotary_dim) == (20, 8)
    ids = ids_for(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits)


def test_real_phi2_widths(tmp_path):
    # hidden 2560, 32 heads of 80, RoPE on 32 dims: microsoft/phi-2's attention shapes (1 layer,
    # small vocab and MLP to stay fast; the full 10240 MLP at 2 layers was checked by hand).
    ref = make_reference(str(tmp_path), hidden=2560, heads=32, layers=1, intermediate=512)
    model = Phi2.from_pretrained(str(tmp_path)).eval()
    assert (model.config.head_dim, model.config.rotary_dim) == (80, 32)
    ids = ids_for(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits)


def test_right_padded_batch(plain):
    ref, _, model = plain
    ids, lengths = ids_for(3, 16), [16, 11, 5]
    mask = torch.zeros(3, 16, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        expected = ref(ids, attention_mask=mask).logits
        for b, n in enumerate(lengths):
            alone = model(ids[b:b + 1, :n])[0]
            torch.testing.assert_close(batched[b, :n], alone)
            torch.testing.assert_close(batched[b, :n], expected[b, :n])


def test_greedy_tokens_match_transformers_generate(plain):
    ref, _, model = plain
    ids = ids_for(1, 8, seed=2)
    ours = model.generate(ids, max_new_tokens=20, stop_sequences=[])
    assert ours == ref_greedy(ref, ids, 20)
    assert len(ours[0]) == 20


@pytest.mark.parametrize("logit_shift", [0.0, -5.0], ids=["mixed-sign", "all-negative"])
def test_repetition_penalty_matches_transformers(tmp_path, logit_shift):
    # CTRL's penalty divides positive logits and multiplies negative ones: shifting every logit
    # below zero (through lm_head's bias) exercises the second half
    ref = make_reference(str(tmp_path))
    with torch.no_grad():
        ref.lm_head.bias.add_(logit_shift)
    ref.save_pretrained(str(tmp_path))
    model = Phi2.from_pretrained(str(tmp_path)).eval()
    ids = ids_for(1, 8, seed=3)
    with torch.no_grad():
        assert (model(ids).max() < 0) == (logit_shift < 0)
    ours = model.generate(ids, max_new_tokens=20, stop_sequences=[], repetition_penalty=1.5)
    assert ours == ref_greedy(ref, ids, 20, repetition_penalty=1.5)
    assert ours != model.generate(ids, max_new_tokens=20, stop_sequences=[])  # it did something


def test_explicit_position_ids_match_transformers(plain):
    ref, _, model = plain
    ids = ids_for(2, 6)
    positions = torch.tensor([[0, 1, 2, 10, 11, 30], [5, 6, 7, 8, 9, 10]])  # gaps change relative angles
    with torch.no_grad():
        ours = model(ids, position_ids=positions)
        torch.testing.assert_close(ours, ref(ids, position_ids=positions).logits)
        assert not torch.allclose(ours[0], model(ids)[0], atol=1e-3)


def test_legacy_fused_layout_loads_to_identical_logits(plain, tmp_path):
    # TinyGPT-V's transformers 4.36 layout: one query_key_value whose rows run head by head,
    # [h0: q, k, v][h1: q, k, v]..., built here from the reference's separate q/k/v.
    ref, d, model = plain
    nh, hd = ref.config.num_attention_heads, ref.config.hidden_size // ref.config.num_attention_heads
    sd = load_file(os.path.join(d, "model.safetensors"))
    for i in range(ref.config.num_hidden_layers):
        pre = f"model.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            q, k, v = (sd.pop(f"{pre}{p}_proj.{kind}") for p in "qkv")
            rows = []
            for h in range(nh):
                rows += [q[h * hd:(h + 1) * hd], k[h * hd:(h + 1) * hd], v[h * hd:(h + 1) * hd]]
            sd[f"{pre}query_key_value.{kind}"] = torch.cat(rows)
    save_file(sd, str(tmp_path / "legacy.safetensors"))
    with open(os.path.join(d, "config.json")) as src, open(tmp_path / "config.json", "w") as dst:
        dst.write(src.read())  # a single .safetensors file takes the config.json beside it
    legacy = load_phi2(str(tmp_path / "legacy.safetensors")).eval()
    ids = ids_for(2, 12)
    with torch.no_grad():
        assert torch.equal(legacy(ids), model(ids))


def test_sharded_checkpoint_with_index(tmp_path):
    ref = make_reference(str(tmp_path), seed=4)
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    model = Phi2.from_pretrained(str(tmp_path / "sharded")).eval()
    ids = ids_for(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits)


# -----------------------------------------------------------------------------
# Our own machinery: KV cache, embeddings in, generation


def test_kv_cache_equals_full_recompute(plain):
    _, _, model = plain
    ids = ids_for(2, 14)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is left-padded
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache()
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
        for t in range(6, 14):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids(plain):
    _, _, model = plain
    ids = ids_for(2, 9)
    with torch.no_grad():
        embeds = model.embed_tokens(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds), model(ids))
    assert model.generate(inputs_embeds=embeds, max_new_tokens=6, stop_sequences=[]) == \
        model.generate(ids, max_new_tokens=6, stop_sequences=[])


def test_bad_inputs_are_value_errors(plain):
    _, _, model = plain
    ids = ids_for(2, 5)
    with pytest.raises(ValueError):
        model()
    with pytest.raises(ValueError):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))


SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7)


@pytest.mark.parametrize("sampling", [dict(), SAMPLED], ids=["greedy", "sampled"])
def test_batched_left_padded_generate_equals_one_at_a_time(plain, sampling):
    _, _, model = plain
    prompts = [ids_for(1, n, seed=n)[0].tolist() for n in (9, 4, 6)]
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = torch.tensor(p), 1
    model.train()  # generate must switch dropout off by itself, and restore the mode
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, stop_sequences=[], **sampling)
    assert model.training
    model.eval()
    alone = [model.generate(torch.tensor([p]), max_new_tokens=12, stop_sequences=[], **sampling)[0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 12 for row in batched)


@pytest.mark.parametrize("sampling", [dict(), SAMPLED], ids=["greedy", "sampled"])
def test_static_cache_decodes_like_the_growing_cache(plain, sampling):
    # The fixed-size cache that CUDA graphs need (StaticKVCache, GraphedDecodeStep), run eagerly on
    # the CPU: unwritten slots hidden by the mask, positions and write slots advanced by hand.
    ref, _, model = plain
    ids = ids_for(3, 10, seed=4)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3], mask[2, :7] = 0, 0  # left padding of different lengths
    grown = model.generate(ids, attention_mask=mask, max_new_tokens=16, stop_sequences=[], **sampling)
    fixed = model.generate(ids, attention_mask=mask, max_new_tokens=16, stop_sequences=[], decoder=CUDAGraphDecoder(), **sampling)
    assert fixed == grown
    if not sampling:  # and greedy decoding equals the reference's, row 0 being unpadded
        assert fixed[:1] == ref_greedy(ref, ids[:1], 16)


def test_sampling_is_seeded_and_filters_reduce_to_greedy(plain):
    _, _, model = plain
    ids = ids_for(2, 6)
    sample = lambda **kw: model.generate(ids, max_new_tokens=15, stop_sequences=[], temperature=1.0, **kw)
    greedy = model.generate(ids, max_new_tokens=15, stop_sequences=[])
    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert sample(seed=1) != greedy
    assert sample(top_k=1, seed=3) == greedy  # only the argmax survives
    assert sample(top_p=1e-6, seed=3) == greedy  # the nucleus is the single most likely token


def test_stop_sequences_and_default_eos(plain, tmp_path):
    ref, d, model = plain
    ids = ids_for(1, 7, seed=5)
    free = model.generate(ids, max_new_tokens=12, stop_sequences=[])[0]

    def cut_at(stop):  # free-running tokens up to the first end of `stop`, stop removed
        end = next(i for i in range(len(stop), len(free) + 1) if free[i - len(stop):i] == stop)
        return free[:end - len(stop)]

    stop = free[5:7]
    assert model.generate(ids, max_new_tokens=12, stop_sequences=[[999], stop])[0] == cut_at(stop)
    eos_model = Phi2.from_pretrained(d, eos_token_id=free[3]).eval()  # eos is the stop by default
    assert eos_model.generate(ids, max_new_tokens=12)[0] == cut_at([free[3]])
    assert eos_model.generate(ids, max_new_tokens=12, stop_sequences=[])[0] == free  # [] never stops


# -----------------------------------------------------------------------------
# TinyGPT-V's stabilizers


def test_rmsnorm_matches_its_formula():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(32))
    x = 3 * torch.randn(4, 5, 32)
    x64, w64 = x.double(), norm.weight.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    torch.testing.assert_close(norm(x), expected.float())
    assert not torch.allclose(norm(x), x * norm.weight)  # it normalizes: not a plain scale
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # weight only, no bias
    # the mean of squares is taken in fp32: fp16 activations of size 300 would overflow it (300^2 > 65504)
    big = 300 * x
    out = norm.half()(big.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_fresh_stabilizers_change_output_and_are_the_only_new_params(plain, capsys):
    _, d, model = plain
    capsys.readouterr()
    tiny = Phi2.from_pretrained(d, qk_layernorm=True, post_layernorm=True).eval()
    printed = capsys.readouterr().out.strip()
    assert "\n" not in printed and "stabilizer" in printed and "weight 1, bias 0" in printed
    old, new = dict(model.named_parameters()), dict(tiny.named_parameters())
    added = sorted(set(new) - set(old))
    L = model.config.num_hidden_layers
    assert added == sorted([f"layers.{i}.self_attn.{n}_layernorm.{k}" for i in range(L) for n in "qk"
                            for k in ("weight", "bias")] + [f"layers.{i}.post_layernorm.weight" for i in range(L)])
    assert set(old) <= set(new)
    for name in added:
        assert torch.equal(new[name], torch.ones_like(new[name]) if name.endswith("weight") else
                           torch.zeros_like(new[name]))
    for name in old:
        assert torch.equal(new[name], old[name])
    hd = model.config.head_dim
    assert new["layers.0.self_attn.q_layernorm.weight"].shape == (hd,)  # one per head size, shared
    ids = ids_for(2, 10)
    with torch.no_grad():
        assert (tiny(ids) - model(ids)).abs().max() > 0.1  # freshly added norms are not the identity
        for flag in ("qk_layernorm", "post_layernorm"):  # and each of the two on its own
            one = Phi2.from_pretrained(d, **{flag: True}).eval()
            assert (one(ids) - model(ids)).abs().max() > 0.1, flag


def test_qk_layernorm_checkpoint_missing_its_norms_is_an_error(tmp_path):
    # the exception is only for norms an override turns on: a checkpoint that claims them must hold them
    make_reference(str(tmp_path), qk_layernorm=True)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_layernorm.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_layernorm.bias"):
        Phi2.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# Saving, dtypes, bad checkpoints


def test_save_pretrained_round_trip(plain, tmp_path):
    ref, d, _ = plain
    tiny = Phi2.from_pretrained(d, qk_layernorm=True, post_layernorm=True).eval()
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(tiny, str(tmp_path / "tiny"))
    saved = json.load(open(tmp_path / "tiny" / "config.json"))
    assert saved["model_type"] == "phi" and saved["architectures"] == ["PhiForCausalLM"]
    assert saved["qk_layernorm"] and saved["post_layernorm"]
    assert "model.layers.0.post_layernorm.weight" in load_file(str(tmp_path / "tiny" / "model.safetensors"))
    back = Phi2.from_pretrained(str(tmp_path / "tiny")).eval()
    assert back.config == tiny.config
    for (n1, p1), (n2, p2) in zip(tiny.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert [f for f in os.listdir(tmp_path / "tiny") if not f.startswith(("config", "model"))] == []  # no temp files

    # without post_layernorm (which transformers lacks), transformers itself loads what we wrote
    plain_ours = Phi2.from_pretrained(d).eval()
    save_pretrained(plain_ours, str(tmp_path / "plain"))
    reloaded = PhiForCausalLM.from_pretrained(str(tmp_path / "plain"), attn_implementation="eager").eval()
    ids = ids_for(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(plain, dtype):
    _, d, model = plain
    half = Phi2.from_pretrained(d, dtype=dtype, qk_layernorm=True).eval()
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert not any(p.is_meta for p in half.parameters())
    ids = ids_for(1, 8)
    with torch.no_grad():
        ref_half = Phi2.from_pretrained(d, qk_layernorm=True).eval()(ids)
        torch.testing.assert_close(half(ids).float(), ref_half, atol=0.1, rtol=0.05)


def _error(path, **kw):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        Phi2.from_pretrained(path, **kw)
    message = str(info.value)
    assert "\n" not in message
    return info.type, message


def _edit_checkpoint(src, dst, edit):
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_bad_checkpoints_give_one_line_errors(plain, tmp_path):
    _, d, _ = plain
    key = "model.layers.1.mlp.fc1.weight"

    bad = _edit_checkpoint(d, str(tmp_path / "missing"), lambda sd: sd.pop(key))
    assert _error(bad) == (ValueError, f"{bad}: missing tensor '{key}'")

    extra = "model.layers.0.extra.weight"
    bad = _edit_checkpoint(d, str(tmp_path / "extra"), lambda sd: sd.update({extra: sd[key].clone()}))
    kind, msg = _error(bad)
    assert kind is ValueError and "unexpected" in msg and extra in msg and bad in msg

    bad = _edit_checkpoint(d, str(tmp_path / "shape"), lambda sd: sd.update({key: sd[key][:-1]}))
    kind, msg = _error(bad)
    assert kind is ValueError and key in msg and "shape" in msg and bad in msg

    bad = _edit_checkpoint(d, str(tmp_path / "qproj"), lambda sd: sd.pop("model.layers.0.self_attn.k_proj.bias"))
    kind, msg = _error(bad)
    assert kind is ValueError and "model.layers.0.self_attn.k_proj.bias" in msg

    bad = _edit_checkpoint(d, str(tmp_path / "truncated"), lambda sd: None)
    file = os.path.join(bad, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[:len(data) // 2])
    kind, msg = _error(bad)
    assert kind is ValueError and file in msg

    missing = str(tmp_path / "nowhere")
    kind, msg = _error(missing)
    assert kind is FileNotFoundError and missing in msg

    bad = _edit_checkpoint(d, str(tmp_path / "no_config"), lambda sd: None)
    os.remove(os.path.join(bad, "config.json"))
    kind, msg = _error(bad)
    assert kind is FileNotFoundError and "config.json" in msg
