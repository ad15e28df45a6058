"""The runtime's resident adapters: read from the registry or a folder, checked against the base, mixed or stacked,
written into free slots of the stacked tensors at every adapted site (`sites.py`), evicted when room is needed, and
kept in step with the registry. `AdapterRuntime` (runtime.py) runs batches over them."""

from __future__ import annotations

import threading
import time
from collections import Counter

import torch

from ..errors import UserInputError
from ..formats import MANIFEST, folder_kind, read_adapter_config, read_manifest
from ..methods import AdapterWeights, method, method_of_folder
from ..models.backbone import Backbone
from ..registry.refs import Auto, Base, Mix, Stack, check_name, parse_ref, resolve
from ..registry.store import Registry
from .loading import check_adapter, check_shapes_fit
from .residency import SERVED_TASKS, Residency, ResidentAdapter
from .sites import AdaptedSite, BatchContext
from .stacks import check_part


class ResidentAdapters:
    """Every adapter resident on one base, in slots of the stacked tensors (slot 0: no adapter)."""

    def __init__(self, backbone: Backbone, task: str, registry=None, max_adapters: int | None = None,
                 max_bytes: int | None = None, initial_capacity: int = 8, lock: threading.RLock | None = None):
        self.backbone = backbone
        self.model = backbone.model
        self.task = task
        self.device = backbone.device
        self.dtype = torch.float32 if backbone.device.type == "cpu" else torch.bfloat16
        self._registry = registry
        self.residency = Residency(max_adapters, max_bytes)
        self.context = BatchContext()
        self.sites: dict[str, AdaptedSite] = {}
        self._capacity = max(2, initial_capacity)
        self._lock = lock or threading.RLock()
        self._registry_changes: int | None = None
        # rows now generating with each adapter (continuous batching): never evicted or replaced under them
        self.in_use: Counter[str] = Counter()
        self.refresh_pending: set[str] = set()  # in use when the registry changed them: new rows wait for the refresh

    @property
    def registry(self):
        if self._registry is None:
            self._registry = Registry()
        return self._registry

    def load(self, name: str, weights: dict[str, float] | None = None, pin: bool = False,
             force: bool = False) -> ResidentAdapter:
        """Make `name` resident: a registry ref or adapter folder, or with `weights` a linear combination
        {ref: coefficient} of LoRA adapters under the new name `name`. Loading again refreshes it."""
        key = name if weights else self.key(name)
        if key is None:
            raise UserInputError(f"{name!r} names the base model; load an adapter by its name, name@version or folder")
        return self._load(key, weights, pin, force, keep=set())

    def key(self, name) -> str | None:
        """The one spelling a resident adapter is keyed by (`books@latest` is `books`, `auto:b,a` is `auto:a,b`);
        None for the base. A name already resident (weights loaded under a name of the caller's) is its own key."""
        if name is None or name in self.residency:
            return name
        ref = parse_ref(name)
        return None if isinstance(ref, Base) else str(ref)

    def load_weights(self, name: str, weights: AdapterWeights, pin: bool = False) -> ResidentAdapter:
        """Make weights already in memory resident under `name` (not reloadable after eviction)."""
        with self._lock:
            return self._install(name, weights, {"source": "memory"}, pin, None, keep=set())

    def _load(self, name: str, weights: dict[str, float] | None, pin: bool, force: bool, keep: set[str]) -> ResidentAdapter:
        with self._lock:
            ref = parse_ref(name) if not weights else None
            if name is None or isinstance(ref, (Base, Auto)):
                raise UserInputError(f"{name!r} names the base model or a router; give the adapter another name")
            started = time.perf_counter()
            if isinstance(ref, Mix):  # a routed mix names its parts
                weights = ref.as_dict()
            if weights:
                adapter_weights, meta = self._mix(name, weights, force)
            elif isinstance(ref, Stack):
                adapter_weights, meta = self.stack(ref, force)
            else:
                adapter_weights, meta = self.read(ref, force)
            adapter = self._install(name, adapter_weights, meta, pin, weights, keep)
            self.residency.load_seconds += time.perf_counter() - started
            return adapter

    def _mix(self, name: str, weights: dict[str, float], force: bool) -> tuple[AdapterWeights, dict]:
        """sum_i w_i * adapter_i of adapters of one method as one adapter (LoRA exactly; others by averaging their
        tensors); classifiers mix their heads the same way (weights normalised): one label map and pooling."""
        if not isinstance(parse_ref(name), Mix):
            check_name(name)
        read = [(self.read(ref, force), float(w)) for ref, w in weights.items()]
        metas = [meta for (_, meta), _ in read]
        first = next(iter(weights))
        for ref, ((part, meta), _) in zip(weights, read):
            if part.method != read[0][0][0].method:
                raise UserInputError(f"{ref} is a {part.method} adapter and {first} a {read[0][0][0].method} one; "
                                     f"only adapters of one method can be mixed")
            if any(meta.get(k) != metas[0].get(k) for k in ("labels", "pooling", "task")):
                raise UserInputError(f"{ref} has labels {meta.get('labels')} (pooling {meta.get('pooling')}) and "
                                     f"{first} {metas[0].get('labels')} ({metas[0].get('pooling')}): "
                                     f"only classifiers with one label map and pooling can be mixed")
        combined = method(read[0][0][0].method).combine([(part, w) for (part, _), w in read])
        source = " + ".join(f"{w:g}*{ref}" for ref, w in weights.items())
        return combined, metas[0] | {"source": source, "version": None}

    def stack(self, stack, force: bool) -> tuple[AdapterWeights, dict]:
        """`domain+task` (bottom first): the parts' deltas summed as one adapter in one slot, served with the top
        part's head and label map. Each part is checked against this base like any adapter, so a stack never mixes
        bases."""
        stack = parse_ref(stack)
        refs = stack.parts
        read = [self.read(ref, force, role="top" if i == len(refs) - 1 else "under") for i, ref in enumerate(refs)]
        first = read[0][0]
        combined = method(first.method).stack([weights for weights, _ in read])
        versions = tuple(meta.get("version") for _, meta in read)
        return combined, read[-1][1] | {"source": str(stack), "version": None if None in versions else versions}

    def _install(self, name: str, weights: AdapterWeights, meta: dict, pin: bool, recipe, keep: set[str]) -> ResidentAdapter:
        """Put an adapter's weights into a fresh slot (or, for a method that cannot be stacked, its group model),
        evicting what must go."""
        adapting = method(weights.method)
        if adapting.stacked:
            sites = self._sites_for(adapting, weights)  # every site checked before anything is evicted or written
        if name in self.residency:
            self._refuse_if_in_use(name, "replace")
            self._evict(name, count=False)
        for victim in self.residency.victims_for(weights.nbytes, keep=keep | {name} | set(self.in_use)):
            self._evict(victim)
        slot = self.residency.allocate_slot()
        adapter = ResidentAdapter(
            name=name, slot=slot, method=weights.method, extent=weights.extent, nbytes=weights.nbytes,
            source=meta["source"], pinned=pin, head=weights.head, labels=meta.get("labels"),
            pooling=meta.get("pooling"), max_length=meta.get("max_length"), task=meta.get("task"),
            recipe=dict(recipe) if recipe else None, version=meta.get("version"),
        )
        try:
            if adapting.stacked:
                self._grow(slot)
                for path, site in weights.sites.items():
                    sites[path].components[weights.method].write(slot, site)
            else:
                adapter.group_model = adapting.group_model(weights, self.model)
        except BaseException:  # a write that fails part-way leaves no trace and frees its slot
            self.residency.add(adapter)
            self._evict(name, count=False)
            raise
        self.residency.add(adapter)
        return adapter

    def read(self, ref, force: bool, role: str = "alone") -> tuple[AdapterWeights, dict]:
        """The weights of a folder or registry ref (parsed), after checking they fit this base. `role`: served alone,
        or the top (task) part of a stack, or a (domain) part under it."""
        located = resolve(parse_ref(ref), self.registry)
        folder, source, version = located.folder, located.source, located.version
        manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
        if manifest is not None:
            check_adapter(folder, manifest, self.backbone, source, force)
            if role != "alone":
                check_part(source, manifest, self.task, top=role == "top")
            elif manifest.task not in SERVED_TASKS[self.task]:
                raise UserInputError(f"{source} is a {manifest.task} adapter; this runtime serves "
                                     f"{' and '.join(SERVED_TASKS[self.task])}")
            elif manifest.stack_on:
                under = manifest.stack_on["ref"]
                raise UserInputError(f"{source} was trained on top of domain adapter {under}: serve it as a stack, "
                                     f"{under.partition('@')[0]}+{ref} (or another domain's adapter under it)")
        else:  # a plain peft folder: no checksums to check, but every matrix must fit a layer of this base
            check_shapes_fit(folder, self.backbone, source)
        if folder_kind(folder) != "adapter":
            raise UserInputError(f"{source}: a fine-tuned baseline (trained_weights), not an adapter the runtime can serve")
        weights = method_of_folder(folder).read(folder, strip_prefix="encoder." if self.task == "classification" else "")
        if self.task == "classification" and role != "under" and not weights.head:
            raise UserInputError(f"{source}: a classification adapter needs its head (classifier weights)")
        task = manifest.task if manifest else _peft_task(folder, self.task)
        meta = {"source": source, "version": version, "labels": manifest.labels if manifest else None, "task": task,
                "pooling": (manifest.pooling if manifest else None) or "mean",
                "max_length": manifest.max_length if manifest else None}
        return weights, meta

    def _sites_for(self, adapting, weights: AdapterWeights) -> dict[str, AdaptedSite]:
        """The adapted site at every path the adapter names, each with this method's stack, after checking the
        weights fit the base layer there."""
        for path, site in weights.sites.items():
            adapting.check_site(path, site, self._base_layer(path))
        sites = {}
        for path, site in weights.sites.items():
            adapted = self._site(path)
            if weights.method not in adapted.components:
                adapted.add(weights.method, adapting.component(site, adapted.base_layer, self._capacity, self.dtype,
                                                               self.device))
            sites[path] = adapted
        return sites

    def _base_layer(self, path: str) -> torch.nn.Module:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise UserInputError(f"the adapter names layer {path!r}, which this base does not have") from None
        return module.base_layer if isinstance(module, AdaptedSite) else module

    def _site(self, path: str) -> AdaptedSite:
        """The adapted site at `path`, wrapping the base's layer there on first use."""
        if path not in self.sites:
            parent_path, _, child = path.rpartition(".")
            holder = self.model.get_submodule(parent_path) if parent_path else self.model
            self.sites[path] = AdaptedSite(getattr(holder, child), self.context)
            setattr(holder, child, self.sites[path])
        return self.sites[path]

    def _grow(self, slot: int) -> None:
        """Make every stack hold `slot` (doubling the slots as needed)."""
        capacity = self._capacity
        while slot >= capacity:
            capacity *= 2
        if capacity != self._capacity:
            self._capacity = capacity
            for site in self.sites.values():
                for component in site.components.values():
                    component.resize(capacity)

    def _evict(self, name: str, count: bool = True) -> None:
        adapter = self.residency.remove(name)
        for site in self.sites.values():
            for component in site.components.values():
                component.clear(adapter.slot)  # no trace of it remains in the stacks
        if count:
            self.residency.evictions += 1

    def sync_with_registry(self) -> list[str]:
        """Drop what the registry no longer says: a resident adapter loaded by registry name whose name now means
        another version (a new one, a moved tag) or nothing (removed) is evicted; a pinned one is loaded again at
        once. One cheap read of the registry's change counter when nothing changed. Returns the names affected."""
        if self._registry is None:
            return []
        changes = self.registry.changes()
        if changes == self._registry_changes:
            return []
        with self._lock:
            stale = []
            self.refresh_pending = set()
            for name, adapter in list(self.residency.adapters.items()):
                if adapter.version is None:  # a folder, a mix or weights in memory: not the registry's to change
                    continue
                now = self._version_now(name)
                if now != adapter.version and name in self.in_use:
                    self.refresh_pending.add(name)  # its running rows finish on the version they began with
                elif now != adapter.version:
                    stale.append(name)
                    self._evict(name, count=False)
                    if adapter.pinned and now is not None:
                        self._load(name, None, True, False, keep=set())
            if not self.refresh_pending:
                self._registry_changes = changes
            return stale

    def _version_now(self, name: str):
        """What the registry says `name` is now (a stack: each part's version), None if it names nothing."""
        try:
            ref = parse_ref(name)
            if isinstance(ref, Stack):
                return tuple(self.registry.get(part).version for part in ref.parts)
            return self.registry.get(ref).version
        except UserInputError:
            return None

    def unload(self, name: str) -> None:
        with self._lock:
            name = self.key(name)
            if name not in self.residency:
                raise UserInputError(f"adapter {name!r} is not resident; resident: {sorted(self.residency.adapters)}")
            self._refuse_if_in_use(name, "unload")
            self._evict(name, count=False)

    def _refuse_if_in_use(self, name: str, what: str) -> None:
        if self.in_use.get(name):
            raise UserInputError(f"adapter {name!r} is generating for {self.in_use[name]} running request(s); "
                                 f"{what} it once they finish")

    def ensure_resident(self, name: str) -> ResidentAdapter:
        """Load `name` now if it is not resident (a miss); a resident one is left as it is."""
        with self._lock:
            name = self.key(name)
            if name in self.residency:
                return self.residency.adapters[name]
            self.residency.misses += 1
            return self._load(name, None, False, False, keep=set())

    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned adapters are never evicted (loaded now if not resident)."""
        with self._lock:
            self.use(self.key(name)).pinned = pinned

    # resident() and stats() read without the lock: a health check or metrics scrape never waits for a batch
    # (a generation holds the lock for its whole stream); a read racing a load may miss that one adapter

    def resident(self) -> list[str]:
        return list(self.residency.adapters.copy())

    def stats(self) -> dict:
        r = self.residency
        components = [c for site in list(self.sites.values()) for c in list(site.components.values())]
        stack_bytes = sum(b.numel() * b.element_size() for c in components for b in c.buffers(recurse=False))
        return {
            "resident": len(r.adapters), "resident_adapter_bytes": r.resident_bytes, "stack_bytes": stack_bytes,
            "slots": self._capacity, "sites": len(self.sites),
            "hits": r.hits, "misses": r.misses,
            "evictions": r.evictions, "load_seconds": r.load_seconds,
        }

    def use(self, name: str, keep: set[str] = frozenset()) -> ResidentAdapter:
        """A resident adapter (a hit), or loaded now from where it came from (a miss), never evicting `keep`."""
        if name in self.residency:
            self.residency.hits += 1
            return self.residency.use(name)
        self.residency.misses += 1
        return self._load(name, None, False, False, keep=set(keep))


def _peft_task(folder, served: str) -> str:
    """A plain peft folder's task, from its config's task_type (TOKEN_CLS: token classification)."""
    config = read_adapter_config(folder)
    return "token_classification" if served == "classification" and config.task_type == "TOKEN_CLS" else served
