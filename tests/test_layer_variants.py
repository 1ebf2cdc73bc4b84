"""Norm, residual and layout variants from upstream (issue 21): each keyword's defining formula,
written out by hand, against the built stack."""

import math

import pytest
import torch
import torch.nn.functional as F

import upstream
from x_transformers import CrossAttender, Decoder, Encoder, FunnelEncoder, TransformerWrapper, XTransformer
from x_transformers.config import ConfigConflictError
from x_transformers.norms import Derf, DynamicTanh

DIM = 16


def enc(**kw):
    torch.manual_seed(0)
    return Encoder(dim=DIM, depth=kw.pop("depth", 2), heads=2, attn_dim_head=8, **kw).double().eval()


def x_in(b=2, n=5):
    torch.manual_seed(1)
    return torch.randn(b, n, DIM, dtype=torch.float64)


def randomise(module):
    """Every parameter of ``module`` at random values, so a formula is checked beyond its init."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 0.5)


# --------------------------------------------------------------------------------------------
# norms


def test_dynamic_tanh_is_gamma_tanh_alpha_x_plus_beta():
    # DyT (2503.10622): gamma * tanh(alpha * x) + beta, alpha a learned scalar starting at the init alpha
    model = enc(use_dynamic_tanh=True, dynamic_tanh_init_alpha=1.5)
    norms = [m for m in model.modules() if isinstance(m, DynamicTanh)]
    assert len(norms) == 2 * 2 + 1  # before every branch, and the final norm
    assert all(n.alpha.item() == 1.5 and n.alpha.numel() == 1 for n in norms)
    norm = norms[0]
    randomise(norm)
    x = x_in() * 3
    expected = norm.gamma * torch.tanh(norm.alpha * x) + norm.beta
    torch.testing.assert_close(norm(x), expected)
    # no statistics over channels: a channel's output depends on that channel only
    y = x.clone()
    y[..., 0] += 10
    torch.testing.assert_close(norm(y)[..., 1:], norm(x)[..., 1:])


def test_derf_is_gamma_erf_alpha_x_plus_s_plus_beta():
    # Derf (2512.10938): gamma * erf(alpha * x + s) + beta, alpha starting at 0.5, s at 0
    model = enc(use_derf=True)
    norms = [m for m in model.modules() if isinstance(m, Derf)]
    assert len(norms) == 5 and all(n.alpha.item() == 0.5 and n.shift.item() == 0.0 for n in norms)
    norm = norms[0]
    randomise(norm)
    x = x_in()
    torch.testing.assert_close(norm(x), norm.gamma * torch.erf(norm.alpha * x + norm.shift) + norm.beta)


def test_pre_and_post_norm_normalises_branch_input_and_sum_without_final_norm():
    model = enc(pre_and_post_norm=True, depth=1)
    assert model.final_norm is None
    x = x_in()
    h = x
    for block in model.blocks:
        randomise(block.post_norm)
        h_branch = block.fn(block.pre_norm(h))
        h_branch = h_branch[0] if isinstance(h_branch, tuple) else h_branch
        h = block.post_norm(h + h_branch)
    torch.testing.assert_close(model(x), h)


@pytest.mark.parametrize("init", [0.0, 0.1])
def test_layerscale_is_a_per_channel_gain_on_each_branch(init):
    # CaiT (2103.17239): x + diag(gamma) f(norm(x)), gamma initialised to layerscale_init_value
    model = enc(use_layerscale=True, layerscale_init_value=init, depth=1)
    gammas = [b.layerscale for b in model.blocks]
    assert all(g.shape == (DIM,) and torch.allclose(g, torch.full_like(g, init)) for g in gammas)
    x = x_in()
    if init == 0.0:  # every branch off: the stack is its final norm
        torch.testing.assert_close(model(x), model.final_norm(x))
    block = model.blocks[1]
    randomise(block)
    out, _ = block(x)
    torch.testing.assert_close(out, x + block.layerscale * block.fn(block.pre_norm(x)))


def test_softclamp_output_bounds_the_stack_before_its_final_norm():
    value = 0.3
    model = enc(softclamp_output=True, softclamp_output_value=value)
    plain = enc(pre_norm_has_final_norm=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("final_norm")})
    x = x_in()
    torch.testing.assert_close(model(x), model.final_norm(value * torch.tanh(plain(x) / value)))


# --------------------------------------------------------------------------------------------
# residual paths


def test_gate_residual_is_a_gru_step_from_skip_to_branch():
    # GTrXL (1910.06764): the sum becomes a GRU with the branch as input and the skip as state
    model = enc(gate_residual=True, depth=1)
    block = model.blocks[1]
    randomise(block.gru)
    x = x_in()
    f = block.fn(block.pre_norm(x))
    g = block.gru
    wi, wh, bi, bh = g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh
    (ir, iz, i_n), (hr, hz, h_n) = (f @ wi.T + bi).chunk(3, -1), (x @ wh.T + bh).chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    new = torch.tanh(i_n + r * h_n)
    torch.testing.assert_close(block(x)[0], (1 - z) * new + z * x)


def test_scale_residual_learns_a_gain_on_the_skip_and_the_constant_scales_it():
    model = enc(scale_residual=True, scale_residual_constant=0.7, depth=1)
    block = model.blocks[0]
    assert block.skip_scale.shape == (DIM,) and torch.all(block.skip_scale == 1)
    randomise(block)
    x = x_in()
    torch.testing.assert_close(block(x)[0], 0.7 * block.skip_scale * x + block.fn(block.pre_norm(x))[0])


@pytest.mark.parametrize("key", ["scale_residual", "depth_scale_residual"])
def test_a_number_for_scale_residual_scales_every_branch(key):
    scaled, plain = enc(**{key: 0.25}), enc()
    assert sum(p.numel() for p in scaled.parameters()) == sum(p.numel() for p in plain.parameters())
    plain.load_state_dict(scaled.state_dict())
    x = x_in()
    block_s, block_p = scaled.blocks[0], plain.blocks[0]
    torch.testing.assert_close(block_s(x)[0] - x, 0.25 * (block_p(x)[0] - x))


def test_depth_scale_residual_initialises_output_projections_by_unit_depth():
    # OLMo's init: std (2 * fan_in * l) ** -0.5 for the branches of the l-th unit (1-based)
    torch.manual_seed(0)
    model = Encoder(dim=256, depth=3, heads=4, attn_dim_head=64, depth_scale_residual=True)
    for i, block in enumerate(model.blocks):
        layer = block.fn.to_out if i % 2 == 0 else block.fn.proj_out
        expected = (2 * layer.in_features * (i // 2 + 1)) ** -0.5
        assert abs(layer.weight.std().item() / expected - 1) < 0.03


def test_zero_init_branch_output_makes_the_stack_its_final_norm():
    model = enc(zero_init_branch_output=True)
    assert all(not (b.fn.to_out if hasattr(b.fn, "to_out") else b.fn.proj_out).weight.any() for b in model.blocks)
    x = x_in()
    torch.testing.assert_close(model(x), model.final_norm(x))


@pytest.mark.parametrize("gated", [False, True])
def test_reinject_input_adds_a_projection_of_the_input_to_every_branch_input(gated):
    # DEQ (1909.01377): each branch reads x_l + W x_0 (times sigmoid(w . x_0) when gated); the skip path reads x_l
    model = enc(reinject_input=True, learned_reinject_input_gate=gated, pre_norm_has_final_norm=False)
    x = x_in()
    inject = model.reinject(x)
    if gated:
        inject = inject * torch.sigmoid(x @ model.reinject_gate.weight.T)
    h = x
    for block in model.blocks:
        out = block.fn(block.pre_norm(h + inject))
        h = h + (out[0] if isinstance(out, tuple) else out)
    torch.testing.assert_close(model(x), h)


def test_reinject_input_through_a_reversible_stack_has_ordinary_autograds_gradients():
    # the recomputing Function takes the injection as a differentiable input: its gradient
    # reaches the projection as under ordinary autograd (return_attn runs the coupling that way)
    torch.manual_seed(0)
    model = Encoder(dim=DIM, depth=2, heads=2, reversible=True, reinject_input=True).double()
    x = x_in()
    grads = []
    for kwargs in ({}, dict(return_attn=True)):
        model.zero_grad()
        out = model(x, **kwargs)
        (out[0] if kwargs else out).square().sum().backward()
        grads.append(model.reinject.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# --------------------------------------------------------------------------------------------
# hyper-connections


def test_one_residual_stream_is_the_plain_residual():
    one, plain = enc(num_residual_streams=1), enc()
    assert one.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(one(x_in()), plain(x_in()))


def _sinkhorn_by_hand(logits, iters):
    m = torch.exp(logits) / torch.exp(logits).sum(dim=-2, keepdim=True)
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m


def test_sinkhorn_mixing_is_doubly_stochastic():
    from x_transformers.hyper import sinkhorn

    logits = torch.randn(7, 4, 4, dtype=torch.float64)
    m = sinkhorn(logits, 50)  # (computed in float32)
    torch.testing.assert_close(m.sum(-2), torch.ones(7, 4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.sum(-1), torch.ones(7, 4, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(sinkhorn(logits, 3), _sinkhorn_by_hand(logits, 3))


def test_hyper_connection_block_reads_mixes_and_writes_the_streams():
    # 2409.19606 (dynamic), mHC's Sinkhorn mixing: h = sum_s a_s R_s; R'_t = sum_s M_st R_s + b_t f(h)
    s_, iters = 3, 4
    model = enc(num_residual_streams=s_, hyper_conn_sinkhorn_iters=iters, depth=2)
    block = model.blocks[2]  # layer index 2: at init it reads stream 2 most
    torch.testing.assert_close(torch.sigmoid(block.static_alpha[:, 0]),
                               torch.sigmoid(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)))
    randomise(block)
    torch.manual_seed(4)
    streams = torch.randn(2, 5, s_, DIM, dtype=torch.float64)
    normed = F.layer_norm(streams, (DIM,), block.norm.weight)
    alpha = normed @ block.dynamic_alpha * block.dynamic_alpha_scale + block.static_alpha
    read = torch.sigmoid(alpha[..., 0])
    mix = _sinkhorn_by_hand(alpha[..., 1:], iters)
    write = 2 * torch.sigmoid(block.static_beta + 2 * torch.sigmoid(normed @ block.dynamic_beta)
                              * block.dynamic_beta_scale)
    h = (read[..., None] * streams).sum(dim=-2)
    f = block.fn(block.pre_norm(h))
    f = f[0] if isinstance(f, tuple) else f
    expected = torch.einsum("bnst,bnsd->bntd", mix, streams) + write[..., None] * f[..., None, :]
    torch.testing.assert_close(block(streams)[0], expected)


def test_hyper_connection_stack_expands_to_streams_and_sums_them():
    model = enc(num_residual_streams=2, pre_norm_has_final_norm=False)
    with torch.no_grad():
        model.stream_emb.copy_(torch.randn(2, DIM))
    x = x_in()
    h = x[..., None, :] + model.stream_emb
    for block in model.blocks:
        h = block(h)[0]
    torch.testing.assert_close(model(x), h.sum(dim=-2))


# --------------------------------------------------------------------------------------------
# layout


def test_weight_tie_layers_has_one_layers_parameters_and_runs_it_depth_times():
    tied = enc(weight_tie_layers=True, depth=3, pre_norm_has_final_norm=False)
    one = enc(depth=1, pre_norm_has_final_norm=False)
    assert sum(p.numel() for p in tied.parameters()) == sum(p.numel() for p in one.parameters())
    assert tied.layout_string == "a f a f a f" and tied.blocks[0] is tied.blocks[2] is tied.blocks[4]
    one.load_state_dict({k: v for k, v in tied.state_dict().items() if k.split(".")[1] in ("0", "1")})
    x = x_in()
    torch.testing.assert_close(tied(x), one(one(one(x))))


@pytest.mark.parametrize("kw", [dict(sandwich_coef=2), dict(sandwich_coef=1, macaron=True), dict(par_ratio=2),
                                dict(custom_layers=("a", "f", "f", "a", "f")), dict(top_attn_to_ff=1)])
def test_weight_tying_a_layout_without_repeated_units_shares_one_block_per_kind(kw):
    """ALBERT's all-shared layers (1909.11942) on a layout that is no repeated unit: every block of
    one kind (and branch scale) runs one module, so the model is the untied layout with each block
    given its kind's weights, and has one block of each kind's parameters."""
    tied, untied = enc(weight_tie_layers=True, depth=3, **kw), enc(depth=3, **kw)
    assert tied.layout == untied.layout
    first = {spec: tied.blocks[tied.layout.index(spec)] for spec in tied.layout}
    assert all(block is first[spec] for spec, block in zip(tied.layout, tied.blocks))
    randomise(tied)
    state = {f"blocks.{i}.{k}": v for i, spec in enumerate(untied.layout) for k, v in first[spec].state_dict().items()}
    untied.load_state_dict(state | {k: v for k, v in tied.state_dict().items() if not k.startswith("blocks.")})
    x = x_in()
    torch.testing.assert_close(tied(x), untied(x))
    shared = sum(p.numel() for b in first.values() for p in b.parameters())
    assert sum(p.numel() for p in tied.parameters()) == shared + sum(p.numel() for p in tied.final_norm.parameters())


def test_layers_execute_order_runs_the_built_blocks_in_that_order():
    model = enc(layers_execute_order=(2, 3, 0, 1, 2, 3))
    built = enc()
    assert model.layout_string == "a f a f a f"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in built.parameters())
    built.load_state_dict({f"blocks.{i}.{k.split('.', 2)[2]}": v for k, v in model.state_dict().items()
                           for j, i in ((0, 2), (1, 3), (2, 0), (3, 1)) if k.startswith(f"blocks.{j}.")}
                          | {k: v for k, v in model.state_dict().items() if k.startswith("final")})
    x = x_in()
    h = x
    for i in (2, 3, 0, 1, 2, 3):
        h = built.blocks[i](h)[0]
    torch.testing.assert_close(model(x), built.final_norm(h))


@pytest.mark.parametrize("depth", [4, 5])
def test_unet_skips_feed_each_upper_unit_its_mirrors_input(depth):
    # U-ViT (2209.12152): unit u >= depth / 2 starts from W [x_in(depth - 1 - u) ; x]
    model = enc(unet_skips=True, depth=depth, pre_norm_has_final_norm=False)
    upper = [u for u in range(depth) if u >= depth / 2]
    assert len(model.unet.combines) == len(upper)
    x = x_in()
    h, inputs = x, {}
    for u in range(depth):
        if u in upper:
            w = model.unet.combines[upper.index(u)].weight
            h = torch.cat((inputs[depth - 1 - u], h), dim=-1) @ w.T
        inputs[u] = h
        for block in model.blocks[2 * u: 2 * u + 2]:
            h = block(h)[0]
    torch.testing.assert_close(model(x), h)


def test_par_ratio_puts_attention_in_the_bottom_two_thirds():
    # upstream's par_ratio on depth 6 (12 blocks), ratio 3: 4 attention blocks, each followed by
    # (8 + 2) // 4 - 1 = 1 feed-forward, then feed-forwards only
    assert enc(depth=6, par_ratio=3).layout_string == "a f a f a f a f f f f f"
    assert enc(depth=2, par_ratio=2).layout_string == "a a f f"
    with pytest.raises(ValueError, match="par_ratio"):
        enc(depth=2, par_ratio=5)


def _shifted_by_hand(h, shifts, mask=None):
    """Each kept token's channel group g read from the shifts[g]-th kept token before it (after it when
    negative), zero past either end; padding contributes nothing. Rows of padding are left as zeros."""
    mask = torch.ones(h.shape[:2], dtype=torch.bool) if mask is None else mask
    out, size = torch.zeros_like(h), h.shape[-1] // len(shifts)
    for b in range(h.shape[0]):
        kept = mask[b].nonzero().flatten().tolist()
        for r, t in enumerate(kept):
            for g, s in enumerate(shifts):
                cols = slice(g * size, (g + 1) * size)
                out[b, t, cols] = h[b, kept[r - s], cols] if 0 <= r - s < len(kept) else 0.0
            out[b, t, len(shifts) * size:] = h[b, t, len(shifts) * size:]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_shift_tokens_moves_channel_groups_of_the_branch_input_along_the_sequence(causal):
    torch.manual_seed(0)
    cls = Decoder if causal else Encoder
    model = cls(dim=DIM, depth=1, heads=2, shift_tokens=1).double().eval()
    shifts = (0, 1) if causal else (-1, 0, 1)
    block = model.blocks[1]
    assert block.shifts == shifts
    x = x_in()
    # padding on the left, on the right and between tokens: the shift runs along the kept tokens
    mask = torch.tensor([[True] * 5, [False, True, False, True, False]])
    h = _shifted_by_hand(block.pre_norm(x), shifts, mask)
    expected = x + block.fn(h)
    got, _ = block(x, shift_mask=mask)
    torch.testing.assert_close(got[mask], expected[mask])
    torch.testing.assert_close(block(x)[0], x + block.fn(_shifted_by_hand(block.pre_norm(x), shifts)))


def test_shift_tokens_with_memory_tokens_shift_the_last_memory_token_into_the_first():
    """As upstream, memory tokens are prepended before the stack, so the shift sees them: the first
    token's shifted channels are the last memory token's. Padding between them and the first token
    (left padding) changes nothing; cached decoding is refused by name (shift_tokens has no cache)."""
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=20, max_seq_len=16, num_memory_tokens=2,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=2, shift_tokens=1)).eval()
    seen = {}

    def keep_first(name):
        def hook(_, args):
            seen.setdefault(name, args[0])  # (returns None: the module's input stays)
        return hook

    model.attn_layers.register_forward_pre_hook(keep_first("x"))
    model.attn_layers.blocks[0].fn.register_forward_pre_hook(keep_first("h"))
    x = torch.randint(0, 20, (2, 6))
    ref = model(x)
    stack_in = seen["x"]  # (b, 2 + 6, dim): the memory tokens first
    torch.testing.assert_close(stack_in[:, :2], model.memory_tokens[None].expand(2, -1, -1))
    normed = model.attn_layers.blocks[0].pre_norm(stack_in)
    torch.testing.assert_close(seen["h"], _shifted_by_hand(normed, (0, 1)))
    half = DIM // 2  # group 1 (shift 1) of the first token is the last memory token's
    torch.testing.assert_close(seen["h"][:, 2, half:], normed[:, 1, half:])
    pad = torch.zeros(3, dtype=torch.long)  # row 0 padded on the right, row 1 on the left
    xp = torch.stack((torch.cat((x[0], pad)), torch.cat((pad, x[1]))))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = keep[1, :3] = False
    out = model(xp, keep)
    torch.testing.assert_close(out[0, :6], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 3:], ref[1], atol=1e-5, rtol=1e-5)
    from x_transformers import AutoregressiveWrapper

    with pytest.raises(ValueError, match="shift_tokens.*cache"):
        AutoregressiveWrapper(model).generate(x[:, :3], 2, cache_kv=True)


def test_shift_tokens_per_block_and_refused_with_a_cache():
    model = enc(shift_tokens=(2, 0, 0, 1))
    assert [b.shifts for b in model.blocks] == [(-2, -1, 0, 1, 2), None, None, (-1, 0, 1)]
    with pytest.raises(ValueError, match="one amount per block"):
        enc(shift_tokens=(1, 1))
    from x_transformers.cache import KVCache

    dec = Decoder(dim=DIM, depth=1, heads=2, shift_tokens=1)
    with pytest.raises(ValueError, match="shift_tokens.*cache"):
        dec(torch.randn(1, 3, DIM), cache=KVCache())


def test_cross_attn_tokens_dropout_keeps_a_random_subset_of_context_tokens_in_training():
    torch.manual_seed(0)
    model = CrossAttender(dim=DIM, depth=1, heads=2, cross_attn_tokens_dropout=0.5).double()
    x, context = x_in(), torch.randn(2, 8, DIM, dtype=torch.float64)
    mask = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    seen = []
    attn = model.blocks[0].fn
    hook = attn.register_forward_pre_hook(lambda mod, args, kw: seen.append((kw["context"], kw["mask"])), with_kwargs=True)
    model.train()
    model(x, context=context, context_mask=mask)
    kept, kept_mask = seen[-1]
    assert kept.shape == (2, 4, DIM)
    # every kept column is one of the row's context tokens; row 2 keeps ceil(6 / 2) = 3 of its real ones
    for row in range(2):
        for col in range(4):
            assert any(torch.equal(kept[row, col], c) for c in context[row])
    assert kept_mask[:, 0, 0].sum(-1).tolist() == [4, 3]
    assert all(any(torch.equal(kept[1, c], t) for t in context[1, :6]) for c in range(4) if kept_mask[1, 0, 0, c])
    model.eval()  # eval: the whole context
    model(x, context=context, context_mask=mask)
    assert seen[-1][0].shape == (2, 8, DIM)
    hook.remove()


def test_layers_execute_order_refuses_a_block_the_layout_lacks():
    with pytest.raises(ValueError, match="layers_execute_order"):
        enc(layers_execute_order=(0, 4))


def test_only_attn_drops_every_feed_forward():
    assert enc(only_attn=True).layout_string == "a a"
    assert Decoder(dim=DIM, depth=2, heads=2, cross_attend=True, only_attn=True).layout_string == "a c a c"
    assert enc(only_attn=True, macaron=True).layout_string == "a a"


# --------------------------------------------------------------------------------------------
# positions


def test_position_interpolation_divides_positions_by_the_factor():
    # PI (2306.15595): angle_k(t) = (t / s) * base ** (-2k / r)
    from x_transformers.positional import RotaryEmbedding

    rot = RotaryEmbedding(8, base=100.0, interpolation_factor=4.0)
    t = torch.arange(0, 40)[None]
    cos, sin = rot(t)
    theta = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    angles = (t[0, :, None].double() / 4.0) * theta
    torch.testing.assert_close(cos[0, 0].double(), torch.cat((angles, angles), -1).cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0, 0].double(), torch.cat((angles, angles), -1).sin(), atol=1e-6, rtol=0)


def test_ntk_rescaling_keeps_the_highest_frequency_and_divides_the_lowest_by_the_factor():
    from x_transformers.positional import RotaryEmbedding

    r, a = 16, 8.0
    plain, ntk = RotaryEmbedding(r), RotaryEmbedding(r, base_rescale_factor=a)
    torch.testing.assert_close(ntk.inv_freq.double(), (10000.0 * a ** (r / (r - 2))) ** (
        -torch.arange(0, r, 2, dtype=torch.float64) / r), rtol=1e-6, atol=0)
    assert ntk.inv_freq[0] == plain.inv_freq[0] == 1.0
    torch.testing.assert_close(ntk.inv_freq[-1], plain.inv_freq[-1] / a)


@pytest.mark.parametrize("kw", [dict(rotary_interpolation_factor=3.0), dict(rotary_base_rescale_factor=4.0)])
def test_rescaled_rotary_keeps_relative_position_invariance(kw):
    # shifting every position by the same amount changes nothing, with or without a cache
    torch.manual_seed(0)
    model = Decoder(dim=DIM, depth=2, heads=2, rotary_pos_emb=True, **kw).double().eval()
    x = x_in()
    torch.testing.assert_close(model(x, positions=torch.arange(5)[None] + 37), model(x))
    assert model.rotary.interpolation_factor == kw.get("rotary_interpolation_factor", 1.0)


def test_dynamic_pos_bias_is_an_mlp_of_the_log_distance_per_head():
    torch.manual_seed(0)
    model = Encoder(dim=32, depth=2, heads=4, dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True,
                    dynamic_pos_bias_norm=True, dynamic_pos_bias_mlp_depth=3).double()
    dpb = model.rel_pos
    linears = [m for m in dpb.mlp if isinstance(m, torch.nn.Linear)]
    norms = [m for m in dpb.mlp if isinstance(m, torch.nn.LayerNorm)]
    assert [lin.out_features for lin in linears] == [8, 8, 8, 4] and len(norms) == 3  # width dim // 4
    q, k = torch.arange(3, 9)[None], torch.arange(0, 9)[None]
    bias = dpb(q, k)
    for i in (0, 3, 5):
        for j in (0, 4, 8):
            d = torch.tensor([[float(q[0, i] - k[0, j])]], dtype=torch.float64)
            h = torch.sign(d) * torch.log(d.abs() + 1)
            for lin, norm in zip(linears[:-1], norms):
                h = F.silu(F.layer_norm(h @ lin.weight.T + lin.bias, (8,), norm.weight, norm.bias))
            torch.testing.assert_close(bias[0, :, i, j], (h @ linears[-1].weight.T + linears[-1].bias)[0])
    # one module shared by every layer, reached through the stack's score modification
    torch.testing.assert_close(model.score_mod(q, k).dense(), bias)


# --------------------------------------------------------------------------------------------
# every model kind: built and run, or refused by a declared entry naming the keyword

KEYWORDS = [dict(use_dynamic_tanh=True), dict(use_derf=True), dict(pre_and_post_norm=True), dict(use_layerscale=True),
            dict(softclamp_output=True), dict(gate_residual=True), dict(scale_residual=True),
            dict(depth_scale_residual=0.5), dict(zero_init_branch_output=True), dict(reinject_input=True),
            dict(weight_tie_layers=True), dict(only_attn=True), dict(dynamic_pos_bias=True),
            dict(num_residual_streams=3), dict(unet_skips=True), dict(par_ratio=2), dict(shift_tokens=1)]


def _kinds(kw):
    yield "decoder", lambda: TransformerWrapper(num_tokens=20, max_seq_len=16,
                                                attn_layers=Decoder(dim=DIM, depth=2, heads=2, **kw))
    yield "encoder", lambda: TransformerWrapper(num_tokens=20, max_seq_len=16,
                                                attn_layers=Encoder(dim=DIM, depth=2, heads=2, **kw))
    yield "cross", lambda: CrossAttender(dim=DIM, depth=2, heads=2, **kw)
    yield "xtransformer", lambda: XTransformer(dim=DIM, depth=2, heads=2, num_tokens=20, max_seq_len=16, **kw)
    yield "funnel", lambda: TransformerWrapper(num_tokens=20, max_seq_len=16,
                                               attn_layers=FunnelEncoder(dim=DIM, depths=(1, 1), heads=2, **kw))
    yield "reversible", lambda: TransformerWrapper(
        num_tokens=20, max_seq_len=16, attn_layers=Decoder(dim=DIM, depth=2, heads=2, reversible=True, **kw))


@pytest.mark.parametrize("kw", KEYWORDS, ids=lambda kw: next(iter(kw)))
def test_every_kind_runs_or_refuses_naming_the_keyword(kw):
    name = next(iter(kw))
    for kind, make in _kinds(kw):
        try:
            model = make()
        except ConfigConflictError as err:  # a declared entry
            assert err.conflict is not None and name in str(err), (kind, err)
            continue
        except ValueError as err:  # a value this kind cannot take (par_ratio over a c f units)
            assert str(err).startswith(name), (kind, err)
            continue
        tokens = torch.randint(0, 20, (2, 6))
        if kind == "cross":
            out = model(torch.randn(2, 6, DIM), context=torch.randn(2, 3, DIM))
        elif kind == "xtransformer":
            out = model(tokens, tokens)
        else:
            out = model(tokens)
        out.float().square().mean().backward()
        assert torch.isfinite(out).all(), kind


def test_reversible_refuses_what_is_not_x_plus_f_x():
    for kw in (dict(pre_and_post_norm=True), dict(gate_residual=True), dict(scale_residual=True),
               dict(scale_residual_constant=0.5)):
        with pytest.raises(ConfigConflictError, match=next(iter(kw))):
            Decoder(dim=DIM, depth=2, heads=2, reversible=True, **kw)


def test_sub_keywords_need_their_feature():
    for sub, value in (("dynamic_tanh_init_alpha", 2.0), ("layerscale_init_value", 0.1),
                       ("softclamp_output_value", 5.0), ("learned_reinject_input_gate", True)):
        with pytest.raises(ValueError, match=sub):
            Decoder(dim=DIM, depth=1, heads=2, **{sub: value})


# --------------------------------------------------------------------------------------------
# the same parameters as upstream 2.31.10 for the same keywords

COUNT_CASES = [
    ("Decoder", dict(use_dynamic_tanh=True, dynamic_tanh_init_alpha=1.5)),
    ("Decoder", dict(use_derf=True)),
    ("Decoder", dict(pre_and_post_norm=True)),
    ("Decoder", dict(use_layerscale=True, layerscale_init_value=0.1)),
    ("Decoder", dict(softclamp_output=True)),
    ("Decoder", dict(gate_residual=True)),
    ("Encoder", dict(scale_residual=True, scale_residual_constant=0.5)),
    ("Decoder", dict(depth_scale_residual=True, zero_init_branch_output=False)),
    ("Decoder", dict(reinject_input=True, learned_reinject_input_gate=True)),
    ("Decoder", dict(weight_tie_layers=True, depth=4)),
    ("Encoder", dict(layers_execute_order=(0, 1, 0, 1, 2, 3))),
    ("Decoder", dict(only_attn=True)),
    ("Decoder", dict(ff_solu=True, ff_post_act_ln=True)),
    ("Decoder", dict(ff_glu=True, ff_glu_mult_bias=True, ff_glu_softclamp=True)),
    ("Decoder", dict(ff_sublayer_dropout=0.1, ff_zero_init_output=True, ff_softclamp_value=5.0)),
    ("Decoder", dict(dynamic_pos_bias=True, dynamic_pos_bias_norm=True, dynamic_pos_bias_mlp_depth=3)),
    ("Encoder", dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True)),
    ("Decoder", dict(rotary_pos_emb=True, rotary_interpolation_factor=2.0, rotary_base_rescale_factor=2.0)),
    ("Decoder", dict(num_residual_streams=4, hyper_conn_sinkhorn_iters=3)),
    ("Encoder", dict(unet_skips=True, depth=5)),
    ("Decoder", dict(par_ratio=3, depth=6)),
    ("Decoder", dict(shift_tokens=2)),
]


def test_parameter_counts_equal_upstreams():
    base = dict(dim=64, depth=2, heads=4)
    payload = [dict(kind=k, layers={**base, **kw}, wrapper=dict(num_tokens=50, max_seq_len=16)) for k, kw in COUNT_CASES]
    theirs = upstream.upstream_param_counts(payload)
    ours = []
    for kind, kw in COUNT_CASES:
        stack = dict(Decoder=Decoder, Encoder=Encoder)[kind](**{**base, **kw})
        ours.append(sum(p.numel() for p in TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=stack)
                        .parameters()))
    assert [c for c, o, t in zip(COUNT_CASES, ours, theirs) if o != t] == []
    assert math.prod(ours) > 0


def test_xtransformer_cross_attn_tokens_dropout_drops_encoder_tokens_for_the_decoder_only():
    """Upstream's XTransformer keyword: in training, a fraction of the encoder's output tokens is
    hidden from the decoder's cross-attention; in eval the model is the plain one."""
    from x_transformers import XTransformer

    def make(**kw):
        torch.manual_seed(0)
        return XTransformer(dim=16, num_tokens=20, depth=1, heads=2, max_seq_len=12, **kw)

    src, tgt = torch.randint(0, 20, (2, 12)), torch.randint(0, 20, (2, 12))
    plain, dropped = make(), make(cross_attn_tokens_dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    torch.testing.assert_close(dropped.eval()(src, tgt), plain.eval()(src, tgt))
    torch.manual_seed(1)
    trained = dropped.train()(src, tgt)
    assert not torch.allclose(trained, plain.train()(src, tgt))
    # the encoder is untouched: its hidden states are the plain encoder's, in training too
    torch.testing.assert_close(dropped.encoder(src, return_embeddings=True), plain.encoder(src, return_embeddings=True))
