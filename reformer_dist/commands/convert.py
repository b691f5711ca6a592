"""Convert a model between the Hugging Face Reformer format and the native format.

Examples:
  reformer-dist convert --from hf --to native --input hf-reformer-enwik8/ --output models/enwik8
  reformer-dist convert --from native --to hf --input runs/tiny --output hf-tiny/

HF input: a local ReformerModelWithLMHead directory (config.json + model.safetensors or
pytorch_model.bin); its LSH layers become 'chunk'-window layers so the logits stay HF's. Native input:
a native model directory or a training run directory (its consolidated native/ model). The tokenizer
(spiece.model, tokenizer.json, or raw bytes for byte vocabularies) travels with the model.
"""

from __future__ import annotations

import argparse

FORMATS = ("hf", "native")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", choices=FORMATS, required=True, help="input format")
    parser.add_argument("--to", dest="target_format", choices=FORMATS, required=True, help="output format")
    parser.add_argument("--input", "-i", required=True, metavar="DIR", help="model directory to read")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")


def run(args: argparse.Namespace) -> int:
    from reformer_dist.artifacts import hf_checkpoint, native, tokenizer_spec
    from reformer_dist.artifacts.model_source import load_model
    from reformer_dist.errors import ConfigError

    if args.source_format == args.target_format:
        raise ConfigError("--to", f"input and output are both {args.source_format!r}: nothing to convert")
    source = load_model(args.input)
    if source.kind != args.source_format:
        raise ConfigError("--from", f"{args.input} is a {source.kind} model, not {args.source_format}")
    model, tokenizer = source.model, source.tokenizer
    if source.kind == "hf" and tokenizer is None:
        tokenizer = tokenizer_spec.read_hf(source.path, model.config.vocab_size)
    if args.target_format == "native":
        native.save_native(model, args.output, tokenizer)
    else:
        hf_checkpoint.save_hf(model, args.output, tokenizer)
    cfg = model.config
    kinds = "/".join(sorted(set(cfg.layer_kinds())))
    print(f"converted {source.kind} {source.path} -> {args.target_format} {args.output}: {cfg.n_layers} layers "
          f"({kinds}), d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"tokenizer {tokenizer['kind'] if tokenizer else 'none'}")
    return 0
