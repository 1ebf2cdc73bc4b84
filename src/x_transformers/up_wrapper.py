"""Universal pretraining (Peter Bloem, "Universal pretraining by iterated random computation",
arXiv 2506.20057): pretrain a language model on data no one wrote, made by random computation.

A buffer of token sequences starts as noise (half uniformly random, half constant). Each step a
random recurrent network (``SyntheticDataGenerator``, standing for a random program) continues a
short seed cropped from one buffered sequence after another buffered sequence, nearly greedily;
the output replaces that sequence in the buffer, so the buffer is enriched by computation iterated
step after step, while a few buffered sequences go back to noise. The model is trained on the
next-token loss of sequences drawn from the buffer (``UniversalPretrainWrapper``).

Upstream's 2.31.10 copies the drawn rows before it writes to them, so its buffer never changes;
here the generated and reset sequences are written back by index, as the algorithm says.

Legend: b batch, n sequence length, s seed length, v vocabulary, d dim, B buffer size.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .autoregressive import AutoregressiveWrapper
from .config import _positive_int
from .sampling import check_temperature
from .wrappers import TransformerWrapper


def random_sequences(num_tokens: int, seq_len: int, num_samples_random: int, num_samples_constant: int,
                     shuffle: bool = True, device=None) -> Tensor:
    """(random + constant, seq_len) ids: uniformly random rows, then rows of one repeated token
    (one token per row), in a random order when ``shuffle``."""
    if num_samples_random + num_samples_constant < 1:
        raise ValueError("random_sequences needs at least one row (num_samples_random + num_samples_constant)")
    rand = torch.randint(0, num_tokens, (num_samples_random, seq_len), device=device)
    const = torch.randint(0, num_tokens, (num_samples_constant, 1), device=device).expand(-1, seq_len)
    rows = torch.cat((rand, const))
    return rows[torch.randperm(rows.shape[0], device=rows.device)] if shuffle else rows


class SyntheticDataGenerator(nn.Module):
    """A random recurrent network over tokens: embedding -> LSTM (or GRU, or ``network_klass``:
    (dim, hidden_size) -> a batch-first module returning (outputs, state)) -> logits. Each linear
    layer's weights get a random gain in [0, 1.1] at initialisation (upstream's choice), so each
    draw computes differently. ``max_seq_len``: how many of the last tokens ``generate`` returns."""

    def __init__(self, dim: int, num_tokens: int, max_seq_len: int = 512, hidden_size: int | None = None,
                 use_gru: bool = False, network_klass=None):
        super().__init__()
        for name, value in (("dim", dim), ("num_tokens", num_tokens), ("max_seq_len", max_seq_len)):
            _positive_int(name, value)
        _positive_int("hidden_size", hidden_size, allow_none=True)
        if network_klass is not None and not callable(network_klass):
            raise TypeError(f"network_klass must build a module from (dim, hidden_size), got {network_klass!r}")
        hidden_size = hidden_size or dim
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(num_tokens, dim)
        klass = network_klass or partial(nn.GRU if use_gru else nn.LSTM, batch_first=True)
        self.net = klass(dim, hidden_size)
        self.to_logits = nn.Linear(hidden_size, num_tokens, bias=False)
        self.apply(self._random_gain)

    @torch.no_grad()
    def _random_gain(self, module):
        if isinstance(module, nn.Linear):
            module.weight.mul_(float(torch.empty(()).uniform_(0.0, 1.1)))  # drawn by torch: seeded with it

    def reset_(self):
        """A new random network: every submodule re-initialised, the gains drawn again."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.apply(self._random_gain)

    def forward(self, input: Tensor, hiddens=None):
        """(b, n) ids (and the recurrent state) -> (logits (b, n, v), the next state)."""
        out, hiddens = self.net(self.embed(input), hiddens)
        return self.to_logits(out), hiddens

    @torch.no_grad()
    def generate(self, length: int, seed: Tensor | None = None, condition: Tensor | None = None,
                 temperature: float = 1e-4) -> Tensor:
        """Read ``seed`` (b, s) then ``condition`` (b, m) (either may be absent, not both) and sample
        ``length`` tokens at ``temperature`` (near greedy by default, as the paper). Returns the last
        ``max_seq_len`` tokens of the whole sequence (b, <= max_seq_len)."""
        _positive_int("length", length)
        check_temperature(temperature)
        parts = [t for t in (seed, condition) if t is not None]
        if not parts:
            raise ValueError("generate needs a seed or a condition (b, n) to start from")
        if any(t.ndim != 2 or t.is_floating_point() or t.shape[0] != parts[0].shape[0] for t in parts):
            raise ValueError(f"seed and condition must be token ids (b, n) of one batch, got "
                             f"{[tuple(t.shape) for t in parts]}")
        seq = torch.cat(parts, dim=-1)
        step_input, hiddens, out = seq, None, [seq]
        for _ in range(length):
            logits, hiddens = self(step_input, hiddens)
            last = logits[:, -1].float()
            if temperature == 0:
                token = last.argmax(dim=-1, keepdim=True)
            else:
                token = torch.multinomial((last / temperature).softmax(dim=-1), 1)
            out.append(token)
            step_input = token
        return torch.cat(out, dim=-1)[:, -self.max_seq_len:]


class UniversalPretrainWrapper(nn.Module):
    """Next-token training of a causal ``model`` on sequences made by iterated random computation
    (see the module docstring). ``forward()`` takes no data: one step of the buffer's algorithm,
    then the loss on ``batch_size`` buffered sequences of ``seq_len`` tokens.

    ``data_generator``: a module with ``generate(length, seed=, condition=)`` (default: a
    ``SyntheticDataGenerator`` of the model's width). ``buffer_size`` (default 20 * batch_size);
    ``num_reset`` (even) sequences go back to noise each step; ``seed_length``: the crop that seeds
    the generator; ``reset_turing_machine_every`` > 0: a new random generator every that many steps;
    ``keep_buffer_on_cpu``: the buffer stays on the CPU (not a module buffer)."""

    def __init__(self, model: TransformerWrapper, data_generator: nn.Module | None = None,
                 buffer_size: int | None = None, num_reset: int = 20, batch_size: int = 32, seq_len: int = 512,
                 seed_length: int = 8, reset_turing_machine_every: int = 0, keep_buffer_on_cpu: bool = False):
        super().__init__()
        if not isinstance(model, TransformerWrapper):
            raise TypeError(f"model must be a TransformerWrapper, got {type(model).__name__}")
        if not getattr(model.attn_layers, "causal", False):
            raise ValueError("model must be causal (a Decoder): universal pretraining trains next-token prediction")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("seed_length", seed_length)):
            _positive_int(name, value)
        buffer_size = batch_size * 20 if buffer_size is None else buffer_size
        _positive_int("buffer_size", buffer_size)
        if buffer_size <= batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must exceed batch_size ({batch_size})")
        if isinstance(num_reset, bool) or not isinstance(num_reset, int) or num_reset < 0 or num_reset % 2 \
                or num_reset > buffer_size:
            raise ValueError(f"num_reset must be an even count in [0, buffer_size={buffer_size}] (half random, "
                             f"half constant sequences), got {num_reset!r}")
        if seed_length >= seq_len:
            raise ValueError(f"seed_length ({seed_length}) must be below seq_len ({seq_len}): the seed is a crop")
        if isinstance(reset_turing_machine_every, bool) or not isinstance(reset_turing_machine_every, int) \
                or reset_turing_machine_every < 0:
            raise ValueError(f"reset_turing_machine_every must be a count >= 0 (0: never), "
                             f"got {reset_turing_machine_every!r}")
        if model.max_seq_len is not None and seq_len > model.max_seq_len:
            raise ValueError(f"seq_len ({seq_len}) exceeds the model's max_seq_len ({model.max_seq_len})")
        if data_generator is not None and not callable(getattr(data_generator, "generate", None)):
            raise TypeError("data_generator must have generate(length, seed=, condition=) returning ids (b, seq_len)")
        self.model = model
        self.ar_wrapped = AutoregressiveWrapper(model)
        self.data_generator = data_generator or SyntheticDataGenerator(dim=model.attn_layers.dim,
                                                                       num_tokens=model.num_tokens,
                                                                       max_seq_len=seq_len)
        self.num_tokens, self.seq_len, self.seed_length = model.num_tokens, seq_len, seed_length
        self.batch_size, self.buffer_size, self.num_reset = batch_size, buffer_size, num_reset
        self.reset_turing_machine_every = reset_turing_machine_every
        noise = random_sequences(model.num_tokens, seq_len, buffer_size // 2, buffer_size - buffer_size // 2)
        if keep_buffer_on_cpu:
            self.synth_data_buffer = noise
        else:
            self.register_buffer("synth_data_buffer", noise)
        self.register_buffer("step", torch.tensor(0))

    @property
    def device(self):
        return self.step.device

    def _draw(self, size: int) -> Tensor:
        """``size`` distinct buffer rows (indices on the buffer's device)."""
        return torch.randperm(self.buffer_size, device=self.synth_data_buffer.device)[:size]

    @torch.no_grad()
    def enrich_(self):
        """One step of the buffer: generate from (seed crop, condition) pairs, write the outputs over
        the conditions, return num_reset sequences to noise."""
        buffer, b, s = self.synth_data_buffer, self.batch_size, self.seed_length
        cond_idx, seed_idx = self._draw(b), self._draw(b)
        offsets = torch.randint(0, self.seq_len - s + 1, (b, 1), device=buffer.device)
        seeds = buffer[seed_idx[:, None], offsets + torch.arange(s, device=buffer.device)]  # (b, s)
        generated = self.data_generator.generate(self.seq_len, seed=seeds.to(self.device),
                                                 condition=buffer[cond_idx].to(self.device))
        if generated.shape != (b, self.seq_len):
            raise ValueError(f"data_generator.generate must return ids ({b}, {self.seq_len}), got "
                             f"{tuple(generated.shape)}")
        buffer[cond_idx] = generated.to(buffer.device, buffer.dtype)
        self.step.add_(1)
        every = self.reset_turing_machine_every
        if every and int(self.step) % every == 0:
            self.data_generator.reset_()
        if self.num_reset:
            half = self.num_reset // 2
            buffer[self._draw(self.num_reset)] = random_sequences(self.num_tokens, self.seq_len, half, half,
                                                                  device=buffer.device)

    def forward(self) -> Tensor:
        """One enrichment step, then the next-token loss on batch_size buffered sequences."""
        self.enrich_()
        data = self.synth_data_buffer[self._draw(self.batch_size)].to(self.device)
        return self.ar_wrapped(data)


__all__ = ["UniversalPretrainWrapper", "SyntheticDataGenerator", "random_sequences"]
