"""The experiment commands: each reads its settings from the context, runs the protocol and reports."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..experiments import continual
from ..experiments.analysis import gradient_agreement, table1
from ..experiments.ckl import CKLSettings, ckl_table, make_update_task, run_ckl, write_ckl_csv
from ..experiments.data import MMAC_PARTS, QuestionSource, load_benchmark, write_jsonl
from ..experiments.demo import DemoSettings, run_demo
from ..experiments.model import ModelOptions, select_trainable
from ..experiments.outputs import UsageError, write_json, write_text
from ..experiments.progress import note
from ..experiments.protocol import InjectConfig, compare, infer_and_split, out_of_set
from ..experiments.teach import TeachSettings, teach_first, teach_summary
from ..experiments.report import count_percent, markdown_table
from .context import Context, jsonable_config
from .settings import DeepSpeedOption, FileOutput, FolderOutput, MmacSource, OutOfSetSide, RunPlan, SplitFiles, TeachOutput

DEFAULT_DEMO_OUT = Path("runs/demo")
DEFAULT_CONTINUAL_OUT = Path("continual-results")


def demo_folder_is_replaceable(ctx: Context, path: Path) -> bool:
    """The demo's default folder holding only a previous demo's outputs (and nothing else)."""
    if Path(ctx[FolderOutput].out) != DEFAULT_DEMO_OUT:
        return False
    try:
        previous = json.loads((path / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    demo_files = {"questions.jsonl", "mastered.jsonl", "injection.jsonl", "teach.json", "teach_log.json",
                  "summary.csv", "results.json", "tables.md", "curves.png", "checkpoints"}
    return previous.get("step") == "demo" and {p.name for p in path.iterdir()} <= demo_files


def cmd_prepare_data(ctx: Context) -> None:
    questions = ctx[QuestionSource].load()
    write_jsonl(ctx[FileOutput].out, questions)
    print(f"{len(questions)} questions -> {ctx[FileOutput].out}")


def cmd_mmac(ctx: Context) -> None:
    source = ctx[MmacSource]
    union = []
    for part in MMAC_PARTS:
        questions = load_benchmark(part, data_files=source.files.get(part), fraction=source.fraction, seed=source.seed)
        print(f"{part}: {len(questions)} questions")
        union += questions
    write_jsonl(ctx[FileOutput].out, union)
    print(f"MMAC: {len(union)} questions -> {ctx[FileOutput].out}")


def _write_split(ctx: Context, split, payload: dict) -> None:
    write_jsonl(ctx.out_dir / "mastered.jsonl", split.mastered)
    write_jsonl(ctx.out_dir / "injection.jsonl", split.injection)
    ctx.write_results(dict(payload, mastered=len(split.mastered), injection=len(split.injection),
                           excluded=len(split.excluded)))
    print(f"mastered {len(split.mastered)}, injection {len(split.injection)}, excluded {len(split.excluded)}")


def cmd_infer_and_split(ctx: Context) -> None:
    questions = ctx[QuestionSource].load()
    model, _, encoder = ctx.load_model()
    started = time.perf_counter()
    split = infer_and_split(model, encoder, questions, batch_size=ctx[ModelOptions].eval_batch_size)
    _write_split(ctx, split, dict(step="infer-and-split", questions=len(questions),
                                  wall_s=round(time.perf_counter() - started, 1)))


def cmd_teach(ctx: Context) -> None:
    source, settings = ctx[QuestionSource], ctx[TeachSettings]
    questions = source.load()
    model, tokenizer, encoder = ctx.load_model()
    split, log = teach_first(model, encoder, questions, fraction=settings.teach_fraction, seed=source.seed,
                             lr=settings.teach_lr, max_epochs=settings.teach_epochs, margin=settings.teach_margin,
                             trainable=settings.trainable, eval_batch_size=ctx[ModelOptions].eval_batch_size,
                             backend=settings.backend)
    summary = teach_summary(split, log, n_taught=round(len(questions) * settings.teach_fraction),
                            margin=settings.teach_margin, max_epochs=settings.teach_epochs)
    for line in summary:
        note(line)
    _write_split(ctx, split, dict(step="teach", questions=len(questions), teach_log=log, teach_summary=summary,
                                  margin_reached=log[-1]["min_margin"] >= settings.teach_margin))
    if ctx[TeachOutput].save_model:
        # A GGUF-loaded config still names its GGUF file; the saved copy is plain safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(ctx.out_dir / "model")
        tokenizer.save_pretrained(ctx.out_dir / "model")
        print(f"taught model -> {ctx[FolderOutput].out / 'model'} (use it as --model)")


def _training(ctx: Context):
    """The split, the model and the injection config of inject / out-of-set / table1."""
    config = ctx[InjectConfig]
    plan = ctx.get(RunPlan)
    if plan is not None and plan.default_lr is not None:
        config = replace(config, lr=plan.default_lr)
    if plan is not None and "agem" in plan.methods and config.reference_dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--methods agem needs the reference's magnitudes: --reference-dtype float32 or bfloat16, "
                         f"not {config.reference_dtype}")
    mastered, injection = ctx[SplitFiles].load(config.seed)
    model, _, encoder = ctx.load_model()
    return config, mastered, injection, model, encoder


# Under ZeRO each rank steps a partition: A-GEM's dot products and EWC's Fisher capture would need the
# engine's reduction across ranks, which only the reference capture goes through so far.
DEEPSPEED_UNSUPPORTED_METHODS = ("ewc", "agem")


def cmd_inject(ctx: Context) -> None:
    plan = ctx[RunPlan]
    deepspeed = ctx.get(DeepSpeedOption, DeepSpeedOption()).deepspeed
    unsupported = [m for m in plan.methods if m in DEEPSPEED_UNSUPPORTED_METHODS]
    if deepspeed is not None and unsupported:
        raise UsageError(f"--deepspeed does not run --methods {' '.join(unsupported)} yet (A-GEM's global dot "
                         "product and EWC's Fisher are not reduced across ZeRO partitions); run them without it")
    config, mastered, injection, model, encoder = _training(ctx)
    wrap_training, checkpoints = None, ctx.checkpoints
    if deepspeed is not None:  # DeepSpeed steps the runs (cnl_ext/experiments/deepspeed_runs.py); no checkpoints
        from ..experiments.deepspeed_runs import DeepSpeedTraining

        wrap_training = DeepSpeedTraining(deepspeed, batch_size=config.batch_size)
        checkpoints = None
    runs = compare(model, encoder, methods=plan.methods, optimizers=plan.optimizers, config=config, train=injection,
                   reference=mastered, lrs=plan.lrs, checkpoints=checkpoints, wrap_training=wrap_training)
    ctx.run_outputs(runs, f"In-set injection ({Path(ctx[SplitFiles].mastered).parent.name or 'split'})",
                    dict(step="inject", config=jsonable_config(config)))


def cmd_out_of_set(ctx: Context) -> None:
    config, mastered, injection, model, encoder = _training(ctx)
    plan, side = ctx[RunPlan], ctx[OutOfSetSide]
    runs, (seen, unseen) = out_of_set(model, encoder, mastered, injection, side=side.side, methods=plan.methods,
                                      optimizers=plan.optimizers, config=config, split_seed=side.split_seed,
                                      lrs=plan.lrs, checkpoints=ctx.checkpoints)
    ctx.run_outputs(runs, f"Out-of-set, {side.side} side (1:1 split)",
                    dict(step="out-of-set", config=jsonable_config(config), side=side.side, seen_half=len(seen),
                         unseen_half=len(unseen)))


def cmd_ckl(ctx: Context) -> None:
    config, mastered, injection, model, encoder = _training(ctx)
    plan, settings = ctx[RunPlan], ctx[CKLSettings]
    task = make_update_task(mastered, injection, fraction=settings.update_fraction, seed=settings.update_seed)
    note(f"CKL: {len(task.updated)} updated (mastered, answer changed), {len(task.new)} new (injection), "
         f"{len(task.invariant)} invariant (mastered, the memory)")
    runs, rows = run_ckl(model, encoder, task, methods=plan.methods, optimizers=plan.optimizers, config=config,
                         lrs=plan.lrs, checkpoints=ctx.checkpoints)
    markdown = ckl_table(rows)
    write_ckl_csv(ctx.out_dir / "ckl.csv", rows)
    write_jsonl(ctx.out_dir / "updated.jsonl", task.updated)
    ctx.run_outputs(runs, "CKL update task: LEARNED = updated + acquired (of updated + new), FORGOT = invariant "
                    "forgotten", dict(step="ckl", config=jsonable_config(config), update_fraction=settings.update_fraction,
                                      update_seed=settings.update_seed, n_updated=len(task.updated),
                                      n_new=len(task.new), n_invariant=len(task.invariant), ckl=rows),
                    extra_markdown=markdown)
    print(markdown)


def cmd_table1(ctx: Context) -> None:
    config, mastered, injection, model, encoder = _training(ctx)
    groups, run, rows = table1(model, encoder, mastered, injection, config=config, checkpoints=ctx.checkpoints)
    markdown = ("### Table 1: forgetting of mastered samples by gradient similarity to the injection set\n\n"
                f"FT with {run.optimizer}, {run.final.epoch} epochs; mastered samples with g_m·g_I < 0 ranked by "
                "magnitude: Sim = top third, Dissim = bottom third.\n\n"
                + markdown_table(["Group", "Samples", "FORGOT"],
                                 [[r["group"], r["size"], count_percent(r["forgot"], r["size"])] for r in rows]))
    ctx.run_outputs([run], "Table 1 run (FT)", dict(step="table1", config=jsonable_config(config), table1=rows,
                                                      sim=groups.sim, dissim=groups.dissim, dots=groups.dots),
                    extra_markdown=markdown)
    write_text(ctx.out_dir / "table1.md", markdown)
    write_json(ctx.out_dir / "table1.json", dict(rows=rows, sim=groups.sim, dissim=groups.dissim, dots=groups.dots))
    print(markdown)


def cmd_table2(ctx: Context) -> None:
    config = ctx[InjectConfig]
    mastered, injection = ctx[SplitFiles].load()
    model, _, encoder = ctx.load_model()
    select_trainable(model, config.trainable)
    result = gradient_agreement(model, encoder, mastered, injection, batch_size=config.reference_batch_size,
                                backend=config.backend)
    rows = [["Collaborative (s ≥ 0)", f"{result.collaborative:,}", f"{100 * result.collaborative_share:.2f}%",
             f"{result.sum_s_collaborative:.6g}"],
            ["Conflicting (s < 0)", f"{result.conflicting:,}", f"{100 * result.conflicting_share:.2f}%",
             f"{result.sum_s_conflicting:.6g}"],
            ["All", f"{result.total:,}", "100%", f"{result.sum_s_collaborative + result.sum_s_conflicting:.6g}"]]
    markdown = ("### Table 2: collaborative vs conflicting elements (u = ∇L_I, r = ∇L_M, s = r·u)\n\n"
                + markdown_table(["", "Elements", "Share", "Sum of s"], rows, align="lrrr"))
    write_text(ctx.out_dir / "table2.md", markdown)
    ctx.write_results(dict(step="table2", mastered=len(mastered), injection=len(injection),
                           table2=result.to_dict()))
    print(markdown)


def cmd_demo(ctx: Context) -> None:
    model, _, encoder = ctx.load_model()
    settings = ctx[DemoSettings]
    print(run_demo(model, encoder, ctx.out_dir, settings, checkpoints=ctx.checkpoints, provenance=ctx.provenance))


def cmd_continual(ctx: Context) -> None:
    model, _, encoder = ctx.load_model()
    continual.run(ctx[continual.ContinualConfig], model, encoder, ctx.out_dir, model_options=ctx[ModelOptions],
                  resume=ctx.out.resuming, provenance=ctx.provenance)


