"""Train one adapter per domain from a recipe, on `transformers.Trainer`.

The path a recipe takes, in order: load the base (`backbone`), inject the adapter (`methods`) or
set the freezing baseline (`freeze`), read and tokenize the domain's data (`data`), train with
Trainer, evaluate, and save the adapter folder with `manifest.json`, `metrics.json` and a PNG of
the loss curves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..adaptation import adaptation_method
from ..adaptation.base import PhaseContext
from ..adaptation.features import read_target_texts, tokenize_target
from ..adaptation.selection import deciding_dev, settings_grid
from ..data import Collator, DomainData, MaskingCollator, read_domain, tokenize_domain
from ..errors import UserInputError
from ..formats import (
    ADAPTER_CONFIG,
    TRAINED_WEIGHTS,
    Manifest,
    build_manifest,
    check_output_folder,
    staged_folder,
    write_json,
    write_manifest,
)
from ..formats.model_card import model_card
from ..methods import inject_adapter, method
from ..models.backbone import Backbone, disable_cpu_repacking, load_backbone
from ..models.builtin_models import portable_name
from ..registry.refs import check_name, parse_ref, resolve
from ..registry.store import Registry
from ..routing.router import MIN_ROWS, input_text, sign, write_signature
from ..runtime.stacks import StackedDomain, resolve_domain
from .adapting import DomainAdaptationTrainer
from .checkpoints import AdapterTrainer, CrashAfterCheckpoint
from .distributed import become_single_process, my_domains, record_failure, wait_for_all, world
from .evaluation import evaluate_task, masked_nll_per_row, nll_per_row, predict_probabilities
from .freeze import apply_freeze
from .init_from import initialise_from
from .metrics import classification_metrics, entity_metrics
from .plots import plot_loss_curves
from .recipe import Recipe, parse_recipe
from .safeguard import judge, source_labels, train_source_only
from .threads import configure_threads

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class TrainResult:
    domain: str
    out_dir: Path
    metrics: dict
    manifest: Manifest | None  # None on a data-parallel worker other than the main one
    model: torch.nn.Module
    backbone: Backbone
    data: DomainData
    registered: object = None  # the registry entry, when registered
    pseudo_labels: list = field(default_factory=list)  # self-training: each round's PseudoLabels
    adapted: TrainResult | None = None  # adda / generate: the target adapter trained after this (source) one
    generated: list = field(default_factory=list)  # generate: the kept GeneratedSamples


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a packed 4-bit weight holds two values per byte."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def prepare_model(recipe: Recipe, backbone: Backbone) -> torch.nn.Module:
    """The base with its adapter injected, or frozen for a baseline; only what should train has grads."""
    from peft import prepare_model_for_kbit_training

    model = backbone.model
    heads = {"causal_lm": [], "seq2seq": [], "masked_lm": ["mlm_head"]}.get(recipe.task.type, ["classifier"])
    if recipe.task.crf:  # the transitions train (and are saved) with the head
        heads = heads + ["crf"]
    if recipe.base.quantization != "none":
        disable_cpu_repacking(model)
    if recipe.adapter is None:
        apply_freeze(model, recipe.freeze, heads)
        if recipe.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    inner = model if recipe.task.type in ("causal_lm", "seq2seq") else model.encoder  # ours wrap an encoder
    if recipe.base.quantization != "none":
        prepare_model_for_kbit_training(
            inner,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        inner.requires_grad_(False)
        if recipe.training.gradient_checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return inject_adapter(model, recipe.adapter, recipe.task.type, heads, backbone.model.config.model_type)


def _metric_key(metric: str) -> str:
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def _training_arguments(recipe: Recipe, backbone: Backbone, checkpoints: Path, n_train: int, has_eval: bool,
                        quiet: bool = False):
    from transformers import TrainingArguments

    t = recipe.training
    if not has_eval:
        strategy, steps = "no", None
    elif t.eval_steps:
        strategy, steps = "steps", t.eval_steps
    elif t.max_steps:
        strategy, steps = "steps", t.max_steps
    else:
        strategy, steps = "epoch", None
    early = t.early_stopping
    if early:  # early stopping saves where it evaluates, to keep the best
        save_strategy, save_steps = strategy, steps
    elif t.checkpoint_steps:
        save_strategy, save_steps = "steps", t.checkpoint_steps
    else:
        save_strategy, save_steps = "no", None
    use_bf16 = backbone.device.type == "cuda" and recipe.base.compute_dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        eval_strategy=strategy,
        eval_steps=steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=1 if save_strategy != "no" else None,
        load_best_model_at_end=bool(early),
        metric_for_best_model=_metric_key(early.metric) if early else None,
        greater_is_better=(not any(k in early.metric for k in LOWER_IS_BETTER)) if early else None,
        logging_steps=min(t.logging_steps, max(1, math.ceil(n_train / (t.batch_size * t.grad_accum)))),
        logging_first_step=True,
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",  # tensorboard: our own callback
        disable_tqdm=quiet,
        use_cpu=backbone.device.type == "cpu",
        bf16=use_bf16,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        save_only_model=False,  # optimizer, scheduler and RNG state too: `train --resume` continues exactly
        ddp_find_unused_parameters=False,  # adapters and heads are all used in every forward
        use_liger_kernel=_use_liger(t.kernels, backbone),
    )


def _use_liger(choice: str, backbone: Backbone) -> bool:
    """liger-kernel's fused layers (Triton, CUDA) for the model types it patches (its own table says which);
    transformers applies them."""
    if choice == "none":
        return False
    model_type = getattr(backbone.model.config, "model_type", None)
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as patched
    except ImportError:
        patched = None
    applies = patched is not None and backbone.device.type == "cuda" and model_type in patched
    if choice == "liger" and not applies:
        why = ("liger-kernel is not installed (pip install liger-kernel)" if patched is None else
               f"it needs CUDA and a model type liger patches (this is {model_type} on {backbone.device.type})")
        raise UserInputError(f"training.kernels: liger cannot be used: {why}; use kernels: auto or none")
    return applies


def _compute_metrics_for(task: str, num_labels: int | None, label_names: list[str] | None = None):
    """Trainer hooks: accuracy and macro-F1 (classification), entity F1 (token classification), token-weighted
    perplexity (causal LM); each reduces logits per batch so evaluation never holds [rows, length, vocab]."""
    if task == "token_classification":
        def compute(eval_pred):
            predicted, gold = [], []
            for p_row, g_row in zip(eval_pred.predictions, eval_pred.label_ids):
                keep = g_row != -100  # each word's first sub-token
                predicted.append([label_names[i] for i in p_row[keep]])
                gold.append([label_names[i] for i in g_row[keep]])
            return entity_metrics(predicted, gold)

        return compute, lambda logits, labels: logits.argmax(-1)
    if task == "classification":
        def compute(eval_pred):
            predictions = eval_pred.predictions.argmax(-1).tolist()
            return classification_metrics(predictions, eval_pred.label_ids.tolist(), num_labels)

        return compute, None

    def compute(eval_pred):
        sums = eval_pred.predictions.reshape(-1, 2).sum(0)  # (nll, tokens) per row, summed
        return {"perplexity": math.exp(sums[0] / sums[1])}

    # keep only (nll, tokens) per row instead of gathering [rows, length, vocab] logits; a masked LM's and a
    # decoder's (seq2seq) logits stand at their labels' positions, a causal LM's one before
    nll = masked_nll_per_row if task in ("masked_lm", "seq2seq") else nll_per_row
    # an encoder-decoder's outputs come as a tuple (logits, its cache, the encoder's states)
    return compute, lambda logits, labels: nll(logits[0] if isinstance(logits, tuple) else logits, labels)


def checkpoint_folder(out_root: str | Path, domain: str) -> Path:
    """Where a domain's training checkpoints live: beside its output folder, removed once it is saved."""
    return Path(out_root) / f".{domain}.checkpoints"


def last_checkpoint(out_root: str | Path, domain: str) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = checkpoint_folder(out_root, domain)
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(last) if last else None


class ProgressLines(TrainerCallback):
    """One plain line per log event, named by worker and domain: readable when several workers share a terminal
    (progress bars from several processes interleave into noise)."""

    def __init__(self, label: str):
        self.label = label

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (logs or {}).items()
                         if k in ("loss", "eval_loss", "eval_accuracy", "eval_f1", "eval_perplexity"))
        if shown:
            print(f"[{self.label}] step {state.global_step}/{state.max_steps} {shown}", flush=True)


def _tensorboard(out_root: Path, domain: str):
    """Trainer's TensorBoard callback writing to <out_root>/logs/<domain> (offline event files)."""
    from transformers.integrations import TensorBoardCallback

    try:
        callback = TensorBoardCallback()
    except RuntimeError:
        raise UserInputError("training.report_to: tensorboard needs the tensorboard package: "
                             "pip install 'peft-adapt[tensorboard]'") from None
    callback.logging_dir = str(Path(out_root) / "logs" / domain)
    return callback


@dataclass
class _Prepared:
    """One domain ready to train: its data, the base with its adapter, and what the manifest will record."""

    examples: object
    backbone: Backbone
    data: DomainData
    model: torch.nn.Module
    signature: object
    stacked_on: dict | None
    initialised: dict | None


def _prepare(recipe: Recipe, domain: str, registry) -> _Prepared:
    """Data first (bad rows fail before the model loads, and the label map sizes the classifier's head), then the
    base, its routing signature (read before anything adapts it), a stacked domain adapter and the adapter."""
    spec = recipe.domain(domain)
    t = recipe.training
    examples = read_domain(recipe.task, recipe.data_path(spec.train), recipe.data_path(spec.eval) if spec.eval else None,
                           recipe.data_path(spec.test) if spec.test else None, t.seed, t.max_train_rows,
                           t.max_eval_rows, t.shots)
    labels = examples.labels.names if examples.labels else None
    backbone = load_backbone(recipe.base, recipe.task.type, len(labels) if labels else None, recipe.task.pooling,
                             labels if recipe.task.crf else None)
    data = tokenize_domain(examples, backbone.tokenizer, recipe.task)
    signature = _signature(backbone, examples) if recipe.adapter is not None else None
    stacked_on = None
    if recipe.stack_on is not None:  # the frozen domain adapter's delta joins every forward, before the task's
        folder, stacked_on = resolve_domain(recipe.stack_on, registry or Registry(), recipe.task.type,
                                            backbone.fingerprint)
        StackedDomain(backbone.model, folder, "encoder." if recipe.task.type != "causal_lm" else "")
    model = prepare_model(recipe, backbone)
    initialised = None
    if recipe.init_from is not None:
        initialised = initialise_from(model, recipe.init_from, registry or Registry(), recipe.method,
                                      recipe.task.type, backbone.fingerprint, labels)
    return _Prepared(examples, backbone, data, model, signature, stacked_on, initialised)


def _trainer(recipe: Recipe, domain: str, out_root: Path, ready: _Prepared, progress_label: str | None):
    """Trainer (or, with a domain-adaptation term, its subclass) with our callbacks, checkpoints and metrics."""
    from transformers import EarlyStoppingCallback

    t, data, backbone = recipe.training, ready.data, ready.backbone
    if t.early_stopping and not data.eval:
        raise UserInputError(f"{recipe.source}: training.early_stopping needs eval data, but domain {domain!r} has no "
                             f"eval file and task.eval_fraction is 0")
    args = _training_arguments(recipe, backbone, checkpoint_folder(out_root, domain), len(data.train), bool(data.eval),
                               progress_label is not None)
    labels = ready.examples.labels.names if ready.examples.labels else None
    compute_metrics, preprocess = _compute_metrics_for(recipe.task.type, len(labels) if labels else None, labels)
    callbacks = [CrashAfterCheckpoint()]
    if t.early_stopping:
        callbacks.append(EarlyStoppingCallback(t.early_stopping.patience, t.early_stopping.threshold))
    if "tensorboard" in t.report_to:
        callbacks.append(_tensorboard(out_root, domain))
    if progress_label is not None:
        callbacks.append(ProgressLines(progress_label))
    options = dict(
        model=ready.model, args=args, train_dataset=data.train, eval_dataset=data.eval or None,
        data_collator=(MaskingCollator(backbone.tokenizer, recipe.task.mask_probability) if recipe.task.type == "masked_lm"
                       else Collator(backbone.tokenizer.pad_token_id)),
        compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess, callbacks=callbacks,
    )
    adaptation = recipe.domain_adaptation
    if adaptation is not None and not adaptation_method(adaptation.method).phased:
        trainer = DomainAdaptationTrainer(**options, adaptation=adaptation, task=recipe.task.type,
                                          target_features=target_features(recipe, backbone.tokenizer),
                                          hidden_size=backbone.model.config.hidden_size)
    else:
        trainer = AdapterTrainer(**options)
    if progress_label is not None:  # our lines replace Trainer's printed dicts
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _metrics(recipe: Recipe, ready: _Prepared, trainer, train_output, wall: float) -> dict:
    """What the run did and how well the adapter scores on the domain's eval and test rows."""
    t, data = recipe.training, ready.data
    trainable, total = count_parameters(ready.model)
    labels = ready.examples.labels.names if ready.examples.labels else None
    evaluate = lambda rows: evaluate_task(ready.model, rows, recipe.task.type, ready.backbone.tokenizer.pad_token_id,  # noqa: E731
                                          len(labels) if labels else None, t.eval_batch_size or t.batch_size, labels)
    metrics = {
        "train_loss": train_output.training_loss,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": _tokens_seen(data.train, trainer.state.global_step, t.batch_size * t.grad_accum),
        "train_seconds": wall,
        "threads": torch.get_num_threads(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "rows": data.examples.n_rows,
    }
    if ready.initialised is not None:
        metrics["init_from"] = ready.initialised
    if data.eval:
        metrics["eval"] = evaluate(data.eval)
    metrics["train_tokens_per_second"] = metrics["train_tokens"] / wall if wall > 0 else None
    if data.test is not None:
        metrics["test"] = evaluate(data.test)
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    pseudo_labels = getattr(trainer, "pseudo_label_rounds", [])
    if pseudo_labels:
        metrics["self_training"] = [r.summary(len(labels)) for r in pseudo_labels]
    return metrics


def train_domain(recipe: Recipe, domain: str, out_root: str | Path, resume: bool = False,
                 progress_label: str | None = None, registry=None) -> TrainResult:
    """Train, evaluate and save one domain's adapter into `out_root/<domain>/`; with `resume`, continue from the
    domain's last checkpoint if a previous run left one. `progress_label`: plain progress lines instead of a bar.
    `registry`: where the recipe's `stack_on` is looked up (default: the default registry)."""
    from transformers import set_seed

    set_seed(recipe.training.seed)
    out_root = Path(out_root)
    ready = _prepare(recipe, domain, registry)
    if count_parameters(ready.model)[0] == 0:
        raise UserInputError(f"{recipe.source}: nothing to train: the recipe leaves every parameter frozen")
    trainer = _trainer(recipe, domain, out_root, ready, progress_label)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume_from = last_checkpoint(out_root, domain) if resume else None
    if resume_from is not None:
        log.warning("%s: resuming from %s", domain, resume_from)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = _metrics(recipe, ready, trainer, train_output, time.perf_counter() - started)
    if resume_from is not None:
        metrics["resumed_from_step"] = int(resume_from.name.rpartition("-")[2])
    kept, log_history, saved_recipe = ready, trainer.state.log_history, recipe
    if _guarded(recipe) and trainer.is_world_process_zero():
        kept, metrics, log_history, saved_recipe = _safeguard(recipe, domain, out_root, ready, metrics, log_history,
                                                              registry)

    out_dir, manifest, gathered = out_root / domain, None, None
    if getattr(trainer, "is_fsdp_enabled", False):
        # FSDP shards the weights: every process takes part in gathering them; the main one writes
        gathered = out_dir.parent / f".{out_dir.name}.fsdp-gathered"
        trainer.save_model(str(gathered))
    if trainer.is_world_process_zero():  # data parallel: only the main process writes
        manifest = save_trained(saved_recipe, domain, out_dir, kept.model, kept.backbone, kept.data, metrics,
                                log_history, gathered, ready.stacked_on, ready.signature)
        shutil.rmtree(checkpoint_folder(out_root, domain), ignore_errors=True)
    result = TrainResult(domain, out_dir, metrics, manifest, kept.model, kept.backbone, kept.data,
                         pseudo_labels=getattr(trainer, "pseudo_label_rounds", []))
    phased = recipe.domain_adaptation is not None and adaptation_method(recipe.domain_adaptation.method).phased
    if phased and manifest is not None:  # the source adapter is saved: now the target phase, on the same model
        result.adapted = _target_phase(recipe, domain, out_root, result, ready.backbone.tokenizer)
    return result


def _guarded(recipe: Recipe) -> bool:
    """A classifier trained with an alignment term or self-training, its safeguard on (phased methods train their
    target adapter beside the source one, which stays saved)."""
    spec = recipe.domain_adaptation
    if spec is None or not spec.safeguard or recipe.task.type != "classification" or adaptation_method(spec.method).phased:
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        log.warning("the safeguard trains and judges in one process; this data-parallel run keeps the adapted adapter "
                    "unjudged: train with one process to judge it")
        return False
    return True


def _safeguard(recipe: Recipe, domain: str, out_root: Path, ready: _Prepared, metrics: dict, log_history: list,
               registry):
    """Train source-only too (and with `select: auto` the grid's other settings) and judge them all without target
    labels; returns what to save: (the prepared model, its metrics with the judgement, its log history, its
    recipe)."""
    spec = recipe.domain_adaptation
    if spec.source_only is not None:
        source_only, scratch = _registered_source_only(recipe, domain, registry), []
    else:
        source_only, folder = train_source_only(recipe, domain, out_root, train_domain, registry)
        scratch = [folder]
    try:
        variants = {}
        if spec.select == "auto":
            grid = settings_grid(spec, adaptation_method(spec.method).aligns)
            for i, (label, update) in enumerate(grid.items()):
                changed = spec.model_copy(update=update | {"safeguard": False, "select": None})
                scratch.append(Path(out_root) / f".{domain}.select-{i}")
                shutil.rmtree(scratch[-1], ignore_errors=True)
                variant = recipe.model_copy(update={"domain_adaptation": changed})
                variants[label] = (variant, train_domain(variant, domain, scratch[-1], registry=registry))
        t = recipe.training
        judgement = judge(ready.model, source_only.model, ready.data.eval or [],
                          target_features(recipe, ready.backbone.tokenizer), ready.backbone.tokenizer.pad_token_id,
                          t.eval_batch_size or t.batch_size, {label: r.model for label, (_, r) in variants.items()},
                          source_labels(ready.data))
        judgement.source_only = source_only
        record = judgement.record(spec.method)
        chosen = judgement.selected
        compared = judgement.criteria[chosen if chosen != "source_only" else "adapted"]  # beside source-only's
        shown = ", ".join(f"{k} {compared[k]:.3f}/"
                          f"{judgement.criteria['source_only'][k]:.3f}"
                          for k in (deciding_dev(compared, judgement.criteria["source_only"]), "source_accuracy",
                                    "prior_gap"))
        if chosen != "source_only":
            print(f"{domain}: safeguard kept the {spec.method} adapter"
                  f"{f' trained with {chosen}' if chosen in variants else ''}: {judgement.why} "
                  f"(kept/source-only: {shown})", flush=True)
            if chosen == "adapted":
                return ready, metrics | {"domain_adaptation": record}, log_history, recipe
            variant, result = variants[chosen]
            history = json.loads((result.out_dir / "log_history.json").read_text())
            kept = _Prepared(ready.examples, result.backbone, result.data, result.model, ready.signature,
                             ready.stacked_on, ready.initialised)
            return kept, result.metrics | {"domain_adaptation": record}, history, variant
        log.warning("%s: safeguard fell back to the source-only adapter: %s (adapted/source-only: %s); the adapted "
                    "one's scores are in metrics.json (domain_adaptation.adapted_metrics)", domain, judgement.why, shown)
        record["adapted_metrics"] = {k: v for k, v in metrics.items() if k in ("eval", "test")}
        logged = source_only.out_dir / "log_history.json"
        history = json.loads(logged.read_text()) if logged.is_file() else []
        kept = _Prepared(ready.examples, source_only.backbone, source_only.data, source_only.model, ready.signature,
                         ready.stacked_on, ready.initialised)
        return kept, source_only.metrics | {"domain_adaptation": record}, history, recipe
    finally:
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)


def _registered_source_only(recipe: Recipe, domain: str, registry) -> TrainResult:
    """The safeguard's reference read from the registry (`domain_adaptation.source_only`), not trained again: loaded
    as init_from loads (same base, method and shape), its head too, so its labels must be this domain's; scored on
    this recipe's held-out and test rows."""
    ref = recipe.domain_adaptation.source_only
    plain = recipe.model_copy(update={"domain_adaptation": None, "init_from": ref})
    try:
        ready = _prepare(plain, domain, registry)
    except UserInputError as error:
        raise UserInputError(f"domain_adaptation.source_only: {str(error).removeprefix('init_from: ')}") from None
    labels = ready.examples.labels.names
    if not ready.initialised["head"]:
        raise UserInputError(f"domain_adaptation.source_only: {ref} classifies other labels than {domain}'s "
                             f"({', '.join(labels)}): name an adapter trained on this task, or remove source_only "
                             f"to train one")
    folder = resolve(parse_ref(ref), registry or Registry()).folder
    t = recipe.training
    scores = {name: evaluate_task(ready.model, rows, "classification", ready.backbone.tokenizer.pad_token_id,
                                  len(labels), t.eval_batch_size or t.batch_size, labels)
              for name, rows in (("eval", ready.data.eval), ("test", ready.data.test)) if rows}
    saved = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    metrics = {k: v for k, v in saved.items() if k not in ("eval", "test")} | scores | {"source_only_from": ref}
    return TrainResult(domain, folder, metrics, None, ready.model, ready.backbone, ready.data)


def _target_phase(recipe: Recipe, domain: str, out_root, source: TrainResult, tokenizer) -> TrainResult:
    """A phased method's target adapter, trained on the source's model after the source adapter was saved; evaluated
    and saved here as `<domain>-<method>`."""
    method = adaptation_method(recipe.domain_adaptation.method)
    out_root = Path(out_root)
    t = recipe.training
    eval_batch = t.eval_batch_size or t.batch_size
    pad = tokenizer.pad_token_id
    context = PhaseContext(
        recipe=recipe, domain=domain, out_root=out_root, source=source,
        target_texts=lambda: _target_texts(recipe),
        target_features=lambda: target_features(recipe, tokenizer),
        train_recipe=lambda data, name, root: train_domain(parse_recipe(data), name, root),
        predict_probabilities=lambda model, rows: predict_probabilities(model, rows, pad, eval_batch),
        train_epoch=lambda rows, name: _one_epoch(recipe, source, rows, out_root / f".{name}.checkpoints"),
    )
    outcome = method.run_phase(context)
    model, backbone, data = source.model, source.backbone, source.data
    metrics = outcome.metrics
    for split in ("eval", "test"):
        rows = getattr(data, split)
        if rows:
            metrics[split] = evaluate_task(model, rows, recipe.task.type, pad, len(data.labels.names), eval_batch,
                                           data.labels.names)
    name = f"{domain}-{method.name}"
    if recipe.domain_adaptation.safeguard and recipe.task.type == "classification":
        metrics["domain_adaptation"] = _judge_phase(recipe, domain, name, source, tokenizer)
    out_dir = out_root / name
    manifest = save_trained(recipe, name, out_dir, model, backbone, data, metrics, outcome.history)
    return TrainResult(name, out_dir, metrics, manifest, model, backbone, data, generated=outcome.generated)


def _judge_phase(recipe: Recipe, domain: str, name: str, source: TrainResult, tokenizer) -> dict:
    """A phase's target adapter (trained in place on the source's model) against the source adapter it started from,
    which is source-only and already saved: loaded again and judged by the same label-free criteria."""
    from ..runtime.loading import load_trained  # lazy: only a guarded phase loads the source adapter again

    t = recipe.training
    plain = load_trained(source.out_dir, quantization=recipe.base.quantization, device=recipe.base.device).model
    judgement = judge(source.model, plain, source.data.eval or [], target_features(recipe, tokenizer),
                      tokenizer.pad_token_id, t.eval_batch_size or t.batch_size,
                      class_labels=source_labels(source.data))
    if judgement.selected == "adapted":
        print(f"{name}: safeguard: the {recipe.domain_adaptation.method} adapter is better than source-only "
              f"{domain}: {judgement.why}", flush=True)
    else:
        log.warning("%s: safeguard: no better than the source-only adapter %s (%s); it is saved but not registered: "
                    "serve %s", name, domain, judgement.why, domain)
    return judgement.record(recipe.domain_adaptation.method)


def _one_epoch(recipe: Recipe, source: TrainResult, rows: list[dict], checkpoints: Path) -> dict:
    """One epoch of the source's model on `rows` (a phase's extra training): steps, seconds and the log history."""
    t = recipe.training
    one_epoch = recipe.model_copy(update={"training": t.model_copy(update={
        "epochs": 1.0, "max_steps": None, "checkpoint_steps": None, "early_stopping": None})})
    source.model.train()
    trainer = AdapterTrainer(model=source.model, args=_training_arguments(one_epoch, source.backbone, checkpoints,
                                                                          len(rows), False, quiet=True),
                             train_dataset=rows, data_collator=Collator(source.backbone.tokenizer.pad_token_id))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"steps": trainer.state.global_step, "seconds": seconds, "history": trainer.state.log_history}


def _target_texts(recipe: Recipe) -> list[str]:
    spec = recipe.domain_adaptation
    return read_target_texts(recipe.data_path(spec.target), recipe.task.text_field, spec.max_target_rows)


def target_features(recipe: Recipe, tokenizer) -> list[dict]:
    """The domain-adaptation target: its text only, tokenized like the source (labels never read)."""
    return tokenize_target(_target_texts(recipe), tokenizer, recipe.task.max_length)


def _tokens_seen(features: list[dict], steps: int, batch: int) -> int:
    """Tokens the optimizer saw: the mean example length times the examples of every step."""
    mean_length = sum(len(f["input_ids"]) for f in features) / len(features)
    return int(mean_length * steps * batch)


def _signature(backbone: Backbone, examples):
    """The training text's routing signature (routing.py), or None for a domain too small to sign."""

    texts = [input_text(e) for e in examples.train]
    if sum(1 for t in texts if t.strip()) < MIN_ROWS:
        return None
    return sign(backbone.model, backbone.tokenizer, texts, backbone.device)


def save_trained(recipe: Recipe, domain: str, out_dir: Path, model, backbone: Backbone, data: DomainData,
                 metrics: dict, log_history: list[dict], gathered: Path | None = None,
                 stacked_on: dict | None = None, signature=None) -> Manifest:
    """Write the adapter (its method's format) or a baseline's trained weights, with metrics, curves, model card and
    manifest, as one folder that appears whole (`formats.staged_folder`): a crash leaves no half-written adapter."""
    with staged_folder(out_dir) as staging:
        if gathered is not None:  # weights Trainer gathered from FSDP shards
            for f in gathered.iterdir():
                if f.suffix in (".json", ".safetensors") and f.name not in ("training_args.json", "trainer_state.json"):
                    shutil.move(str(f), staging / f.name)
            shutil.rmtree(gathered, ignore_errors=True)
        elif recipe.adapter is not None:
            method(recipe.method).save(model, staging)
        else:
            from safetensors.torch import save_file

            trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trained, str(staging / TRAINED_WEIGHTS))
        labels = data.labels.names if data.labels else None
        pooling = getattr(backbone.model, "pooling", None)
        if recipe.adapter is not None:
            describe_for_plain_tools(staging, recipe, domain, labels, pooling)
        if signature is not None:
            write_signature(staging, signature.features, signature.layer, signature.tokens)
        write_json(staging / "metrics.json", metrics)
        write_json(staging / "log_history.json", log_history)
        plot_loss_curves(log_history, staging / "loss_curve.png", f"{recipe.name or 'recipe'} / {domain}")
        manifest = build_manifest(
            staging, base=recipe.base, name=f"{recipe.name}-{domain}" if recipe.name else domain, domain=domain,
            method=recipe.method, task=recipe.task.type, labels=labels, pooling=pooling,
            base_fingerprint=backbone.fingerprint, recipe=recipe.model_dump(mode="json"),
            data_sha256=data.examples.data_sha256, metrics=metrics, stack_on=stacked_on,
        )
        write_manifest(staging, manifest)
    return manifest


def result_line(result: TrainResult) -> str:
    """One line a person reads when a domain is done: its score, size, time and where it went."""
    split = "test" if "test" in result.metrics else "eval" if "eval" in result.metrics else None
    scores = json.dumps(result.metrics[split]) if split else "(no eval data)"
    where = f"{result.out_dir}" + (f", registered as {result.registered.ref}" if result.registered else "")
    return (f"{result.domain}: {split or 'trained'} {scores}  trainable={result.metrics['trainable_parameters']:,}  "
            f"time={result.metrics['train_seconds']:.0f}s ({result.metrics['threads']} threads)  -> {where}")


def describe_for_plain_tools(folder: Path, recipe: Recipe, domain: str, labels: list[str] | None,
                             pooling: str | None) -> None:
    """What other tools read: peft's `base_model_name_or_path` names the base portably (the hub id of a
    built-in, not a path inside this machine's cache), and README.md says how to load it without us."""

    config_path = folder / ADAPTER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = portable_name(recipe.base.model)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    peft_loadable = method(recipe.method).peft_loadable(recipe.task.type)
    card = model_card(f"{recipe.name}-{domain}" if recipe.name else domain, recipe.task.type, recipe.method,
                      recipe.base.model, labels, pooling, recipe.task.max_length, peft_loadable)
    (folder / "README.md").write_text(card, encoding="utf-8")


def output_names(recipe: Recipe, domain: str) -> list[str]:
    """The folders (under the output root) that training `domain` writes: its adapter, and a phased method's."""
    names = [domain]
    spec = recipe.domain_adaptation
    if spec is not None and adaptation_method(spec.method).phased:
        names.append(f"{domain}-{adaptation_method(spec.method).name}")
    return names


def check_outputs(recipe: Recipe, out_root: Path, domain: str, replace: bool) -> None:
    """Before training anything: every adapter name this domain registers is allowed, and no output folder would
    replace something that is not a previous run of this tool (or one at all, unless `replace`)."""
    for name in output_names(recipe, domain):
        check_name(f"{recipe.name}-{name}" if recipe.name else name)
        check_output_folder(out_root / name, replace, "--overwrite (or --resume to continue it)")


def train_recipe(recipe: Recipe, out_root: str | Path, domains: list[str] | None = None,
                 registry=None, parallel_domains: bool = False, resume: bool = False,
                 report=None, stack_registry=None, overwrite: bool = False) -> list[TrainResult]:
    """Train every domain of the recipe in turn (or only `domains`), registering each adapter if given a
    registry. Under a multi-process launcher: data parallel per domain, or with `parallel_domains` each
    worker trains its own share of the domains; a failed domain is reported with its worker and error.
    With `resume`, a domain whose adapter is already saved is skipped and an interrupted one continues from
    its last checkpoint. `report(line)` hears a banner before each domain and its result line after it.
    `stack_registry`: where `stack_on` is looked up (default: `registry`, else the default registry).
    An output folder that exists is replaced only with `overwrite` (or continued with `resume`), and only if it
    holds a previous run; every check happens before anything is written."""

    names = domains or list(recipe.domains)
    for name in names:
        recipe.domain(name)  # fail on an unknown domain before training anything
    here = world()
    configure_threads(recipe.training.threads)  # after the launcher's environment is read, before any work
    separate = parallel_domains and here.size > 1
    if separate:
        here = become_single_process()
        names = my_domains(names, here)
    for name in names:  # a worker checks its own domains: another's may be written already when a late one starts
        check_outputs(recipe, Path(out_root), name, overwrite or resume)
    say = report if (report is not None and (separate or here.rank == 0)) else (lambda line: None)
    prefix = f"[worker {here.rank}] " if separate else ""
    results, failed = [], []
    for index, name in enumerate(names, start=1):
        out_dir = Path(out_root) / name
        if resume and (out_dir / "manifest.json").is_file() and last_checkpoint(out_root, name) is None:
            say(f"{prefix}{name}: already trained in {out_dir}; skipped (--resume)")
            continue
        say(f"{prefix}== {name} ({index}/{len(names)}): {recipe.method} on {recipe.base.model} "
            f"({recipe.base.quantization}), {recipe.task.type} ==")
        try:
            result = train_domain(recipe, name, out_root, resume=resume,
                                  progress_label=f"worker {here.rank} {name}" if separate else None,
                                  registry=stack_registry or registry)
        except Exception as exc:
            if not separate:
                raise
            record_failure(Path(out_root), name, here, exc)
            print(f"error: domain {name!r} failed on worker {here.rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        for trained in filter(None, (result, result.adapted)):
            if trained.metrics.get("domain_adaptation", {}).get("selected") == "source_only" and trained is not result:
                continue  # a phase's target adapter the safeguard found no better than source-only (said above)
            if registry is not None and trained.manifest is not None:  # the main process (or each domain's worker)
                trained.registered = registry.add(trained.out_dir)
            if trained.manifest is not None:
                say(prefix + result_line(trained))
        results.append(result)
    if separate:
        wait_for_all(Path(out_root), here, os.environ.get("PEFT_ADAPT_RUN_ID", "run"))
        if failed:
            raise SystemExit(1)
    return results
