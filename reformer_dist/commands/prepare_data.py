"""Tokenize text corpora into memory-mapped token shards plus a manifest (or verify a prepared directory).

Inputs: text files, directories (recursive, filtered by --glob), .gz/.zip archives, quoted globs,
`stdlib` (this interpreter's standard library .py files), or the enwik8 file (enwik8 / enwik8.zip,
split 90M/5M/5M bytes into train/val/test). Other corpora: the last --val-fraction of the token
stream becomes the val split.

Examples:
  reformer-dist prepare-data --input stdlib --output runs/data/stdlib
  reformer-dist prepare-data --input enwik8.zip --output runs/data/enwik8 --byte-offset 2
  reformer-dist prepare-data --input books/ --glob '*.txt' --tokenizer spiece.model --output runs/data/books
  reformer-dist prepare-data --verify runs/data/stdlib
"""

from __future__ import annotations

import argparse

from reformer_dist.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", "-i", nargs="+", action="extend", default=[], metavar="PATH",
                        help="files, directories, .gz/.zip, globs, 'stdlib', or an enwik8 file")
    parser.add_argument("--output", "-o", metavar="DIR", help="data directory to write")
    parser.add_argument("--tokenizer", default="bytes",
                        help="'bytes' (default), a tokenizer.json, a sentencepiece .model, or a directory "
                             "holding one")
    parser.add_argument("--byte-offset", type=int, default=0, metavar="N",
                        help="bytes tokenizer: id = byte + N, keeping ids below N free (HF enwik8: 2)")
    parser.add_argument("--val-fraction", type=float, default=0.005, metavar="F",
                        help="tail of the token stream used for validation (default 0.005; not for enwik8)")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="tokenizer processes for text tokenizers (default 0 = one per CPU)")
    parser.add_argument("--glob", default="*", metavar="PATTERN",
                        help="file-name pattern inside input directories (default '*')")
    parser.add_argument("--dtype", choices=("uint8", "uint16", "uint32"),
                        help="shard dtype (default: the smallest that holds the vocabulary)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 27, metavar="N",
                        help="tokens per shard file (default 2^27)")
    parser.add_argument("--verify", metavar="DIR",
                        help="instead of preparing: check DIR's shards against its manifest (sizes and sha256)")


def run(args: argparse.Namespace) -> int:
    from reformer_dist.data import load_manifest, prepare_corpus

    if args.verify:
        manifest = load_manifest(args.verify, verify_checksums=True)
        _print_summary(args.verify, manifest)
        print("all shards match the manifest (sizes and sha256)")
        return 0
    if not args.input or not args.output:
        raise DataError("prepare-data needs --input PATH... and --output DIR (or --verify DIR)")
    manifest = prepare_corpus(args.input, args.output, tokenizer=args.tokenizer, byte_offset=args.byte_offset,
                              val_fraction=args.val_fraction, workers=args.workers, pattern=args.glob,
                              dtype=args.dtype, shard_tokens=args.shard_tokens, progress=True)
    _print_summary(args.output, manifest)
    return 0


def _print_summary(data_dir: str, manifest: dict) -> None:
    tok = manifest["tokenizer"]
    tok_name = f"bytes (offset {tok['offset']})" if tok["kind"] == "bytes" else f"{tok['kind']} ({tok['path']})"
    print(f"data directory: {data_dir}")
    for s in manifest["sources"]:
        print(f"  {'source':<10} {s['input']}: {s['files']:,} files, {s['bytes']:,} bytes")
    print(f"  {'tokenizer':<10} {tok_name}, vocab {manifest['vocab_size']:,}, {manifest['dtype']} shards")
    for name, split in manifest["splits"].items():
        print(f"  {name:<10} {split['n_tokens']:,} tokens in {len(split['shards'])} shard(s)")
