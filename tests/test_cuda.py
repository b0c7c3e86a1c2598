"""The CUDA paths: int8 with torch._int_mm on the GPU, bf16 and fp16 mixed-precision training steps.

These need a GPU and are skipped (not passed) on machines without one; CI has none. They ran on an
H100 as `python -m pytest tests/test_cuda.py` (see the README's Results)."""

import pytest
import torch
import torch.nn as nn

import tinygptv as tg
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("n", [1, 8, 64])  # decode (dequantized fallback) and prefill (int8 x int8 -> int32)
def test_int8_linear_on_cuda_matches_fp32(n):
    torch.manual_seed(0)
    lin = nn.Linear(512, 1024).cuda()
    q = tg.Int8Linear(lin).cuda()
    x = torch.randn(n, 512, device="cuda")
    ref = lin(x)
    got = q(x)
    assert got.device.type == "cuda" and got.dtype == ref.dtype
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel
    x16 = x.to(torch.bfloat16)  # bf16 activations in, bf16 out
    assert q(x16).dtype == torch.bfloat16


def test_quantized_tiny_model_generates_on_cuda():
    torch.manual_seed(0)
    model = tg.TinyGPTV(tg.TinyGPTVConfig.tiny(vocab_size=300)).cuda().eval()
    model.add_lora()
    ids = torch.randint(1, 300, (2, 40), device="cuda")
    with torch.no_grad():
        ref = model.llama_model(ids)
        tg.quantize_int8(model, vision=True)
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
    train.build_backbones(args)
    losses, finished = train.train_stage(args, 1)
    assert finished and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    losses, finished = train.train_stage(args, 2)  # with LoRA
    assert finished and all(torch.isfinite(torch.tensor(losses)))
