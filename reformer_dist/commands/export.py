"""Export a trained model: ONNX graphs, TensorRT engines, and static checks of both.

Examples:
  reformer-dist export onnx --checkpoint runs/tiny --output model.onnx
  reformer-dist export onnx --checkpoint hf-reformer-dir/ --output model.onnx --precision fp16 --flavour tensorrt
  reformer-dist export onnx --checkpoint runs/tiny --output model.onnx --generation   # + model.prefill/.decode.onnx
  reformer-dist export onnx --checkpoint runs/tiny --output model.int8.onnx --precision int8
  reformer-dist export check model.onnx --target tensorrt
  reformer-dist export check model.int8.onnx --target onnxruntime --reference model.onnx --data runs/data/stdlib
  reformer-dist export tensorrt --onnx model.onnx --output model.plan --fp16 --shapes 1x64/1x1024/4x4096
"""

from __future__ import annotations

import argparse

from reformer_dist.export import triton_repo


# ---------------------------------------------------------------------------------------------- onnx
def _add_onnx(p: argparse.ArgumentParser) -> None:
    from reformer_dist.export.config import FLAVOURS, LSH_SORTS, PRECISIONS, ExportConfig

    d = ExportConfig()
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="training run directory, native model directory / .safetensors, or HF Reformer directory")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="run config YAML (repeatable) whose export: section sets the defaults of the flags below")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help=f"weights and activations of the graph (default {d.precision})")
    p.add_argument("--flavour", choices=FLAVOURS, default=None,
                   help=f"portable: standard-op LSH body; tensorrt: + plugin attributes; ort-tensorrt: "
                        f"node in ONNX Runtime's trt.plugins domain (default {d.flavour})")
    p.add_argument("--sort", dest="lsh_sort", choices=LSH_SORTS, default=None,
                   help=f"sort of the LSH body: counting (TensorRT-parsable) or topk (fewer ops) (default {d.lsh_sort})")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="longest sequence the deployment accepts (default: the model's max_seq_len)")
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset version (default {d.opset})")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="tokenizer to record (bytes, a tokenizer.json, a .model); default: the checkpoint's")
    p.add_argument("--generation", action="store_true",
                   help="also write the cached-generation graphs <stem>.prefill.onnx and <stem>.decode.onnx "
                        "(used by `reformer-dist generate --model` and the Triton repository)")


def export_config(args: argparse.Namespace):
    """ExportConfig defaults < the export: section of --config < flags given on the command line."""
    from dataclasses import fields, replace

    from reformer_dist.config_files import load_section
    from reformer_dist.export.config import ExportConfig

    cfg = load_section("export", ExportConfig, args.config)
    flags = {f.name: getattr(args, f.name) for f in fields(ExportConfig) if getattr(args, f.name) is not None}
    return replace(cfg, **flags).validate()


def _run_onnx(args: argparse.Namespace) -> int:
    from reformer_dist.artifacts.model_source import load_model, model_name
    from reformer_dist.export.check import check_model
    from reformer_dist.export.onnx_export import export_onnx
    from reformer_dist.export.onnx_graph import lsh_nodes

    cfg = export_config(args)
    source = load_model(args.checkpoint)
    tokenizer = source.tokenizer
    if args.tokenizer is not None:
        from reformer_dist.data.tokenizer import parse_tokenizer_arg

        tokenizer = parse_tokenizer_arg(args.tokenizer)
    if tokenizer is not None:
        from reformer_dist.data.tokenizer import get_tokenizer

        get_tokenizer(tokenizer)  # a file the deployment could not load is refused before it is embedded
    proto = export_onnx(source.model, args.output, precision=cfg.precision, flavour=cfg.flavour, sort=cfg.lsh_sort,
                        opset=cfg.opset, max_seq_len=args.max_seq_len, tokenizer=tokenizer, generation=args.generation,
                        model_name=model_name(source.path))
    report = check_model(proto, "onnxruntime")
    print(f"wrote {args.output}: {len(proto.graph.node)} nodes, {len(lsh_nodes(proto))} LshAttention, "
          f"{cfg.precision}, flavour {cfg.flavour}, {cfg.lsh_sort} sort ({source.kind} checkpoint {source.path})")
    if args.generation:
        from reformer_dist.export.metadata import generation_paths

        print("wrote " + ", ".join(str(p) for p in generation_paths(args.output).values()))
    if cfg.precision == "int8":
        print(f"int8: measure its quality cost with `reformer-dist export check {args.output} --target onnxruntime "
              f"--reference FP32.onnx --data DATA_DIR`")
    if not report.ok:
        print(report.format())
    return 0 if report.ok else 1


# --------------------------------------------------------------------------------------------- check
def _add_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx", help="the exported graph to check")
    p.add_argument("--target", choices=["tensorrt", "onnxruntime"], required=True,
                   help="the runtime whose importer the graph must pass")
    quality = p.add_argument_group("quality cost (e.g. of an int8 graph)")
    quality.add_argument("--reference", default=None, metavar="REF.onnx",
                         help="also compare the held-out loss of MODEL with this graph's (e.g. the fp32 export)")
    quality.add_argument("--data", default=None, metavar="DIR", help="prepared data directory (its val split)")
    quality.add_argument("--seq-len", type=int, default=None, help="window length (default: min(1024, max_seq_len))")
    quality.add_argument("--windows", type=int, default=16, help="held-out windows to score (16)")
    quality.add_argument("--max-loss-increase", type=float, default=None, metavar="PCT",
                         help="fail when MODEL's loss exceeds the reference's by more than PCT percent")


def _run_check(args: argparse.Namespace) -> int:
    import os

    from reformer_dist.errors import ReformerDistError
    from reformer_dist.export.check import check_model

    if not os.path.isfile(args.model):
        raise ReformerDistError(f"{args.model}: no such ONNX model")
    report = check_model(args.model, args.target)
    print(report.format())
    ok = report.ok
    if args.reference is not None:
        from reformer_dist.export.quantize import quality_cost

        if args.data is None:
            raise ReformerDistError("--reference needs --data (a prepared data directory with a val split)")
        quality = quality_cost(args.model, args.reference, args.data, args.seq_len, args.windows)
        print(quality.format())
        if args.max_loss_increase is not None and 100 * quality.relative > args.max_loss_increase:
            print(f"FAIL: loss increase above {args.max_loss_increase}%")
            ok = False
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ tensorrt
def _add_tensorrt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, metavar="FILE", help="an exported .onnx (portable or tensorrt flavour)")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="the engine (.plan) to write")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
    precision.add_argument("--bf16", action="store_true", help="allow bf16 kernels")
    p.add_argument("--shapes", default=None, metavar="MIN/OPT/MAX",
                   help="optimisation profile as BxL triples, e.g. 1x64/1x1024/4x4096 "
                        "(default 1xC/1x1024/1xmax_seq_len, C = the chunk multiple)")
    p.add_argument("--timing-cache", default=None, metavar="FILE", help="read and update this timing cache")
    p.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit")
    p.add_argument("--plugin", default=None, metavar="FILE",
                   help="Python file defining the LshAttention QDP plugin (default: export/tensorrt/lsh_plugin.py)")


def _run_tensorrt(args: argparse.Namespace) -> int:
    from reformer_dist.export.tensorrt_build import build_engine, build_generation_engines, parse_shapes

    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    options = dict(precision=precision, shapes=parse_shapes(args.shapes) if args.shapes else None,
                   timing_cache=args.timing_cache, workspace_gb=args.workspace_gb, plugin=args.plugin)
    engine = build_engine(args.onnx, args.output, **options)
    print(f"wrote {engine}")
    # the cached-generation engines the TensorRT serving backend decodes through, when exported
    for generation_engine in build_generation_engines(args.onnx, args.output, **options):
        print(f"wrote {generation_engine}")
    return 0


# Sub-subcommands: name -> (one-line help, add_arguments, run).
SUBCOMMANDS = {
    "onnx": ("export a checkpoint to an ONNX graph with one LshAttention node per LSH layer", _add_onnx, _run_onnx),
    "check": ("list a graph's ops and flag what the target's importer rejects", _add_check, _run_check),
    "tensorrt": ("build a TensorRT engine from an exported ONNX graph", _add_tensorrt, _run_tensorrt),
    "triton-repo": (triton_repo.SUMMARY, triton_repo.add_arguments, triton_repo.run),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_command", metavar="WHAT", required=True)
    for name, (summary, add, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        add(p)
        p.set_defaults(_export_run=run)


def run(args: argparse.Namespace) -> int:
    return args._export_run(args)
