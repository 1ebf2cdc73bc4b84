"""gated_multi_residual (hyper.py's GatedMultiResidual): one block against its formula computed
here, gradients, cache agreement, and read_gate_rank required as upstream."""

import pytest
import torch
import torch.nn.functional as F

from attention_helpers import assert_cache_decoding_equals_full_forward
from x_transformers import Decoder, TransformerWrapper

KW = dict(dim=16, depth=2, heads=2, attn_dim_head=8, gated_multi_residual=True, num_residual_streams=3,
          residual_fn_kwargs=dict(read_gate_rank=2))


def test_block_formula():
    torch.manual_seed(0)
    block = Decoder(**KW).blocks[1].eval()  # a feed-forward block: layer index 1 reads stream 1 most
    with torch.no_grad():
        for lin in (block.to_read, block.to_write):
            lin.weight.normal_(0, 0.5)
        block.dynamic_scale.fill_(0.7)
    x = torch.randn(2, 4, 3, 16)
    normed = x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(x.dtype).eps).sqrt() * block.read_gain
    z = F.silu(normed.reshape(2, 4, 48) / 3 @ block.to_bottleneck.weight.T) * 0.7
    static = torch.zeros(3, 16)
    static[1] = 1.0
    read = torch.sigmoid((z @ block.to_read.weight.T).view(2, 4, 3, 16) + static)
    h = (read * normed).sum(-2) / 3
    write = 2 * torch.sigmoid(z @ block.to_write.weight.T)
    ref = x + write[..., None] * block.fn(h)[..., None, :]
    torch.testing.assert_close(block(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_gradients_and_cache():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(**KW))
    x = torch.randint(0, 20, (2, 6))
    block = net.attn_layers.blocks[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(2):  # the bottleneck reaches the output through the gates, which start at zero
        opt.zero_grad()
        net(x).square().mean().backward()
        grads = [p.grad for p in (block.to_read.weight, block.to_write.weight, block.read_gain)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the zero-initialised gates learn
        assert (block.to_bottleneck.weight.grad.abs().sum() > 0) == (step == 1)
        opt.step()
    assert_cache_decoding_equals_full_forward(net)


def test_read_gate_rank_is_required():
    with pytest.raises(ValueError, match="read_gate_rank"):
        Decoder(dim=16, depth=1, heads=2, gated_multi_residual=True)
