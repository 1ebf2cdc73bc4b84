"""ONNX export (issue 23): the file onnxruntime runs gives the PyTorch model's logits at batch sizes
and lengths the export never saw, with and without a padding mask; the command does it for a run."""

import onnxruntime as ort  # in the test extra
import pytest
import torch
from train_helpers import TINY, cli

from x_transformers import Decoder, Encoder, TransformerWrapper, XTransformer
from x_transformers.export import export_onnx


def run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]


def test_an_encoder_with_a_mask_and_an_encoder_decoder_export_with_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    enc = TransformerWrapper(num_tokens=50, max_seq_len=40, attn_layers=Encoder(dim=32, depth=2, heads=4)).eval()
    report = export_onnx(enc, tmp_path / "enc.onnx", with_mask=True)
    assert report["inputs"] == ["ids", "mask"] and max(report["max_abs_diff"].values()) < 1e-5
    x = torch.randint(0, 50, (4, 33))
    mask = torch.arange(33)[None, :] < torch.tensor([[33], [10], [1], [20]])
    got = run_onnx(tmp_path / "enc.onnx", x, mask)
    want = enc(x, mask=mask).detach().numpy()
    assert abs(got - want)[mask.numpy()].max() < 1e-4  # padded positions' outputs are not defined
    seq2seq = XTransformer(num_tokens=30, dim=32, depth=1, heads=2, max_seq_len=24).eval()
    report = export_onnx(seq2seq, tmp_path / "s2s.onnx")
    src, tgt = torch.randint(0, 30, (2, 17)), torch.randint(0, 30, (2, 6))
    assert abs(run_onnx(tmp_path / "s2s.onnx", src, tgt) - seq2seq(src, tgt).detach().numpy()).max() < 1e-4


def test_export_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="TransformerWrapper or an XTransformer"):
        export_onnx(Decoder(dim=16, depth=1, heads=2), tmp_path / "x.onnx")
    lm = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2)).double()
    with pytest.raises(ValueError, match="float32 model on CPU"):
        export_onnx(lm, tmp_path / "x.onnx")


def test_the_export_command_writes_a_checked_file_for_a_trained_run(tmp_path, capsys):
    run = tmp_path / "r"
    assert cli("train", *TINY, "--max-steps", 1, "--eval-every", 1, "--logger", "none", "--out", run) == 0
    capsys.readouterr()
    assert cli("export", run, "--onnx", tmp_path / "lm.onnx") == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and (tmp_path / "lm.onnx").stat().st_size > 10_000
    assert cli("export", run, "--onnx", tmp_path / "lm.txt") == 2  # not a .onnx name


def test_a_decoder_exports_with_its_kv_cache_and_decodes_like_the_full_forward(tmp_path, capsys):
    from x_transformers.export import export_onnx_with_cache

    torch.manual_seed(0)
    lm = TransformerWrapper(num_tokens=60, max_seq_len=40, num_memory_tokens=2,
                            attn_layers=Decoder(dim=32, depth=2, heads=4, rotary_pos_emb=True, attn_kv_heads=2)).eval()
    report = export_onnx_with_cache(lm, tmp_path / "lm.onnx")
    assert report["cache"] == ["key_mask", "positions", "keys_0", "values_0", "keys_2", "values_2"]
    assert max(report["max_abs_diff"].values()) < 1e-5
    # greedy decoding in onnxruntime alone equals our cached generate
    prefill, decode = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                       for p in (tmp_path / "lm.onnx", tmp_path / "lm.decode.onnx"))
    prompt = torch.randint(0, 60, (2, 4), generator=torch.Generator().manual_seed(3))
    outs, tokens = prefill.run(None, {"ids": prompt.numpy()}), []
    for _ in range(8):
        token = outs[0][:, -1:].argmax(-1)
        tokens.append(token)
        outs = decode.run(None, {"ids": token, **{i.name: v for i, v in zip(decode.get_inputs()[1:], outs[1:])}})
    from x_transformers import AutoregressiveWrapper

    want = AutoregressiveWrapper(lm).generate(prompt, 8, temperature=0.0)
    assert torch.equal(torch.from_numpy(__import__("numpy").concatenate(tokens, axis=1)), want)
    with pytest.raises(TypeError, match="takes a decoder"):
        export_onnx_with_cache(TransformerWrapper(num_tokens=20, max_seq_len=16,
                                                  attn_layers=Encoder(dim=16, depth=1, heads=2)), tmp_path / "e.onnx")
