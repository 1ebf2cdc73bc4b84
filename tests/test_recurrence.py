"""Transformer-XL recurrence (recurrence.py, xl_autoregressive_wrapper.py): memories carry a causal
stack's hidden states from one segment to the next."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, TransformerWrapper
from x_transformers.xl_autoregressive_wrapper import XLAutoregressiveWrapper

SEG = 4


def model(seed=0, **kwargs):
    torch.manual_seed(seed)
    layers = {k: kwargs.pop(k) for k in ("rotary_pos_emb", "alibi_pos_bias", "rel_pos_bias") if k in kwargs}
    return TransformerWrapper(num_tokens=16, max_seq_len=SEG, attn_layers=Decoder(dim=16, depth=2, heads=2, **layers),
                              **{"max_mem_len": 64, **kwargs}).eval()


def in_segments(net, x, mems=None):
    """Logits of x run segment by segment with memories, and the last memories."""
    outs = []
    for seg in x.split(SEG, dim=1):
        out, mems = net(seg, mems=mems, return_mems=True)
        outs.append(out)
    return torch.cat(outs, dim=1), mems


@pytest.mark.parametrize("position", ["rotary_pos_emb", "alibi_pos_bias", "rel_pos_bias"])
def test_segments_with_unbounded_memory_compute_the_whole_sequence(position):
    # a causal stack: segment k's keys are [every earlier hidden state; its own], at their true distances
    net = model(**{position: True, "use_abs_pos_emb": False})
    x = torch.randint(0, 16, (2, 3 * SEG))
    with torch.no_grad():
        segmented, mems = in_segments(net, x)
        # the same model over the whole sequence at once (no cap on positions: no absolute table)
        whole = TransformerWrapper(num_tokens=16, attn_layers=net.attn_layers, use_abs_pos_emb=False)
        whole.load_state_dict(net.state_dict())
        torch.testing.assert_close(segmented, whole.eval()(x), atol=1e-5, rtol=1e-5)
    assert [tuple(t.shape) for t in mems] == [(2, 3 * SEG, 16)] * 2


@pytest.mark.parametrize("learned", [True, False])
def test_value_residual_with_memories_computes_the_whole_sequence(learned):
    """add_value_residual (ResFormer) with Transformer-XL memories: the memory columns' values are mixed
    with the first attention's memory values, as the sequence's are, so segments with unbounded memory
    still compute the whole sequence (without the memory's mix they differ by ~5e-2), and XL generation
    with its cache is the segment-wise forward's greedy."""
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=16, max_seq_len=SEG, max_mem_len=64, use_abs_pos_emb=False, attn_layers=Decoder(
        dim=16, depth=3, heads=2, rotary_pos_emb=True, add_value_residual=True,
        learned_value_residual_mix=learned)).eval()
    x = torch.randint(0, 16, (2, 3 * SEG))
    with torch.no_grad():
        segmented, _ = in_segments(net, x)
        whole = TransformerWrapper(num_tokens=16, attn_layers=net.attn_layers, use_abs_pos_emb=False)
        whole.load_state_dict(net.state_dict())
        torch.testing.assert_close(segmented, whole.eval()(x), atol=1e-5, rtol=1e-5)
    gen = XLAutoregressiveWrapper(net).generate(x[:, :SEG + 1], 2 * SEG, temperature=0)
    with torch.no_grad():
        logits, _ = in_segments(net, torch.cat((x[:, :SEG + 1], gen), dim=1)[:, :-1])
    assert torch.equal(logits.argmax(dim=-1)[:, SEG:], gen)


def test_a_segment_reads_the_previous_one_only_through_memories():
    net = model(rotary_pos_emb=True)
    x = torch.randint(0, 16, (1, 2 * SEG))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 16  # a change in the first segment only
    with torch.no_grad():
        with_mems = [in_segments(net, t)[0][:, SEG] for t in (x, y)]
        without = [net(t[:, SEG:])[:, 0] for t in (x, y)]
    assert not torch.allclose(*with_mems)  # the second segment's first token sees the first segment
    torch.testing.assert_close(*without)


def test_returned_memories_are_detached_unless_asked():
    net = model(rotary_pos_emb=True).train()
    x = torch.randint(0, 16, (1, 2 * SEG))
    for detach in (True, False):
        extra = torch.zeros(1, SEG, 16, requires_grad=True)  # a differentiable input of the first segment
        _, mems = net(x[:, :SEG], sum_embeds=extra, return_mems=True, detach_mems=detach)
        out = net(x[:, SEG:], mems=mems)
        (grad,) = torch.autograd.grad(out.sum(), extra, allow_unused=True)
        assert (grad is None) == detach
        assert all(t.requires_grad != detach for t in mems)


def test_max_mem_len_keeps_the_last_columns():
    long = model(max_mem_len=64)
    short = model(max_mem_len=6)
    none = model(max_mem_len=0)
    x = torch.randint(0, 16, (2, 2 * SEG))
    with torch.no_grad():
        _, first = long(x[:, :SEG], return_mems=True)
        _, full = long(x[:, SEG:], mems=first, return_mems=True)  # 8 columns: first segment's, then second's
        _, cut = short(x[:, SEG:], mems=first, return_mems=True)
        _, empty = none(x[:, :SEG], return_mems=True)
    for f, c in zip(full, cut):
        torch.testing.assert_close(c, f[:, -6:])
    assert [tuple(t.shape) for t in empty] == [(2, 0, 16)] * 2


def test_shift_mem_down_gives_block_i_the_memory_of_block_i_plus_shift():
    plain, shifted = model(), model(shift_mem_down=1)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randint(0, 16, (2, SEG))
    a, b = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        out_s, mems_s = shifted(x, mems=[a, b], return_mems=True)
        out_p, mems_p = plain(x, mems=[b, a], return_mems=True)
    torch.testing.assert_close(out_s, out_p)
    for s, p in zip(mems_s, mems_p):  # each block's memory: what it read, then its input
        torch.testing.assert_close(s, p)
    torch.testing.assert_close(mems_s[0][:, :3], b)


def test_fully_masked_memory_changes_nothing():
    net = model(rotary_pos_emb=True)
    x = torch.randint(0, 16, (2, SEG))
    mems = [torch.randn(2, 3, 16) for _ in range(2)]
    hidden = [torch.zeros(2, 3, dtype=torch.bool)] * 2
    with torch.no_grad():
        torch.testing.assert_close(net(x, mems=mems, mem_masks=hidden), net(x))


def test_bad_memories_are_one_line_errors():
    net = model()
    x = torch.randint(0, 16, (2, SEG))
    with pytest.raises(ValueError, match="one per self-attention block"):
        net(x, mems=[torch.randn(2, 3, 16)])
    with pytest.raises(ValueError, match=r"mems\[1\] must be a float tensor"):
        net(x, mems=[torch.randn(2, 3, 16), torch.randn(2, 3, 8)])
    with pytest.raises(ValueError, match="max_mem_len=0"):
        model(max_mem_len=0)(x, mems=[torch.randn(2, 3, 16)] * 2)


def test_xl_wrapper_loss_is_the_length_weighted_segment_losses_with_detached_memories():
    net = model(rotary_pos_emb=True).train()
    xl = XLAutoregressiveWrapper(net)
    x = torch.randint(0, 16, (2, 2 * SEG + 3))  # segments of 4, 4, 2
    loss = xl(x)
    expected, mems = 0.0, None
    inp, labels = x[:, :-1], x[:, 1:]
    for seg, target in zip(inp.split(SEG, 1), labels.split(SEG, 1)):
        logits, mems = net(seg, mems=mems, return_mems=True)
        expected = expected + F.cross_entropy(logits.transpose(1, 2), target) * seg.shape[1] / inp.shape[1]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "pos_emb" not in n)
    with pytest.raises(ValueError, match="ttt_module_paths"):
        XLAutoregressiveWrapper(net, ttt_module_paths=("attn_layers",))


@pytest.mark.parametrize("prompt", [SEG, SEG + 1])  # ending on a segment boundary, and just past one
def test_xl_generate_is_the_segment_wise_forward_greedy(prompt):
    net = model(rotary_pos_emb=True, max_mem_len=6)
    xl = XLAutoregressiveWrapper(net)
    x = torch.randint(0, 16, (2, prompt))
    gen = xl.generate(x, 2 * SEG, temperature=0)
    full = torch.cat((x, gen), dim=1)
    with torch.no_grad():
        logits, _ = in_segments(net, full[:, :-1])
    assert torch.equal(logits.argmax(dim=-1)[:, prompt - 1:], gen)


def test_xl_generate_pads_after_eos():
    xl = XLAutoregressiveWrapper(model(), pad_value=0)
    x = torch.randint(1, 16, (3, 2))
    greedy = xl.generate(x, 6, temperature=0)
    eos = int(greedy[0, 1])
    out = xl.generate(x, 6, temperature=0, eos_token=eos)
    for row, ref in zip(out, greedy):
        hits = (ref == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else len(ref)
        assert torch.equal(row[:stop], ref[:stop]) and not row[stop:].any()


UPSTREAM_XL = r"""
import json, os, torch
from x_transformers import Decoder, TransformerWrapper
p = json.loads(os.environ["PAYLOAD"])
results = {}
for name, layers in p["configs"].items():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=16, max_seq_len=4, max_mem_len=6, shift_mem_down=1,
                             attn_layers=Decoder(dim=16, depth=2, heads=2, **layers)).eval()
    with torch.no_grad():
        for t in net.parameters():
            t.add_(torch.randn_like(t) * 0.1)
    x = torch.randint(0, 16, (2, 12))
    mems, outs = None, []
    with torch.no_grad():
        for seg in x.split(4, dim=1):
            out, mems = net(seg, mems=mems, return_mems=True)
            outs.append(out)
    results[name] = dict(state_dict=net.state_dict(), x=x, out=torch.cat(outs, 1), mems=mems)
torch.save(results, p["path"])
print(json.dumps("ok"))
"""


def test_segments_match_upstream(tmp_path):
    # the real upstream 2.31.10, weights perturbed, three segments with max_mem_len=6 and shift_mem_down=1
    import upstream
    from x_transformers.upstream import load_state_dict

    configs = dict(rotary=dict(rotary_pos_emb=True), t5=dict(rel_pos_bias=True), absolute={})
    path = tmp_path / "xl.pt"
    upstream.run(UPSTREAM_XL, dict(configs=configs, path=str(path)))
    results = torch.load(path)
    for name, layers in configs.items():
        ref = results[name]
        net = TransformerWrapper(num_tokens=16, max_seq_len=4, max_mem_len=6, shift_mem_down=1,
                                 attn_layers=Decoder(dim=16, depth=2, heads=2, **layers)).eval()
        load_state_dict(net, ref["state_dict"])
        with torch.no_grad():
            out, mems = in_segments(net, ref["x"])
        torch.testing.assert_close(out, ref["out"], atol=1e-5, rtol=1e-5, msg=name)
        for ours, theirs in zip(mems, ref["mems"]):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=name)


def test_memories_with_a_static_cache_are_refused():
    from x_transformers.cache import StaticKVCache

    net = model()
    x = torch.randint(0, 16, (2, SEG))
    mems = [torch.randn(2, 3, 16)] * 2
    with pytest.raises(ValueError, match="StaticKVCache"):
        net(x, mems=mems, cache=StaticKVCache.for_model(net, 2, 8))
    with pytest.raises(ValueError, match="StaticKVCache"):
        net.attn_layers(torch.randn(2, SEG, 16), mems=mems, cache=StaticKVCache.for_model(net, 2, 8))
