"""`AdapterRuntime`: one base held once, many resident LoRA adapters, one adapter per call or per row.

    rt = AdapterRuntime("smollm2-135m", quantization="nf4", max_adapters=32)
    rt.load("medical")                                   # from the registry (name, name@3, name@tag) or a folder
    rt.load("med+legal", weights={"medical": 0.5, "legal": 0.5})   # a linear combination, one slot
    rt.generate(["Q: ...", "Q: ..."], adapters=["medical", "legal"])
    rt.logits(["some text"], adapters="medical")

Adapters are read into the runtime's own stacked tensors (`stacked_lora.py`), never through peft's
loading path, so loading after the model has served is as exact as loading before. Every public method
holds one lock: concurrent calls from several threads each get what they would get alone.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..backbone import BaseSpec, load_backbone
from ..errors import UserInputError
from ..fingerprint import fingerprint_differences
from ..heads import pool_hidden
from ..manifest import read_manifest
from .batch import AdapterBatch
from .lora_weights import LoraWeights, combine_linearly, read_lora_weights
from .residency import Residency, ResidentAdapter
from .stacked_lora import BatchContext, StackedLoraLinear

BASE_NAMES = (None, "base", "")  # a row that names one of these runs the base model alone
TASKS = ("causal_lm", "classification")


class AdapterRuntime:
    def __init__(self, base: str | BaseSpec, task: str = "causal_lm", quantization: str = "nf4",
                 registry=None, max_adapters: int | None = None, max_bytes: int | None = None,
                 initial_capacity: int = 8, initial_rank: int = 8, device: str = "auto"):
        if task not in TASKS:
            raise UserInputError(f"runtime task {task!r} is not known; use {' or '.join(TASKS)}")
        spec = base if isinstance(base, BaseSpec) else BaseSpec(model=base, quantization=quantization, device=device)
        self.task = task
        self.backbone = load_backbone(spec, "causal_lm" if task == "causal_lm" else "encoder")
        self.model = self.backbone.model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = self.backbone.tokenizer
        self.device = self.backbone.device
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self._registry = registry
        self.residency = Residency(max_adapters, max_bytes)
        self.context = BatchContext()
        self.layers: dict[str, StackedLoraLinear] = {}
        self._capacity = max(2, initial_capacity)
        self._rank = max(1, initial_rank)
        self._lock = threading.RLock()

    # ------------------------------------------------------------ adapters in and out

    @property
    def registry(self):
        if self._registry is None:
            from ..registry import Registry

            self._registry = Registry()
        return self._registry

    def load(self, name: str, weights: dict[str, float] | None = None, pin: bool = False,
             force: bool = False) -> ResidentAdapter:
        """Make `name` resident: a registry ref or adapter folder, or with `weights` a linear combination
        {ref: coefficient} of LoRA adapters under the new name `name`. Loading again refreshes it."""
        return self._load(name, weights, pin, force, keep=set())

    def load_lora(self, name: str, lora: LoraWeights, pin: bool = False) -> ResidentAdapter:
        """Make LoRA weights already in memory resident under `name` (not reloadable after eviction)."""
        with self._lock:
            return self._install(name, lora, {"source": "memory"}, pin, None, keep=set())

    def _load(self, name: str, weights: dict[str, float] | None, pin: bool, force: bool, keep: set[str]) -> ResidentAdapter:
        with self._lock:
            if name in BASE_NAMES:
                raise UserInputError(f"{name!r} names the base model; give the adapter another name")
            started = time.perf_counter()
            if weights:
                parts = [(self._read(ref, force)[0], float(w)) for ref, w in weights.items()]
                lora, meta = combine_linearly(parts), {"source": "+".join(weights)}
            else:
                lora, meta = self._read(name, force)
            adapter = self._install(name, lora, meta, pin, weights, keep)
            self.residency.load_seconds += time.perf_counter() - started
            return adapter

    def _install(self, name: str, lora: LoraWeights, meta: dict, pin: bool, weights, keep: set[str]) -> ResidentAdapter:
        if name in self.residency:
            self._evict(name, count=False)
        for victim in self.residency.victims_for(lora.nbytes, keep=keep | {name}):
            self._evict(victim)
        slot = self.residency.allocate_slot()
        self._write_slot(slot, lora)
        adapter = ResidentAdapter(
            name=name, slot=slot, rank=lora.rank, nbytes=lora.nbytes, source=meta["source"], pinned=pin,
            head=lora.head, labels=meta.get("labels"), pooling=meta.get("pooling"),
            recipe=dict(weights) if weights else None,
        )
        self.residency.add(adapter)
        return adapter

    def _read(self, ref: str, force: bool) -> tuple[LoraWeights, dict]:
        """LoRA weights of a folder or registry ref, after checking that they fit this base."""
        folder = Path(ref)
        if folder.is_dir():
            source = str(folder)
        else:
            entry = self.registry.get(ref)
            folder, source = entry.path, entry.ref
        manifest = read_manifest(folder) if (folder / "manifest.json").is_file() else {}
        if manifest:
            from ..adapter_files import verify_checksums

            problems = verify_checksums(folder, manifest)
            if problems:
                raise UserInputError(f"{source}: checksum mismatch, refusing to load: " + "; ".join(problems))
            diffs = fingerprint_differences(manifest["base_fingerprint"], self.backbone.fingerprint)
            if diffs and not force:
                raise UserInputError(
                    f"{source} was trained on base {manifest.get('base_model')!r}, which differs from this runtime's "
                    f"base {self.backbone.spec.model!r}: " + "; ".join(diffs[:5]) + ". Use the right base or force=True."
                )
            task = manifest.get("task", "causal_lm")
            if task != self.task:
                raise UserInputError(f"{source} is a {task} adapter; this runtime serves {self.task}")
        lora = read_lora_weights(folder, strip_prefix="encoder." if self.task == "classification" else "")
        if self.task == "classification" and not lora.head:
            raise UserInputError(f"{source}: a classification adapter needs its head (classifier weights)")
        meta = {"source": source, "labels": manifest.get("labels"), "pooling": manifest.get("pooling") or "mean"}
        return lora, meta

    def _layer(self, path: str) -> StackedLoraLinear:
        """The wrapped layer at `path`, wrapping the base's linear layer there on first use."""
        if path in self.layers:
            return self.layers[path]
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise UserInputError(f"the adapter names layer {path!r}, which this base does not have") from None
        if not isinstance(module, torch.nn.Linear):
            raise UserInputError(f"the adapter adapts {path!r}, a {type(module).__name__}; only linear layers are served")
        parent_path, _, child = path.rpartition(".")
        wrapped = StackedLoraLinear(module, self.context, self._capacity, self._rank, self.dtype, self.device)
        setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, wrapped)
        self.layers[path] = wrapped
        return wrapped

    def _write_slot(self, slot: int, lora: LoraWeights) -> None:
        capacity, rank = self._capacity, self._rank
        while slot >= capacity:
            capacity *= 2
        rank = max(rank, lora.rank)
        layers = {path: self._layer(path) for path in lora.modules}  # validate every path before writing
        for path, (a, b, _) in lora.modules.items():
            layer = layers[path]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise UserInputError(
                    f"the adapter's {path} maps {a.shape[1]} -> {b.shape[0]} features, the base layer "
                    f"{layer.in_features} -> {layer.out_features}"
                )
        if (capacity, rank) != (self._capacity, self._rank):
            self._capacity, self._rank = capacity, rank
            for layer in self.layers.values():
                layer.resize(capacity, rank)
        for layer in self.layers.values():
            layer.resize(self._capacity, self._rank)  # layers wrapped just now
        for path, (a, b, scale) in lora.modules.items():
            layers[path].write(slot, a, b, scale)

    def _evict(self, name: str, count: bool = True) -> None:
        adapter = self.residency.remove(name)
        for layer in self.layers.values():
            layer.clear(adapter.slot)  # no trace of it remains in the stacks
        if count:
            self.residency.evictions += 1

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.residency:
                raise UserInputError(f"adapter {name!r} is not resident; resident: {sorted(self.residency.adapters)}")
            self._evict(name, count=False)

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned adapters are never evicted (loaded now if not resident)."""
        with self._lock:
            self._resident(name).pinned = pinned

    def resident(self) -> list[str]:
        with self._lock:
            return list(self.residency.adapters)

    def stats(self) -> dict:
        with self._lock:
            r = self.residency
            stack_bytes = sum((l.A.numel() + l.B.numel()) * l.A.element_size() for l in self.layers.values())
            return {
                "resident": len(r.adapters), "resident_adapter_bytes": r.resident_bytes, "stack_bytes": stack_bytes,
                "slots": self._capacity, "padded_rank": self._rank, "hits": r.hits, "misses": r.misses,
                "evictions": r.evictions, "load_seconds": r.load_seconds,
            }

    def _resident(self, name: str, keep: set[str] = frozenset()) -> ResidentAdapter:
        """A resident adapter (a hit), or loaded now from where it came from (a miss), never evicting `keep`."""
        if name in self.residency:
            self.residency.hits += 1
            return self.residency.use(name)
        self.residency.misses += 1
        return self._load(name, None, False, False, keep=set(keep))

    # ------------------------------------------------------------ running

    def _batch(self, adapters, rows: int) -> tuple[AdapterBatch, list[ResidentAdapter | None]]:
        names = [adapters] * rows if adapters is None or isinstance(adapters, str) else list(adapters)
        if len(names) != rows:
            raise UserInputError(f"{len(names)} adapter names for {rows} rows; give one per row, or one for all")
        wanted = {n for n in names if n not in BASE_NAMES}
        resident = [None if n in BASE_NAMES else self._resident(n, keep=wanted) for n in names]
        slots = [0 if a is None else a.slot for a in resident]
        ranks = {a.slot: a.rank for a in resident if a is not None}
        return AdapterBatch.build(slots, ranks, self.device), resident

    def _encode(self, inputs, padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(inputs, str):
            raise UserInputError("pass a list of texts (one per row), not a single string")
        if inputs and isinstance(inputs[0], str):
            self.tokenizer.padding_side = padding_side
            enc = self.tokenizer(list(inputs), return_tensors="pt", padding=True)
            return enc["input_ids"], enc["attention_mask"]
        width = max(len(row) for row in inputs)
        pad = self.tokenizer.pad_token_id
        ids = [([pad] * (width - len(r)) + list(r)) if padding_side == "left" else (list(r) + [pad] * (width - len(r))) for r in inputs]
        mask = [([0] * (width - len(r)) + [1] * len(r)) if padding_side == "left" else ([1] * len(r) + [0] * (width - len(r))) for r in inputs]
        return torch.tensor(ids), torch.tensor(mask)

    def _forward(self, batch: AdapterBatch, **inputs):
        self.context.current = batch
        try:
            with torch.no_grad():
                return self.model(**inputs)
        finally:
            self.context.current = None

    def logits(self, inputs, adapters=None, attention_mask: torch.Tensor | None = None,
               padding_side: str = "right") -> torch.Tensor:
        """Next-token logits [rows, tokens, vocab]. `inputs`: texts, token-id lists, or an id tensor with
        its attention mask (padding on either side); `adapters`: one name for all rows or one per row."""
        if self.task != "causal_lm":
            raise UserInputError("logits() is for causal LM runtimes; use classify()")
        with self._lock:
            if isinstance(inputs, torch.Tensor):
                ids, mask = inputs, attention_mask if attention_mask is not None else torch.ones_like(inputs)
            else:
                ids, mask = self._encode(inputs, padding_side)
            batch, _ = self._batch(adapters, ids.shape[0])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens keep their positions under left padding
            out = self._forward(batch, input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device))
            return out.logits

    def generate(self, prompts, adapters=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50, seed: int | None = None,
                 return_tokens: bool = False, min_new_tokens: int = 0) -> list:
        """Continue each prompt (texts or token-id lists) with its row's adapter; greedy unless do_sample."""
        if self.task != "causal_lm":
            raise UserInputError("generate() is for causal LM runtimes; use classify()")
        if max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        with self._lock:
            ids, mask = self._encode(prompts, padding_side="left")  # generation appends on the right
            batch, _ = self._batch(adapters, ids.shape[0])
            if seed is not None:
                torch.manual_seed(seed)
            options = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                           pad_token_id=self.tokenizer.pad_token_id)
            if do_sample:
                options |= dict(temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                options |= dict(temperature=None, top_p=None, top_k=None)
            self.context.current = batch
            try:
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **options)
            finally:
                self.context.current = None
            new = out[:, ids.shape[1]:].tolist()
            eos = self.tokenizer.eos_token_id
            new = [row[: row.index(eos) + 1] if eos in row else row for row in new]
            if return_tokens:
                return new
            return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]

    def classify(self, texts, adapters) -> list[dict]:
        """Label each text with its row's classification adapter (its own head and pooling)."""
        if self.task != "classification":
            raise UserInputError("classify() is for classification runtimes (task='classification')")
        with self._lock:
            ids, mask = self._encode(texts)
            batch, resident = self._batch(adapters, ids.shape[0])
            if any(a is None for a in resident):
                raise UserInputError("classification needs an adapter for every row (the base has no head)")
            hidden = self._forward(batch, input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            mask = mask.to(self.device)
            results: list[dict | None] = [None] * len(resident)
            for slot in sorted({a.slot for a in resident}):
                rows = [i for i, a in enumerate(resident) if a.slot == slot]
                adapter = resident[rows[0]]
                pooled = pool_hidden(hidden[rows].float(), mask[rows], adapter.pooling)
                logits = pooled @ adapter.head["weight"].float().T.to(self.device) + adapter.head["bias"].float().to(self.device)
                probs = logits.softmax(-1)
                for i, p in zip(rows, probs):
                    label_id = int(p.argmax())
                    names = adapter.labels or [str(k) for k in range(len(p))]
                    results[i] = {"adapter": adapter.name, "label": names[label_id], "label_id": label_id,
                                  "probs": dict(zip(names, p.tolist()))}
            return results
