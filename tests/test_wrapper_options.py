"""TransformerWrapper's upstream options beyond the plain path: input_not_include_cache, ff_deep_embed,
add_continuous_pred_head (with AutoregressiveWrapper's next_embed_loss_weight)."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.config import ConfigConflictError
from x_transformers.feedforward import FeedForward


def model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=12, max_seq_len=16, attn_layers=Decoder(dim=16, depth=2, heads=2),
                              **kwargs).eval()


def test_input_not_include_cache_reads_only_the_new_tokens():
    full, new_only = model(), model(input_not_include_cache=True)
    new_only.load_state_dict(full.state_dict())
    x = torch.randint(0, 12, (2, 7))
    with torch.no_grad():
        _, inter = full(x[:, :5], return_intermediates=True)
        whole = full(x[:, :7], cache=inter)  # upstream's default: the input holds the whole sequence so far
        new = new_only(x[:, 5:], cache=inter)
        torch.testing.assert_close(new, whole)
        torch.testing.assert_close(new, full(x)[:, 5:], atol=1e-5, rtol=1e-5)


def test_ff_deep_embed_scales_each_feed_forward_output_by_its_token_row():
    deep, plain = model(ff_deep_embed=True), model()
    plain.load_state_dict({k: v for k, v in deep.state_dict().items() if k != "ff_deep_embed"})
    assert deep.ff_deep_embed.shape == (12, 2, 16)  # (num_tokens, depth, dim), ones at init
    x = torch.randint(0, 12, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(deep(x), plain(x))
        deep.ff_deep_embed.normal_()
        table = deep.ff_deep_embed[x]  # (b, n, depth, dim)
        ffs = [m for m in plain.modules() if isinstance(m, FeedForward)]
        hooks = [ff.register_forward_hook(lambda mod, inp, out, l=l: out * table[:, :, l]) for l, ff in enumerate(ffs)]
        expected = plain(x)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(deep(x), expected)
        _, inter = deep(x[:, :4], return_intermediates=True)  # decoding: each new token's own rows
        torch.testing.assert_close(deep(x, cache=inter), expected[:, 4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigConflictError, match="ff_deep_embed cannot be combined with num_memory_tokens"):
        model(ff_deep_embed=True, num_memory_tokens=2)


def test_continuous_pred_head_predicts_the_next_input_embedding():
    net = model(add_continuous_pred_head=True).train()
    x = torch.randint(0, 12, (2, 6))
    logits, (pred, init) = net(x, return_next_embed_pred=True)
    hidden = net(x, return_embeddings=True)
    torch.testing.assert_close(pred, net.to_next_embed_pred(hidden))
    torch.testing.assert_close(init, net.token_emb(x) + net.pos_emb(torch.arange(6)[None]))
    # the autoregressive loss adds weight * L1(prediction, next token's detached input embedding),
    # over the targets that count
    ar = AutoregressiveWrapper(net, next_embed_loss_weight=0.5)
    y = x.clone()
    y[0, 3] = -100
    loss = ar(y)
    inp = y.masked_fill(y == -100, 0)
    logits, (pred, init) = net(inp, return_next_embed_pred=True)
    keep = y[:, 1:] != -100
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), y[:, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, ce + 0.5 * (pred[:, :-1] - init[:, 1:]).abs()[keep].mean())
    loss.backward()
    assert net.to_next_embed_pred[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="add_continuous_pred_head"):
        model()(x, return_next_embed_pred=True)


def test_recycling_reruns_the_stack_on_the_embeddings_plus_its_projected_output():
    net = model(recycling=True, train_max_recycle_steps=3)
    x = torch.randint(0, 12, (2, 6))
    emb = net.token_emb(x) + net.pos_emb(torch.arange(6)[None])
    out = net.attn_layers(emb)  # step 1
    for _ in range(2):  # steps 2 and 3 read the previous output, detached, through recycled_proj
        out = net.attn_layers(emb + net.recycled_proj(out.detach()))
    torch.testing.assert_close(net(x, recycle_steps=3), net.logits_from(out))
    net(x, recycle_steps=3).sum().backward()  # only the last step keeps gradients: one stack's worth
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    with torch.no_grad():
        first = net.attn_layers(emb)
        second = net.attn_layers(emb + net.recycled_proj(first))
    net.logits_from(net.attn_layers(emb + net.recycled_proj(second))).sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    with pytest.raises(ValueError, match="recycle_steps= to forward in eval mode"):
        net(x)
    calls = []
    net.attn_layers.register_forward_hook(lambda *a: calls.append(1))
    counts = set()
    for _ in range(12):  # training draws 1..train_max_recycle_steps runs of the stack
        calls.clear()
        net.train()(x)
        counts.add(len(calls))
    assert counts <= {1, 2, 3} and len(counts) > 1


def test_autoregressive_z_loss_is_added_and_compiles_as_one_graph():
    net = model(attn_z_loss_weight=0.5).train()
    ar = AutoregressiveWrapper(net, add_attn_z_loss=True)
    x = torch.randint(0, 12, (2, 7))
    loss = ar(x)
    logits, inter = net(x[:, :-1], return_attn_z_loss=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits.transpose(1, 2), x[:, 1:]) + inter.attn_z_loss)
    assert inter.attn_z_loss > 0
    loss.backward()
    eager = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    compiled = torch.compile(ar, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    closs = compiled(x)
    closs.backward()
    torch.testing.assert_close(closs, loss)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], msg=n)


def test_static_cache_holds_interspersed_memory_tokens():
    # the cache is sized for a memory group before every every-th token, not for one group
    net = model(num_memory_tokens=2, memory_tokens_interspersed_every=3)
    ar = AutoregressiveWrapper(net)
    x = torch.randint(0, 12, (2, 4))
    dynamic = ar.generate(x, 9, temperature=0)
    torch.testing.assert_close(ar.generate(x, 9, temperature=0, static_cache=True), dynamic)
    torch.testing.assert_close(ar.generate(x, 9, temperature=0, cache_kv=False), dynamic)
