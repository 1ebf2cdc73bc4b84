"""Named presets: partial configurations applied over the :class:`TrainConfig` defaults.

``tiny``        a byte-level decoder (dim 256, depth 4, rotary) that trains on 2 CPU cores in ~4 minutes (``make run``)
``gpt2-small``  the GPT-2-small shape (vocab 50304, dim 768, depth 12, heads 12, seq 1024, batch 16), on a
                byte-level BPE of 50,304 entries trained on the corpus (``tokenizer: bpe:50304``)
``1b``          a ~0.9B-parameter decoder (vocab 50304, dim 2048, depth 16, heads 16, seq 2048, batch 8, tied
                head): the compiled-vs-eager training guard and the speed benchmarks' large shape (one GPU)
``ablate``        the base of ``xtransformers ablate``'s language-model table: a plain byte-level decoder
                (dim 256, depth 4, heads 4, learned absolute positions), seq 256, batch 32, 250 steps
``ablate-seq2seq`` its encoder-decoder table: a plain XTransformer (dim 128, depth 2) on ``reverse``
``seed``        the seed's encoder-decoder ``XTransformer(num_tokens=256, dim=512, depth=6, heads=8,
                max_seq_len=1024)`` on the synthetic ``reverse`` task
"""

# Shapes are spelled out where a default changed to upstream's (issue 17: attn_dim_head 64, a tied head
# scaled by dim ** -0.5), so each preset keeps its model; tiny takes upstream's rotary default (half the
# head) because a rotary_emb_dim in the preset would refuse a config that turns rotary off.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        arch="decoder",
        model=dict(dim=256, depth=4, heads=4, rotary_pos_emb=True),
        # ~6k tokens/s on 2 shared CPU cores: 350 steps of 4,096 tokens take about 4 minutes
        seq_len=256, batch_size=16, max_steps=350, lr=2e-3, warmup_steps=30,
        eval_every=70, eval_batches=8, save_every=70, sample_tokens=160,
    ),
    "gpt2-small": dict(
        arch="decoder",
        model=dict(num_tokens=50304, dim=768, depth=12, heads=12, attn_bias=True, tie_embedding=True, logits_scale=1.0),
        tokenizer="bpe:50304",  # GPT-2's vocabulary size, trained on the corpus (cached)
        seq_len=1024, batch_size=16, max_steps=5000, lr=6e-4, warmup_steps=200,
        eval_every=500, save_every=1000, stdlib_bytes=32_000_000,
    ),
    "1b": dict(
        arch="decoder",
        model=dict(num_tokens=50304, dim=2048, depth=16, heads=16, attn_dim_head=128, tie_embedding=True,
                   logits_scale=1.0),
        seq_len=2048, batch_size=8, max_steps=5000, lr=3e-4, warmup_steps=200,
        eval_every=500, save_every=1000, stdlib_bytes=32_000_000,
    ),
    "seed": dict(
        arch="xtransformer",
        model=dict(dim=512, depth=6, heads=8, max_seq_len=1024),
        task="reverse", seq_len=32, batch_size=32, max_steps=2000, lr=3e-4, warmup_steps=100,
        eval_every=250, save_every=500,
    ),
    # the plain model every ablation row is compared with (no feature keywords): 2.05M tokens a run,
    # estimated ~3 s a run on one H200 in bf16 (launch-bound), so ~100 runs fit in ~6 minutes
    "ablate": dict(
        arch="decoder",
        model=dict(dim=256, depth=4, heads=4),
        seq_len=256, batch_size=32, max_steps=250, lr=2e-3, warmup_steps=25, eval_batches=16,
    ),
    "ablate-seq2seq": dict(
        arch="xtransformer",
        model=dict(dim=128, depth=2, heads=4, attn_dim_head=32),
        task="reverse", seq_len=16, batch_size=64, max_steps=300, lr=2e-3, warmup_steps=30, eval_batches=4,
    ),
}
