"""The L2-prefetch chain: each packed matmul knows the one called after it in a forward."""

from __future__ import annotations

import torch

from conftest import load_pipeline
from efficientqat.prefetch_chain import chain_prefetch_, packed_call_order
from efficientqat.qlinear import PackedLinear
from efficientqat.quantizer import QuantSpec


def _tiny_packed(fuse: bool):
    bench = load_pipeline("bench_generate")
    torch.manual_seed(0)
    return bench.build_model(bench.TINY, QuantSpec(4, 128), torch.device("cpu"), fuse)


def test_chain_follows_the_call_order_and_wraps_to_the_first():
    model = _tiny_packed(fuse=True)
    ids = torch.tensor([[3, 5, 7]])
    before = model(ids).logits
    assert chain_prefetch_(model) == 8
    order = packed_call_order(model)
    expected = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        expected += [attn.fused_q_k_v.layer, attn.o_proj, mlp.fused_gate_up.layer, mlp.down_proj]
    assert order == expected
    assert [layer.prefetch_next for layer in order] == expected[1:] + expected[:1]
    # the dry run left the layers computing, and the chain is outside the module tree and the state dict
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert not any("prefetch" in key for key in model.state_dict())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 8


def test_unfused_layers_chain_in_call_order_too():
    model = _tiny_packed(fuse=False)
    chain_prefetch_(model)
    block = model.model.layers[0]
    attn, mlp = block.self_attn, block.mlp
    assert attn.q_proj.prefetch_next is attn.k_proj and attn.v_proj.prefetch_next is attn.o_proj
    assert attn.o_proj.prefetch_next is mlp.gate_proj and mlp.down_proj.prefetch_next is model.model.layers[1].self_attn.q_proj


def test_prefetch_tensors_list_zero_points_once_built():
    layer = _tiny_packed(fuse=True).model.layers[0].mlp.down_proj
    assert [t.data_ptr() for t in layer.prefetch_tensors()] == [layer.scales.data_ptr(), layer.qweight.data_ptr()]
    zeros = layer.kernel_zeros()  # the kernels' uint8 table, built on a layer's first kernel call
    assert [t.data_ptr() for t in layer.prefetch_tensors()] == [layer.scales.data_ptr(), zeros.data_ptr(),
                                                                 layer.qweight.data_ptr()]
