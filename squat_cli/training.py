"""Jobs: what one ``squat finetune`` or ``squat quantize`` run does, from recipe to run folder.

Everything is checked (task, data, model, source run) before the run folder
is created; a job that fails before it has trained leaves no folder behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from squat_cli.allocator import tune_allocator
from squat_cli.batching import train_loader
from squat_cli.compiled import kernel_state
from squat_cli.dev_scores import evaluate
from squat_cli.errors import DivergenceError, RecipeError, RunError, SquatError
from squat_cli.files import atomic_dir, ensure_writable, user_path, write_json, write_text
from squat_cli.glue import GlueTask
from squat_cli.models import check_vocab, load_model, load_tokenizer, save_model
from squat_cli.progress import Reporter
from squat_cli.quant.convert import calibrate, quantize_model, save_quantizer, step_summary
from squat_cli.quant.gobo import gobo_outlier_shares
from squat_cli.quant.methods import get_method
from squat_cli.quant.mixed_precision import assign_mixed_bits
from squat_cli.quant.qlinear import is_quantizer_key
from squat_cli.recipe import Recipe
from squat_cli.runs import RunDir, environment, variant_name
from squat_cli.task_data import TaskData, load_task_data
from squat_cli.tasks import get_task
from squat_cli.train.checkpoint import checkpoint_step, recover_checkpoint
from squat_cli.train.distill import check_teacher, use_score_attention
from squat_cli.train.loop import FitResult, fit, make_accelerator, seed_everything


@dataclass
class JobResult:
    run: RunDir
    metrics: dict
    skipped: bool = False


def _prepare_run(run: RunDir, recipe: Recipe, force: bool, resume: bool) -> tuple[Optional[JobResult], bool]:
    """(result if already finished, whether to resume from the run's checkpoint). Raises if unclear."""
    recover_checkpoint(run.checkpoint_dir)
    run.recover()
    if run.is_complete() and not force:
        return JobResult(run, run.metrics(), skipped=True), False
    ckpt = run.checkpoint_dir / "manifest.json"
    if force or not ckpt.is_file():
        return None, False
    step = checkpoint_step(run.checkpoint_dir)
    if not resume:
        raise RunError(f"{run.path} holds a checkpoint at step {step}; pass --resume to continue it or --force to "
                       "start over")
    if run.recipe_file.is_file() and run.recipe_file.read_text(encoding="utf-8") != recipe.dump():
        raise RunError(f"{run.path}: the recipe differs from the one its checkpoint was made with; "
                       "use the same options, or --force to start over")
    return None, True


def _start_run_folder(run: RunDir, recipe: Recipe, device: str, extra: dict, resuming: bool = False) -> None:
    if resuming:
        run.failed_file.unlink(missing_ok=True)
        return
    run.set_aside()  # a finished run (--force) is kept aside until the new one completes
    run.path.mkdir(parents=True)
    write_text(run.recipe_file, recipe.dump())
    write_json(run.path / "environment.json", environment(device, extra))


def _finish(run: RunDir, metrics: dict) -> None:
    write_json(run.metrics_file, metrics)
    shutil.rmtree(run.checkpoint_dir, ignore_errors=True)  # only needed to resume an unfinished run
    run.drop_previous()
    run.recover()


def _final_metrics(task: GlueTask, result: FitResult, data: TaskData, extra: dict) -> dict:
    m = result.metrics
    out = {
        "task": task.name,
        **{k: m[k] for k in task.metric_names()},
        "main_metric": task.main_metric,
        "eval_loss": m.get("eval_loss"),
        "dev_sizes": {s: len(e) for s, e in data.dev.items()},
        "train_examples": result.train_examples,
        "steps": result.steps,
        "epochs": round(result.epochs, 4),
        "train_loss": result.train_loss,
        "wall_time_s": round(result.wall_time_s, 2),
        "train_time_s": round(result.train_time_s, 3),
        "train_samples_per_s": round(result.train_examples * result.epochs / max(result.train_time_s, 1e-9), 2),
        # the share of its threads' time the run got: well under 1 when something else shared the CPU
        "cpu_share": round(result.train_cpu_s / (result.train_time_s * result.threads), 3)
        if result.train_time_s > 0 else None,  # None: no training steps (PTQ, GOBO)
        "fused_kernels": kernel_state(),  # "on", "off" or which fell back to the (slower) eager ops
    }
    out.update(extra)
    return out


def _cleanup_on_error(run: RunDir, exc: BaseException) -> None:
    """A diverged run is kept and marked failed; any other failure before a checkpoint leaves no folder.
    A finished run that a forced rerun replaces comes back whenever the rerun does not complete."""
    if run.restore_previous():
        return
    if isinstance(exc, DivergenceError) and run.path.exists():
        write_json(run.failed_file, {"error": str(exc)})
        return
    if run.path.exists() and not run.is_complete() and not run.checkpoint_dir.exists():
        shutil.rmtree(run.path, ignore_errors=True)
        for parent in (run.path.parent, run.path.parent.parent):
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break


def _train_and_save(
    run: RunDir, recipe: Recipe, acc, model, tokenizer, data: TaskData, method: str, resuming: bool,
    reporter: Optional[Reporter], extra: dict, env_extra: dict, names: Optional[list[str]] = None,
    started: Optional[float] = None, teacher=None,
) -> dict:
    """Create the run folder, train (or, for PTQ, only evaluate), save model and quantizer, write metrics.

    With several processes only the main one writes; the others train alongside it. ``started``: when the job
    began (``time.perf_counter()``), for ``job_time_s``.
    """
    main = acc.is_main_process
    allocator = tune_allocator() if acc.device.type == "cpu" else "device"
    if main:
        env_extra = {**env_extra, "processes": acc.num_processes, "precision": recipe.train.precision,
                     "cpu_allocator": allocator}
        _start_run_folder(run, recipe, str(acc.device), env_extra, resuming)
    acc.wait_for_everyone()
    task = data.task
    try:
        steps_before = step_summary(model)
        if get_method(method).post_training:
            m = evaluate(model, task, data.dev, recipe.train.eval_batch_size, tokenizer.pad_token_id,
                         acc.device, acc.autocast)
            if main:
                run.append_history({"step": 0, "epoch": 0, **m})
            result = FitResult(metrics=m, train_examples=0)
        else:
            result = fit(model, task, data.train, data.dev, recipe, method, tokenizer.pad_token_id, reporter,
                         on_eval=run.append_history, accelerator=acc, checkpoint_dir=run.checkpoint_dir,
                         resume=resuming, on_resume=run.write_history, teacher=teacher)
        model = acc.unwrap_model(model)
        extra = dict(extra)
        extra.update({f"{k}_init": v for k, v in steps_before.items()})
        extra.update({f"{k}_final": v for k, v in step_summary(model).items()})
        metrics = _final_metrics(task, result, data, extra)
        if started is not None:  # this process's whole job: loading, calibration, training, evaluations
            metrics["job_time_s"] = round(time.perf_counter() - started, 2)
        if main:
            if recipe.train.save_model:
                fp_state = {k: v for k, v in model.state_dict().items() if not is_quantizer_key(k)}
                with atomic_dir(run.model_dir) as tmp:
                    save_model(model, tokenizer, tmp, state_dict=fp_state)
            if names:
                save_quantizer(model, recipe.quant, run.quantizer_file, names)
            _finish(run, metrics)
        acc.wait_for_everyone()
    except BaseException as exc:
        if main:
            _cleanup_on_error(run, exc)
        raise
    return metrics


def finetune(recipe: Recipe, runs_root: Path, force: bool = False, reporter: Optional[Reporter] = None,
             resume: bool = False) -> JobResult:
    """Full-precision fine-tuning: ``runs/<task>/fp/seed<k>/``."""
    started = time.perf_counter()
    recipe.quant = None  # nothing is quantized here; recipe.yaml records exactly what ran
    if recipe.distill is not None:
        raise RecipeError("distill: fine-tuning has no teacher; distillation is a squat quantize option")
    task = get_task(recipe.data.task)
    run = RunDir.for_run(runs_root, task.name, "fp", recipe.train.seed)
    ensure_writable(runs_root)
    done, resuming = _prepare_run(run, recipe, force, resume)
    if done:
        return done
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    data = load_task_data(recipe, tokenizer)
    acc = make_accelerator(recipe.train.precision, report_to=recipe.train.report_to, log_dir=run.path / "tensorboard")
    seed_everything(recipe.train.seed)
    model = load_model(recipe.model.name_or_path, task, recipe.model.trust_remote_code)
    check_vocab(model, tokenizer, recipe.model.name_or_path)
    extra = {"method": "fp", "wbits": 32, "abits": 32, "seed": recipe.train.seed, "model": recipe.model.name_or_path}
    metrics = _train_and_save(run, recipe, acc, model, tokenizer, data, "fp", resuming, reporter, extra,
                              {"model": recipe.model.name_or_path}, started=started)
    return JobResult(run, metrics)


def source_run(runs_root: Path, task: GlueTask, seed: int, from_path: Optional[Path]) -> RunDir:
    """The FP run a quantized run starts from; it must be complete and hold a model."""
    src = RunDir(Path(from_path)) if from_path else RunDir.for_run(runs_root, task.name, "fp", seed)
    if not src.path.is_dir():
        raise RunError(
            f"no FP run at {src.path}; run `squat finetune --task {task.name} --seed {seed}` first or pass --from"
        )
    if not src.is_complete() or not (src.model_dir / "config.json").is_file():
        raise RunError(f"FP run {src.path} is not complete (no metrics.json or model/); rerun it with --force")
    src_task = src.metrics().get("task")
    if src_task and src_task != task.name:
        raise RunError(f"FP run {src.path} is for task {src_task}, not {task.name}")
    return src


def quantize(
    recipe: Recipe, runs_root: Path, from_path: Optional[Path] = None, force: bool = False,
    reporter: Optional[Reporter] = None, resume: bool = False,
) -> JobResult:
    """Quantization-aware training (or PTQ) from an FP run: ``runs/<task>/<method>-w<W>a<A>/seed<k>/``."""
    started = time.perf_counter()
    q = recipe.quant
    if q is None:
        raise SquatError("the recipe has no quant section")
    task = get_task(recipe.data.task)
    variant = variant_name(*recipe.variant_parts())
    run = RunDir.for_run(runs_root, task.name, variant, recipe.train.seed)
    src = source_run(runs_root, task, recipe.train.seed, from_path)
    ensure_writable(runs_root)
    recipe.model.name_or_path = src.metrics().get("model", recipe.model.name_or_path)
    done, resuming = _prepare_run(run, recipe, force, resume)
    if done:
        return done
    tokenizer = load_tokenizer(str(src.model_dir))
    data = load_task_data(recipe, tokenizer)
    acc = make_accelerator(recipe.train.precision, report_to=recipe.train.report_to, log_dir=run.path / "tensorboard")
    teacher, teacher_dir = (load_teacher(recipe.distill, src, task) if recipe.distill is not None else (None, None))
    seed_everything(recipe.train.seed)
    model = load_model(str(src.model_dir), task)
    check_vocab(model, tokenizer, str(src.model_dir))
    bits, method_info = None, {}
    if teacher is not None:
        check_teacher(teacher, model, str(teacher_dir))
        if recipe.distill.attention > 0:  # the attention term needs the pre-softmax scores
            use_score_attention(model)
            use_score_attention(teacher)
        teacher.to(acc.device)
        method_info["distill"] = {"teacher": str(teacher_dir), "terms": list(recipe.distill.uses())}
    if q.mixed_bits():  # Q-BERT: the FP model's Hessian decides which layers get the higher bit width
        bits, method_info = assign_mixed_bits(model, q, data.train, recipe.train.seed, tokenizer.pad_token_id)
    names = quantize_model(model, q, bits=bits)
    if not names and get_method(q.method).quantizes:
        what = f"quant.include {q.include}" if q.include is not None else "no repeated encoder block was found and"
        raise RecipeError(f"{what} (minus quant.exclude) matches no linear layer of this model: nothing would be "
                          "quantized; set quant.include")
    outliers = gobo_outlier_shares(model)
    if outliers:  # GOBO's FP32 outliers, per module
        method_info["gobo_outlier_share"] = outliers
    model.to(acc.device)
    calib = train_loader(data.train, recipe.train.batch_size, recipe.train.seed + 1, tokenizer.pad_token_id)
    calib_batches = [b for _, b in zip(range(q.calib_batches), calib)]
    calibrate(model, ({k: v.to(acc.device) for k, v in b.items()} for b in calib_batches), q.act_init)
    extra = {"method": q.method, "wbits": q.wbits, "abits": q.abits, "seed": recipe.train.seed,
             "model": recipe.model.name_or_path, "from": str(src.path), "fp_metrics": src.metrics(),
             "quantized_modules": len(names), **method_info}
    metrics = _train_and_save(run, recipe, acc, model, tokenizer, data, q.method, resuming, reporter, extra,
                              {"from": str(src.path), "quantized_modules": names}, names, started=started,
                              teacher=teacher)
    return JobResult(run, metrics)


def load_teacher(cfg, src: RunDir, task: GlueTask):
    """The distillation teacher: ``distill.teacher``'s model folder, else the FP run's model. One-line errors."""
    folder = user_path(cfg.teacher, "distill.teacher") if cfg.teacher else src.model_dir
    if not (folder / "config.json").is_file():
        raise RecipeError(f"distill.teacher: {folder} holds no model (no config.json)")
    return load_model(str(folder), task), folder
