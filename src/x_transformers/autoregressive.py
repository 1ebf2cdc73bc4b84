"""Autoregressive training and generation around a causal ``TransformerWrapper``.

Generation lives here, outside the model: :meth:`AutoregressiveWrapper.generate` runs
:func:`~x_transformers.decoding.prefill` over the prompt once, then loops over
:func:`~x_transformers.decoding.decode_step` (one token per row, compiled per model where asked:
``decoding.py``), sampling with :mod:`x_transformers.sampling` or searching with beams.

Ragged prompts are left-padded with a mask: positions count kept tokens only (the cache and the
wrapper both do), so each row generates exactly what it would generate alone.

Legend: b batch, k beams, n prompt length, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attend import plan_free_attention
from .hub import Pretrained
from .loss import chunked_cross_entropy, head_weight
from .cache import Intermediates, KVCache, StaticKVCache
from .checks import check_context, check_finite, refuse_upstream, trusted_inputs
from .decoding import GenerationConfig, _static_len, compiled_decoder, conditioned, decode_step, left_pad, prefill
from .sampling import get_filter, sample
from .positional import AbsolutePositionalEmbedding
from .wrappers import TransformerWrapper
from . import looped


class AutoregressiveWrapper(Pretrained, nn.Module):
    """Next-token training loss and generation for a causal ``TransformerWrapper``."""

    def __init__(self, net: TransformerWrapper, ignore_index: int = -100, pad_value: int = 0, mask_prob: float = 0.0,
                 fused_loss: bool = True, next_embed_loss_weight: float = 0.1, add_attn_z_loss: bool = False,
                 looped_loss_threshold_exit: float = 0.05, looped_loss_slope: float = 50,
                 looped_exit_loss_weight: float = 1.0):
        """``mask_prob``: in the loss, hide that fraction of each row's tokens from self-attention
        (upstream's "autoregressive + MLM" of 2210.13432: ``int(n * mask_prob)`` random keys per row,
        never the first, are masked for every query; positions do not move). ``fused_loss``: where
        the head is one plain linear map (or the tied embedding), the loss is computed from the
        hidden states with :func:`~x_transformers.loss.chunked_cross_entropy` and the (b, n, vocab)
        logits are never built (same value and gradients as ``F.cross_entropy``; False: always the
        plain loss on the logits, e.g. for double backward). ``next_embed_loss_weight``: with a net
        built with ``add_continuous_pred_head``, the loss adds this weight times the L1 distance
        between the head's prediction and the next token's (detached) input embedding, as upstream.
        ``add_attn_z_loss``: the loss adds the attention z-loss of the forward (the net's
        ``attn_z_loss_weight``; 2202.08906), as upstream. With a ``looped`` net (looped.py) the loss is
        upstream's: every loop step's next-token loss weighted by the exit gate's distribution, plus
        ``looped_exit_loss_weight`` times the gate's loss against sigmoid(``looped_loss_slope`` *
        (loss change of one more step + ``looped_loss_threshold_exit``))."""
        super().__init__()
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"AutoregressiveWrapper wraps a TransformerWrapper, got {type(net).__name__}")
        if not net.attn_layers.causal:
            raise ValueError("AutoregressiveWrapper needs a causal stack (Decoder); this one is bidirectional "
                             "(Encoder), so it cannot predict the next token or decode with a cache")
        loop = dict(looped_loss_threshold_exit=(looped_loss_threshold_exit, 0.05), looped_loss_slope=(looped_loss_slope, 50),
                    looped_exit_loss_weight=(looped_exit_loss_weight, 1.0))
        for key, (value, default) in loop.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{key} must be a number >= 0, got {value!r}")
            if value != default and not net.looped:
                raise ValueError(f"{key} configures the looped loss; this net is not looped (build it with looped=True)")
        self.looped_loss_threshold_exit, self.looped_loss_slope, self.looped_exit_loss_weight = (
            float(looped_loss_threshold_exit), float(looped_loss_slope), float(looped_exit_loss_weight))
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"mask_prob must be a number in [0, 1), got {mask_prob!r}")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.mask_prob = float(mask_prob)
        self.fused_loss = bool(fused_loss)
        if isinstance(next_embed_loss_weight, bool) or not isinstance(next_embed_loss_weight, (int, float)):
            raise ValueError(f"next_embed_loss_weight must be a number, got {next_embed_loss_weight!r}")
        self.next_embed_loss_weight = float(next_embed_loss_weight)
        if not isinstance(add_attn_z_loss, bool):
            raise ValueError(f"add_attn_z_loss must be True or False, got {add_attn_z_loss!r}")
        self.add_attn_z_loss = add_attn_z_loss

    def kv_mask(self, x: Tensor) -> Tensor:
        """(b, n) -> the keys self-attention may see (True) under ``mask_prob``: per row exactly
        ``min(int(n * mask_prob), n - 1)`` columns hidden, drawn uniformly, never the first."""
        b, n = x.shape
        rand = torch.rand(b, n, device=x.device)
        rand[:, 0] = -1.0  # the first token is never hidden: every query keeps a key to attend to
        hidden = rand.topk(min(int(n * self.mask_prob), n - 1), dim=-1).indices
        return torch.ones(b, n, dtype=torch.bool, device=x.device).scatter(1, hidden, False)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, lens: Tensor | None = None,
                return_outputs: bool = False, prepend_embeds=None, **kwargs):
        """x (b, n) -> mean cross-entropy of predicting x[:, 1:] from x[:, :-1]. Targets equal to
        ``ignore_index`` (or masked out) do not count; such inputs are fed as ``pad_value``.
        ``lens`` (b,): upstream's right-padded lengths (columns from ``lens`` on are padding).
        ``prepend_embeds`` (b, P, emb_dim) (with ``prepend_mask``): embeddings ahead of the tokens, as upstream.
        ``return_outputs``: also (logits (b, n-1, v), the Intermediates of the forward)."""
        if prepend_embeds is not None:  # (b, P, emb_dim) ahead of the tokens; the loss is over the tokens only
            if self.mask_prob > 0 or self.net.to_next_embed_pred is not None:
                raise ValueError("prepend_embeds in the loss: not with mask_prob or the next-embedding head "
                                 "(both are per token column)")
            kwargs.update(prepend_embeds=prepend_embeds, excise_prepend_embeds=True)
        if lens is not None:
            within = torch.arange(x.shape[1], device=x.device)[None] < lens.to(x.device)[:, None]
            mask = within if mask is None else mask & within
        inp, target = x[:, :-1], x[:, 1:]
        inp = inp.masked_fill(inp == self.ignore_index, self.pad_value)
        inp_mask = None
        if mask is not None:
            inp_mask = mask[:, :-1]
            target = target.masked_fill(~mask[:, 1:], self.ignore_index)
        if self.mask_prob > 0:  # drawn over the whole row, as upstream; the last column is only a target
            hidden = self.kv_mask(x)[:, :-1]
            given = kwargs.pop("self_attn_kv_mask", None)
            kwargs["self_attn_kv_mask"] = hidden if given is None else hidden & given
        if self.add_attn_z_loss:  # the plain loss, with the z-loss the forward records
            kwargs["return_attn_z_loss"] = True
        if self.net.to_next_embed_pred is not None:
            return self._next_embed_loss(x, mask, target, return_outputs, kwargs)
        if self.net.looped:
            return self._looped_loss(inp, inp_mask, target, return_outputs, kwargs)
        fused = not return_outputs and not any(k.startswith("return_") for k in kwargs) and self._fused_weight() is not None
        if fused:  # the head's product and the loss in one pass, chunk by chunk
            hidden = self.net(inp, inp_mask, return_embeddings=True, **kwargs)  # (b, n-1, d)
            if self.net.logits_scale != 1.0:  # the forward scales the hidden states before its head
                hidden = hidden * self.net.logits_scale
            # the weight is read after the forward: under FSDP that is when it is gathered
            return chunked_cross_entropy(hidden, self._fused_weight(), target, ignore_index=self.ignore_index)
        want_inter = return_outputs or self.add_attn_z_loss
        out = self.net(inp, inp_mask, return_intermediates=want_inter, **kwargs)
        logits, inter = out if want_inter else (out, None)
        loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)
        if self.add_attn_z_loss:
            loss = loss + inter.attn_z_loss
        return (loss, (logits, inter)) if return_outputs else loss

    def _looped_loss(self, inp, inp_mask, target, return_outputs, kwargs):
        """The looped net's loss (looped.looped_loss) over every loop step's logits and exit gate."""
        kwargs = dict(kwargs, looped_pred_all_logits=True)
        logits, inter = self.net(inp, inp_mask, return_intermediates=True, **kwargs)
        loss = looped.looped_loss(torch.stack(inter.all_pred_logits, dim=1), torch.stack(inter.exit_logits, dim=1)[..., 0],
                                  target, ignore_index=self.ignore_index, slope=self.looped_loss_slope,
                                  threshold=self.looped_loss_threshold_exit, exit_weight=self.looped_exit_loss_weight)
        if self.add_attn_z_loss:
            loss = loss + inter.attn_z_loss
        return (loss, (logits, inter)) if return_outputs else loss

    def _next_embed_loss(self, x, mask, target, return_outputs, kwargs):
        """Upstream's loss with the next-embedding head: the net reads all n tokens (a causal stack's
        first n-1 outputs are those of x[:, :-1]), so the last token's input embedding is a target."""
        inp = x.masked_fill(x == self.ignore_index, self.pad_value)
        if "self_attn_kv_mask" in kwargs:  # drawn over n - 1 columns; the last one is only read by itself
            kv = kwargs["self_attn_kv_mask"]
            kwargs["self_attn_kv_mask"] = torch.cat((kv, torch.ones_like(kv[:, :1])), dim=-1)
        out, inter = self.net(inp, mask, return_intermediates=True, return_next_embed_pred=True, **kwargs)
        logits, (pred, init) = out
        logits = logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)
        keep = target != self.ignore_index  # (b, n-1)
        distance = F.l1_loss(pred[:, :-1], init[:, 1:].detach(), reduction="none")[keep]
        loss = loss + distance.mean() * self.next_embed_loss_weight
        if self.add_attn_z_loss:
            loss = loss + inter.attn_z_loss
        return (loss, (logits, inter)) if return_outputs else loss

    def _fused_weight(self) -> Tensor | None:
        return head_weight(self.net) if self.fused_loss else None

    # ------------------------------------------------------------------------------------------
    # generation

    def _compile_options(self, compile) -> dict:
        if isinstance(compile, dict):  # torch.compile keywords, e.g. {"backend": "eager"} in tests
            return dict(compile)
        if isinstance(compile, str):
            return dict(mode=compile)
        # CUDA graphs remove the per-step launch overhead that dominates small-batch decoding
        return dict(mode="reduce-overhead" if next(self.net.parameters()).is_cuda else "default")

    def _static_cache(self, batch, max_len):
        # Reused while the shape fits: the same tensors keep a compiled step's guards and a CUDA
        # graph's addresses valid from one generate() call to the next.
        param = next(self.net.parameters())
        key = (batch, max_len, param.dtype, param.device)
        cache = getattr(self, "_cache", None)
        if cache is not None and self._cache_key == key:
            cache.reset()
            return cache
        self._cache, self._cache_key = StaticKVCache.for_model(self.net, batch, max_len), key
        return self._cache

    def _window(self, cfg: GenerationConfig, prompt_len: int) -> int | None:
        """Upstream's ``restrict_to_max_seq_len``: the model sees at most ``max_seq_len`` tokens (the
        latest ones), or None where nothing is cropped. Refused where a window cannot be honoured."""
        max_len = self.net.max_seq_len
        if not cfg.restrict_to_max_seq_len or max_len is None or prompt_len + cfg.seq_len - 1 <= max_len:
            return None
        if cfg.cache_kv and isinstance(self.net.pos_emb, AbsolutePositionalEmbedding):
            raise ValueError(f"restrict_to_max_seq_len: {prompt_len} + {cfg.seq_len} tokens exceed max_seq_len "
                             f"({max_len}) and learned absolute positions cannot slide with a cache; pass "
                             f"cache_kv=False (each step re-embeds the window) or use rotary positions")
        if cfg.static_cache:
            raise ValueError("restrict_to_max_seq_len: a static cache cannot drop its oldest keys; "
                             "use the dynamic cache (static_cache=False, compile=False)")
        return max_len

    def _stepper(self, tokens, mask, cfg: GenerationConfig, *, context, context_mask, condition=None, net=None,
                 prepend=None):
        """Returns (logits of the prompt's last column, step(token (b,) -> logits), the cache).
        ``prepend``: {"prepend_embeds": (b, P, emb_dim), "prepend_mask": (b, P)} read ahead of the prompt
        (by the prefill; the cache keeps it), or None."""
        net = net or self.net
        ahead = prepend or {}
        P = ahead["prepend_embeds"].shape[1] if ahead else 0
        window = self._window(cfg, tokens.shape[1])
        if window is not None and tokens.shape[1] > window:  # upstream crops the prompt too
            tokens, mask = tokens[:, -window:], None if mask is None else mask[:, -window:]
        if not cfg.cache_kv:
            seq = [tokens]
            masks = [mask if mask is not None else torch.ones_like(tokens, dtype=torch.bool)]

            def step(token):  # the uncached reference: the whole sequence (its last window) again
                seq.append(token[:, None])
                masks.append(torch.ones_like(token[:, None], dtype=torch.bool))
                full, full_mask = torch.cat(seq, dim=1), torch.cat(masks, dim=1) if mask is not None else None
                if window is not None:
                    full, full_mask = full[:, -window:], None if full_mask is None else full_mask[:, -window:]
                return net(full, full_mask, context=context, context_mask=context_mask, **conditioned(condition),
                           **ahead)[:, -1]

            return net(tokens, mask, context=context, context_mask=context_mask, **conditioned(condition),
                       **ahead)[:, -1], step, None

        if cfg.static_cache:
            max_len = cache_columns(net, tokens.shape[1] + cfg.seq_len) + P
            cache = self._static_cache(tokens.shape[0], _static_len(max_len) if cfg.compile else max_len)
            # The capacity is known up front: check it once here (host-side), not with a sync per step.
            cache.check_room(cache_columns(net, tokens.shape[1] + cfg.seq_len - 1) + P)
        else:
            cache = KVCache()
        logits = prefill(net, tokens, mask, cache, context, context_mask, condition, **ahead)
        decode = compiled_decoder(net, self._compile_options(cfg.compile)) if cfg.compile else decode_step
        cudagraphs = decode is not decode_step and logits.is_cuda
        trust = self._trusted(logits, tokens.shape[1] + P, cfg, window)

        def step(token):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            if window is not None:  # keep the latest window - 1 keys (memory tokens stay), as upstream
                cache.keep_last(window - 1, keep_first=net.num_memory_tokens)
            with trusted_inputs(*trust):
                return decode(net, token[:, None], cache, context, context_mask, condition)

        return logits, step, cache

    def _trusted(self, logits, columns: int, cfg: GenerationConfig, window) -> tuple:
        """What a decode step's input checks may take on trust (checks.trusted_inputs): the ids, when
        every sampled id is below num_tokens (the logits are no wider); the positions, when without a
        window the last token's position (under the columns it follows, memory tokens counted too)
        stays under max_seq_len: both known here once, on the host, instead of a sync a step."""
        num_tokens, limit = getattr(self.net, "num_tokens", None), getattr(self.net, "max_seq_len", None)
        trust = ("ids",) if num_tokens is not None and logits.shape[-1] <= num_tokens else ()
        memory = getattr(self.net, "num_memory_tokens", 0) or 0
        if window is None and limit is not None and columns + memory + cfg.seq_len - 1 <= limit:
            trust += ("positions",)
        return trust

    def _prompts(self, prompts, prompt_lens):
        """Upstream's prompt forms -> (tokens (b, n) left-padded, mask or None, whether the batch
        dimension was added). A 1-D tensor is one prompt; ``prompt_lens`` (b,) gives the lengths of
        a right-padded (b, n) batch (upstream's ragged form)."""
        unbatched = isinstance(prompts, Tensor) and prompts.ndim == 1
        if unbatched:
            prompts = prompts[None]
        if prompt_lens is not None:
            if not isinstance(prompts, Tensor):
                raise ValueError("prompt_lens is for a padded (b, n) tensor of prompts; a list of prompts "
                                 "carries its own lengths")
            lens = [int(n) for n in prompt_lens.tolist()]
            if len(lens) != prompts.shape[0] or not all(1 <= n <= prompts.shape[1] for n in lens):
                raise ValueError(f"prompt_lens must hold {prompts.shape[0]} lengths in [1, {prompts.shape[1]}], "
                                 f"got {lens}")
            prompts = [row[:n] for row, n in zip(prompts, lens)]
        tokens, mask = left_pad(prompts, self.pad_value)
        return tokens, mask, unbatched

    @torch.no_grad()
    def generate(self, prompts, seq_len: int, eos_token: int | None = None, temperature: float = 1.0,
                 prompt_lens: Tensor | None = None, filter_logits_fn=None, restrict_to_max_seq_len: bool = False,
                 amateur_model=None, filter_kwargs: dict | None = None, contrastive_decode_kwargs=None,
                 cache_kv: bool = True, return_intermediates: bool = False, *, static_cache: bool | None = None,
                 compile: bool | str | dict = False, beams: int | None = None, length_penalty: float = 1.0,
                 return_scores: bool = False, generator: torch.Generator | None = None,
                 context: Tensor | None = None, context_mask: Tensor | None = None, condition: Tensor | None = None,
                 prepend_embeds: Tensor | None = None, prepend_mask: Tensor | None = None,
                 looped_steps: int | None = None,
                 max_looped_steps: int | None = None, looped_exit_prob_threshold: float = 0.9, **upstream):
        """Generate ``seq_len`` new tokens after each prompt. The positional order is upstream
        x-transformers' (prompts, seq_len, eos_token, temperature, prompt_lens, filter_logits_fn, ...).

        prompts: (b, n) tokens, one 1-D prompt (the result is then 1-D), a list of 1-D tensors
        (ragged; left-padded internally), or a right-padded (b, n) batch with ``prompt_lens`` (b,).
        temperature 0 is greedy; ``filter_logits_fn`` a name in ``sampling.FILTERS`` (upstream's
        ``top_k``, ``top_p``, ``min_p``, ``top_a``) or a callable (upstream's functions too), with
        ``filter_kwargs`` under our or upstream's names; applied to logits / temperature. No filter
        by default (upstream's default is top_k). ``generator`` seeds the draws. Rows that emit
        ``eos_token`` stop and are padded with ``pad_value``. ``restrict_to_max_seq_len``: the model
        sees only the latest ``max_seq_len`` tokens (a sliding window; off by default, upstream's is
        on). ``beams=k``: beam search (k = 1 is greedy) with scores length-normalised by
        ``length ** length_penalty``; temperature and filters do not apply (see :meth:`beam_search`
        for upstream's). ``static_cache`` preallocates the cache (default: on when compiling);
        ``compile`` compiles the decode step (True: CUDA graphs on GPU; a torch.compile mode name; or
        a dict of torch.compile keywords): the model's own copy, a graph per batch size and cache
        length (rounded up to a power of two); where it cannot compile, a one-line warning and the
        uncompiled static cache. ``context`` / ``context_mask`` feed cross-attention; ``condition``
        (b, dim_condition) the stack's adaptive norms / scales (upstream passes it through too).
        ``prepend_embeds`` (b, P, emb_dim): embeddings read ahead of every prompt (upstream's; e.g. a
        latent's token), held in the cache after the prefill; ``prepend_mask`` (b, P) hides some of them
        (keys no column attends to; the tokens' positions start after each row's kept ones).

        Returns the new tokens (b, seq_len); with ``return_scores`` also each row's score (b,):
        the sum of the model's log-probabilities of the emitted tokens (up to and including eos)
        divided by their count ** length_penalty; with ``return_intermediates`` (upstream's) also an
        :class:`~x_transformers.cache.Intermediates` whose cache holds the (left-padded) prompt and
        every generated token but the last: ``net(cat(prompt, out), cache=it)`` decodes on.
        ``amateur_model`` (contrastive decoding) is not implemented and refused. A ``looped`` net
        decodes as upstream's: each token runs up to ``max_looped_steps`` loop steps, each row stopping
        early at ``looped_exit_prob_threshold``, or exactly ``looped_steps``; the intermediates
        then also hold ``exit_indices`` (b, seq_len) and ``looped_prompt_kv_cache``.

        Every keyword is validated first, into a frozen :class:`GenerationConfig`, and the prompts
        and context are checked, before the model runs: a bad value raises one line naming it.
        """
        refuse_upstream(upstream, "AutoregressiveWrapper.generate")
        if amateur_model is not None or contrastive_decode_kwargs is not None:
            raise TypeError("AutoregressiveWrapper.generate: upstream's contrastive decoding (amateur_model, "
                            "contrastive_decode_kwargs) is not implemented")
        if return_intermediates and (beams is not None or not cache_kv or static_cache or compile):
            raise ValueError("return_intermediates returns the dynamic cache of sampling: not with beams, "
                             "cache_kv=False, static_cache or compile")
        cfg = GenerationConfig(seq_len=seq_len, num_tokens=self.net.num_tokens, temperature=temperature,
                               filter_logits_fn=filter_logits_fn, filter_kwargs=filter_kwargs or {},
                               eos_token=eos_token, cache_kv=cache_kv, static_cache=static_cache, compile=compile,
                               beams=beams, length_penalty=length_penalty, return_scores=return_scores,
                               generator=generator, restrict_to_max_seq_len=restrict_to_max_seq_len)
        tokens, mask, unbatched = self._prompts(prompts, prompt_lens)
        self._check_context(tokens, context, context_mask)
        if prepend_embeds is not None:
            self.net._check_extra_inputs(tokens, prepend_embeds, prepend_mask, None, None, False)
            if self._window(cfg, tokens.shape[1]) is not None:
                raise ValueError("prepend_embeds with restrict_to_max_seq_len: the window would slide over the "
                                 "prefix; raise max_seq_len or pass restrict_to_max_seq_len=False")
        net = self._looped_calls(tokens, cfg, looped_steps, max_looped_steps, looped_exit_prob_threshold)
        if net is not None and prepend_embeds is not None:
            raise ValueError("prepend_embeds with a looped net: its loop steps' cache does not hold a prefix; "
                             "generate without prepend_embeds")
        if prepend_embeds is None and prepend_mask is not None:
            raise ValueError("prepend_mask without prepend_embeds")
        prepend = None if prepend_embeds is None else dict(
            prepend_embeds=prepend_embeds, **({} if prepend_mask is None else dict(prepend_mask=prepend_mask)))
        with _eval(self.net), plan_free_attention():  # no cuDNN planning of the prefill's new shape
            if cfg.beams is not None:
                seqs, scores = self._beam_search(tokens, mask, cfg, context=context, context_mask=context_mask,
                                                 condition=condition, prepend=prepend)
                out, scores = seqs[:, 0], scores[:, 0]
            else:
                out, scores, cache = self._sample(tokens, mask, cfg, context=context, context_mask=context_mask,
                                                  condition=condition, prepend=prepend, net=net)
        run = tokens.shape[1] + out.shape[1] - 1  # the columns the cache has seen (the last token not yet)
        if out.shape[1] < seq_len:  # every row stopped early
            out = F.pad(out, (0, seq_len - out.shape[1]), value=self.pad_value)
        result = [out[0] if unbatched else out]
        if cfg.return_scores:
            result.append(scores)
        if return_intermediates:
            result.append(inter := Intermediates(cache=cache, cache_length=run))
            if net is not None:
                inter.exit_indices = torch.cat(net.exits, dim=-1)
                inter.looped_prompt_kv_cache = looped.prompt_keys(cache, self.net.num_memory_tokens + tokens.shape[1])
        return tuple(result) if len(result) > 1 else result[0]

    @torch.no_grad()
    def beam_search(self, prompts, seq_len: int, beams: int = 4, return_beams_and_scores: bool = False,
                    eos_token: int | None = None, temperature: float = 1.0, stochastic: bool = False,
                    prompt_lens: Tensor | None = None, filter_logits_fn=None, restrict_to_max_seq_len: bool = False,
                    filter_kwargs: dict | None = None, cache_kv: bool = True, *,
                    generator: torch.Generator | None = None, context: Tensor | None = None,
                    context_mask: Tensor | None = None, condition: Tensor | None = None, **upstream):
        """Upstream x-transformers' beam search, on this package's cache: each step keeps the
        ``beams`` continuations of highest total log-probability (the sum over the new tokens, no
        length normalisation). ``stochastic``: each beam proposes its candidates by the Gumbel top-k
        of ``filter(logits) / temperature`` (seeded by ``generator``) instead of its most likely
        tokens; scores stay the model's log-probabilities. ``eos_token`` (which upstream refuses):
        a beam that emits it stops, is padded with ``pad_value`` and keeps its score.

        Returns the best beam's tokens (b, seq_len); with ``return_beams_and_scores`` every beam
        (beams, b, seq_len), best first, and their total log-probabilities (beams, b).
        """
        refuse_upstream(upstream, "AutoregressiveWrapper.beam_search")
        cfg = GenerationConfig(seq_len=seq_len, num_tokens=self.net.num_tokens, temperature=temperature,
                               filter_logits_fn=filter_logits_fn, filter_kwargs=filter_kwargs or {},
                               eos_token=eos_token, cache_kv=cache_kv, beams=beams, length_penalty=0.0,
                               generator=generator, restrict_to_max_seq_len=restrict_to_max_seq_len,
                               stochastic=bool(stochastic))
        tokens, mask, unbatched = self._prompts(prompts, prompt_lens)
        self._check_context(tokens, context, context_mask)
        with _eval(self.net):
            seqs, scores = self._beam_search(tokens, mask, cfg, context=context, context_mask=context_mask,
                                             condition=condition)
        if seqs.shape[-1] < seq_len:
            seqs = F.pad(seqs, (0, seq_len - seqs.shape[-1]), value=self.pad_value)
        seqs, scores = seqs.transpose(0, 1), scores.transpose(0, 1)  # (beams, b, n), (beams, b)
        if unbatched:
            seqs = seqs[:, 0]
        return (seqs, scores) if return_beams_and_scores else seqs[0]

    def _check_context(self, tokens, context, context_mask):
        layers = self.net.attn_layers
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without context; pass context=(batch, ctx_len, dim)")
            return
        check_context(context, tokens.shape[0], getattr(layers.cfg, "dim_context", None) or layers.dim)
        check_finite(context, "context")  # once per generate(), not per step
        if context_mask is not None and (context_mask.dtype != torch.bool or context_mask.shape != context.shape[:2]):
            raise ValueError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])} (True = keep), "
                             f"got {context_mask.dtype} of shape {tuple(context_mask.shape)}")

    def _looped_calls(self, tokens, cfg: GenerationConfig, steps, max_steps, threshold):
        """A looped net's calls for generate (looped.LoopedCalls), checked first; None for a plain net."""
        given = {k: v for k, v in dict(looped_steps=steps, max_looped_steps=max_steps).items() if v is not None}
        if not self.net.looped:
            if given or threshold != 0.9:
                raise ValueError(f"{next(iter(given), 'looped_exit_prob_threshold')}= needs a net built with looped=True")
            return None
        kw = dict(given, looped_exit_prob_threshold=threshold)
        looped.check_loop_call(self.net, looped_steps=steps, max_looped_steps=max_steps, looped_inference=True,
                               looped_exit_prob_threshold=threshold, looped_pred_all_logits=None)
        if cfg.beams is not None or cfg.static_cache or cfg.compile:
            raise ValueError("looped generate samples step by step (early exits are data-dependent): not with "
                             "beams, static_cache or compile")
        return looped.LoopedCalls(self.net, **kw)

    def _sample(self, tokens, mask, cfg: GenerationConfig, *, context, context_mask, condition=None, prepend=None,
                net=None):
        b = tokens.shape[0]
        looped_net = {} if net is None else dict(net=net)  # a looped net's calls (looped.LoopedCalls)
        logits, step, cache = self._stepper(tokens, mask, cfg, context=context, context_mask=context_mask,
                                            condition=condition, prepend=prepend, **looped_net)
        done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
        logp_sum = torch.zeros(b, device=tokens.device)
        length = torch.zeros(b, device=tokens.device)
        eos_token, out = cfg.eos_token, []
        for i in range(cfg.seq_len):
            token = sample(logits, temperature=cfg.temperature, filter_logits_fn=cfg.filter_logits_fn,
                           filter_kwargs=cfg.filter_kwargs, generator=cfg.generator)
            if cfg.return_scores:  # (the per-token bookkeeping only when asked: ops a step, on a GPU launches)
                logp = logits.float().log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1)
                live = ~done
                logp_sum += logp * live
                length += live
            if eos_token is not None:
                token = token.masked_fill(done, self.pad_value)
                done = done | (token == eos_token)
            out.append(token)
            if i == cfg.seq_len - 1 or (eos_token is not None and bool(done.all())):
                break
            logits = step(token)
        return torch.stack(out, dim=1), logp_sum / length.clamp(min=1) ** cfg.length_penalty, cache

    def _candidates(self, logp, logits, done, k: int, cfg: GenerationConfig):
        """Each beam's k candidate tokens (b*k, k): its most likely, or (stochastic) the Gumbel top-k
        of its filtered, tempered logits. A finished beam proposes pad_value first."""
        k = min(k, logp.shape[-1])
        if not (cfg.stochastic and cfg.temperature > 0):
            return logp.topk(k, dim=-1).indices
        fn = get_filter(cfg.filter_logits_fn)
        keyed = logits.float() if fn is None else fn(logits.float(), **cfg.filter_kwargs)
        u = torch.rand(keyed.shape, generator=cfg.generator, device=keyed.device)
        keyed = keyed / cfg.temperature - (-u.clamp(min=1e-20).log()).clamp(min=1e-20).log()
        keyed = torch.where(done[:, None], logp, keyed)  # finished: pad first (logp is 0 there)
        return keyed.topk(k, dim=-1).indices

    def _beam_search(self, tokens, mask, cfg: GenerationConfig, *, context, context_mask, condition=None,
                     prepend=None):
        """-> every beam (b, k, n), best first, and its score (b, k) (total log-probability divided
        by length ** length_penalty)."""
        b, k, eos_token, length_penalty = tokens.shape[0], cfg.beams, cfg.eos_token, cfg.length_penalty
        rows = lambda t: None if t is None else t.repeat_interleave(k, dim=0)  # noqa: E731
        tokens, mask, context, context_mask = rows(tokens), rows(mask), rows(context), rows(context_mask)
        condition, prepend = rows(condition), None if prepend is None else {k: rows(v) for k, v in prepend.items()}
        logits, step, cache = self._stepper(tokens, mask, cfg, context=context, context_mask=context_mask,
                                            condition=condition, prepend=prepend)
        dev = tokens.device
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start equal: expand the first one only
        scores = scores.view(-1)
        length = torch.zeros(b * k, device=dev)
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        seqs = torch.empty(b * k, 0, dtype=tokens.dtype, device=dev)
        base = torch.arange(b, device=dev)[:, None] * k
        for i in range(cfg.seq_len):
            logp = logits.float().log_softmax(dim=-1)  # (b*k, v)
            # a finished beam continues with pad_value only, at no cost and no added length
            finished = torch.full_like(logp[:1], float("-inf"))
            finished[:, self.pad_value] = 0.0
            logp = torch.where(done[:, None], finished, logp)
            cand_tok = self._candidates(logp, logits, done, k, cfg)  # (b*k, c)
            c = cand_tok.shape[-1]
            cand = scores[:, None] + logp.gather(-1, cand_tok)  # (b*k, c)
            cand_len = length + (~done).float()
            norm = cand / cand_len[:, None].clamp(min=1) ** length_penalty
            best = norm.view(b, k * c).topk(k, dim=-1).indices  # (b, k), best first
            src = (base + best // c).view(-1)  # the beam each survivor extends
            token = cand_tok.view(b, k * c).gather(-1, best).view(-1)
            scores = cand.view(b, k * c).gather(-1, best).view(-1)
            length, done, seqs = cand_len[src], done[src], torch.cat((seqs[src], token[:, None]), dim=1)
            if eos_token is not None:
                done = done | (token == eos_token)
            if i == cfg.seq_len - 1 or (eos_token is not None and bool(done.all())):
                break
            if cache is not None:
                cache.reorder(src)  # each survivor continues from its parent's keys/values
                logits = step(token)
            else:  # the uncached reference recomputes every row from its whole sequence
                logits = self._uncached_beam_logits(tokens, mask, seqs, context, context_mask, cfg, condition, prepend)
        final = (scores / length.clamp(min=1) ** length_penalty).view(b, k)
        order = final.argsort(dim=-1, descending=True)  # finished beams may have been overtaken
        rows_idx = (base + order).view(-1)
        return seqs[rows_idx].view(b, k, -1), final.gather(-1, order)

    def _uncached_beam_logits(self, tokens, mask, seqs, context, context_mask, cfg, condition=None, prepend=None):
        full = torch.cat((tokens, seqs), dim=1)
        full_mask = None if mask is None else F.pad(mask, (0, seqs.shape[1]), value=True)
        window = self._window(cfg, tokens.shape[1])
        if window is not None:
            full, full_mask = full[:, -window:], None if full_mask is None else full_mask[:, -window:]
        ahead = prepend or {}
        return self.net(full, full_mask, context=context, context_mask=context_mask, **conditioned(condition),
                        **ahead)[:, -1]


class _eval:
    """Eval mode for the duration of a generation, then the mode it was in."""

    def __init__(self, net):
        self.net, self.was_training = net, net.training

    def __enter__(self):
        self.net.eval()

    def __exit__(self, *exc):
        self.net.train(self.was_training)


__all__ = ["AutoregressiveWrapper", "GenerationConfig", "left_pad", "prefill", "decode_step"]


def cache_columns(net, tokens: int) -> int:
    """Key/value columns ``tokens`` token columns take in ``net``'s cache: the memory tokens once, or
    with ``memory_tokens_interspersed_every`` a group before every every-th token (the first included)."""
    M, every = net.num_memory_tokens, net.cfg.memory_tokens_interspersed_every
    if M and every:
        return tokens + M * -(-tokens // every)
    return tokens + M

