"""Test-time training on the Transformer-XL wrapper (ttt.py, xl_autoregressive_wrapper.py): per-row
weights that take one gradient step on each segment's loss before the next segment is read
(Sun et al., 2407.04620), and upstream's episodic memories."""

import copy

import pytest
import torch
import torch.nn.functional as F

from train_helpers import assert_loss_falls

from x_transformers import Decoder, TransformerWrapper
from x_transformers.ttt import EpisodicMemories, newton_schulz
from x_transformers.xl_autoregressive_wrapper import (LowRankLinear, TTTMetaLearningTargetKLLoss, TTTModuleWrapper,
                                                      TTTNextLatentPredictionLoss, XLAutoregressiveWrapper)

SEG = 4
TO_V = "attn_layers.layers.0.1.to_v"  # upstream's path of the first layer's value projection


def model(seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=16, max_seq_len=SEG, max_mem_len=SEG,
                              attn_layers=Decoder(dim=16, depth=2, heads=2))


def tokens(n=2 * SEG + 1, seed=1):
    return torch.randint(0, 16, (2, n), generator=torch.Generator().manual_seed(seed))


def row_grads(net, x, params, loss_fn=None):
    """Per row: the gradient of its mean next-token loss on the first segment at ``params`` (names)."""
    out = []
    for r in range(x.shape[0]):
        logits, inter = net(x[r:r + 1, :SEG], return_intermediates=True)
        loss = F.cross_entropy(logits[0], x[r, 1:SEG + 1]) if loss_fn is None else loss_fn(inter).mean()
        out.append(torch.autograd.grad(loss, [dict(net.named_parameters())[p] for p in params]))
    return out


@pytest.mark.parametrize("muon", [False, True])
@pytest.mark.parametrize("custom", [False, True])
@pytest.mark.parametrize("episodic", [0, 3])
def test_zero_learning_rate_is_the_plain_wrapper(muon, custom, episodic):
    torch.manual_seed(5)
    base = XLAutoregressiveWrapper(model(), tbptt_steps=100, episodic_mem_len=episodic)
    paths = (TO_V,) + (("episodic_mems",) if episodic else ())
    loss_module = TTTMetaLearningTargetKLLoss(dim=16, num_classes=16, heads=2, dim_head=8) if custom else None
    torch.manual_seed(5)
    ttt = XLAutoregressiveWrapper(model(), tbptt_steps=100, episodic_mem_len=episodic, ttt_module_paths=paths,
                                  ttt_lr=0.0, ttt_use_muon=muon, ttt_muon_lr=0.0, ttt_custom_loss_module=loss_module)
    x = tokens(3 * SEG + 2)
    loss_base, loss_ttt = base(x), ttt(x)
    torch.testing.assert_close(loss_ttt, loss_base)
    loss_base.backward()
    loss_ttt.backward()
    grads_ttt = {n.replace(".module", ""): p.grad for n, p in ttt.named_parameters()}
    for name, p in base.named_parameters():
        torch.testing.assert_close(grads_ttt[name], p.grad, atol=1e-5, rtol=1e-4)
    if custom:  # the inner loss is in the outer graph (its step is multiplied by a zero rate here)
        assert all(p.grad is not None for p in loss_module.parameters())
    prompt = x[:, :SEG + 2]
    assert torch.equal(ttt.generate(prompt, 6, temperature=0), base.generate(prompt, 6, temperature=0))


def test_inner_step_is_one_sgd_step_per_row_and_the_next_segment_uses_it():
    net = model()
    plain = copy.deepcopy(net)
    lr, wd = 0.5, 0.1
    xl = XLAutoregressiveWrapper(net, tbptt_steps=2, ttt_module_paths=(TO_V,), ttt_lr=lr, ttt_wd=wd)
    x = tokens()
    loss = xl(x)
    w = plain.attn_layers.blocks[0].fn.to_v.weight.detach()
    got = xl.ttt_wrappers[TO_V].batch_params
    assert set(got) == {"weight"}  # (to_v has no bias)
    expected_loss = 0.0
    for r, (g,) in enumerate(row_grads(plain, x, ("attn_layers.blocks.0.fn.to_v.weight",))):
        new = w - lr * g - lr * wd * w
        torch.testing.assert_close(got["weight"][r], new)
        # the second segment reads the first's memories (original weights) through the stepped weights
        logits0, mems = plain(x[r:r + 1, :SEG], return_mems=True)
        stepped = copy.deepcopy(plain)
        stepped.attn_layers.blocks[0].fn.to_v.weight.data = new
        logits1 = stepped(x[r:r + 1, SEG:2 * SEG], mems=mems)
        expected_loss += (F.cross_entropy(logits0[0], x[r, 1:SEG + 1]) + F.cross_entropy(logits1[0], x[r, SEG + 1:]))
    torch.testing.assert_close(loss, expected_loss / 4)


def test_inner_loop_changes_no_parameter():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xl = XLAutoregressiveWrapper(net, tbptt_steps=4, ttt_module_paths=(TO_V, "attn_layers.layers.1.1.ff.0.0"),
                                 ttt_lr=1.0)
    xl(tokens(3 * SEG + 1))
    xl.generate(tokens(SEG + 2), 5, temperature=0)
    after = {k.replace(".module", ""): v for k, v in net.state_dict().items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    wrapper = xl.ttt_wrappers[TO_V]
    assert not torch.allclose(wrapper.batch_params["weight"], wrapper.module.weight.expand(2, -1, -1))
    TTTModuleWrapper.reset_all(xl)
    assert all(w.batch_params is None for w in xl.ttt_wrappers.values())


def test_source_gradient_steps_the_target():
    net = model()
    plain = copy.deepcopy(net)
    src, tgt = "attn_layers.layers.3.1.ff.0.0", "attn_layers.layers.1.1.ff.0.0"
    lr, wd = 0.3, 0.01
    xl = XLAutoregressiveWrapper(net, tbptt_steps=2, ttt_module_paths=((src, tgt),), ttt_lr=lr, ttt_wd=wd)
    x = tokens()
    xl(x)
    src_w, tgt_w = plain.attn_layers.blocks[3].fn.proj_in.weight, plain.attn_layers.blocks[1].fn.proj_in.weight
    got_src, got_tgt = xl.ttt_wrappers[src].batch_params["weight"], xl.ttt_wrappers[tgt].batch_params["weight"]
    for r, (g,) in enumerate(row_grads(plain, x, ("attn_layers.blocks.3.fn.proj_in.weight",))):
        torch.testing.assert_close(got_src[r], src_w)
        torch.testing.assert_close(got_tgt[r], tgt_w - lr * g - lr * wd * tgt_w)


def test_muon_step_orthogonalises_matrix_gradients():
    for shape in ((3, 8, 5), (3, 5, 8)):
        s = torch.linalg.svdvals(newton_schulz(torch.randn(shape)))
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration's band around 1
    net = model()
    plain = copy.deepcopy(net)
    ff = "attn_layers.layers.1.1.ff.0.0"  # upstream's path of the first feed-forward's input linear
    xl = XLAutoregressiveWrapper(net, tbptt_steps=2, ttt_module_paths=(ff,), ttt_lr=0.0, ttt_use_muon=True,
                                 ttt_muon_lr=0.2, ttt_wd=0.0)
    x = tokens()
    xl(x)
    w, b = plain.attn_layers.blocks[1].fn.proj_in.weight, plain.attn_layers.blocks[1].fn.proj_in.bias
    got = xl.ttt_wrappers[ff].batch_params
    for r, (g,) in enumerate(row_grads(plain, x, ("attn_layers.blocks.1.fn.proj_in.weight",))):
        torch.testing.assert_close(got["weight"][r], w - 0.2 * newton_schulz(g[None])[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["bias"][r], b)  # a vector takes the plain step (rate 0 here)


def test_custom_inner_loss_drives_the_step():
    net = model()
    plain = copy.deepcopy(net)

    class HiddenEnergy(torch.nn.Module):
        def forward(self, intermediates, mask=None):
            return intermediates.last_layer_hiddens.pow(2).mean(dim=-1)  # (b, n)

    xl = XLAutoregressiveWrapper(net, tbptt_steps=2, ttt_module_paths=(TO_V,), ttt_lr=0.4, ttt_wd=0.0,
                                 ttt_custom_loss_module=HiddenEnergy())
    x = tokens()
    xl(x)
    w = plain.attn_layers.blocks[0].fn.to_v.weight
    grads = row_grads(plain, x, ("attn_layers.blocks.0.fn.to_v.weight",), lambda i: i.last_hidden.pow(2).mean(-1))
    for r, (g,) in enumerate(grads):
        torch.testing.assert_close(xl.ttt_wrappers[TO_V].batch_params["weight"][r], w - 0.4 * g)


def test_learned_inner_losses_follow_their_formulas():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 16)
    inter = type("I", (), {"last_layer_hiddens": h})()
    kl = TTTMetaLearningTargetKLLoss(dim=16, num_classes=7, heads=2, dim_head=8)
    p = kl.to_prediction(h).softmax(-1)
    q = kl.to_meta_prediction(kl.encoder(h)).softmax(-1)
    torch.testing.assert_close(kl(inter), (p * (p.log() - q.log())).sum(-1))
    assert (kl(inter) >= -1e-6).all()
    nl = TTTNextLatentPredictionLoss(dim=16, loss_type="mse")
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3] = False
    want = (nl.predictor(h) - h.roll(-1, dims=1)).pow(2).mean(-1) * mask.roll(-1, dims=1)
    torch.testing.assert_close(nl(inter, mask), want)
    xl = XLAutoregressiveWrapper(model(), tbptt_steps=2, ttt_module_paths=(TO_V,), ttt_next_latent_loss=True)
    assert isinstance(xl.ttt_custom_loss_module, TTTNextLatentPredictionLoss)


def test_episodic_memories_are_extra_keys_values_of_every_attention_block():
    net = model()
    xl = XLAutoregressiveWrapper(net, episodic_mem_len=3)
    x = tokens()
    kv = EpisodicMemories.as_additional_kv(xl.episodic_mems(), 2)
    assert len(kv) == 2 and kv[0][0].shape == (2, 2, 3, 64)  # (b, kv heads, m, dim_head)
    expected, mems = 0.0, None
    for seg, target in zip(x[:, :-1].split(SEG, 1), x[:, 1:].split(SEG, 1)):
        logits, mems = net(seg, mems=mems, return_mems=True, self_attn_additional_kv=kv)
        expected = expected + F.cross_entropy(logits.transpose(1, 2), target) * seg.shape[1] / (x.shape[1] - 1)
    torch.testing.assert_close(xl(x), expected)


def test_low_rank_memories():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    low = LowRankLinear(lin, 2)
    assert torch.equal(low.bias, lin.bias) and not low.weight_b.any()
    with torch.no_grad():
        low.weight_b.normal_()
    z = torch.randn(3, 8)
    torch.testing.assert_close(low(z), z @ (low.weight_a @ low.weight_b).T + lin.bias)
    xl = XLAutoregressiveWrapper(model(), tbptt_steps=2, ttt_module_paths=(TO_V,), ttt_low_rank_paths=((TO_V, 4),))
    assert (TO_V, TO_V) in xl.ttt_paths_map
    xl(tokens())
    params = xl.ttt_wrappers[TO_V].batch_params
    assert set(params) == {"weight_a", "weight_b"} and params["weight_a"].shape == (2, 128, 4)  # (b, heads * dim_head, r)


def test_gradients_and_sleep_phase():
    xl = XLAutoregressiveWrapper(model(), tbptt_steps=4, ttt_module_paths=(TO_V,), ttt_lr=0.1)
    xl(tokens(3 * SEG + 1), dropout_mems=True, ttt_recurrent_steps=2).backward()
    for name, p in xl.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_toy_run_loss_falls():
    torch.manual_seed(0)
    xl = XLAutoregressiveWrapper(model(), tbptt_steps=4, ttt_module_paths=(TO_V,), ttt_lr=0.05)
    assert_loss_falls(xl, tokens(3 * SEG + 1, seed=7), steps=200, lr=3e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ttt_lr=-1.0), "ttt_lr"),
    (dict(ttt_wd="0.1"), "ttt_wd"),
    (dict(ttt_muon_lr=None), "ttt_muon_lr"),
    (dict(ttt_use_muon=1), "ttt_use_muon"),
    (dict(ttt_muon_steps=0), "ttt_muon_steps"),
    (dict(ttt_module_paths=TO_V), "ttt_module_paths"),
    (dict(ttt_module_paths=("attn_layers.layers.0.1.to_nothing",)), "no module at"),
    (dict(ttt_module_paths=((TO_V, TO_V, TO_V),)), "ttt_module_paths entries"),
    (dict(ttt_module_paths=((TO_V, "attn_layers.layers.1.1.ff.0.0"),)), "same shapes"),
    (dict(ttt_module_paths=(TO_V,), tbptt_steps=1), "tbptt_steps > 1"),
    (dict(ttt_low_rank_paths=((TO_V, 16),)), "low_rank_dim"),
    (dict(ttt_low_rank_paths=(TO_V,)), "ttt_low_rank_paths entries"),
    (dict(episodic_mem_len=-1), "episodic_mem_len"),
    (dict(ttt_custom_loss_module=lambda i, mask: i), "ttt_custom_loss_module"),
    (dict(ttt_custom_loss_module=torch.nn.Identity(), ttt_next_latent_loss=True), "cannot both"),
    (dict(ttt_module_paths=("episodic_mems",)), "no module at"),
])
def test_bad_keywords_are_refused_before_the_net_is_touched(kwargs, match):
    net = model()
    kwargs.setdefault("tbptt_steps", 2)
    with pytest.raises(ValueError, match=match):
        XLAutoregressiveWrapper(net, **kwargs)
    assert not any(isinstance(m, TTTModuleWrapper) for m in net.modules())


def test_bad_forward_arguments():
    xl = XLAutoregressiveWrapper(model())
    with pytest.raises(ValueError, match="ttt_recurrent_steps > 1 needs"):
        xl(tokens(), ttt_recurrent_steps=2)
    with pytest.raises(ValueError, match="ttt_recurrent_steps must be"):
        xl(tokens(), ttt_recurrent_steps=0)
    ttt = XLAutoregressiveWrapper(model(), tbptt_steps=2, ttt_module_paths=(TO_V,))
    ttt(tokens())  # leaves per-row weights for 2 rows in the net
    with pytest.raises(ValueError, match="reset_all"):
        ttt.net(torch.zeros(3, 4, dtype=torch.long))
    TTTModuleWrapper.reset_all(ttt)
    assert ttt.net(torch.zeros(3, 4, dtype=torch.long)).shape == (3, 4, 16)
    episodic = XLAutoregressiveWrapper(model(), episodic_mem_len=2)
    with pytest.raises(ValueError, match="self_attn_additional_kv"):
        episodic(tokens(), self_attn_additional_kv=[])


SHAPES_AT_PATHS = r"""
import json, os
from functools import reduce
from x_transformers import Decoder, TransformerWrapper
out = []
for case in json.loads(os.environ["PAYLOAD"]):
    net = TransformerWrapper(num_tokens=16, max_seq_len=4, max_mem_len=4,
                             attn_layers=Decoder(dim=16, depth=2, heads=2, **case["layers"]))
    out.append([[list(p.shape) for p in reduce(getattr, path.split("."), net).parameters()] for path in case["paths"]])
print(json.dumps(out))
"""


def test_upstream_paths_name_the_same_modules():
    from upstream import run

    paths = ["attn_layers.layers.0.1.to_v", "attn_layers.layers.2.1.to_q", "attn_layers.layers.1.1.ff.0.0",
             "attn_layers.layers.3.1.ff.0.proj", "attn_layers.layers.1.1.ff.2", "attn_layers.layers.3.1.ff.3"]
    cases = [dict(layers={}, paths=paths[:3] + paths[4:5]), dict(layers=dict(ff_glu=True), paths=paths[:2] + paths[3:5]),
             dict(layers=dict(ff_post_act_ln=True, attn_kv_heads=1), paths=paths[:3] + paths[5:])]
    want = run(SHAPES_AT_PATHS, cases)
    for case, shapes in zip(cases, want):
        net = TransformerWrapper(num_tokens=16, max_seq_len=4, max_mem_len=4,
                                 attn_layers=Decoder(dim=16, depth=2, heads=2, **case["layers"]))
        xl = XLAutoregressiveWrapper(net, tbptt_steps=2, ttt_module_paths=tuple(case["paths"]))
        got = [[list(p.shape) for p in xl.ttt_wrappers[path].module.parameters()] for path in case["paths"]]
        assert got == shapes, case
