"""Learning-curve benchmark: validation bits/byte against training steps, Reformer variants vs a plain transformer.

Every model trains in the same hand-written loop on the same data, token budget and optimiser (AdamW,
linear warmup then cosine, gradient clipping, weight decay on matrices — ``reformer_dist.train.deepspeed_engine``'s
parameter groups and schedule) and is evaluated every ``--eval-every`` steps on the same validation
windows. The model size, batch, sequence length, dropout and optimiser settings are the ``tiny`` config's
(``configs/tiny.yaml``), so "ours" is exactly what the quickstart trains:

  ours          ReformerLM, the tiny config (local/LSH layer mix, bucket LSH window)
  ours_full     ... with full attention in every layer
  ours_plain    ... non-reversible (ordinary residual stack, same parameters)
  ours_lsh      ... LSH attention in every layer
  ours_hf_init  ... initialised as HF does (and this project once did): every weight at std
                0.02 (HF's initializer_range) but the axial positions at 1.0 (HF's axial_norm_std)
  hf            transformers' ReformerModelWithLMHead (4.57.6) of the same shape (local/LSH mix; HF has
                only the reference chunk LSH window) at its best settings: its own initialisation
                (``_init_weights``) given our init stds through its own knobs (initializer_range,
                axial_norm_std); HF has no scaled init of the branch outputs
  gpt           a plain pre-LN causal transformer (SDPA, learned positions, ReLU feed-forward, nanoGPT's
                init) of the same width, depth, heads and feed-forward size, at its best settings
                (GPT_SETTINGS, from a sweep of init std / learning rate / warmup)
  gpt_local     diagnostic: that transformer with each query attending only its last LOCAL_WINDOW positions
                (a sliding window, about the reach of ours' local layers), to separate the effect of local
                attention's inductive bias from everything else that differs
  gpt_local_axial  diagnostic: gpt_local with ours' axial positions (the config's factorised table, at init
                std) instead of learned absolute ones

Corpora: ``stdlib`` (the Python standard library's sources, as the quickstart) and ``dna``: a DNA-like
byte stream generated deterministically here (FASTA-style lines of A/C/G/T from a fixed order-5 Markov
chain, with repeats copied from up to 200 bases back; see :func:`write_dna_corpus`).

Runs are cached in the results JSON per (model, corpus, seed, steps, resolved model + optimiser settings,
so a changed config or variant re-runs and stale runs are not reported): re-running the same command
skips finished runs and resumes an interrupted one from its last evaluation (state under --work-dir).
One thread per process; start two processes on disjoint ``--models`` to use two cores.

    python benchmarks/bench_learning.py                                  # everything (many CPU-hours)
    python benchmarks/bench_learning.py --models gpt ours --corpus stdlib --seeds 0 --steps 300
    python benchmarks/bench_learning.py --report                         # table + plot from the JSON only
    python benchmarks/bench_learning.py --models ours --set model.axial_norm_std=1.0 --tag old-axial
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from train_step_impls import SdpaBlock  # benchmarks/ (the script's directory) is on sys.path

from reformer_dist.model.embeddings import AxialPositionalEmbedding

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "learning.json"
MODELS = ("ours", "ours_full", "ours_plain", "ours_lsh", "ours_hf_init", "hf", "gpt", "gpt_local", "gpt_local_axial")
GPT_SETTINGS: list[str] = []
"""The plain transformer's own overrides of the tiny config, from the sweep in the README (300 steps, seed
0: init std 0.02 as nanoGPT, lr 1e-3): none, the tiny config's init std 0.088 / lr 2e-3 was its best."""
LOCAL_WINDOW = 64  # gpt_local: each query attends its last 64 positions, the reach of ours' local layers
CORPORA = ("stdlib", "dna")
VAL_WINDOWS = 128  # validation windows per evaluation (the split's first ones, the same every time)


# ------------------------------------------------------------------------------------------------ data
def dna_markov_table(seed: int = 0, order: int = 5) -> np.ndarray:
    """The DNA corpus's transition table (4**order contexts x 4 bases), drawn once from ``seed``."""
    return np.random.default_rng(seed).dirichlet([0.3] * 4, size=4**order)


def dna_entropy_rate(seed: int = 0, order: int = 5) -> float:
    """Bits per base of the corpus's Markov chain at its stationary distribution: what a model that knows
    the chain pays per base outside repeats (repeats, line breaks and headers cost less)."""
    table = dna_markov_table(seed, order)
    n = 4**order
    pi = np.full(n, 1.0 / n)
    for _ in range(2000):  # power iteration: context c = (c << 2 | b) & (n - 1)
        nxt = np.zeros(n)
        for b in range(4):
            np.add.at(nxt, ((np.arange(n) << 2) | b) & (n - 1), pi * table[:, b])
        pi = nxt
    row_entropy = -(table * np.log2(table)).sum(axis=1)
    return float(pi @ row_entropy)


def write_dna_corpus(path: Path, n_bytes: int = 4_000_000, seed: int = 0) -> None:
    """A DNA-like corpus: records of a header line ``>seq<i> len=<n>`` and 60-base lines of A/C/G/T.

    Bases come from an order-5 Markov chain whose 1,024 transition rows are drawn once from a
    Dirichlet(0.3) (peaked, so context matters); with probability 1/150 per base a repeat starts: the
    next 20-80 bases are a copy of the bases 30-200 positions back (content a model can only predict by
    looking back, as tandem and interspersed repeats in real genomes). Fully determined by ``seed``.
    """
    order, alphabet = 5, np.frombuffer(b"ACGT", dtype=np.uint8)
    cdf = np.cumsum(dna_markov_table(seed, order), axis=1)  # (1024, 4)
    rng = np.random.default_rng(seed + 1)
    out = bytearray()
    record = 0
    while len(out) < n_bytes:
        length = int(rng.integers(600, 3000))
        bases = np.empty(length, dtype=np.int64)
        bases[:order] = rng.integers(0, 4, order)
        ctx = int(sum(int(b) << (2 * i) for i, b in enumerate(bases[:order][::-1])))
        u = rng.random(length)
        i = order
        while i < length:
            if rng.random() < 1 / 150 and i > 230:
                span, back = int(rng.integers(20, 81)), int(rng.integers(30, 201))
                for j in range(i, min(i + span, length)):
                    bases[j] = bases[j - back]
                i = min(i + span, length)
                ctx = 0
                for b in bases[i - order:i]:
                    ctx = ((ctx << 2) | int(b)) & (4**order - 1)
                continue
            b = int(np.searchsorted(cdf[ctx], u[i] * cdf[ctx, -1]))
            bases[i] = min(b, 3)
            ctx = ((ctx << 2) | bases[i]) & (4**order - 1)
            i += 1
        seq = alphabet[bases].tobytes()
        out += f">seq{record} len={length}\n".encode()
        out += b"".join(seq[k:k + 60] + b"\n" for k in range(0, length, 60))
        record += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out[:n_bytes]))


def prepared_corpus(name: str, data_root: Path) -> str:
    """The prepared data directory of corpus ``name`` (prepared on first use)."""
    from reformer_dist.data.prepare import prepare_corpus

    out = data_root / name
    if (out / "manifest.json").is_file():
        return str(out)
    if name == "stdlib":
        prepare_corpus(["stdlib"], str(out))
    else:
        text = data_root / "dna-source" / "dna.txt"
        write_dna_corpus(text)
        prepare_corpus([str(text)], str(out), val_fraction=0.02)
    return str(out)


# ------------------------------------------------------------------------------------------------ models
class PlainTransformer(nn.Module):
    """A plain pre-LN causal transformer (nanoGPT's layout: learned positions, N(0, init_std) init with the
    residual output projections scaled by 1/sqrt(2 * n_layers), untied head with bias)."""

    def __init__(self, vocab: int, length: int, d_model: int, n_layers: int, n_heads: int, d_head: int,
                 d_ff: int, dropout: float, init_std: float, window: int | None = None,
                 axial: tuple[list[int], list[int]] | None = None):
        super().__init__()
        self.dropout = dropout
        self.emb = nn.Embedding(vocab, d_model)
        # learned absolute positions, or (axial = (shape, dims)) the Reformer's factorised table
        self.pos = nn.Embedding(length, d_model) if axial is None else AxialPositionalEmbedding(*axial, std=init_std)
        self.blocks = nn.ModuleList([SdpaBlock(d_model, n_heads, d_head, d_ff, dropout, window)
                                     for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scaled = name.endswith(("out.weight", "ff.2.weight"))
                std = init_std / math.sqrt(2 * n_layers) if scaled else init_std
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def loss(self, ids: Tensor, targets: Tensor) -> Tensor:
        length = ids.shape[1]
        x = self.emb(ids) + (self.pos(torch.arange(length)) if isinstance(self.pos, nn.Embedding)
                             else self.pos(length, ids.device))
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class HFReformer(nn.Module):
    """transformers' ReformerModelWithLMHead with the ``loss(ids, targets)`` interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def loss(self, ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.model(ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def hf_model(cfg) -> nn.Module:
    """HF's Reformer with our config's shape; its LSH layers use the ``chunk`` window, the only one HF has,
    and its feed-forward is unchunked (HF needs the length to be a multiple of the chunk; chunking only
    saves memory)."""
    from transformers import ReformerConfig as HFConfig
    from transformers import ReformerModelWithLMHead

    from reformer_dist.model.hf_mapping import config_to_hf

    shape = dataclasses.replace(cfg.model, lsh_window="chunk", ff_chunk_size=0)
    return HFReformer(ReformerModelWithLMHead(HFConfig(**config_to_hf(shape))))


def build(name: str, cfg) -> nn.Module:
    """Model ``name`` at the config's size (the caller seeds torch's RNG first)."""
    from reformer_dist.model import ReformerLM

    m = cfg.model
    if name.startswith("gpt"):
        window = LOCAL_WINDOW if name.startswith("gpt_local") else None
        axial = (m.resolved_axial_shape(), m.resolved_axial_dims()) if name.endswith("axial") else None
        return PlainTransformer(m.vocab_size, cfg.train.seq_len, m.d_model, m.n_layers, m.n_heads, m.d_head,
                                m.d_ff, m.dropout, m.init_std, window, axial)
    if name == "hf":
        return hf_model(cfg)
    model = ReformerLM(m)
    if name == "ours_hf_init":  # init_std and axial std come from the overrides; branch outputs unscaled
        for layer in model.layers:
            for branch_output in (layer.attention.output, layer.feed_forward.output):
                nn.init.normal_(branch_output.weight, std=m.init_std)
    return model


def variant_overrides(name: str) -> list[str]:
    return {"ours_full": ["model.attn_layers=[full]"], "ours_plain": ["model.reversible=false"],
            "ours_lsh": ["model.attn_layers=[lsh]"], "ours_hf_init": ["model.init_std=0.02", "model.axial_norm_std=1.0"],
            "gpt": GPT_SETTINGS, "gpt_local": GPT_SETTINGS, "gpt_local_axial": GPT_SETTINGS}.get(name, [])


def run_config(name: str, overrides: list[str]):
    """The tiny config with model ``name``'s variant settings, then the command line's overrides."""
    from reformer_dist.run_config import load_config

    return load_config(["tiny"], [*variant_overrides(name), *overrides])


def settings_hash(cfg) -> str:
    """Hash of everything a run's curve depends on besides model/corpus/seed/steps: the resolved model
    config and the data/optimiser settings (the cache key, so a changed config re-runs)."""
    t = cfg.train
    settings = {"model": dataclasses.asdict(cfg.model),
                "train": {k: getattr(t, k) for k in ("seq_len", "micro_batch_size", "grad_accum", "lr", "betas",
                                                     "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip")}}
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------ one run
def bits_per_byte(model: nn.Module, val, batch: int) -> float:
    """Mean cross-entropy over the first VAL_WINDOWS validation windows, in bits."""
    from reformer_dist.model import ReformerLM

    saved = model.rng_state() if isinstance(model, ReformerLM) else None
    model.eval()
    total, n = 0.0, min(VAL_WINDOWS, len(val))
    with torch.no_grad():
        for start in range(0, n, batch):
            w = torch.from_numpy(np.stack([val[i] for i in range(start, min(start + batch, n))]))
            total += float(model.loss(w[:, :-1], w[:, 1:])) * w.shape[0]
    model.train()
    if saved is not None:  # evaluation must not change the LSH rotations training draws next
        model.set_rng_state(saved)
    return total / n / math.log(2)


def train_run(name: str, corpus: str, seed: int, steps: int, eval_every: int, overrides: list[str],
              data_root: Path, state_path: Path, log: Callable[[str], None]) -> dict:
    from reformer_dist.data import GlobalOrderSampler, TokenWindowDataset, next_batch
    from reformer_dist.model import ReformerLM
    from reformer_dist.train.deepspeed_engine import lr_factor, param_groups

    cfg = run_config(name, overrides)
    t = cfg.train
    data = prepared_corpus(corpus, data_root)
    train_ds = TokenWindowDataset(data, "train", t.seq_len)
    val_ds = TokenWindowDataset(data, "val", t.seq_len)
    torch.manual_seed(seed)
    model = build(name, cfg).train()
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, t.warmup_steps, steps, t.min_lr_ratio))
    sampler = GlobalOrderSampler(len(train_ds), seed=seed)
    batch = t.micro_batch_size * t.grad_accum
    record = {"model": name, "corpus": corpus, "seed": seed, "steps": steps, "overrides": overrides,
              "params": sum(p.numel() for p in model.parameters()), "batch": batch, "seq_len": t.seq_len,
              "lr": t.lr, "betas": list(t.betas), "warmup": t.warmup_steps, "dropout": cfg.model.dropout,
              "init_std": cfg.model.init_std, "settings": settings_hash(cfg),
              "val_bpb": {}, "train_loss": {}, "cpu_s": 0.0}
    step = 0
    if state_path.is_file():  # resume an interrupted run at its last evaluation
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if isinstance(model, ReformerLM):
            model.set_rng_state(state["model_rng"])
        record, step = state["record"], state["record"]["at"]
        log(f"  resumed at step {step}")
    if step == 0:
        record["val_bpb"]["0"] = bits_per_byte(model, val_ds, t.micro_batch_size)
    cpu0, losses = time.process_time(), []
    while step < steps:
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            ids, targets = next_batch(train_ds, sampler, t.micro_batch_size)
            loss = model.loss(ids, targets) / t.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss_sum)
        if step % eval_every == 0 or step == steps:
            record["val_bpb"][str(step)] = bpb = bits_per_byte(model, val_ds, t.micro_batch_size)
            record["train_loss"][str(step)] = sum(losses) / len(losses)
            record["cpu_s"] += time.process_time() - cpu0
            record["at"] = step
            cpu0, losses = time.process_time(), []
            log(f"  step {step}: val {bpb:.4f} bits/byte, train loss {record['train_loss'][str(step)]:.4f} nats "
                f"({record['cpu_s']:.0f} CPU s)")
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(), "record": record}
            if isinstance(model, ReformerLM):
                state["model_rng"] = model.rng_state()
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, str(state_path) + ".tmp")
            os.replace(str(state_path) + ".tmp", state_path)
    return record


# ------------------------------------------------------------------------------------------------ results
@contextlib.contextmanager
def locked_results(path: Path):
    """The results dict, read and written back under an exclusive lock (several processes share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        yield results
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def run_key(name: str, corpus: str, seed: int, steps: int, eval_every: int, overrides: list[str]) -> str:
    return f"{name}/{corpus}/s{seed}/{steps}x{eval_every}/{settings_hash(run_config(name, overrides))}"


def mean_curves(results: dict, steps: int, eval_every: int, overrides: list[str]) -> dict:
    """(model, corpus) -> {step: mean val bits/byte over the finished seeds, 'seeds': n}."""
    current = {m: settings_hash(run_config(m, overrides)) for m in MODELS}
    out: dict = {}
    for r in results.values():
        if r["steps"] != steps or r.get("eval_every") != eval_every or r.get("settings") != current[r["model"]] \
                or r.get("at") != steps:
            continue
        out.setdefault((r["model"], r["corpus"]), []).append(r)
    means = {}
    for key, runs in out.items():
        points = sorted(set.intersection(*(set(int(s) for s in r["val_bpb"]) for r in runs)))
        means[key] = {"seeds": sorted(r["seed"] for r in runs), "params": runs[0]["params"],
                      "tokens": runs[0]["batch"] * runs[0]["seq_len"],
                      "cpu_s": sum(r["cpu_s"] for r in runs) / len(runs),
                      "curve": {s: float(np.mean([r["val_bpb"][str(s)] for r in runs])) for s in points}}
    return means


def report(results: dict, steps: int, eval_every: int, overrides: list[str], out_md: Path, out_png: Path,
           command: str) -> str:
    means = mean_curves(results, steps, eval_every, overrides)
    if not means:
        return "no finished runs for these settings"
    marks = [s for s in (100, 300, 500, 1000, 2000, 3000) if s <= steps]
    lines = [f"Command: `{command}`", "",
             "Validation bits/byte (mean of the seeds listed) at equal training steps; ratio = model / gpt.", ""]
    for corpus in CORPORA:
        rows = [(m, means[(m, corpus)]) for m in MODELS if (m, corpus) in means]
        if not rows:
            continue
        base = means.get(("gpt", corpus))
        lines += [f"### {corpus}", "", "| model | params | seeds | " + " | ".join(f"step {s}" for s in marks)
                  + " | CPU s / run |", "|---|---|---|" + "---|" * len(marks) + "---|"]
        for m, r in rows:
            cells = []
            for s in marks:
                v = r["curve"].get(s)
                if v is None:
                    cells.append("-")
                    continue
                ratio = f" ({v / base['curve'][s]:.3f}×)" if base and s in base["curve"] and m != "gpt" else ""
                cells.append(f"{v:.3f}{ratio}")
            lines.append(f"| {m} | {r['params']:,} | {','.join(map(str, r['seeds']))} | " + " | ".join(cells)
                         + f" | {r['cpu_s']:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    out_md.write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text + "\n(matplotlib missing: no plot)"
    corpora = [c for c in CORPORA if any(k[1] == c for k in means)]
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for m in MODELS:
            if (m, corpus) in means:
                curve = {s: v for s, v in means[(m, corpus)]["curve"].items() if s > 0}
                ax.plot(list(curve), list(curve.values()), label=m, marker=".", lw=1.2,
                        ls="--" if m.startswith("hf") else "-", color="black" if m == "gpt" else None)
        ax.set_title(f"{corpus}: validation bits/byte")
        tokens = next(r["tokens"] for k, r in means.items() if k[1] == corpus)
        ax.set_xlabel(f"training step ({tokens:,} bytes each)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--corpus", nargs="+", default=list(CORPORA), choices=CORPORA)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--set", dest="overrides", nargs="*", default=[],
                    help="config overrides (key=value) applied to every model built from the config")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--data-root", type=Path, default=REPO / "runs" / "data")
    ap.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench_learning")
    ap.add_argument("--report", action="store_true", help="only print/write the table and plot from the JSON")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # one table + plot per step budget (and per override set): learning_1000steps.md / .png, ...
    stem = args.results.with_name(f"{args.results.stem}_{args.steps}steps" + (
        "_" + hashlib.sha1(" ".join(args.overrides).encode()).hexdigest()[:8] if args.overrides else ""))
    command = "python benchmarks/bench_learning.py" + (
        f" --steps {args.steps}" if args.steps != 1000 else "") + (
        f" --set {' '.join(args.overrides)}" if args.overrides else "")
    if not args.report:
        for corpus in args.corpus:
            for seed in args.seeds:
                for name in args.models:
                    key = run_key(name, corpus, seed, args.steps, args.eval_every, args.overrides)
                    with locked_results(args.results) as results:
                        done = results.get(key, {}).get("at") == args.steps
                    if done:
                        continue
                    print(f"{key}", flush=True)
                    state = args.work_dir / (key.replace("/", "_") + ".pt")
                    record = train_run(name, corpus, seed, args.steps, args.eval_every, args.overrides,
                                       args.data_root, state, lambda s: print(s, flush=True))
                    record["eval_every"] = args.eval_every
                    with locked_results(args.results) as results:
                        results[key] = record
                    state.unlink(missing_ok=True)
    with locked_results(args.results) as results:
        text = report(results, args.steps, args.eval_every, args.overrides, stem.with_suffix(".md"),
                      stem.with_suffix(".png"), command)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
