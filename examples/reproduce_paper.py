"""Reproduce the CNL paper's experiments with the Python API (the CLI runs the same steps one by one).

    python examples/reproduce_paper.py --data-dir ../shared/data/cnl-paper --dataset arc_c --out runs/paper
    python examples/reproduce_paper.py ... --taught-first          # the variant for near-chance models
    python examples/reproduce_paper.py ... --limit 12 --epochs 1 --trainable last:2   # a quick look on CPU

Steps: join the authors' correct + wrong files for the dataset and re-split them with this model
(or teach half first), in-set FT vs CNL for SGD / Momentum / Adam / AdamW, Table 2, and one
out-of-set run on the mastered side with the replay baseline. Each step writes summary.csv,
results.json, tables.md and curves.png under --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cnl_ext.experiments import (InjectConfig, MCQEncoder, compare, gradient_agreement, infer_and_split, load_model,
                                 out_of_set, read_jsonl, sample_n, select_trainable, teach_first, write_jsonl,
                                 write_run_outputs)
from cnl_ext.experiments.report import write_json

# The paper's SGD / Momentum rate; Adam / AdamW use the package default (the paper gives none).
LEARNING_RATES = {"sgd": 1e-7, "momentum": 1e-7, "adam": 1e-6, "adamw": 1e-6}


def paper_questions(data_dir: Path, dataset: str):
    """All of the authors' questions for a dataset: one model's correct + wrong files, re-split here."""
    files = [data_dir / f"{dataset}_{side}_Qwen2.5-1.5B-Instruct.jsonl" for side in ("correct", "wrong")]
    return [q for path in files for q in read_jsonl(path)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--dataset", default="arc_c", choices=["arc_c", "mmlu", "csqa"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--limit", type=int, help="use a seeded sample of this many questions")
    parser.add_argument("--trainable", default="all", help="'all' (paper) or 'last:N' decoder layers (CPU)")
    parser.add_argument("--taught-first", action="store_true", help="teach half of the questions before splitting")
    parser.add_argument("--out", type=Path, default=Path("runs/paper"))
    args = parser.parse_args()

    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device)
    encoder = MCQEncoder(tokenizer)
    questions = sample_n(paper_questions(args.data_dir, args.dataset), args.limit, seed=0)
    variant = "taught_first" if args.taught_first else "plain"
    out = args.out / f"{args.dataset}_{variant}"

    if args.taught_first:
        split, teach_log = teach_first(model, encoder, questions, fraction=0.5, seed=0, lr=1e-5, max_epochs=10,
                                       trainable=args.trainable)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "teach_log.json", teach_log)
    else:
        split = infer_and_split(model, encoder, questions)
    write_jsonl(out / "mastered.jsonl", split.mastered)
    write_jsonl(out / "injection.jsonl", split.injection)
    print(f"{args.dataset} ({variant}): mastered {len(split.mastered)}, injection {len(split.injection)}")

    # one reference per epoch, the paper's (the CLI's default adapts the period: docs/experiments.md)
    config = InjectConfig(epochs=args.epochs, trainable=args.trainable, adaptive_reference=None)
    runs = compare(model, encoder, methods=["ft", "cnl"], optimizers=list(LEARNING_RATES), config=config,
                   train=split.injection, reference=split.mastered, lrs=LEARNING_RATES)
    print(write_run_outputs(out / "in_set", runs, title=f"In-set, {args.dataset} ({variant})",
                            meta=dict(step="inject", model=args.model)))

    select_trainable(model, args.trainable)
    agreement = gradient_agreement(model, encoder, split.mastered, split.injection)
    write_json(out / "table2.json", agreement.to_dict())
    print(f"Table 2: collaborative {100 * agreement.collaborative_share:.2f}% of {agreement.total:,} elements")

    runs, _ = out_of_set(model, encoder, split.mastered, split.injection, side="mastered",
                         methods=["ft", "cnl", "replay"], optimizers=["adamw"], config=config, lrs=LEARNING_RATES)
    print(write_run_outputs(out / "out_of_set_mastered", runs, title=f"Out-of-set (mastered side), {args.dataset}",
                            meta=dict(step="out-of-set", side="mastered", model=args.model)))
    print(f"done in {time.perf_counter() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
