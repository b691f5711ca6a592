"""A micro training run and what is exported from it, built once per test session (``micro_run`` in
conftest.py) for the tests of files a user hands the commands and of what the package writes.

Layout of the directory: ``micro.yaml`` (the run config), ``data/`` (a prepared byte-level corpus), ``run/``
(a 2-step single-process ZeRO-1 training run: DeepSpeed's model and optimizer states, the RNG file,
meta.json, latest, the consolidated ``native/`` model), ``model.onnx`` (exported from it), ``hf/`` (a
Hugging Face Reformer directory of the same shape, 'chunk' windows) and ``tok.json`` (a word-level
tokenizers file whose ids fit the byte vocabulary).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

STEP = "checkpoints/step_00000002"
# the micro Reformer of the training tests (test_train_distributed.py trains it too)
MICRO_MODEL = """
model:
  vocab_size: 256
  d_model: 32
  n_heads: 2
  d_head: 16
  d_ff: 64
  n_layers: 2
  attn_layers: [local, lsh]
  lsh_chunk_len: 16
  local_chunk_len: 16
  max_seq_len: 64
  axial_pos_shape: [8, 8]
  axial_pos_dims: [16, 16]
"""
MICRO = MICRO_MODEL + """train:
  max_steps: 2
  seq_len: 64
  micro_batch_size: 2
  warmup_steps: 1
  eval_every: 0
  eval_batches: 1
  save_every: 0
  log_every: 1
deepspeed:
  zero_stage: 1
"""
WORDS = ["the", "reformer", "hashes", "queries", "into", "buckets", "and", "attends", "within", "chunks"]


def _write_tokenizer(path: Path) -> None:
    """A word-level tokenizers JSON over the corpus words (ids < 256, so the byte-vocabulary model fits)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS, "."])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _write_hf_dir(path: Path) -> None:
    from reformer_dist.artifacts.hf_checkpoint import save_hf
    from reformer_dist.model import ReformerLM
    from reformer_dist.run_config import load_config

    cfg = load_config([str(path.parent / "micro.yaml")], ["model.lsh_window=chunk"]).model
    torch.manual_seed(0)
    save_hf(ReformerLM(cfg), path)


def build(root: Path) -> Path:
    from reformer_dist.cli import main
    from reformer_dist.data import prepare_corpus

    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(" ".join(rng.choice(WORDS, size=12)) + ".\n" for _ in range(300)))
    prepare_corpus([str(corpus)], str(root / "data"), val_fraction=0.1)
    (root / "micro.yaml").write_text(MICRO)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "reformer_dist", "train", "--config", str(root / "micro.yaml"),
                           f"data.path={root / 'data'}", f"train.output_dir={root / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert main(["export", "onnx", "--checkpoint", str(root / "run"), "--output", str(root / "model.onnx")]) == 0
    _write_hf_dir(root / "hf")
    _write_tokenizer(root / "tok.json")
    return root
