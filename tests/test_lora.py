"""What lora.py promises: a fresh adapter is the identity, only the adapter trains, merging is exact
and idempotent, dropout acts only in training, and LoRA-only checkpoints round-trip strictly."""

import math

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear, add_lora, mark_trainable, merge_lora
from phi2 import Phi2, Phi2Config

# -----------------------------------------------------------------------------
# LoRA-only checkpoints and an unmerge of the whole model: what a user of lora.py on its own would
# add, written here, where they are used, to check that LoRALinear supports them exactly


def mark_only_lora_as_trainable(model):
    return mark_trainable(model, lambda name: ".lora_" in name or name.startswith("lora_"))


def lora_state_dict(model):
    """Only the adapters: {name.lora_A: (r, in), name.lora_B: (out, r)}."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def load_lora_state_dict(model, state):
    """Load adapters strictly: every LoRA tensor of the model must be in `state` with its shape,
    and `state` may hold nothing else. Errors name the key."""
    own = lora_state_dict(model)
    for k in state:
        if k not in own:
            raise ValueError(f"unexpected LoRA tensor '{k}' (the model has no such adapter)")
    for k, t in own.items():
        if k not in state:
            raise ValueError(f"missing LoRA tensor '{k}'")
        if tuple(state[k].shape) != tuple(t.shape):
            raise ValueError(f"LoRA tensor '{k}' has shape {tuple(state[k].shape)}, expected {tuple(t.shape)}")
    merged = [m for m in model.modules() if isinstance(m, LoRALinear) and m.merged]
    for m in merged:  # the merged weight holds the old adapter: take it out before replacing it
        unmerge(m)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    for m in merged:
        m.merge()


@torch.no_grad()
def unmerge(layer):
    """Take a merged update out of the base weight again (to keep training after a merge)."""
    if layer.merged:
        layer.weight.copy_((layer.weight.float() - layer.delta_weight()).to(layer.weight.dtype))
        layer.merged = False


def unmerge_lora(model):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            unmerge(m)



def lora_layer(i=24, o=40, r=4, alpha=16.0, dropout=0.0, seed=0, randomize_b=True):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(i, o), r=r, alpha=alpha, dropout=dropout)
    if randomize_b:  # a trained adapter: B no longer zero
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
    return layer


def test_shapes_init_and_identity_when_fresh():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    assert isinstance(layer.lora_A, nn.Parameter) and layer.lora_A.shape == (4, 24)
    assert isinstance(layer.lora_B, nn.Parameter) and layer.lora_B.shape == (40, 4)
    assert layer.weight is base.weight and layer.bias is base.bias  # the same tensors, not copies
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(24)  # kaiming_uniform(a=sqrt(5)) on fan_in 24
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_forward_equals_independent_formula():
    layer = lora_layer(alpha=16.0, r=4).eval()
    x = torch.randn(7, 24)
    A, B, W, b = layer.lora_A, layer.lora_B, layer.weight, layer.bias
    expected = x @ W.T + b + (x @ A.T @ B.T) * (16.0 / 4)
    torch.testing.assert_close(layer(x), expected)


def test_one_step_changes_only_the_adapter():
    layer = lora_layer(randomize_b=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    trainable = [p for p in layer.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(layer.lora_A), id(layer.lora_B)}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    layer(torch.randn(8, 24)).pow(2).mean().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    opt.step()
    after = layer.state_dict()
    assert torch.equal(after["weight"], before["weight"]) and torch.equal(after["bias"], before["bias"])
    assert not torch.equal(after["lora_B"], before["lora_B"])  # B learns first (its gradient uses A x)
    # A's gradient is B^T (...) = 0 at the first step, but AdamW's weight decay still moves it
    assert not torch.equal(after["lora_A"], before["lora_A"])


def test_merge_is_exact_idempotent_and_reversible():
    layer = lora_layer(r=4, alpha=16.0).eval()  # alpha != r: scaling 4 must be applied
    x = torch.randn(6, 24)
    w0 = layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=1e-6)
    w1 = layer.weight.detach().clone()
    layer.merge()  # twice: nothing more
    assert torch.equal(layer.weight, w1)
    torch.testing.assert_close(w1 - w0, 4.0 * layer.lora_B.detach() @ layer.lora_A.detach(), rtol=1e-6, atol=1e-6)
    unmerge(layer)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=1e-6)
    unmerge(layer)  # twice: nothing more
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training():
    layer = lora_layer(dropout=0.5)
    x = torch.randn(64, 24)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)  # different dropout masks
    layer.eval()
    e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    expected = x @ layer.weight.T + layer.bias + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(e1, expected)
    layer.merge()
    torch.testing.assert_close(layer(x), e1)  # fp32 defaults: B is large here (scaling 4)
    # dropout acts on the LoRA input only: with B = 0 training mode gives the base output exactly
    fresh = lora_layer(dropout=0.9, randomize_b=False).train()
    torch.testing.assert_close(fresh(x), nn.functional.linear(x, fresh.weight, fresh.bias), rtol=0, atol=0)


def tiny_phi2():
    torch.manual_seed(0)
    return Phi2(Phi2Config.tiny(qk_layernorm=True, post_layernorm=True)).eval()


def test_add_lora_targets_attention_only_and_trains_only_lora():
    model = tiny_phi2()
    ids = torch.randint(0, 512, (2, 9))
    before = model(ids)
    names = add_lora(model, targets=("query_key_value", "dense"), r=8, alpha=16, dropout=0.05)
    L = model.config.num_hidden_layers
    assert names == sorted([f"layers.{i}.self_attn.{t}" for i in range(L) for t in ("dense", "query_key_value")])
    assert not any(isinstance(m, LoRALinear) for n, m in model.named_modules() if ".mlp." in n)
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # fresh adapters: identity
    trainable = mark_only_lora_as_trainable(model)
    assert set(trainable) == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(model, targets=("nonexistent",), r=8, alpha=16)


def test_lora_state_dict_round_trip_and_strict():
    model = tiny_phi2()
    add_lora(model, targets=("query_key_value", "dense"), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_()
    sd = lora_state_dict(model)
    L = model.config.num_hidden_layers
    assert len(sd) == L * 2 * 2 and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    ids = torch.randint(0, 512, (1, 7))
    expected = model(ids)

    other = tiny_phi2()  # same base weights (same seed)
    add_lora(other, targets=("query_key_value", "dense"), r=4, alpha=8)
    assert not torch.allclose(other(ids), expected)
    load_lora_state_dict(other, sd)
    torch.testing.assert_close(other(ids), expected)

    merge_lora(other)  # loading into a merged model replaces the merged update too
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    load_lora_state_dict(other, zeros)
    unmerge_lora(other)
    torch.testing.assert_close(other(ids), tiny_phi2()(ids), rtol=1e-5, atol=1e-5)

    key = next(iter(sd))
    with pytest.raises(ValueError, match="missing LoRA tensor"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="unexpected LoRA tensor 'foo.lora_A'"):
        load_lora_state_dict(other, {**sd, "foo.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        load_lora_state_dict(other, {**sd, key: torch.zeros(3, 3)})


def test_base_checkpoint_loads_into_model_with_lora():
    """A plain Phi-2 state dict (no adapters) loads into a model that already has LoRA: the
    LoRALinear keeps the `weight` / `bias` names, only the adapters are reported missing."""
    source = tiny_phi2()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    target = tiny_phi2()
    add_lora(target, targets=("query_key_value", "dense"), r=4, alpha=8)
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.endswith((".lora_A", ".lora_B")) for k in result.missing_keys)
    ids = torch.randint(0, 512, (2, 6))
    torch.testing.assert_close(target(ids), source(ids))
