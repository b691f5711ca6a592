"""`reformer-dist convert`: HF <-> native, with the tokenizer travelling along."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="transformers 4.57.6 is the parity reference")

from test_hf_interop import random_hf_model, saved  # noqa: E402

from reformer_dist.artifacts.hf_checkpoint import from_hf  # noqa: E402
from reformer_dist.artifacts.native import from_native  # noqa: E402
from reformer_dist.artifacts.tokenizer_spec import read_native  # noqa: E402
from reformer_dist.cli import main  # noqa: E402


def test_convert_hf_to_native_and_back(tmp_path, capsys):
    # google/reformer-enwik8's vocabulary: bytes + 2, so the tokenizer is known without a file
    hf = random_hf_model(vocab_size=258, attn_layers=["local", "lsh"])
    hf_dir = saved(hf, tmp_path)
    assert main(["convert", "--from", "hf", "--to", "native", "--input", str(hf_dir),
                 "--output", str(tmp_path / "native")]) == 0
    assert "tokenizer bytes" in capsys.readouterr().out
    native = from_native(tmp_path / "native")
    assert read_native(tmp_path / "native") == {"kind": "bytes", "offset": 2}
    assert yaml.safe_load((tmp_path / "native" / "config.yaml").read_text())["model"]["lsh_window"] == "chunk"
    ids = torch.randint(0, 258, (1, 21))
    with torch.no_grad():
        assert torch.equal(native(ids), from_hf(hf_dir)(ids))

    assert main(["convert", "--from", "native", "--to", "hf", "--input", str(tmp_path / "native"),
                 "--output", str(tmp_path / "back")]) == 0
    back = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "back")
    for key, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_sentencepiece_tokenizer_is_copied_both_ways(tmp_path):
    hf_dir = saved(random_hf_model(attn_layers=["lsh", "local"]), tmp_path)
    (hf_dir / "spiece.model").write_bytes(b"not parsed by convert, only carried")
    assert main(["convert", "--from", "hf", "--to", "native", "--input", str(hf_dir),
                 "--output", str(tmp_path / "native")]) == 0
    spec = json.loads((tmp_path / "native" / "tokenizer.json").read_text())
    assert spec == {"kind": "sentencepiece", "path": "spiece.model"}
    assert main(["convert", "--from", "native", "--to", "hf", "--input", str(tmp_path / "native"),
                 "--output", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "spiece.model").read_bytes() == (hf_dir / "spiece.model").read_bytes()


def test_convert_reports_user_errors_without_traceback(tmp_path, capsys):
    hf_dir = saved(random_hf_model(attn_layers=["lsh", "local"]), tmp_path)
    assert main(["convert", "--from", "native", "--to", "hf", "--input", str(hf_dir),
                 "--output", str(tmp_path / "x")]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["convert", "--from", "hf", "--to", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "y")]) == 2
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "tanh"}))
    assert main(["convert", "--from", "hf", "--to", "native", "--input", str(hf_dir),
                 "--output", str(tmp_path / "z")]) == 2
    assert "hidden_act" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
