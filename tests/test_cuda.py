"""The CUDA paths: int8 with torch._int_mm on the GPU, decoding through a CUDA graph, bf16 and fp16
mixed-precision training steps.

These need a GPU and are skipped (not passed) on machines without one; CI has none. They ran on an
H100 as `python -m pytest tests/test_cuda.py` (see the README's Results)."""

import pytest
import torch
import torch.nn as nn

import demo
import int8
import tinygptv as tg
import train
from fastpaths import CUDAGraphDecoder
from lora import add_lora
from phi2 import Phi2, Phi2Config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n", [1, 8, 64])  # decode (dequantized fallback) and prefill (int8 x int8 -> int32)
def test_int8_linear_on_cuda_matches_fp32(n):
    torch.manual_seed(0)
    lin = nn.Linear(512, 1024).cuda()
    q = int8.Int8Linear(lin).cuda()
    x = torch.randn(n, 512, device="cuda")
    ref = lin(x)
    got = q(x)
    assert got.device.type == "cuda" and got.dtype == ref.dtype
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel
    x16 = x.to(torch.bfloat16)  # bf16 activations in, bf16 out
    got16 = q(x16)
    assert got16.dtype == torch.bfloat16
    rel16 = ((got16.float() - ref).norm() / ref.norm()).item()
    assert rel16 < 0.03, rel16


def test_int8_linear_quantized_on_the_cpu_moves_to_cuda():
    # packed on the CPU (oneDNN's or fbgemm's layout, where this CPU packs), .cuda() unpacks it first
    torch.manual_seed(0)
    lin = nn.Linear(512, 1024)
    q = int8.Int8Linear(lin)
    weight = q.int8_weight().clone()
    q.pack()
    assert (q.packed is not None) == (int8.CPU_KERNEL in int8.PACKING)
    q = q.cuda()
    assert q.packed is None and q.weight_int8.device.type == "cuda"
    assert torch.equal(q.weight_int8.cpu(), weight)
    x = torch.randn(32, 512)
    rel = ((q(x.cuda()).cpu() - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.02, rel


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_cuda_graph_decode_equals_eager(sampling):
    # GraphedDecodeStep replays one recorded step; it must give the tokens of the eager loop, for a
    # left-padded batch, in fp32 and bf16, with int8 weights and with LoRA
    torch.manual_seed(0)
    model = Phi2(Phi2Config.tiny(vocab_size=300)).cuda().eval()
    ids = torch.randint(1, 300, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    bf16 = Phi2(model.config).cuda().eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    quant = Phi2(model.config).cuda().eval()  # not named int8: that is the module
    quant.load_state_dict(model.state_dict())
    for layer in quant.layers:
        layer.self_attn.query_key_value = int8.Int8Linear(layer.self_attn.query_key_value)
        layer.mlp.fc1 = int8.Int8Linear(layer.mlp.fc1)
    lora = Phi2(model.config).cuda().eval()
    lora.load_state_dict(model.state_dict())
    add_lora(lora, targets=("query_key_value", "dense"), r=8, alpha=16.0, dropout=0.1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # a trained adapter, not the fresh zero one
    for name, m in (("fp32", model), ("bf16", bf16), ("int8", quant), ("lora", lora)):
        run = lambda decoder: m.generate(ids, attention_mask=mask, max_new_tokens=20, stop_sequences=[],
                                         decoder=decoder, **sampling)
        assert run(CUDAGraphDecoder()) == run(None), name


def test_quantized_tiny_model_generates_on_cuda():
    torch.manual_seed(0)
    model = tg.TinyGPTV(tg.TinyGPTVConfig.tiny(vocab_size=300)).cuda().eval()
    model.add_lora()
    ids = torch.randint(1, 300, (2, 40), device="cuda")
    with torch.no_grad():
        ref = model.llama_model(ids)
        int8.quantize_int8(model, vision=True)
        got = model.llama_model(ids)
        px = torch.randn(2, 3, 64, 64, device="cuda")
        queries = model.encode_queries(px)
    assert torch.isfinite(queries).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_steps_learn(tmp_path, amp):
    small = ["--demo-train", "64", "--demo-eval", "8", "--lm-steps", "20", "--vision-steps", "20", "--no-eval",
             "--batch-size", "8", "--log-every", "1", "--device", "cuda", "--out", str(tmp_path), "--amp", amp]
    args = train.parse_args(small + ["--steps", "15"])
    demo.build_backbones(args.split, str(tmp_path / "backbones"), train.warmup_cosine, args.lm_steps, args.vision_steps)
    losses, finished = train.train_stage(args, 1)
    assert finished and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    losses, finished = train.train_stage(args, 2)  # with LoRA
    assert finished and all(torch.isfinite(torch.tensor(losses)))


def test_a_resumed_stage_on_cuda_draws_the_dropout_it_would_have(tmp_path):
    # the state file holds CUDA's generators too: with dropout on, interrupted and resumed ends where
    # an uninterrupted run does
    small = ["--demo-train", "64", "--demo-eval", "8", "--lm-steps", "20", "--vision-steps", "20", "--no-eval",
             "--batch-size", "8", "--device", "cuda", "--amp", "off", "--dropout", "0.3", "--stage", "1"]
    ends = {}
    for name, runs in (("whole", [[]]), ("resumed", [["--stop-after", "2"], ["--resume"]])):
        out = tmp_path / name
        base = train.parse_args(small + ["--out", str(out)])
        demo.build_backbones(base.split, str(out / "backbones"), train.warmup_cosine, base.lm_steps, base.vision_steps)
        for extra in runs:
            train.run(train.parse_args(small + ["--out", str(out), "--steps", "4", *extra]))
        if name == "resumed":
            state = torch.load(out / "stage1.state.pt", weights_only=True)
            assert state["cuda_rng"] and all(t.dtype == torch.uint8 for t in state["cuda_rng"])
        ends[name] = tg.read_checkpoint(str(out / "stage1.safetensors"))[0]
    for k in ends["whole"]:
        torch.testing.assert_close(ends["resumed"][k], ends["whole"][k])  # (GPU kernels may sum in any order)
