"""int8.py: per-channel int8 weights and per-token int8 activations, within a bounded error on
every CPU kernel this machine can run; and quantizing while loading gives the very weights that
quantizing after loading gives, so the 8 GB path (tinygptv.py --int8 on the downloads) is the
same model as the simple one. Speed and memory are measured in bench.py (sections 2, 3 and 6)."""

import os

import pytest
import torch
import torch.nn as nn
from PIL import Image

import int8
import tinygptv as tg
from checkpoints import StrictReader, open_safetensors
from fastpaths import InferenceAttention
from layouts import load_model, quantizer, save_pretrained
from phi2 import Phi2, Phi2Config

# the CPU kernels that can run here: fbgemm only where torch was built with it (x86), onednn where this
# machine chose it (int8.cpu_kernel: VNNI), as its exactness is measured only there
KERNELS = ["weight_only"] + (["fbgemm"] if "fbgemm" in torch.backends.quantized.supported_engines else []) + \
    (["onednn"] if int8.cpu_kernel() == "onednn" else [])
EXACT = [k for k in int8.PACKING if k in KERNELS]  # integer sums: our arithmetic exactly


def test_weight_rounding_is_per_channel_symmetric():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    q, scale = int8.quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127  # each row's largest magnitude maps to +-127
    assert (q.abs().amax(dim=1) == 127).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()  # half a step at most


@pytest.mark.parametrize("kernel, packed", [(k, False) for k in KERNELS] + [(k, True) for k in EXACT])
def test_int8_linear_error_and_memory(kernel, packed, monkeypatch):
    monkeypatch.setattr(int8, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    lin = nn.Linear(256, 512)
    q = int8.Int8Linear(lin)
    if packed:
        q.pack()
    assert (q.packed is not None) == (packed and kernel in int8.PACKING)
    assert torch.equal(q.int8_weight(), int8.quantize_weight(lin.weight)[0])  # packing keeps our weights
    for n in (1, 32):  # one decoded token and a prefill
        x = torch.randn(n, 256)
        ref = lin(x)
        rel = ((q(x) - ref).norm() / ref.norm()).item()
        assert rel < 0.02, rel
        rel16 = ((q(x.bfloat16()).float() - ref).norm() / ref.norm()).item()  # bf16 in, bf16 out
        assert rel16 < 0.03, rel16
    assert q(torch.randn(2, 3, 256)).shape == (2, 3, 512)
    assert int8.weight_bytes(q) < 0.27 * int8.weight_bytes(lin)


def test_activation_digits_hold_each_token_to_a_252nd_of_its_step():
    torch.manual_seed(0)
    x = torch.randn(6, 300) * torch.tensor([1.0, 1e3, 1e-3, 5.0, 0.1, 1.0])[:, None]
    x[5] = 0.0  # an all-zero token
    hi, lo, sx = int8.quantize_rows(x)
    for d in (hi, lo):
        assert d.abs().max() <= 63 and torch.equal(d, d.round())
    assert (hi.abs().amax(dim=1)[:5] == 63).all()  # each token's largest magnitude is the top digit
    step = x.abs().amax(dim=1, keepdim=True) / 63
    back = sx * (hi + lo / 126)
    assert ((back - x).abs() <= step / 252 * 1.001 + 1e-12).all()


def exact_product(x, lin):
    """y of Int8Linear's docstring, worked in float64 from quantize_weight and quantize_rows."""
    hi, lo, sx = (t.double() for t in int8.quantize_rows(x))
    wq, sw = (t.double() for t in int8.quantize_weight(lin.weight))
    return (hi @ wq.t() + (lo @ wq.t()) / 126) * sx * sw + lin.bias.double()


@pytest.mark.parametrize("kernel, packed", [(k, True) for k in EXACT] + [("onednn", False)] * ("onednn" in KERNELS))
def test_integer_kernels_compute_exactly_our_per_token_arithmetic(kernel, packed, monkeypatch):
    # fbgemm and oneDNN get both digits, scale 1 and zero point 64: their int32 sums are ours; so are
    # _int_mm's, which a VNNI CPU runs over 4 rows of an unpacked weight (fewer: the weight-only kernel)
    monkeypatch.setattr(int8, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    q = int8.Int8Linear(lin)
    if packed:
        q.pack()
    x = torch.randn(20, 128) * torch.rand(20, 1).mul(6).sub(3).exp()  # tokens of very different sizes
    x[3] *= 100.0  # an outlier token
    exact = exact_product(x, lin)  # (20, 64)
    torch.testing.assert_close(q(x).double(), exact, rtol=1e-5, atol=1e-5)  # several tokens at once
    if packed:
        for i in range(5):  # one token at a time, as decoding runs
            torch.testing.assert_close(q(x[i:i + 1]).double(), exact[i:i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(x[:5]).double(), exact[:5], rtol=1e-5, atol=1e-5)  # a short prompt


@pytest.mark.parametrize("kernel", EXACT)
def test_integer_kernels_are_exact_where_int16_pair_sums_would_saturate(kernel, monkeypatch):
    # every weight +-127 and every activation at its token's maximum, with the weight's sign: with
    # 8-bit activations an int8 kernel without VNNI would sum pairs past 32767 here
    monkeypatch.setattr(int8, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    lin = nn.Linear(256, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 256).sign())
    q = int8.Int8Linear(lin)
    q.pack()
    x = torch.cat([lin.weight[:1], -lin.weight[:1], torch.ones(1, 256)]).repeat(6, 1) * 3.0  # (18, 256)
    torch.testing.assert_close(q(x).double(), exact_product(x, lin), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q(x[:1]).double(), exact_product(x[:1], lin), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_command_packs_where_packing_pays(kernel, monkeypatch):
    # fbgemm always (AVX2: its unpacked stand-in is slow); oneDNN for many answers only; quantize never
    import cli
    monkeypatch.setattr(int8, "CPU_KERNEL", kernel)
    for answers, packs in (("none", False), ("few", kernel == "fbgemm"), ("many", kernel in int8.PACKING)):
        model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
        int8.int8_linears(model)
        cli.pack_where_it_pays(model, answers)
        assert [m.packed is not None for m in (model[0], model[2])] == [packs, packs], answers


@pytest.mark.parametrize("kernel", EXACT)
def test_moving_off_the_cpu_unpacks_the_weight(kernel, monkeypatch):
    monkeypatch.setattr(int8, "CPU_KERNEL", kernel)
    torch.manual_seed(0)
    q = int8.Int8Linear(nn.Linear(64, 32))
    q.pack()
    assert q.packed is not None
    q.to("meta")  # stands for a GPU here: a packed weight cannot go there
    assert q.packed is None and q.weight_int8.shape == (32, 64) and q.weight_int8.dtype == torch.int8


def tiny_phi2(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = Phi2(Phi2Config.tiny(vocab_size=300)).eval()
    save_pretrained(model, str(tmp_path / "phi2"))
    return model


def int8_state(model):
    """Every Int8Linear's int8 weight, scales and bias, by name."""
    return {name: (m.int8_weight(), m.weight_scale, m.bias) for name, m in model.named_modules()
            if isinstance(m, int8.Int8Linear)}


def test_quantizing_while_loading_equals_quantizing_after(tmp_path):
    model = tiny_phi2(tmp_path)
    after = Phi2.from_pretrained(str(tmp_path / "phi2")).eval()
    int8.int8_linears(after)
    during = Phi2.from_pretrained(str(tmp_path / "phi2"), convert=quantizer()).eval()
    a, b = int8_state(after), int8_state(during)
    assert a.keys() == b.keys() and len(a) == 4 * 2 + 1  # qkv, dense, fc1, fc2 per layer, and lm_head
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(during(ids), after(ids), rtol=0, atol=0)
        rel = ((during(ids) - model(ids)).norm() / model(ids).norm()).item()
    assert rel < 0.05, rel


def test_reader_reads_every_tensor_as_safetensors_does(tmp_path):
    # StrictReader reads with plain file reads (no memory map): the same tensors, the same dtypes
    from safetensors.torch import load_file, save_file
    tensors = {"a": torch.randn(3, 4).half(), "b": torch.arange(5), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    reader = StrictReader(open_safetensors(str(tmp_path / "t.safetensors")), "t", None, "cpu")
    for k, t in load_file(str(tmp_path / "t.safetensors")).items():
        got = reader.read(str(tmp_path / "t.safetensors"), k)
        assert got.dtype == t.dtype and torch.equal(got, t), k


def test_assembled_int8_from_downloads_equals_quantize_int8_after(tmp_path):
    # layouts.load_model(int8=True) merges the checkpoint's LoRA into each layer before it is
    # quantized: the same int8 weights as loading in full, LoRA and all, then quantize_int8
    torch.manual_seed(0)
    model = tg.TinyGPTV(tg.TinyGPTVConfig.tiny(vocab_size=300)).eval()
    for part, name in ((model.llama_model, "phi2"), (model.visual_encoder, "vit"), (model.qformer, "qformer")):
        save_pretrained(part, str(tmp_path / name))
    model.add_lora()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, 0.05)  # a trained adapter
    tg.save_checkpoint(model, str(tmp_path / "stage4.safetensors"), stage=4)
    paths = (str(tmp_path / "phi2"), str(tmp_path / "vit"), str(tmp_path / "qformer"))
    kw = dict(checkpoint=str(tmp_path / "stage4.safetensors"), proj_dim=model.config.proj_dim)
    after, stage = load_model(*paths, **kw)
    int8.quantize_int8(after)
    during, stage_during = load_model(*paths, int8=True, **kw)
    assert stage == stage_during == 4
    a, b = int8_state(after.llama_model), int8_state(during.llama_model)
    assert a.keys() == b.keys() and len(a) == 4 * 4 + 1
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name
    ex = [tg.Example([1, 2, 3], [4, 5], [6, 7])]  # token ids: before the image, after it, the answer
    px = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(during(ex, pixel_values=px)[0], after(ex, pixel_values=px)[0])


# -----------------------------------------------------------------------------
# The quantized file: what --int8 builds from the downloads, written once and read back (mapped, where
# the CPU kernel packs nothing)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """The demo's shipped stand-ins as downloads (Phi-2 with its tokenizer, the ViT, the Q-Former) and a
    stage-4 checkpoint with non-zero LoRA and random projections."""
    import shutil
    d = tmp_path_factory.mktemp("downloads")
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_backbones")
    shutil.copytree(os.path.join(shipped, "phi2"), d / "phi2")
    shutil.copy(os.path.join(shipped, "tokenizer.json"), d / "phi2" / "tokenizer.json")
    model, _ = load_model(str(d / "phi2"), os.path.join(shipped, "vit"), os.path.join(shipped, "qformer"),
                          proj_dim=tg.TinyGPTVConfig.tiny().proj_dim)
    model.add_lora()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "llama_proj" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    tg.save_checkpoint(model, str(d / "stage4.safetensors"), stage=4)
    return {"phi2": str(d / "phi2"), "vit": os.path.join(shipped, "vit"), "qformer": os.path.join(shipped, "qformer"),
            "checkpoint": str(d / "stage4.safetensors"), "dir": d}


def weight_args(w, **more):
    import argparse
    return argparse.Namespace(phi2=w["phi2"], blip2=w["vit"], qformer=w["qformer"], checkpoint=w["checkpoint"],
                              int8=True, run=None, model=None, device="cpu", **more)


def spans_of(path):
    """The address ranges where the file at path is mapped into this process (Linux's /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        rows = [line.split() for line in f]
    return [tuple(int(a, 16) for a in row[0].split("-")) for row in rows if row[-1] == os.path.realpath(path)]


def mapped_from(t, path):
    """Whether tensor t's memory lies in a mapping of the file at path."""
    return any(lo <= t.data_ptr() < hi for lo, hi in spans_of(path))


@pytest.fixture(scope="module")
def quantized(downloads):
    """`tinygptv.py quantize` of the downloads, written once for the tests that read it."""
    import cli
    w, out = downloads, str(downloads["dir"] / "model.safetensors")
    cli.main(["quantize", out, "--phi2", w["phi2"], "--blip2", w["vit"], "--qformer", w["qformer"],
              "--checkpoint", w["checkpoint"]])
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_quantized_file_is_the_int8_model_from_the_downloads(downloads, quantized, kernel, monkeypatch):
    # each CPU kernel: the file's tensors used in place, mapped; one answer, then the weights packed as the
    # chat packs them (fbgemm and oneDNN: each int8 weight's own map goes as it is packed), another answer
    import cli
    from layouts import load_quantized
    monkeypatch.setattr(int8, "CPU_KERNEL", kernel)
    w, out = downloads, quantized
    direct, tok, stage = cli.load_for_inference(weight_args(w), dtype=torch.bfloat16, answers="none")
    loaded, tok2, stage2 = load_quantized(out)
    loaded = cli.ready_to_answer(loaded, "cpu", "none")  # as load_for_inference made direct ready
    assert stage == stage2 == 4 and tok2.to_str() == tok.to_str()
    assert all(type(m.visual_encoder.blocks[0].attn) is InferenceAttention for m in (direct, loaded))
    a, b = dict(direct.named_modules()), dict(loaded.named_modules())
    assert a.keys() == b.keys()
    sa, sb = direct.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    assert sum(isinstance(m, int8.Int8Linear) for m in b.values()) == 4 * 4 + 1  # qkv, dense, fc1, fc2 in each
    # of the 4 layers, and lm_head: LoRA merged in them
    maps = lambda: len(spans_of(out))
    if os.path.exists("/proc/self/maps"):
        assert mapped_from(loaded.llama_model.layers[0].mlp.fc1.weight_scale, out)
        assert mapped_from(loaded.visual_encoder.blocks[0].mlp.fc1.weight, out)
        for m in b.values():  # aligned in the file, as save_quantized writes them, so mapped, not copied
            # (torch's int8 kernels crashed on a weight 1 byte off)
            if isinstance(m, int8.Int8Linear) and m.weight_int8.numel() % 64 == 0:
                assert mapped_from(m.weight_int8, out) and m.weight_int8.data_ptr() % 64 == 0
        del sa, sb  # (references to every tensor)
        unpacked = maps()
        own = sum(isinstance(m, int8.Int8Linear) and mapped_from(m.weight_int8, out) for m in b.values())
    image = Image.new("RGB", (96, 96), (240, 120, 20))
    ex = [tg.make_example(tok, 4, "[vqa] what color is it?")]
    for packing in ("none", "many"):
        direct, loaded = cli.pack_where_it_pays(direct, packing), cli.pack_where_it_pays(loaded, packing)
        for name, m in b.items():
            if isinstance(m, int8.Int8Linear):
                assert (m.packed is None) == (a[name].packed is None) == (packing == "none" or kernel not in int8.PACKING)
                assert torch.equal(m.int8_weight(), a[name].int8_weight()), name  # read back from a packed copy
        with torch.no_grad():
            px = direct.pixels([image], 4)
            la = direct.generate_ids(px, ex, 6, [])
            lb = loaded.generate_ids(loaded.pixels([image], 4), ex, 6, [])
            qa = direct.project(direct.encode_queries(px))
            qb = loaded.project(loaded.encode_queries(px))
        assert la == lb and torch.equal(qa, qb), packing
    if os.path.exists("/proc/self/maps"):  # a packed weight's map went with it; the tower's goes with its tensors
        packed = maps()  # each mapped int8 weight's own map gone where the kernel packs, none otherwise
        assert unpacked - packed >= own > 0 if kernel in int8.PACKING else packed == unpacked
        loaded.visual_encoder.to("meta")  # as a one-shot answer lets the tower go (cli.py)
        assert maps() < packed and mapped_from(loaded.llama_model.layers[0].mlp.fc1.weight_scale, out)


def test_save_aligned_writes_safetensors_with_aligned_tensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from checkpoints import save_aligned
    torch.manual_seed(0)
    tensors = {"w": torch.randint(-127, 128, (3, 64), dtype=torch.int8), "odd": torch.randint(-127, 128, (5, 7), dtype=torch.int8),
               "b": torch.randn(3, 5).bfloat16(), "f": torch.randn(7), "m": torch.tensor([True, False, True]),
               "e": torch.zeros(0, 3), "w2": torch.randint(-127, 128, (2, 128), dtype=torch.int8)}
    path = str(tmp_path / "a.safetensors")
    save_aligned(tensors, path, {"format": "test"})
    back = load_file(path)  # safetensors' own reader takes it
    assert back.keys() == tensors.keys() and all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "test"}
        assert f.get_tensor("w").data_ptr() % 64 == 0 and f.get_tensor("w2").data_ptr() % 64 == 0
        assert f.get_tensor("f").data_ptr() % 4 == 0 and f.get_tensor("b").data_ptr() % 2 == 0


def test_a_quantized_file_written_unaligned_still_loads_aligned(quantized, tmp_path):
    # a file safetensors' own writer laid out (int8 weights anywhere): those off 64 bytes are copied
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from layouts import load_quantized
    good, plain = quantized, str(tmp_path / "plain.safetensors")
    with safe_open(good, "pt") as f:
        meta = f.metadata()
    save_file(load_file(good), plain, metadata=meta)
    with safe_open(plain, "pt") as f:  # the case this test is for: some int8 weight off a boundary
        assert any(f.get_tensor(k).data_ptr() % 64 for k in f.keys() if k.endswith(".weight_int8"))
    a, b = load_quantized(good)[0], load_quantized(plain)[0]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [m.weight_int8 for m in b.modules() if isinstance(m, int8.Int8Linear)]  # (none packed yet)
    assert all(t.data_ptr() % 64 == 0 for t in weights)


@pytest.mark.parametrize("what", ["truncated", "another stage", "a stage checkpoint", "a tensor missing",
                                  "a tensor mis-shaped"])
def test_a_bad_quantized_file_is_one_line(downloads, quantized, tmp_path, what):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from layouts import load_quantized
    w, good = downloads, quantized
    tensors = load_file(good)
    with safe_open(good, "pt") as f:
        meta = f.metadata()
    bad, names = str(tmp_path / "bad.safetensors"), []
    if what == "truncated":
        with open(good, "rb") as f:
            raw = f.read()
        with open(bad, "wb") as f:
            f.write(raw[:len(raw) * 2 // 3])
    elif what == "another stage":
        save_file(tensors, bad, metadata={**meta, "stage": "7"})
        names = ["stage 7"]
    elif what == "a stage checkpoint":
        bad, names = w["checkpoint"], ["stage checkpoint", "--checkpoint"]
    elif what == "a tensor missing":
        key = "llama_model.layers.1.self_attn.dense.weight_int8"
        save_file({k: v for k, v in tensors.items() if k != key}, bad, metadata=meta)
        names = [key]
    else:
        key = "llama_proj2.bias"
        save_file({**tensors, key: torch.zeros(3)}, bad, metadata=meta)
        names = [key, "(3,)"]
    with pytest.raises(ValueError) as e:
        load_quantized(bad)
    message = str(e.value)
    assert "\n" not in message and bad in message and all(n in message for n in names), message
