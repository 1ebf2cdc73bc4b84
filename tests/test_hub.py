"""save_pretrained / from_pretrained for every model class of ours (issue 23): config.json holds the
class and the keywords it was built with (nested models as nested entries), model.safetensors the
weights; loading rebuilds the same model, whose outputs equal the saved one's exactly."""

import json

import pytest
import torch

import x_transformers as xt
from x_transformers import (AutoregressiveWrapper, ContinuousAutoregressiveWrapper, ContinuousTransformerWrapper,
                            Decoder, Encoder, FunnelEncoder, MultiInputTransformerWrapper, NeoMLP,
                            NonAutoregressiveWrapper, PrefixDecoder, TransformerWrapper, ViTransformerWrapper, XTransformer,
                            DPO, XValAutoregressiveWrapper, XValTransformerWrapper)
from x_transformers.hub import Pretrained


def lm(**layers):
    return TransformerWrapper(num_tokens=40, max_seq_len=16, attn_layers=Decoder(dim=32, depth=2, heads=2, **layers))


def g(seed=0):
    return torch.Generator().manual_seed(seed)


CASES = {
    "decoder_lm": (lambda: lm(rotary_pos_emb=True, attn_kv_heads=1, ff_glu=True),
                   lambda m: m(torch.randint(0, 40, (2, 9), generator=g()))),
    "encoder_tied_memory": (lambda: TransformerWrapper(num_tokens=40, max_seq_len=16, tie_embedding=True,
                                                       num_memory_tokens=2,
                                                       attn_layers=Encoder(dim=32, depth=1, heads=2, use_rmsnorm=True)),
                            lambda m: m(torch.randint(0, 40, (2, 9), generator=g()))),
    "funnel": (lambda: TransformerWrapper(num_tokens=40, max_seq_len=16,
                                          attn_layers=FunnelEncoder(dim=32, depths=(1, 1), heads=2)),
               lambda m: m(torch.randint(0, 40, (2, 8), generator=g()))),
    "bare_stack": (lambda: Decoder(dim=32, depth=1, heads=2, alibi_pos_bias=True),
                   lambda m: m(torch.randn(2, 7, 32, generator=g()))),
    "xtransformer": (lambda: XTransformer(num_tokens=30, dim=32, depth=1, heads=2, max_seq_len=16, tie_token_emb=True,
                                          enc_rel_pos_bias=True),
                     lambda m: m(torch.randint(0, 30, (2, 9), generator=g()), torch.randint(0, 30, (2, 5), generator=g(1)))),
    "autoregressive": (lambda: AutoregressiveWrapper(lm(), ignore_index=-1, mask_prob=0.0),
                       lambda m: m.generate([torch.tensor([1, 2, 3])], 5, temperature=0.0)),
    "continuous": (lambda: ContinuousAutoregressiveWrapper(ContinuousTransformerWrapper(
                       dim_in=3, dim_out=3, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=2))),
                   lambda m: m.net(torch.randn(2, 6, 3, generator=g()))),
    "vit": (lambda: ViTransformerWrapper(image_size=8, patch_size=4, num_classes=5, num_register_tokens=1,
                                         attn_layers=Encoder(dim=32, depth=1, heads=2)),
            lambda m: m(torch.randn(2, 3, 8, 8, generator=g()))),
    "nonautoregressive": (lambda: NonAutoregressiveWrapper(TransformerWrapper(
                              num_tokens=41, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=2)), mask_id=40,
                              steps=3),
                          lambda m: m.net(torch.randint(0, 40, (2, 9), generator=g()))),
    "neo_mlp": (lambda: NeoMLP(dim_in=3, dim_hidden=4, dim_out=2, dim_model=16, depth=1),
                lambda m: m(torch.randn(2, 3, generator=g()))),
    "multi_input": (lambda: MultiInputTransformerWrapper(num_tokens=dict(a=10, b=7), max_seq_len=16,
                                                         attn_layers=Decoder(dim=32, depth=1, heads=2)),
                    lambda m: m(dict(a=torch.randint(0, 10, (2, 5), generator=g()),
                                     b=torch.randint(0, 7, (2, 5), generator=g(1))))),
    "prefix_decoder": (lambda: PrefixDecoder(dim=32, depth=1, heads=2, prefix_attn_len=3),
                       lambda m: m(torch.randn(2, 7, 32, generator=g()))),
    "xval": (lambda: XValAutoregressiveWrapper(XValTransformerWrapper(
                 num_tokens=12, max_seq_len=16, numerical_token_id=3, attn_layers=Decoder(dim=32, depth=1, heads=2)),
                 numerical_loss_weight=0.5),
             lambda m: m.net(torch.arange(8).repeat(2, 1), torch.randn(2, 8, generator=g()))),
    "entropy_tokenizer": (lambda: xt.EntropyBasedTokenizer(lm(), entropy_threshold=3.0, max_token_size=4),
                          lambda m: m(torch.randint(1, 40, (2, 12), generator=g()))),
    "dpo": (lambda: DPO(lm(), beta=0.2, pad_id=0),
            lambda m: m(torch.randint(1, 40, (2, 9), generator=g()), torch.randint(1, 40, (2, 9), generator=g(1)),
                        prompt_mask=torch.arange(9).expand(2, -1) < 3)),
}


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_saved_model_loads_back_with_identical_outputs(name, tmp_path):
    make, run = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    for p in model.parameters():  # away from the initialisation, so a skipped tensor would show
        p.data.add_(torch.randn(p.shape, generator=g(7)) * 0.05)
    model.save_pretrained(tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["class"] == type(model).__name__ and config["library"] == "x-transformers"
    torch.manual_seed(123)  # a different initialisation: everything must come from the folder
    loaded = type(model).from_pretrained(tmp_path / name)
    again = xt.from_pretrained(tmp_path / name)  # the package-level loader reads the class itself
    assert type(loaded) is type(again) is type(model) and not loaded.training
    with torch.no_grad():
        want = run(model)
        assert same(run(loaded), want) and same(run(again), want)


def test_every_public_model_class_can_be_saved():
    public = {name for name in xt.__all__ if isinstance(getattr(xt, name), type)
              and issubclass(getattr(xt, name), torch.nn.Module)}
    assert public and all(issubclass(getattr(xt, n), Pretrained) for n in public), \
        sorted(n for n in public if not issubclass(getattr(xt, n), Pretrained))
    def classes(config):  # every class a saved config holds, nested models included
        found = {config["class"]} if "class" in config else set()
        for value in config.values():
            if isinstance(value, dict):
                found |= classes(value)
        return found

    saved = set().union(*(classes(make().pretrained_config()) for make, _ in CASES.values()))
    saved |= {"AttentionLayers", "CrossAttender"}  # the stacks' base and cross-only kind: same code as Decoder
    assert public <= saved, sorted(public - saved)  # a round trip above covers every public class


def test_what_cannot_be_saved_is_named_before_anything_is_written(tmp_path):
    custom = ContinuousAutoregressiveWrapper(ContinuousTransformerWrapper(
        dim_in=3, dim_out=3, max_seq_len=16, attn_layers=Decoder(dim=32, depth=1, heads=2)), loss_fn=torch.nn.SmoothL1Loss())
    with pytest.raises(TypeError, match="keyword model.loss_fn is a SmoothL1Loss"):
        custom.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_loading_checks_the_class_and_the_folder(tmp_path):
    lm().save_pretrained(tmp_path / "lm")
    with pytest.raises(TypeError, match="holds a TransformerWrapper, not a XTransformer"):
        XTransformer.from_pretrained(tmp_path / "lm")
    with pytest.raises(TypeError, match="rebuilt from its own keywords"):
        xt.from_pretrained(tmp_path / "lm", attn_dropout=0.1)
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**cfg, "config_version": 99}))
    with pytest.raises(ValueError, match="newer than this package reads"):
        TransformerWrapper.from_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match="has no config.json"):
        TransformerWrapper.from_pretrained(tmp_path / "nothing")
    (tmp_path / "lm" / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "lm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(ValueError, match="model.safetensors could not be read"):
        TransformerWrapper.from_pretrained(tmp_path / "lm")


def test_push_to_hub_needs_the_hub_extra(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(ImportError, match=r"x-transformers\[hub\]"):
        lm().push_to_hub("me/model")
