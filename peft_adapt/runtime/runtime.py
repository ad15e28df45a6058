"""`AdapterRuntime`: one base held once, many resident adapters, one adapter per call or per row.

    rt = AdapterRuntime("smollm2-135m", quantization="nf4", max_adapters=32)
    rt.load("medical")                                   # from the registry (name, name@3, name@tag) or a folder
    rt.load("med-legal", weights={"medical": 0.5, "legal": 0.5})   # a linear combination, one slot
    rt.generate(["Q: ...", "Q: ..."], adapters=["medical", "legal"])
    rt.logits(["some text"], adapters="medical")
    rt.classify(texts, adapters="books-domain+sentiment")  # a stack: domain adapter(s) under a task adapter (LoRA)

Adapters of stacked methods (see `methods/`) are read into the runtime's own stacked tensors at adapted sites
(`sites.py`), never through peft's loading path, so loading after the model has served is as exact as loading
before; rows of any mix of them run as one batch. Methods that cannot be stacked (prefix tuning) run their rows as
one group per adapter, through the method's group model around the shared base: their cost grows with the number
of distinct such adapters. Every public method holds one lock: concurrent calls from several threads each get what
they would get alone. With `batch_invariant`, every row runs alone, unpadded: its output never depends on its
batch-mates.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from ..data.tokenize import encode_words
from ..errors import UserInputError
from ..methods import AdapterWeights
from ..models.backbone import BaseSpec, load_backbone
from ..models.crf import tag_rows
from ..models.heads import pool_hidden
from ..registry.refs import AUTO
from ..routing.router import (
    ROUTE_TOKENS,
    Route,
    Router,
    Routers,
    features_of_rows,
    is_auto,
    row_lengths,
    token_rows,
)
from .adapters import ResidentAdapters
from .batch import AdapterBatch
from .decoding import Sampling, decode, per_row
from .encoding import encode
from .residency import Residency, ResidentAdapter
from .tagging import entities, words_of_inputs

TASKS = ("causal_lm", "classification", "seq2seq")


LOGPROB_BLOCK = 256  # positions scored at once by token_logprobs


class AdapterRuntime:
    def __init__(self, base: str | BaseSpec, task: str = "causal_lm", quantization: str = "nf4",
                 registry=None, max_adapters: int | None = None, max_bytes: int | None = None,
                 initial_capacity: int = 8, device: str = "auto",
                 batch_invariant: bool = False):
        if task not in TASKS:
            raise UserInputError(f"runtime task {task!r} is not known; use {' or '.join(TASKS)}")
        spec = base if isinstance(base, BaseSpec) else BaseSpec(model=base, quantization=quantization, device=device)
        self.task = task
        self.backbone = load_backbone(spec, "encoder" if task == "classification" else task)
        self.model = self.backbone.model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = self.backbone.tokenizer
        # the longest row the base can take: learned position tables (BERT, GPT-2) end there
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.device = self.backbone.device
        self._lock = threading.RLock()
        self.adapters = ResidentAdapters(self.backbone, task, registry, max_adapters, max_bytes, initial_capacity,
                                         self._lock)
        self.context = self.adapters.context
        # each row runs alone, unpadded: its outputs never depend on its batch-mates (see `batch_invariant` below)
        self.batch_invariant = batch_invariant
        width, layers = (getattr(self.model.config, k, None) for k in ("hidden_size", "num_hidden_layers"))
        self._routers = Routers(self.backbone.fingerprint["id"], task,
                                shape=(width, layers) if width and layers else None)

    # ------------------------------------------------------------ adapters in and out: ResidentAdapters's

    @property
    def registry(self):
        return self.adapters.registry

    @property
    def residency(self) -> Residency:
        return self.adapters.residency

    @property
    def sites(self) -> dict:
        return self.adapters.sites

    def load(self, name: str, weights: dict[str, float] | None = None, pin: bool = False,
             force: bool = False) -> ResidentAdapter:
        """Make `name` resident: a registry ref or adapter folder, or with `weights` a linear combination
        {ref: coefficient} of LoRA adapters under the new name `name`. Loading again refreshes it."""
        return self.adapters.load(name, weights, pin, force)

    def load_weights(self, name: str, weights: AdapterWeights, pin: bool = False) -> ResidentAdapter:
        """Make weights already in memory resident under `name` (not reloadable after eviction)."""
        return self.adapters.load_weights(name, weights, pin)

    def unload(self, name: str) -> None:
        self.adapters.unload(name)

    def ensure_resident(self, name: str) -> ResidentAdapter:
        return self.adapters.ensure_resident(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        self.adapters.pin(name, pinned)

    def resident(self) -> list[str]:
        return self.adapters.resident()

    def stats(self) -> dict:
        return self.adapters.stats()

    def sync_with_registry(self) -> list[str]:
        return self.adapters.sync_with_registry()

    # ------------------------------------------------------------ routing

    def router(self, selector: str = AUTO) -> Router:
        """The router `selector` names (`auto`, `auto:TAG`, `auto:a,b`), built from the registry's signatures of
        this base and task; rebuilt when the registry changes. Built without the runtime's lock (a build reads
        signatures, not the model), so serving goes on while one is built."""
        return self._routers.get(self.registry, selector)

    def route(self, inputs, router: str = AUTO, threshold: float = 0.5, top_k: int = 2,
              fallback: str | None = None) -> list[Route]:
        """Where each input (text or token ids) goes: the nearest domain's adapter with its confidence; below
        `threshold` a top-k mix (or `fallback` 'base' / 'nearest'); far from every domain, the base (a classifier,
        having no base head, takes the nearest). Reads the base's hidden states at the router's layer only."""
        if isinstance(inputs, str):
            raise UserInputError("pass a list of texts (one per row), not a single string")
        if not is_auto(router):
            raise UserInputError(f"router {router!r}: name one as auto, auto:TAG or auto:NAME,NAME,...")
        chosen = self.router(router)  # built (or found) before the lock: serving goes on meanwhile
        with self._lock:
            rows = token_rows(self.tokenizer, list(inputs)) if inputs and isinstance(inputs[0], str) else \
                [list(r)[:ROUTE_TOKENS] for r in inputs]
            features = features_of_rows(self.model, rows, self.tokenizer.pad_token_id, chosen.layer, self.device)
            fallback = fallback or ("mix" if chosen.mixable else "nearest")
            if fallback == "mix" and not chosen.mixable:
                fallback = "nearest"
            return chosen.route(features, row_lengths(rows), threshold, top_k, fallback,
                                has_base=self.task == "causal_lm")

    def _routed(self, inputs, adapters) -> tuple[list, list[Route | None]]:
        """Per-row adapter names with every `auto` row routed (the route kept for the caller)."""
        names = [self.adapters.key(n) for n in _per_row(adapters, len(inputs))]
        routes: list[Route | None] = [None] * len(names)
        for selector in {n for n in names if is_auto(n)}:
            rows = [i for i, n in enumerate(names) if n == selector]
            for i, r in zip(rows, self.route([inputs[i] for i in rows], selector)):
                names[i], routes[i] = r.serve_as, r
        return names, routes

    # ------------------------------------------------------------ running

    def _plan(self, adapters, rows: int) -> tuple[list[ResidentAdapter | None], list[int], dict[str, list[int]]]:
        """Each row's adapter (made resident), the rows that run stacked, and the rows of each adapter whose method
        runs as a group (not stacked)."""
        names = [self.adapters.key(n) for n in _per_row(adapters, rows)]
        wanted = {n for n in names if n is not None}
        resident = [None if n is None else self.adapters.use(n, keep=wanted) for n in names]
        stacked = [i for i, a in enumerate(resident) if a is None or a.group_model is None]
        grouped: dict[str, list[int]] = {}
        for i, a in enumerate(resident):
            if a is not None and a.group_model is not None:
                grouped.setdefault(a.name, []).append(i)
        return resident, stacked, grouped

    def _batch(self, adapters, rows: int) -> tuple[AdapterBatch, list[ResidentAdapter | None]]:
        """The stacked batch of rows that all run stacked (no grouped adapter among them)."""
        resident, stacked, grouped = self._plan(adapters, rows)
        if grouped:
            raise UserInputError(f"{sorted(grouped)[0]} runs as a group, not stacked; use logits() or generate()")
        return self._stacked_batch([resident[i] for i in stacked]), resident

    def _stacked_batch(self, resident: list[ResidentAdapter | None]) -> AdapterBatch:
        slots = [0 if a is None else a.slot for a in resident]
        methods = {a.slot: (a.method, a.extent) for a in resident if a is not None}
        return AdapterBatch.build(slots, methods, self.device)

    def _encode(self, inputs, padding_side: str = "right", limits: list[int | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return encode(self.tokenizer, self.max_positions, inputs, padding_side, limits)

    def _forward(self, batch: AdapterBatch | None, model=None, **inputs):
        self.context.current = batch
        try:
            with torch.no_grad():
                return (model or self.model)(**inputs)
        finally:
            self.context.current = None

    def token_logprobs(self, ids: list[int], adapter: str | None, start: int, top: int
                       ) -> list[tuple[float | None, dict[int, float]]]:
        """For each position p >= `start` of a token-id sequence: the log-probability the model (with `adapter`)
        gave ids[p] after ids[:p], and its `top` most likely tokens there (None and {} at position 0, which nothing
        predicts). Computed in one forward over the whole sequence, in fp32, from the model's own distribution (no
        temperature): what a completion's `logprobs` and `echo` report."""
        with torch.no_grad():
            logits = self.logits([list(ids)], adapters=[adapter])[0]
        result = [(None, {})] if start == 0 else []
        first = max(start, 1)
        # a block of positions at a time: the fp32 log-softmax of a long prompt over a large vocabulary (4k tokens x
        # 128k entries: 2 GB) is never held whole beside the logits
        for block in range(first, len(ids), LOGPROB_BLOCK):
            rows = logits[block - 1 : min(block - 1 + LOGPROB_BLOCK, len(ids) - 1)].float().log_softmax(-1)
            for offset, row in enumerate(rows):
                best = row.topk(top) if top > 0 else None
                result.append((float(row[ids[block + offset]]),
                               {int(i): float(v) for v, i in zip(*best)} if best else {}))
        return result

    def logits(self, inputs, adapters=None, attention_mask: torch.Tensor | None = None,
               padding_side: str = "right") -> torch.Tensor:
        """Next-token logits [rows, tokens, vocab]. `inputs`: texts, token-id lists, or an id tensor with
        its attention mask (padding on either side); `adapters`: one name for all rows or one per row."""
        if self.task != "causal_lm":
            raise UserInputError(f"logits() is for causal LM runtimes; this one is {self.task}: use "
                                 f"{'target_logits()' if self.task == 'seq2seq' else 'classify()'}")
        with self._lock:
            if isinstance(inputs, torch.Tensor):
                ids, mask = inputs, attention_mask if attention_mask is not None else torch.ones_like(inputs)
            else:
                ids, mask = self._encode(inputs, padding_side)
            ids, mask = ids.to(self.device), mask.to(self.device)
            if any(is_auto(n) for n in _per_row(adapters, ids.shape[0])):
                rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
                adapters, _ = self._routed(rows, adapters)
            if self.batch_invariant and ids.shape[0] > 1:
                return self._logits_row_by_row(ids, mask, adapters)
            resident, stacked, grouped = self._plan(adapters, ids.shape[0])
            out = None
            if stacked:
                rows = torch.tensor(stacked, device=self.device)
                positions = (mask[rows].cumsum(-1) - 1).clamp(min=0)  # real tokens keep their positions under left padding
                part = self._forward(self._stacked_batch([resident[i] for i in stacked]), input_ids=ids[rows],
                                     attention_mask=mask[rows], position_ids=positions).logits
                out = part.new_zeros(ids.shape[0], *part.shape[1:])
                out[rows] = part
            for name, rows in grouped.items():
                part = self._group_logits(resident[rows[0]], ids[rows], mask[rows])
                if out is None:
                    out = part.new_zeros(ids.shape[0], *part.shape[1:])
                out[torch.tensor(rows, device=self.device)] = part
            return out

    def _logits_row_by_row(self, ids: torch.Tensor, mask: torch.Tensor, adapters) -> torch.Tensor:
        """Batch-invariant logits: each row alone, without its padding, put back at its own positions."""
        names = _per_row(adapters, ids.shape[0])
        out = None
        for i, name in enumerate(names):
            real = mask[i].bool()
            row = self.logits(ids[i : i + 1, real], adapters=[name])[0]
            if out is None:
                out = row.new_zeros(ids.shape[0], ids.shape[1], row.shape[-1])
            out[i, real] = row
        return out

    def _group_logits(self, adapter: ResidentAdapter, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of one grouped adapter's rows: run right-padded, as peft trained them, then put back."""
        lengths = mask.sum(1).tolist()
        real = [row[m.bool()] for row, m in zip(ids, mask)]
        right_ids = torch.full_like(ids, self.tokenizer.pad_token_id)
        right_mask = torch.zeros_like(mask)
        for i, tokens in enumerate(real):
            right_ids[i, : len(tokens)] = tokens
            right_mask[i, : len(tokens)] = 1
        logits = self._forward(None, model=adapter.group_model, input_ids=right_ids, attention_mask=right_mask).logits
        out = torch.zeros_like(logits)
        for i, n in enumerate(lengths):
            out[i, mask[i].bool()] = logits[i, :n]
        return out

    def generate(self, prompts, adapters=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 return_tokens: bool = False, min_new_tokens: int = 0) -> list:
        """Continue each prompt (texts or token-id lists) with its row's adapter; greedy unless do_sample."""
        sampling = Sampling(max_new_tokens, min_new_tokens, do_sample, temperature, top_p, top_k, seed)
        new: list[list[int]] = []
        for step in self.generate_stream(prompts, adapters, sampling):
            new = new or [[] for _ in step]
            for row, token in zip(new, step):
                if token is not None:
                    row.append(token)
        if return_tokens:
            return new
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in new]

    def generate_stream(self, prompts, adapters, sampling: Sampling | list[Sampling]) -> Iterator[list[int | None]]:
        """Yield each step's new token for every row (None for a row that has ended). `sampling`: one for all
        rows, or one per row (a batch of requests: each row samples with its own settings and seed, and ends at its
        own `max_new_tokens`). Holds the runtime's lock until the stream is exhausted or closed."""
        if self.task == "classification":
            raise UserInputError("generate() is for causal LM and seq2seq runtimes; use classify()")
        rows = 1 if isinstance(prompts, str) else len(prompts)
        samplings = per_row(sampling, rows)
        if min(s.max_new_tokens for s in samplings) < 1:
            raise UserInputError(f"max_new_tokens must be at least 1, got {min(s.max_new_tokens for s in samplings)}")
        if self.task == "seq2seq":  # written whole, then given out a step at a time
            with self._lock:
                written = self._seq2seq_generate(prompts, adapters, samplings)
            for step in range(max(map(len, written))):
                yield [row[step] if step < len(row) else None for row in written]
            return
        if self.batch_invariant and rows > 1:
            yield from self._generate_row_by_row(prompts, adapters, samplings)
            return
        with self._lock:
            ids, mask = self._encode(prompts, padding_side="left")  # generation appends on the right
            for length, row in zip(mask.sum(1).tolist(), samplings):
                if length + row.max_new_tokens > self.max_positions:
                    raise UserInputError(f"a prompt of {length} tokens plus {row.max_new_tokens} new tokens exceeds "
                                         f"the {self.max_positions} positions this base takes; shorten the prompt or "
                                         f"max_new_tokens")
            ids, mask = ids.to(self.device), mask.to(self.device)
            if any(is_auto(n) for n in _per_row(adapters, ids.shape[0])):
                adapters, _ = self._routed([r[m.bool()].tolist() for r, m in zip(ids, mask)], adapters)
            resident, stacked, grouped = self._plan(adapters, ids.shape[0])
            eos = self.tokenizer.eos_token_id
            # grouped adapters run through their group model's generate, one group each, before the stacked rows stream
            done: dict[int, list[int]] = {}
            for group in grouped.values():
                # one generate() per setting: rows of one request (or equal requests) together
                for same, rows_alike in _by_sampling(group, samplings).items():
                    done.update(self._group_generate(resident[rows_alike[0]], rows_alike, ids, mask, same))
            steps = iter(())
            if stacked:
                index = torch.tensor(stacked, device=self.device)
                sub_ids, sub_mask = _trim_left_padding(ids[index], mask[index])
                batch = self._stacked_batch([resident[i] for i in stacked])
                chosen = sampling if isinstance(sampling, Sampling) else [samplings[i] for i in stacked]
                steps = decode(lambda *a: self._step(batch, *a), sub_ids, sub_mask, chosen, eos, self.max_positions)
            for step in range(max(s.max_new_tokens for s in samplings)):
                tokens: list[int | None] = [None] * ids.shape[0]
                stacked_step = next(steps, None)
                for i, token in zip(stacked, stacked_step or []):
                    tokens[i] = token
                for i, row in done.items():
                    tokens[i] = row[step] if step < len(row) else None
                if stacked_step is None and all(step >= len(row) for row in done.values()):
                    return
                yield tokens

    def _generate_row_by_row(self, prompts, adapters, samplings: list[Sampling]) -> Iterator[list[int | None]]:
        """Batch-invariant decoding: every row is its own stream (its own cache and, when sampling, its own seeded
        generator), stepped in turn; each produces exactly what it produces alone."""
        streams = [self.generate_stream([prompt], [name], row)
                   for prompt, name, row in zip(prompts, _per_row(adapters, len(prompts)), samplings)]
        try:
            with self._lock:
                for _ in range(max(s.max_new_tokens for s in samplings)):
                    tokens = [(next(stream, None) or [None])[0] for stream in streams]
                    if all(t is None for t in tokens):
                        return
                    yield tokens
        finally:
            for stream in streams:
                stream.close()

    def _step(self, batch: AdapterBatch, ids, mask, positions, cache) -> torch.Tensor:
        self.context.current = batch
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                 use_cache=True, logits_to_keep=1)
        finally:
            self.context.current = None
        return out.logits[:, -1]

    def _seq2seq_generate(self, prompts, adapters, samplings: list[Sampling]) -> list[list[int]]:
        """Encoder-decoder rows: the encoder reads each prompt, the decoder writes, and every adapted layer of both
        maps each row to its adapter (transformers' generate keeps the rows in order with one beam). Rows with the
        same sampling settings run together, as one generate() each."""
        if isinstance(prompts, str):
            raise UserInputError("pass a list of prompts (one per row), not a single string")
        if any(is_auto(n) for n in _per_row(adapters, len(prompts))):
            raise UserInputError("auto routes causal LM and classifier rows; name a seq2seq adapter for each row")
        ids, mask = self._encode(prompts, padding_side="right")
        ids, mask = ids.to(self.device), mask.to(self.device)
        resident, _, grouped = self._plan(adapters, ids.shape[0])
        if grouped:
            raise UserInputError(f"{sorted(grouped)[0]} runs as a group; seq2seq runtimes serve LoRA and IA3 adapters")
        if any(s.adjusts for s in samplings):
            raise UserInputError("presence_penalty, frequency_penalty and logit_bias are applied by the causal LM "
                                 "decoder; a seq2seq model's generate() takes none of them: leave them out")
        written: list[list[int]] = [[] for _ in resident]
        eos = self.tokenizer.eos_token_id
        for same, rows in _by_sampling(range(len(resident)), samplings).items():
            index = torch.tensor(rows, device=self.device)
            if same.seed is not None:
                torch.manual_seed(same.seed)
            options = self._generate_options(same) | {"num_beams": 1}
            self.context.current = self._stacked_batch([resident[i] for i in rows])
            try:
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids[index], attention_mask=mask[index], **options)
            finally:
                self.context.current = None
            for i, row in zip(rows, out[:, 1:].tolist()):  # after the decoder's start token
                written[i] = row[: row.index(eos) + 1] if eos in row else row
        return written

    def _generate_options(self, sampling: Sampling) -> dict:
        """transformers' generate() arguments for one row's sampling settings."""
        options = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
                       do_sample=sampling.do_sample, pad_token_id=self.tokenizer.pad_token_id)
        return options | (dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
                          if sampling.do_sample else dict(temperature=None, top_p=None, top_k=None))

    def target_logits(self, prompts, targets, adapters=None, max_length: int | None = None) -> torch.Tensor:
        """A seq2seq runtime's decoder logits [rows, target tokens, vocab] with each target as the decoder's input
        (teacher forcing): what an exported model is compared on. `max_length` cuts prompts and targets as
        training cut them."""
        if self.task != "seq2seq":
            raise UserInputError("target_logits() is for seq2seq runtimes")
        with self._lock:
            ids, mask = self._encode(prompts, padding_side="right", limits=[max_length] * len(prompts))
            labels, real = self._encode(targets, padding_side="right", limits=[max_length] * len(targets))
            labels = labels.masked_fill(real == 0, -100)  # the model shifts them right into the decoder's input
            resident, _, _ = self._plan(adapters, ids.shape[0])
            return self._forward(self._stacked_batch(resident), input_ids=ids.to(self.device),
                                 attention_mask=mask.to(self.device), labels=labels.to(self.device)).logits

    def _group_generate(self, adapter: ResidentAdapter, rows: list[int], ids, mask, sampling: Sampling) -> dict[int, list[int]]:
        if sampling.adjusts:
            raise UserInputError(f"{adapter.name} runs through its group model's generate(), which takes no "
                                 f"presence_penalty, frequency_penalty or logit_bias; leave them out for this adapter")
        index = torch.tensor(rows, device=self.device)
        sub_ids, sub_mask = _trim_left_padding(ids[index], mask[index])
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        options = self._generate_options(sampling)
        with torch.no_grad():
            out = adapter.group_model.generate(input_ids=sub_ids, attention_mask=sub_mask, **options)
        eos = self.tokenizer.eos_token_id
        result = {}
        for i, row in zip(rows, out[:, sub_ids.shape[1]:].tolist()):
            result[i] = row[: row.index(eos) + 1] if eos in row else row
        return result

    def classify(self, texts, adapters, batch_size: int = 32) -> list[dict]:
        """Label each text with its row's classification adapter (its own head and pooling). Texts are cut to
        the adapter's training `max_length` (and the base's positions) and run `batch_size` at a time."""
        if self.task != "classification":
            raise UserInputError("classify() is for classification runtimes (task='classification')")
        if isinstance(texts, str):
            raise UserInputError("pass a list of texts (one per row), not a single string")
        names = _per_row(adapters, len(texts))
        results: list[dict] = []
        for start in range(0, len(texts), batch_size):
            with self._lock:
                results += self._classify_batch(list(texts[start : start + batch_size]), names[start : start + batch_size])
        return results

    def _classify_batch(self, texts: list[str], names: list) -> list[dict]:
        if any(is_auto(n) for n in names):  # routed rows: the chosen adapter, and the route beside the label
            names, routes = self._routed(texts, names)
            results = self._classify_batch(texts, names)
            for result, route in zip(results, routes):
                if route is not None:
                    result["route"] = route.as_dict()
            return results
        if self.batch_invariant and len(texts) > 1:
            return [self._classify_batch([text], [name])[0] for text, name in zip(texts, names)]
        resident, stacked, grouped = self._plan(names, len(texts))
        _check_heads(resident, "classification", "tag (tag(), `peft-adapt tag`, POST /v1/tag)")
        limits = [min(a.max_length or self.max_positions, self.max_positions) for a in resident]
        ids, mask = self._encode(texts, limits=limits)
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self._encoder_hidden(resident, stacked, grouped, ids, mask)
        results: list[dict | None] = [None] * len(resident)
        for slot in sorted({a.slot for a in resident}):
            rows = [i for i, a in enumerate(resident) if a.slot == slot]
            adapter = resident[rows[0]]
            pooled = pool_hidden(hidden[rows].float(), mask[rows], adapter.pooling)
            logits = pooled @ adapter.head["weight"].float().T.to(self.device) + adapter.head["bias"].float().to(self.device)
            probs = logits.softmax(-1)
            names_of = adapter.labels or [str(k) for k in range(probs.shape[-1])]
            for i, p in zip(rows, probs):
                label_id = int(p.argmax())
                results[i] = {"adapter": adapter.name, "label": names_of[label_id], "label_id": label_id,
                              "probs": dict(zip(names_of, p.tolist())), "tokens": int(mask[i].sum())}
        return results

    def tag(self, inputs, adapters, batch_size: int = 32) -> list[dict]:
        """Tag each input's words with its row's token-classification adapter: a text (split on whitespace) or a
        list of words in, per row the words, their tags (Viterbi through the adapter's CRF where it has one) and
        the entities they spell. Inputs are cut to the adapter's training `max_length` as training cut them: words
        past the cut get no tag (`untagged` counts them)."""
        if self.task != "classification":
            raise UserInputError("tag() is for encoder runtimes (task='classification'), which serve token classifiers")
        rows = words_of_inputs(inputs)
        names = _per_row(adapters, len(rows))
        if any(is_auto(n) for n in names):
            raise UserInputError("tagging takes named adapters; auto routes texts for generate() and classify()")
        results: list[dict] = []
        for start in range(0, len(rows), batch_size):
            with self._lock:
                results += self._tag_batch(rows[start : start + batch_size], names[start : start + batch_size])
        return results

    def _tag_batch(self, rows: list[list[str]], names: list) -> list[dict]:
        if self.batch_invariant and len(rows) > 1:
            return [self._tag_batch([words], [name])[0] for words, name in zip(rows, names)]
        resident, stacked, grouped = self._plan(names, len(rows))
        _check_heads(resident, "token_classification",
                     "classify (classify(), `peft-adapt classify`, POST /v1/classify)")
        limits = [min(a.max_length or self.max_positions, self.max_positions) for a in resident]
        ids, mask, starts = encode_words(self.tokenizer, rows, limits)
        hidden = self._encoder_hidden(resident, stacked, grouped, ids.to(self.device), mask.to(self.device))
        results: list[dict | None] = [None] * len(rows)
        for slot in sorted({a.slot for a in resident}):
            index = [i for i, a in enumerate(resident) if a.slot == slot]
            adapter = resident[index[0]]
            labels = adapter.labels or [str(k) for k in range(adapter.head["weight"].shape[0])]
            tags = tag_rows(hidden[index], starts[index].to(self.device), adapter.head, labels)
            for i, row_tags in zip(index, tags):
                words = rows[i]
                results[i] = {"adapter": adapter.name, "words": words, "tags": row_tags,
                              "entities": entities(words[: len(row_tags)], row_tags),
                              "untagged": len(words) - len(row_tags), "tokens": int(mask[i].sum())}
        return results

    def _encoder_hidden(self, resident: list, stacked: list[int], grouped: dict[str, list[int]], ids: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states of every row: rows of stacked adapters in one pass, each prefix-tuned
        adapter's rows through its group model (the prefixes are its own keys and values)."""
        hidden = None
        parts = ([(stacked, self._stacked_batch([resident[i] for i in stacked]), None)] if stacked else []) + \
                [(rows, None, resident[rows[0]].group_model) for rows in grouped.values()]
        for rows, batch, model in parts:
            index = torch.tensor(rows, device=ids.device)
            out = self._forward(batch, model, input_ids=ids[index], attention_mask=mask[index]).last_hidden_state
            if hidden is None:
                hidden = out.new_zeros(ids.shape[0], *out.shape[1:])
            hidden[index] = out
        return hidden


def _check_heads(resident: list[ResidentAdapter | None], task: str, other: str) -> None:
    """Every row has an adapter of `task` (the base has no head of its own)."""
    for adapter in resident:
        if adapter is None:
            raise UserInputError(f"{task} needs an adapter for every row (the base has no head)")
        if (adapter.task or "classification") != task:
            raise UserInputError(f"{adapter.name} is a {adapter.task} adapter; serve it with {other}")


def _by_sampling(rows, samplings: list[Sampling]) -> dict[Sampling, list[int]]:
    """The rows (of `rows`) grouped by their sampling settings, each group in row order."""
    groups: dict[Sampling, list[int]] = {}
    for i in rows:
        groups.setdefault(samplings[i], []).append(i)
    return groups


def _per_row(adapters, rows: int) -> list:
    """One adapter name per row, from one name for all rows or a list of them."""
    names = [adapters] * rows if adapters is None or isinstance(adapters, str) else list(adapters)
    if len(names) != rows:
        raise UserInputError(f"{len(names)} adapter names for {rows} rows; give one per row, or one for all")
    return names


def _trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row (a group may be shorter than the whole batch)."""
    keep = int(mask.sum(1).max())
    return ids[:, ids.shape[1] - keep:], mask[:, mask.shape[1] - keep:]
