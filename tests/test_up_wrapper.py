"""Universal pretraining (2506.20057): each step writes the random network's continuations over the
drawn conditions in the buffer and returns num_reset rows to noise; the generator continues
(seed, condition) greedily as its own recurrent network computes by hand; the model trains on
buffered sequences, whose structure it learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.up_wrapper import SyntheticDataGenerator, UniversalPretrainWrapper, random_sequences

V = 16


def lm(seed=0):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2))


class Stamp(nn.Module):
    """A stand-in generator: every continuation is the token 7, and it records what it was given."""

    def generate(self, length, seed=None, condition=None):
        self.seen = (seed.clone(), condition.clone())
        return torch.full((seed.shape[0], length), 7)


def test_a_step_writes_the_generated_rows_over_the_conditions_and_resets_noise_rows():
    torch.manual_seed(0)
    up = UniversalPretrainWrapper(lm(), data_generator=Stamp(), buffer_size=40, batch_size=8, seq_len=12,
                                  seed_length=4, num_reset=0)
    up.synth_data_buffer.copy_(torch.randint(0, 7, (40, 12)))  # no row of 7s to begin with
    before = up.synth_data_buffer.clone()
    up.enrich_()
    after = up.synth_data_buffer
    changed = (after != before).any(-1)
    stamped = (after == 7).all(-1)
    assert stamped.sum() == 8 and not (changed & ~stamped).any()  # exactly the 8 conditions were replaced
    seed, condition = up.data_generator.seen
    # the conditions are the rows that were overwritten; each seed a 4-long crop of some buffered row
    assert sorted(map(tuple, condition.tolist())) == sorted(map(tuple, before[stamped].tolist()))
    for row in seed:
        assert any(row.tolist() == r[i:i + 4].tolist() for r in before for i in range(9))
    assert int(up.step) == 1
    # resets: num_reset rows go back to noise, half uniformly random and half constant
    up = UniversalPretrainWrapper(lm(), data_generator=Stamp(), buffer_size=40, batch_size=8, seq_len=12,
                                  seed_length=4, num_reset=6)
    up.synth_data_buffer.fill_(7)
    up.enrich_()
    fresh = (up.synth_data_buffer != 7).any(-1)
    assert 3 <= fresh.sum() <= 6  # a constant reset row may happen to be all 7s


def test_the_generator_continues_seed_then_condition_greedily():
    torch.manual_seed(1)
    gen = SyntheticDataGenerator(dim=16, num_tokens=V, max_seq_len=10)
    seed, cond = torch.randint(0, V, (3, 4)), torch.randint(0, V, (3, 5))
    out = gen.generate(6, seed=seed, condition=cond, temperature=0.0)
    seq = torch.cat((seed, cond), dim=-1)
    for _ in range(6):  # greedy by hand: the whole sequence again each step
        logits, _ = gen(seq)
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=-1)
    assert torch.equal(out, seq[:, -10:])
    near_greedy = gen.generate(6, seed=seed, condition=cond)  # the paper's temperature, 1e-4
    assert torch.equal(near_greedy, out)


def test_reset_draws_a_new_network_and_gains_differ_between_draws():
    torch.manual_seed(2)
    gen = SyntheticDataGenerator(dim=16, num_tokens=V, use_gru=True)
    assert isinstance(gen.net, nn.GRU)
    w = gen.to_logits.weight.clone()
    gen.reset_()
    assert not torch.equal(w, gen.to_logits.weight)
    up = UniversalPretrainWrapper(lm(), buffer_size=20, batch_size=4, seq_len=8, seed_length=2,
                                  reset_turing_machine_every=2, num_reset=2)
    w = up.data_generator.to_logits.weight.clone()
    up.enrich_()
    assert torch.equal(w, up.data_generator.to_logits.weight)
    up.enrich_()
    assert not torch.equal(w, up.data_generator.to_logits.weight)


def test_random_sequences_are_half_noise_half_constant():
    rows = random_sequences(V, 12, 5, 5, shuffle=False)
    assert rows.shape == (10, 12)
    assert (rows[5:] == rows[5:, :1]).all()
    assert (rows[:5] != rows[:5, :1]).any(-1).all()


@pytest.mark.parametrize("keep_buffer_on_cpu", [False, True])
def test_training_on_the_buffer_lowers_the_loss(keep_buffer_on_cpu):
    torch.manual_seed(0)
    model = lm()
    up = UniversalPretrainWrapper(model, buffer_size=64, batch_size=16, seq_len=16, seed_length=4, num_reset=2,
                                  keep_buffer_on_cpu=keep_buffer_on_cpu)
    assert ("synth_data_buffer" in dict(up.named_buffers())) is not keep_buffer_on_cpu
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(200 if not keep_buffer_on_cpu else 3):
        loss = up()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert all(p.grad is None for p in up.data_generator.parameters())  # the generator is not trained
        opt.step()
        losses.append(loss.item())
    if not keep_buffer_on_cpu:
        assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


def test_bad_inputs_raise_one_line_errors_naming_the_argument():
    enc = TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Encoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="causal"):
        UniversalPretrainWrapper(enc, seq_len=8)
    with pytest.raises(TypeError, match="model"):
        UniversalPretrainWrapper(nn.Linear(2, 2))
    for kw, match in ((dict(num_reset=3), "num_reset"), (dict(buffer_size=8, batch_size=8), "buffer_size"),
                      (dict(seed_length=16, seq_len=16), "seed_length"), (dict(seq_len=64), "seq_len"),
                      (dict(batch_size=0), "batch_size"), (dict(reset_turing_machine_every=-1),
                                                           "reset_turing_machine_every")):
        with pytest.raises(ValueError, match=match) as err:
            UniversalPretrainWrapper(lm(), **({"seq_len": 16} | kw))
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="data_generator"):
        UniversalPretrainWrapper(lm(), data_generator=nn.Linear(2, 2), seq_len=16)
    gen = SyntheticDataGenerator(dim=8, num_tokens=V)
    with pytest.raises(ValueError, match="seed or a condition"):
        gen.generate(4)
    with pytest.raises(ValueError, match="length"):
        gen.generate(0, seed=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dim"):
        SyntheticDataGenerator(dim=0, num_tokens=V)
