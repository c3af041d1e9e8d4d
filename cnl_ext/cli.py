"""``python -m cnl_ext <subcommand>`` / ``cnl-ext``: the paper's experiments from the command line.

Subcommands (``--help`` on each for its options):

  demo             FT vs CNL (AdamW) on generated questions and the embedded SmolLM2, a few minutes on CPU
  prepare-data     a benchmark (mmlu, arc_c, csqa, medqa, mmac) from the hub or local files -> paper JSONL
  mmac             the union MMLU + MedQA + ARC-C + CSQA -> paper JSONL
  infer-and-split  ask the model every question: mastered.jsonl (correct) / injection.jsonl (wrong)
  teach            the "taught first" variant: teach part, split, save the taught model
  inject           in-set FT / CNL / replay / LoRA runs for one or more optimizers
  out-of-set       the 1:1 out-of-set runs (mastered or injection side)
  table1           Sim / Dissim forgetting
  table2           collaborative / conflicting shares and sums of s (fused kernels)
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------------------------- shared options

def _add_model_options(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2",
                       help="hub id, local folder, .gguf file, or 'smollm2' (the embedded SmolLM2-135M-Instruct; default)")
    group.add_argument("--gguf-file", help="GGUF file name inside --model (a folder or hub repo)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights (paper: float32)")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    group.add_argument("--no-chat-template", action="store_true", help="feed the bare prompt (for base models)")
    group.add_argument("--threads", type=int, help="torch CPU threads")
    group.add_argument("--eval-batch-size", type=int, default=16, help="batch size of inference")


def _add_data_options(parser):
    group = parser.add_argument_group("questions (one source)")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", type=Path, help="paper-format JSONL files (joined)")
    source.add_argument("--dataset", choices=["mmlu", "arc_c", "csqa", "medqa", "mmac"], help="a benchmark")
    group.add_argument("--data-files", nargs="+", help="with --dataset: local files in the hub layout instead of the hub")
    group.add_argument("--fraction", type=float, help="with --dataset: subsampling (default: the paper's)")
    group.add_argument("--limit", type=int, help="keep at most this many questions (seeded sample)")
    group.add_argument("--seed", type=int, default=0, help="seed of the subsampling")


def _add_split_options(parser):
    group = parser.add_argument_group("split (from infer-and-split or teach)")
    group.add_argument("--mastered", type=Path, required=True, help="mastered.jsonl")
    group.add_argument("--injection", type=Path, required=True, help="injection.jsonl")
    group.add_argument("--limit-mastered", type=int, help="use at most this many mastered questions (seeded)")
    group.add_argument("--limit-injection", type=int, help="use at most this many injection questions (seeded)")


def _add_training_options(parser, *, methods_default=("ft", "cnl"), several=True):
    from .experiments.protocol import METHODS, OPTIMIZERS

    group = parser.add_argument_group("training")
    if several:
        group.add_argument("--optimizers", nargs="+", default=["adamw"], choices=OPTIMIZERS)
        group.add_argument("--methods", nargs="+", default=list(methods_default), choices=METHODS)
    else:
        group.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    group.add_argument("--lr", nargs="+", default=[],
                       help="learning rate: one value, or NAME=VALUE per optimizer "
                            "(default: sgd/momentum 1e-7, adam/adamw 1e-6)")
    group.add_argument("--epochs", type=int, default=25)
    group.add_argument("--batch-size", type=int, default=1, help="training batch size (paper: 1)")
    group.add_argument("--reference-every", type=int,
                       help="recompute the reference over M every N steps (default: once per epoch)")
    group.add_argument("--reference-batch-size", type=int, default=16, help="batching of the reference pass")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.1, help="AdamW only")
    group.add_argument("--trainable", default="all", help="'all' or 'last:N' decoder layers")
    group.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "cuda"])
    group.add_argument("--reference-dtype", default="float32",
                       help="storage of the reference (float32, bfloat16, int8, ...)")
    group.add_argument("--order-seed", type=int, default=0, help="seed of the training order")


def _add_out(parser, default=None):
    parser.add_argument("--out", type=Path, default=default, required=default is None, help="output folder")


# ---------------------------------------------------------------------------------- helpers

def _parse_lrs(values):
    """``["1e-6"]`` -> (1e-6, {}); ``["adamw=1e-6", "sgd=1e-7"]`` -> (None, {...})."""
    single, per_optimizer = None, {}
    for value in values:
        name, sep, number = value.partition("=")
        try:
            if sep:
                per_optimizer[name] = float(number)
            elif single is None:
                single = float(value)
            else:
                raise ValueError
        except ValueError:
            raise SystemExit(f"--lr: cannot read {value!r}; give one number or NAME=VALUE pairs") from None
    return single, per_optimizer


def _inject_config(args, optimizer=None):
    from .experiments.protocol import InjectConfig

    single, _ = _parse_lrs(args.lr)
    return InjectConfig(optimizer=optimizer or getattr(args, "optimizer", "adamw"), lr=single, epochs=args.epochs,
                        batch_size=args.batch_size, reference_every=args.reference_every,
                        momentum=args.momentum, weight_decay=args.weight_decay, trainable=args.trainable,
                        reference_batch_size=args.reference_batch_size, eval_batch_size=args.eval_batch_size,
                        seed=args.order_seed, backend=args.backend, reference_dtype=args.reference_dtype)


def _load(args):
    import torch

    from .experiments.model import MCQEncoder, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    print(f"loaded {args.model} in {time.perf_counter() - started:.1f} s "
          f"({sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}, {model.device})")
    return model, tokenizer, MCQEncoder(tokenizer, use_chat_template=not args.no_chat_template)


def _questions(args):
    from .experiments.data import load_benchmark, read_jsonl, sample_n

    if args.data:
        questions = [q for path in args.data for q in read_jsonl(path)]
    else:
        files = args.data_files[0] if args.data_files and len(args.data_files) == 1 else args.data_files
        questions = load_benchmark(args.dataset, data_files=files, fraction=args.fraction, seed=args.seed)
    return sample_n(questions, args.limit, args.seed)


def _split_files(args):
    from .experiments.data import read_jsonl, sample_n

    return (sample_n(read_jsonl(args.mastered), args.limit_mastered, args.order_seed),
            sample_n(read_jsonl(args.injection), args.limit_injection, args.order_seed))


def _write_split(out, split, meta):
    from .experiments.data import write_jsonl
    from .experiments.report import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "mastered.jsonl", split.mastered)
    write_jsonl(out / "injection.jsonl", split.injection)
    write_json(out / "split.json", dict(meta, mastered=len(split.mastered), injection=len(split.injection),
                                        excluded=len(split.excluded)))
    print(f"mastered {len(split.mastered)}, injection {len(split.injection)}, excluded {len(split.excluded)} -> {out}")


def _meta(args, step):
    return dict(step=step, command="python -m cnl_ext " + shlex.join(args.argv), model=args.model, dtype=args.dtype)


# ---------------------------------------------------------------------------------- subcommands

def cmd_prepare_data(args):
    from .experiments.data import write_jsonl

    questions = _questions(args)
    write_jsonl(args.out, questions)
    print(f"{len(questions)} questions -> {args.out}")


def cmd_mmac(args):
    from .experiments.data import MMAC_PARTS, load_benchmark, write_jsonl

    files = {}
    for item in args.data_files or []:
        name, sep, path = item.partition("=")
        if not sep or name not in MMAC_PARTS:
            raise ValueError(f"--data-files: expected NAME=FILE with NAME in {MMAC_PARTS}, got {item!r}")
        files[name] = path
    union = []
    for part in MMAC_PARTS:
        questions = load_benchmark(part, data_files=files.get(part), fraction=args.fraction, seed=args.seed)
        print(f"{part}: {len(questions)} questions")
        union += questions
    write_jsonl(args.out, union)
    print(f"MMAC: {len(union)} questions -> {args.out}")


def cmd_infer_and_split(args):
    from .experiments.protocol import infer_and_split

    questions = _questions(args)
    model, _, encoder = _load(args)
    started = time.perf_counter()
    split = infer_and_split(model, encoder, questions, batch_size=args.eval_batch_size)
    meta = dict(_meta(args, "infer-and-split"), questions=len(questions), wall_s=round(time.perf_counter() - started, 1))
    _write_split(args.out, split, meta)


def cmd_teach(args):
    from .experiments.protocol import teach_first

    questions = _questions(args)
    model, tokenizer, encoder = _load(args)
    split, log = teach_first(model, encoder, questions, fraction=args.teach_fraction, seed=args.seed,
                             lr=args.teach_lr, max_epochs=args.teach_epochs, margin=args.teach_margin,
                             trainable=args.trainable, eval_batch_size=args.eval_batch_size, backend=args.backend)
    _write_split(args.out, split, dict(_meta(args, "teach"), questions=len(questions), teach_log=log))
    if not args.no_save_model:
        # A GGUF-loaded config still names its GGUF file; the saved copy is plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(args.out / "model")
        tokenizer.save_pretrained(args.out / "model")
        print(f"taught model -> {args.out / 'model'} (use it as --model)")


def _run_and_report(args, runs, title, meta, extra_markdown=""):
    from .experiments.report import write_run_outputs

    table = write_run_outputs(args.out, runs, title=title, meta=meta, extra_markdown=extra_markdown)
    print(table)
    print(f"outputs -> {args.out} (summary.csv, results.json, tables.md, curves.png)")


def cmd_inject(args):
    from .experiments.protocol import compare

    mastered, injection = _split_files(args)
    model, _, encoder = _load(args)
    single, lrs = _parse_lrs(args.lr)
    runs = compare(model, encoder, methods=args.methods, optimizers=args.optimizers, config=_inject_config(args),
                   train=injection, reference=mastered, lrs=lrs)
    _run_and_report(args, runs, f"In-set injection ({args.mastered.parent.name or 'split'})", _meta(args, "inject"))


def cmd_out_of_set(args):
    from .experiments.protocol import out_of_set

    mastered, injection = _split_files(args)
    model, _, encoder = _load(args)
    _, lrs = _parse_lrs(args.lr)
    runs, (seen, unseen) = out_of_set(model, encoder, mastered, injection, side=args.side, methods=args.methods,
                                      optimizers=args.optimizers, config=_inject_config(args),
                                      split_seed=args.split_seed, lrs=lrs)
    meta = dict(_meta(args, "out-of-set"), side=args.side, seen_half=len(seen), unseen_half=len(unseen))
    _run_and_report(args, runs, f"Out-of-set, {args.side} side (1:1 split)", meta)


def cmd_table1(args):
    from .experiments.analysis import table1
    from .experiments.report import count_percent, write_json

    mastered, injection = _split_files(args)
    model, _, encoder = _load(args)
    groups, run, rows = table1(model, encoder, mastered, injection, config=_inject_config(args))
    lines = ["### Table 1: forgetting of mastered samples by gradient similarity to the injection set", "",
             f"FT with {run.optimizer}, {run.final.epoch} epochs; mastered samples with g_m·g_I < 0 ranked by "
             "magnitude: Sim = top third, Dissim = bottom third.", "", "| Group | Samples | FORGOT |", "|---|---|---|"]
    lines += [f"| {r['group']} | {r['size']} | {count_percent(r['forgot'], r['size'])} |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    meta = dict(_meta(args, "table1"), table1=rows, sim=groups.sim, dissim=groups.dissim, dots=groups.dots)
    _run_and_report(args, [run], "Table 1 run (FT)", meta, extra_markdown=markdown)
    (args.out / "table1.md").write_text(markdown, encoding="utf-8")
    write_json(args.out / "table1.json", dict(rows=rows, sim=groups.sim, dissim=groups.dissim, dots=groups.dots))
    print(markdown)


def cmd_table2(args):
    from .experiments.analysis import gradient_agreement
    from .experiments.model import select_trainable
    from .experiments.report import write_json

    mastered, injection = _split_files(args)
    model, _, encoder = _load(args)
    select_trainable(model, args.trainable)
    result = gradient_agreement(model, encoder, mastered, injection, batch_size=args.reference_batch_size,
                                backend=args.backend)
    rows = [("Collaborative (s ≥ 0)", result.collaborative, f"{100 * result.collaborative_share:.2f}%",
             result.sum_s_collaborative),
            ("Conflicting (s < 0)", result.conflicting, f"{100 * result.conflicting_share:.2f}%",
             result.sum_s_conflicting),
            ("All", result.total, "100%", result.sum_s_collaborative + result.sum_s_conflicting)]
    markdown = "\n".join([
        "### Table 2: collaborative vs conflicting elements (u = ∇L_I, r = ∇L_M, s = r·u)", "",
        "| | Elements | Share | Sum of s |", "|---|---|---|---|",
        *(f"| {name} | {count:,} | {share} | {total_s:.6g} |" for name, count, share, total_s in rows),
    ]) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table2.md").write_text(markdown, encoding="utf-8")
    write_json(args.out / "results.json", dict(_meta(args, "table2"), mastered=len(mastered),
                                               injection=len(injection), table2=result.to_dict()))
    print(markdown)


def cmd_demo(args):
    from .experiments.demo import DemoSettings, run_demo

    started = time.perf_counter()
    model, _, encoder = _load(args)
    settings = DemoSettings(questions=args.questions, teach_lr=args.teach_lr, teach_epochs=args.teach_epochs,
                            teach_margin=args.teach_margin, epochs=args.epochs, lr=args.lr,
                            trainable=args.trainable, seed=args.seed)
    table = run_demo(model, encoder, args.out, settings, backend=args.backend)
    print(table)
    print(f"outputs -> {args.out} (summary.csv, results.json, tables.md, curves.png); "
          f"total {time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .experiments.demo import DemoSettings

    parser = argparse.ArgumentParser(prog="cnl-ext", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="subcommand")

    demo = sub.add_parser("demo", help="FT vs CNL with AdamW on generated questions (a few minutes on CPU)")
    _add_model_options(demo)
    defaults = DemoSettings()
    demo.add_argument("--questions", type=int, default=defaults.questions, help="how many questions to generate")
    demo.add_argument("--teach-lr", type=float, default=defaults.teach_lr)
    demo.add_argument("--teach-epochs", type=int, default=defaults.teach_epochs, help="at most this many epochs")
    demo.add_argument("--teach-margin", type=float, default=defaults.teach_margin)
    demo.add_argument("--epochs", type=int, default=defaults.epochs, help="injection epochs")
    demo.add_argument("--lr", type=float, default=defaults.lr)
    demo.add_argument("--trainable", default=defaults.trainable, help="'all' or 'last:N' decoder layers")
    demo.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "cuda"])
    demo.add_argument("--seed", type=int, default=defaults.seed)
    _add_out(demo, Path("runs/demo"))
    demo.set_defaults(run=cmd_demo)

    prepare = sub.add_parser("prepare-data", help="a benchmark or JSONL files -> one paper-format JSONL")
    _add_data_options(prepare)
    prepare.add_argument("--out", type=Path, required=True, help="output .jsonl")
    prepare.set_defaults(run=cmd_prepare_data)

    mmac = sub.add_parser("mmac", help="the MMAC union (MMLU + MedQA + ARC-C + CSQA) -> paper-format JSONL")
    mmac.add_argument("--data-files", nargs="+", metavar="NAME=FILE",
                      help="local files per benchmark, e.g. mmlu=mmlu.parquet")
    mmac.add_argument("--fraction", type=float, help="subsampling of every part (default: each one's paper value)")
    mmac.add_argument("--seed", type=int, default=0)
    mmac.add_argument("--out", type=Path, required=True, help="output .jsonl")
    mmac.set_defaults(run=cmd_mmac)

    split = sub.add_parser("infer-and-split", help="mastered.jsonl / injection.jsonl from the model's answers")
    _add_data_options(split)
    _add_model_options(split)
    _add_out(split)
    split.set_defaults(run=cmd_infer_and_split)

    teach = sub.add_parser("teach", help="the taught-first variant: teach part, split, save the taught model")
    _add_data_options(teach)
    _add_model_options(teach)
    teach.add_argument("--teach-fraction", type=float, default=0.5)
    teach.add_argument("--teach-lr", type=float, default=1e-5)
    teach.add_argument("--teach-epochs", type=int, default=10, help="at most this many epochs")
    teach.add_argument("--teach-margin", type=float, default=1.0,
                       help="stop once every taught answer leads by this logit margin")
    teach.add_argument("--trainable", default="all", help="'all' or 'last:N' decoder layers")
    teach.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "cuda"])
    teach.add_argument("--no-save-model", action="store_true")
    _add_out(teach)
    teach.set_defaults(run=cmd_teach)

    for name, handler, help_text, methods in (
            ("inject", cmd_inject, "in-set runs: FT / CNL / replay / LoRA x optimizers", ("ft", "cnl")),
            ("out-of-set", cmd_out_of_set, "out-of-set runs on a 1:1 split", ("ft", "cnl", "replay"))):
        command = sub.add_parser(name, help=help_text)
        _add_split_options(command)
        _add_model_options(command)
        _add_training_options(command, methods_default=methods)
        if name == "out-of-set":
            command.add_argument("--side", choices=["mastered", "injection"], default="mastered")
            command.add_argument("--split-seed", type=int, default=0)
        _add_out(command)
        command.set_defaults(run=handler)

    for name, handler, help_text in (("table1", cmd_table1, "Sim / Dissim forgetting (FT)"),
                                     ("table2", cmd_table2, "collaborative / conflicting shares (fused kernels)")):
        command = sub.add_parser(name, help=help_text)
        _add_split_options(command)
        _add_model_options(command)
        _add_training_options(command, several=False)
        _add_out(command)
        command.set_defaults(run=handler)
    return parser


def main(argv=None) -> int:
    from .experiments.data import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in results.json
    try:
        args.run(args)
    except (DataError, FileNotFoundError, ValueError) as error:  # bad input: a message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
