"""lowrank.nn.Bf16x3Linear and use_bf16x3: drop-in behaviour of an fp32 nn.Linear."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank
from lowrank.nn import Bf16x3Linear, use_bf16x3
from lowrank.ops._backends import cpu_isa
from lowrank.reference import bf16x3_linear as reference

AMX = cpu_isa() == "amx"


def test_from_linear_shares_parameters_and_matches():
    torch.manual_seed(0)
    lin = nn.Linear(40, 17)
    m = Bf16x3Linear.from_linear(lin)
    assert m.weight is lin.weight and m.bias is lin.bias
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(m(x), reference(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-4, atol=1e-4)
    assert set(m.state_dict()) == set(lin.state_dict())  # loads either way


def test_repacks_when_the_weight_changes():
    torch.manual_seed(1)
    m = Bf16x3Linear(33, 20)
    x = torch.randn(4, 33)
    m(x)
    with torch.no_grad():
        m.weight.mul_(2)                               # in place: the version counter moves
    torch.testing.assert_close(m(x), reference(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)
    m.load_state_dict({"weight": torch.randn(20, 33), "bias": torch.zeros(20)})
    torch.testing.assert_close(m(x), reference(x, m.weight, m.bias), rtol=1e-5, atol=1e-5)


def test_training_step_gives_fp32_linear_gradients():
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    m = Bf16x3Linear.from_linear(nn.Linear(16, 8))
    m.load_state_dict(lin.state_dict())
    x = torch.randn(5, 16)
    m(x).square().sum().backward()
    lin(x).square().sum().backward()
    torch.testing.assert_close(m.weight.grad, lin.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.bias.grad, lin.bias.grad, rtol=1e-4, atol=1e-4)


def test_use_bf16x3_converts_fp32_linears_only():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.Linear(4, 4).double())
    x = torch.randn(3, 8)
    ref = model[:3](x)
    assert use_bf16x3(model) == 2
    assert isinstance(model[0], Bf16x3Linear) and isinstance(model[2], Bf16x3Linear)
    assert type(model[3]) is nn.Linear
    torch.testing.assert_close(model[:3](x), ref, rtol=1e-4, atol=1e-4)
    assert use_bf16x3(model) == 0                     # idempotent


def test_bert_ffn_gelu_is_fused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=50)
    torch.manual_seed(5)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    n = use_bf16x3(model)
    assert n == 2 * 6 + 1
    inter = model.encoder.layer[0].intermediate
    assert inter.dense.activation == "gelu" and isinstance(inter.intermediate_act_fn, nn.Identity)
    assert model.encoder.layer[0].output.dense.activation == "none"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref, rtol=1e-4, atol=1e-4)
    plain = transformers.BertModel(cfg).eval()
    use_bf16x3(plain, fuse=False)
    assert plain.encoder.layer[0].intermediate.dense.activation == "none"


def test_llama_mlp_becomes_a_fused_gated_mlp():
    transformers = pytest.importorskip("transformers")
    from lowrank.nn import Bf16x3GatedMLP

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(6)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    keys = set(model.state_dict())
    assert use_bf16x3(model) == 2 * 7 + 1             # q k v o gate up down per layer, and the LM head
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, Bf16x3GatedMLP) and set(model.state_dict()) == keys
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # training runs the unfused path: gradients reach gate_proj / up_proj
    x = torch.randn(3, 32)
    mlp(x).sum().backward()
    assert mlp.gate_proj.weight.grad is not None and mlp.up_proj.weight.grad is not None
    with torch.no_grad():                              # a changed weight is restacked and repacked
        mlp.up_proj.weight.mul_(2)
        want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        Bf16x3Linear(0, 3)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        Bf16x3Linear.from_linear(nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match="must be float32"):
        Bf16x3Linear.from_linear(nn.Linear(3, 3).double())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        use_bf16x3("model")
    with pytest.raises(lowrank.BackendUnavailableError, match="runs on cuda/cpu|runs on cpu"):
        use_bf16x3(nn.Sequential(nn.Linear(3, 3, device="meta")), backend="cpp")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        Bf16x3Linear(3, 3, backend="nope")
    with pytest.raises(ValueError, match="activation must be 'none' or 'gelu'"):
        Bf16x3Linear(3, 3, activation="relu")


@pytest.mark.skipif(not AMX, reason=f"the packed weight is used by the AMX kernel only; this CPU: {cpu_isa()!r}")
def test_packed_weight_is_cached():
    m = Bf16x3Linear(64, 32)
    m(torch.randn(2, 64))
    p = m._packed
    m(torch.randn(2, 64))
    assert m._packed is p


def test_compile_fullgraph():
    torch.manual_seed(4)
    m = Bf16x3Linear(24, 12)
    x = torch.randn(5, 24)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), rtol=0, atol=0)
