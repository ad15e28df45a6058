"""Generative domain adaptation: target-domain samples from a generator, labelled by the source classifier.

After the source phase (ordinary training on the source's labels), a causal-LM LoRA adapter (the generator) is
trained on the target's unlabeled text with the toolkit's own causal-LM path, and generates target-like text
through the runtime, each sample prompted by the first words of a target row. The source classifier labels the
samples; the confident ones, balanced per class (`self_training.select_pseudo_labels`), join the source rows for
one more epoch of the adapter, which is saved as its own classifier, `<domain>-generate`. The target file's labels
are never read: its text trains the generator and gives the prompts.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ..models.model_files import Quantization
from .base import AdaptationMethod, PhaseContext, PhaseOutcome
from .self_training import select_pseudo_labels


class GeneratorSpec(BaseModel):
    """`domain_adaptation.generator:` the generator of target-domain samples (method generate)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("smollm2-135m", description="a causal LM base for the generator")
    quantization: Quantization = "nf4"
    steps: int = Field(100, ge=1, description="the generator adapter's training steps on the target text")
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    samples: int = Field(400, ge=2, description="target-like texts generated")
    prompt_words: int = Field(4, ge=1, description="each sample starts from a target row's first words")
    max_new_tokens: int = Field(64, ge=1)
    threshold: float = Field(0.9, gt=0, lt=1, description="least source-classifier probability a sample needs")
    balance: bool = Field(True, description="as many samples per class as the rarest confident class has")


@dataclass
class GeneratedSample:
    text: str
    prompt_row: int  # the target row whose first words prompted it (for reports that may read its label)
    label: int
    confidence: float


def generator_recipe(recipe, domain: str, spec: GeneratorSpec) -> dict:
    """The generator's recipe (as data): a LoRA causal-LM adapter on the target's text."""
    adaptation = recipe.domain_adaptation
    return {
        "name": f"{recipe.name or 'recipe'}-{domain}-generator",
        "base": {"model": spec.model, "quantization": spec.quantization, "device": recipe.base.device},
        "task": {"type": "causal_lm", "max_length": recipe.task.max_length, "text_field": recipe.task.text_field,
                 "eval_fraction": 0.1},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": spec.steps, "batch_size": spec.batch_size, "max_eval_rows": 64,
                     "learning_rate": spec.learning_rate, "seed": recipe.training.seed,
                     "max_train_rows": adaptation.max_target_rows, "checkpoint_steps": None,
                     "threads": recipe.training.threads},
        "domains": {"generator": {"train": str(recipe.data_path(adaptation.target))}},
    }


def generate_samples(generator_folder, spec: GeneratorSpec, texts: list[str], seed: int,
                     batch_size: int = 32) -> list[tuple[int, str]]:
    """(prompt row, sample) pairs: each prompted by a target row's first words, continued by the generator
    (sampled, seeded)."""
    from ..runtime import AdapterRuntime  # lazy: recipes import this module, and only a generate phase serves

    runtime = AdapterRuntime(spec.model, quantization=spec.quantization)
    adapter = str(generator_folder)
    rng = random.Random(seed)
    usable = [i for i, text in enumerate(texts) if text.split()]
    rows = [rng.choice(usable) for _ in range(spec.samples)]
    prompts = [" ".join(texts[i].split()[: spec.prompt_words]) for i in rows]
    samples = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        completions = runtime.generate(chunk, adapters=adapter, max_new_tokens=spec.max_new_tokens, do_sample=True,
                                       top_p=0.95, seed=seed + start)
        samples += [f"{prompt} {completion.strip()}" for prompt, completion in zip(chunk, completions)]
    return list(zip(rows, samples))


class Generate(AdaptationMethod):
    name = "generate"
    settings = GeneratorSpec
    tasks = ("classification",)
    purpose = "adapts the source's classifier to the target"
    phased = True

    def run_phase(self, context: PhaseContext) -> PhaseOutcome:
        """Generator, samples, their labels from the source classifier, then one epoch of the adapter on the source
        rows plus the confident samples; the kept samples ride on the outcome."""
        recipe, source = context.recipe, context.source
        spec = self.settings_of(recipe.domain_adaptation)
        model, backbone, data = source.model, source.backbone, source.data
        started = time.perf_counter()
        generator = context.train_recipe(generator_recipe(recipe, context.domain, spec), "generator",
                                         context.out_root / f".{context.domain}-generator")
        pairs = generate_samples(generator.out_dir, spec, context.target_texts(), recipe.training.seed)
        generating_seconds = time.perf_counter() - started
        tokenizer = backbone.tokenizer
        features = [{k: v for k, v in tokenizer(text, truncation=True, max_length=recipe.task.max_length).items()
                     if k in ("input_ids", "attention_mask")} for _, text in pairs]
        probabilities = context.predict_probabilities(model, features)
        rows, labels = select_pseudo_labels(probabilities, spec.threshold, spec.balance)
        kept = [GeneratedSample(pairs[r][1], pairs[r][0], label, float(probabilities[r].max()))
                for r, label in zip(rows, labels)]
        num_labels = len(data.labels.names)
        report = {"generated": len(pairs), "kept": len(kept), "per_class": [labels.count(c) for c in range(num_labels)],
                  "mean_confidence": sum(s.confidence for s in kept) / len(kept) if kept else None,
                  "generator": str(generator.out_dir),
                  "generator_perplexity": generator.metrics.get("eval", {}).get("perplexity"),
                  "generating_seconds": generating_seconds}
        train = list(data.train) + [features[r] | {"labels": label} for r, label in zip(rows, labels)]
        epoch = context.train_epoch(train, f"{context.domain}-{self.name}")
        metrics = {"steps": epoch["steps"], "train_seconds": epoch["seconds"] + generating_seconds,
                   "threads": source.metrics["threads"], "trainable_parameters": source.metrics["trainable_parameters"],
                   "total_parameters": source.metrics["total_parameters"], "rows": data.examples.n_rows,
                   "source_adapter": str(source.out_dir), "generated_samples": report}
        return PhaseOutcome(metrics, epoch["history"], generated=kept)
