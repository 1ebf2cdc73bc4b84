"""Hugging Face checkpoints: tiny random HF models of each family, loaded by us, must give the same
logits (float32, max abs difference <= 1e-4) and the same greedy tokens, and our save must load
back into ``transformers`` with the same logits. ``transformers`` is a test-only dependency."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import transformers
from x_transformers import AutoregressiveWrapper, Decoder, KVCache, TransformerWrapper, from_pretrained, load_tokenizer, save_pretrained

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", module="transformers")
TOL, VOCAB, STEPS = 1e-4, 61, 20

# family -> (HF class, config); initializer ranges above the default make the logits peaked, so
# greedy decoding tests real agreement rather than ties
FAMILIES = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, bos_token_id=None, eos_token_id=None)),
    "llama_bias_tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh", initializer_range=0.2, bos_token_id=None, eos_token_id=None)),
    "t5_v1_0": (transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, initializer_factor=2.0,
        feed_forward_proj="relu", eos_token_id=None)),
    "t5_v1_1": (transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, initializer_factor=2.0,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=None)),
}


def make_hf(name, path):
    torch.manual_seed(0)
    cls, cfg = FAMILIES[name]
    model = cls(cfg).eval()
    if name.startswith("t5"):
        # T5 initialises embeddings with std = initializer_factor; with an unscaled head (v1.1)
        # logits reach O(100), where float32 rounding alone passes 1e-4. Keep them O(10).
        with torch.no_grad():
            model.shared.weight.mul_(0.25)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    path = make_hf(name, tmp_path_factory.mktemp(name))
    cls = FAMILIES[name][0]
    return name, path, cls.from_pretrained(path).eval(), from_pretrained(path)


def is_t5(name):
    return name.startswith("t5")


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (3, 13), generator=g)
    tgt = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, 9:] = False  # right padding: HF and we give kept tokens the same positions
    mask[2, 4:] = False
    return src, tgt, mask


@torch.no_grad()
def both_logits(name, hf, ours, seed=0):
    src, tgt, mask = inputs(seed)
    if is_t5(name):
        a = hf(input_ids=src, attention_mask=mask.long(), decoder_input_ids=tgt).logits
        b = ours(src, tgt, mask=mask)
        return a, b
    a = hf(input_ids=src, attention_mask=mask.long()).logits[mask]
    b = ours(src, mask=mask)[mask]
    return a, b


def test_logits_match(family):
    name, _, hf, ours = family
    for seed in range(2):
        a, b = both_logits(name, hf, ours, seed)
        assert a.std() > 0.1  # a real signal, not a near-constant
        assert (a - b).abs().max() <= TOL


@torch.no_grad()
def greedy(step, start, steps=STEPS):
    """Append the argmax token ``steps`` times, running the full forward each step."""
    out = start
    for _ in range(steps):
        out = torch.cat((out, step(out)[:, -1].argmax(-1, keepdim=True)), dim=-1)
    return out[:, start.shape[1]:]


@torch.no_grad()
def greedy_cached(step, first, steps=STEPS):
    """The same, feeding only the new token after a prefill, through our KVCache."""
    cache, out = KVCache(), []
    logits = step(first, cache)
    for _ in range(steps):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = step(out[-1], cache)
    return torch.cat(out, dim=-1)


@torch.no_grad()
def test_greedy_generation_matches(family):
    name, _, hf, ours = family
    src, _, _ = inputs(1)
    src = src[:2, :5]
    if is_t5(name):
        start = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id = pad = 0
        # transformers' decoding cache assumes num_decoder_layers == num_layers
        symmetric = hf.config.num_decoder_layers == hf.config.num_layers
        theirs = hf.generate(input_ids=src, max_new_tokens=STEPS, do_sample=False, num_beams=1, use_cache=symmetric,
                             eos_token_id=None, decoder_start_token_id=0)[:, 1:]
        mine = greedy(lambda t: ours(src, t), start)
        enc = ours.encode(src)
        cached = greedy_cached(lambda t, cache: ours.decoder(t, context=enc, cache=cache), start)
    else:
        theirs = hf.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=STEPS,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)[:, src.shape[1]:]
        mine = greedy(ours, src)
        cached = greedy_cached(lambda t, cache: ours(t, cache=cache), src)
    assert theirs.shape == mine.shape == (2, STEPS)
    assert torch.equal(theirs, mine)
    assert torch.equal(cached, mine)
    assert len(mine.unique()) > 2  # the sequences are not one token repeated


@torch.no_grad()
@pytest.mark.parametrize("static_cache", [False, True])
def test_library_generate_matches_hf_generate(family, static_cache):
    """The library's own greedy generate (AutoregressiveWrapper.generate for a decoder,
    XTransformer.generate for T5), with a KV cache, dynamic or preallocated, gives HF's 20 tokens."""
    name, _, hf, ours = family
    src = inputs(1)[0][:2, :5]
    if is_t5(name):
        symmetric = hf.config.num_decoder_layers == hf.config.num_layers
        theirs = hf.generate(input_ids=src, max_new_tokens=STEPS, do_sample=False, num_beams=1, use_cache=symmetric,
                             eos_token_id=None, decoder_start_token_id=0)[:, 1:]
        start = torch.zeros(2, 1, dtype=torch.long)
        mine = ours.generate(src, start, STEPS, temperature=0.0, cache_kv=True, static_cache=static_cache)
    else:
        theirs = hf.generate(input_ids=src, attention_mask=torch.ones_like(src), max_new_tokens=STEPS,
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)[:, src.shape[1]:]
        mine = AutoregressiveWrapper(ours).generate(src, STEPS, temperature=0.0, cache_kv=True,
                                                    static_cache=static_cache)
    assert theirs.shape == mine.shape == (2, STEPS)
    assert torch.equal(theirs, mine)


def test_round_trip_to_transformers(family, tmp_path):
    name, path, hf, ours = family
    save_pretrained(ours, tmp_path)
    # our file holds exactly the tensors transformers wrote, bit for bit
    theirs, mine = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert theirs.keys() == mine.keys()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    back = FAMILIES[name][0].from_pretrained(tmp_path).eval()
    a, b = both_logits(name, back, ours, seed=3)
    assert (a - b).abs().max() <= TOL
    c, _ = both_logits(name, hf, ours, seed=3)
    assert torch.equal(a, c)


def test_loaded_model_trains(family):
    """Loaded weights are ordinary parameters: a step of fine-tuning changes the loss."""
    name, _, _, ours = family
    model = from_pretrained(family[1]).train()
    src, tgt, mask = inputs(4)
    logits = model(src, tgt, mask=mask) if is_t5(name) else model(src)
    labels = tgt if is_t5(name) else src
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


# ------------------------------------------------------------------------------------------------
# T5 v1.1 checkpoints written by transformers < 5 keep an untied lm_head beside shared.weight


def test_t5_untied_head_checkpoint(tmp_path):
    path = make_hf("t5_v1_1", tmp_path / "hf")
    tensors = load_file(path / "model.safetensors")
    torch.manual_seed(1)
    tensors["lm_head.weight"] = torch.randn_like(tensors["shared.weight"]) * 0.5
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)
    (path / "config.json").write_text(json.dumps(cfg))

    hf = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    ours = from_pretrained(path)
    assert ours.decoder.to_logits is not None and ours.decoder.logits_scale == 1.0
    a, b = both_logits("t5", hf, ours)
    assert (a - b).abs().max() <= TOL
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    a, b = both_logits("t5", back, ours)
    assert (a - b).abs().max() <= TOL


# ------------------------------------------------------------------------------------------------
# a model built with our own keywords saves as the family it matches


def test_save_our_llama_shaped_decoder(tmp_path):
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=32, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_kv_heads=2, attn_dim_head=8, rotary_pos_emb=True, rotary_emb_dim=8,
        use_rmsnorm=True, ff_glu=True, ff_activation="swish", ff_mult=2, ff_no_bias=True)).eval()
    for p in model.parameters():  # non-trivial norms, so a misplaced norm weight would show
        torch.nn.init.normal_(p, std=0.3)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    a, b = both_logits("llama", hf, model)
    assert (a - b).abs().max() <= TOL


def test_save_refuses_unmappable_model_with_every_familys_reasons(tmp_path):
    model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=32, attn_layers=Decoder(
        dim=32, depth=1, heads=4, rotary_pos_emb=True, attn_qk_norm=True))
    with pytest.raises(ValueError) as err:
        save_pretrained(model, tmp_path)
    gpt2, llama, t5 = str(err.value).split("; ")
    assert gpt2.startswith("this model maps to no Hugging Face family (gpt2: ") and "learned absolute positions" in gpt2
    assert llama.startswith("llama: ")
    assert "attn_qk_norm=True (needs False)" in llama and "use_rmsnorm=False (needs True)" in llama
    assert t5 == "t5: t5 is an encoder-decoder (XTransformer))"
    assert not (tmp_path / "config.json").exists()


# ------------------------------------------------------------------------------------------------
# refusals: what we cannot represent is named, nothing is dropped silently


def edit(path, config=None, tensors=None):
    if config:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config(cfg) or cfg))
    if tensors:
        t = load_file(path / "model.safetensors")
        save_file(tensors(t) or t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def drop(tensors, name):
    del tensors[name]


@pytest.mark.parametrize("name, change, message", [
    ("gpt2", dict(config=lambda c: c.update(model_type="bert")), "model_type 'bert' is not supported"),
    ("gpt2", dict(config=lambda c: c.update(scale_attn_by_inverse_layer_idx=True)), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(config=lambda c: c.update(add_cross_attention=True)), "add_cross_attention"),
    ("gpt2", dict(config=lambda c: c.update(activation_function="quick_gelu")), "activation_function='quick_gelu'"),
    ("llama", dict(config=lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})),
     "rope_type 'llama3'"),
    ("t5_v1_0", dict(config=lambda c: c.update(feed_forward_proj="gated-tanh")), "feed_forward_proj='tanh'"),
    ("gpt2", dict(tensors=lambda t: t.update({"transformer.h.0.attn.extra": torch.ones(3)})),
     "no place for: ['h.0.attn.extra']"),
    ("llama", dict(tensors=lambda t: drop(t, "model.layers.1.mlp.gate_proj.weight")),
     "no 'layers.1.mlp.gate_proj.weight'"),
    ("llama", dict(tensors=lambda t: drop(t, "lm_head.weight")), "no lm_head.weight"),
    ("t5_v1_0", dict(tensors=lambda t: t.update({"encoder.embed_tokens.weight": torch.zeros_like(t["shared.weight"])})),
     "encoder.embed_tokens.weight differs from shared.weight"),
    ("gpt2", dict(config=lambda c: c.update(n_embd=16)), "does not fit"),
])
def test_refusals(tmp_path, name, change, message):
    path = edit(make_hf(name, tmp_path), **change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_pretrained(path)


def test_refuses_pickle_only_folder_and_missing_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path / "missing")


def test_overrides_without_weights_apply_and_with_weights_are_refused(tmp_path):
    path = make_hf("llama", tmp_path)
    model = from_pretrained(path, attn_dropout=0.1, attn_backend="explicit")
    assert model.attn_layers.attn_cfg.dropout == 0.1
    with pytest.raises(ValueError, match="not in the checkpoint: .*mem_k"):
        from_pretrained(path, attn_num_mem_kv=2)


def test_old_gpt2_causal_mask_buffers_are_checked_then_skipped(tmp_path):
    n = FAMILIES["gpt2"][1].n_positions
    tril = torch.ones(n, n).tril().view(1, 1, n, n)
    path = edit(make_hf("gpt2", tmp_path), tensors=lambda t: t.update(
        {"transformer.h.0.attn.bias": tril, "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}))
    from_pretrained(path)
    edit(path, tensors=lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(1, 1, n, n)}))
    with pytest.raises(ValueError, match="h.0.attn.bias"):
        from_pretrained(path)


def test_tokenizer_json_loads_with_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert load_tokenizer(tmp_path) is None
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hello world again").ids == [1, 2, 0]


def test_nan_weights_on_load_warn_naming_the_tensors(tmp_path):
    def poison(t):
        t["transformer.h.1.ln_2.weight"][3] = float("nan")
        t["transformer.wte.weight"][0, 0] = float("inf")

    path = make_hf("gpt2", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean checkpoint loads without a warning
        from_pretrained(path)
    edit(path, tensors=poison)
    with pytest.warns(UserWarning, match=r"weights with NaN/inf: .*token_emb.*blocks\.3\.") as caught:
        from_pretrained(path)
    assert len([w for w in caught if "NaN/inf" in str(w.message)]) == 1
