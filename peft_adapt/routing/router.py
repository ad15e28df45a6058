"""Routing: which domain adapter an input belongs to, read from the adapters' domain signatures.

A *signature* is a sample of a domain's inputs as the base model sees them: the mean over tokens of the base's
hidden states at one layer (no adapter), for up to `SIGNATURE_ROWS` rows of the adapter's training text, each cut
to `ROUTE_TOKENS` tokens. It is written beside the adapter's weights (`signature.safetensors`, checksummed in the
manifest like every file of the folder) when the adapter is trained, or later from a text file
(`peft-adapt registry sign`).

A *router* over a set of signed adapters of one base and task is linear discriminant analysis on those samples:
one mean per domain, one shared covariance shrunk toward its diagonal's average. Per input it gives the nearest
domain and a calibrated confidence: the posterior of the domains, softmax(-d^2 / 2T), its temperature T and the
shrinkage fitted by cross-fitting on the signatures themselves (each half of every sample scored by the router of
the other half). An input whose distance to every domain is beyond what held-out rows of the domains ever reach
(their `FAR_QUANTILE`, x `FAR_MARGIN`) is *far*: it goes to the base. Below the confidence threshold the route is
a weighted mix of the top-k domains (weights: their renormalised posteriors), or the base.

Routing reads the base's hidden states at the signature's layer only: the forward stops there (`base_features`),
so at layer 0 (the embeddings, the default) routing costs one embedding lookup.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import read_texts
from ..errors import UserInputError
from ..formats import SIGNATURE_FILE as SIGNATURE
from ..formats.files import MIN_SIGNATURE_ROWS, check_signature_file
from ..models.backbone import load_backbone
from ..models.builtin_models import sha256_file
from ..models.model_files import BaseSpec
from ..registry.refs import AUTO, Auto, mix_of, parse_ref

log = logging.getLogger("peft_adapt.routing")

SIGNATURE_ROWS = 512  # rows of a domain's text kept in its signature (Amazon: 89.8% at 256 rows, 91.1% at 512)
ROUTE_TOKENS = 256  # each input is read up to this many tokens, at signing and at routing (Amazon: 89.4% at 128)
DEFAULT_LAYER = 0  # the hidden state read: 0 is the embeddings' output (chosen by benchmarks/routing.py)
SHRINKAGE = (0.05, 0.2, 0.5, 0.9)  # the shared covariance's pull toward its diagonal's average, fitted per router
FAR_QUANTILE, FAR_MARGIN = 0.99, 2.0
MIN_ROWS = MIN_SIGNATURE_ROWS  # a signature of fewer rows says too little about its domain


class _Reached(Exception):
    """Raised by the hook at the layer routing reads: the rest of the forward is not needed."""


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The base's transformer layers: the first module list as long as the config's layer count."""
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UserInputError(f"{type(model).__name__}: no list of {count} transformer layers found to route from")


@torch.no_grad()
def base_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """[rows, hidden] float32: the mean over real tokens of hidden state `layer` (0: what the first layer takes),
    computed by running the model only up to there."""
    layers = layer_stack(model)
    if not 0 <= layer <= len(layers):
        raise UserInputError(f"routing layer {layer}: this base has hidden states 0 to {len(layers)}")
    seen: list[torch.Tensor] = []

    def before(_module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    def after(_module, _args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)
        raise _Reached

    hook = (layers[0].register_forward_pre_hook(before, with_kwargs=True) if layer == 0
            else layers[layer - 1].register_forward_hook(after))
    try:
        model(input_ids=ids, attention_mask=mask)
    except _Reached:
        pass
    finally:
        hook.remove()
    hidden = seen[0].float()
    weights = mask[:, -hidden.shape[1]:].to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def token_rows(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, cut to ROUTE_TOKENS (as routing reads them)."""
    return tokenizer(list(texts), truncation=True, max_length=ROUTE_TOKENS)["input_ids"]


def features_of_rows(model: nn.Module, rows: list[list[int]], pad_token_id: int, layer: int, device,
                     batch_size: int = 32) -> torch.Tensor:
    """Features of token-id rows (each cut to ROUTE_TOKENS), right-padded, `batch_size` at a time."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    rows = [rows[i] for i in order]
    parts = []
    for start in range(0, len(rows), batch_size):
        chunk = [list(r[:ROUTE_TOKENS]) or [pad_token_id] for r in rows[start : start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        parts.append(base_features(model, ids, mask, layer).cpu())
    if not parts:
        return torch.zeros(0)
    features = torch.empty_like(torch.cat(parts))
    features[torch.tensor(order)] = torch.cat(parts)
    return features


def row_lengths(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([max(1, min(len(r), ROUTE_TOKENS)) for r in rows], dtype=torch.float64)


# ---------------------------------------------------------------- signatures on disk


@dataclass
class Signature:
    features: torch.Tensor  # [rows, hidden] float32
    layer: int
    tokens: float = float(ROUTE_TOKENS)  # the rows' median length in tokens


def write_signature(folder: Path, features: torch.Tensor, layer: int, tokens: float) -> Path:
    from safetensors.torch import save_file

    if features.shape[0] < MIN_ROWS:
        raise UserInputError(f"a domain signature needs at least {MIN_ROWS} rows of text; got {features.shape[0]}")
    path = Path(folder) / SIGNATURE
    save_file({"features": features.to(torch.float16).contiguous()}, str(path), metadata={"layer": str(layer), "tokens": str(float(tokens))})
    return path


def read_signature(folder: Path) -> Signature | None:
    """The folder's signature, or None when it has none."""
    from safetensors import safe_open

    path = Path(folder) / SIGNATURE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return Signature(f.get_tensor("features").float(), int(meta.get("layer", DEFAULT_LAYER)),
                         float(meta.get("tokens", ROUTE_TOKENS)))


def input_text(example) -> str:
    """What a served request of this example would send: its prompt, text, words, or its conversation's turns
    but the assistant's."""
    if example.prompt is not None:
        return example.prompt
    if example.messages:
        return "\n".join(m.get("content", "") for m in example.messages if m.get("role") != "assistant")
    if example.words:
        return " ".join(example.words)
    return example.text


def sign(model: nn.Module, tokenizer, texts: list[str], device, layer: int = DEFAULT_LAYER) -> Signature:
    """A signature of a seeded sample of `texts`, read as routing reads inputs."""
    texts = sample_rows([t for t in texts if t.strip()])
    if len(texts) < MIN_ROWS:
        raise UserInputError(f"a domain signature needs at least {MIN_ROWS} non-empty texts; got {len(texts)}")
    rows = token_rows(tokenizer, texts)
    features = features_of_rows(model, rows, tokenizer.pad_token_id, layer, device)
    return Signature(features, layer, float(row_lengths(rows).median()))


def sample_rows(rows: list, seed: int = 0) -> list:
    """Up to SIGNATURE_ROWS rows, drawn with a fixed seed (not the file's first rows: files are often sorted)."""
    import random

    if len(rows) <= SIGNATURE_ROWS:
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), SIGNATURE_ROWS))]


# ---------------------------------------------------------------- the router


@dataclass
class Route:
    """Where one input goes: `adapter` (None: the base), or for a mix the adapters' weights."""

    adapter: str | None
    confidence: float  # the posterior of the nearest domain
    nearest: str
    weights: dict[str, float] = field(default_factory=dict)  # a mix: adapter -> weight (summing to 1)
    far: bool = False  # beyond every domain: the base (or, with no base to fall back on, the nearest)
    distance: float = 0.0  # squared distance to the nearest domain, in units of the shared covariance

    @property
    def serve_as(self) -> str | None:
        """The name the runtime serves this row with: the adapter, a mix, or None (the base)."""
        return mix_name(self.weights) if self.weights else self.adapter

    def as_dict(self) -> dict:
        return {"adapter": self.adapter, "confidence": round(self.confidence, 6), "nearest": self.nearest,
                "weights": self.weights, "far": self.far, "distance": round(self.distance, 3)}


class _Discriminant:
    """Means and the shrunk shared precision of a set of labelled feature rows."""

    def __init__(self, samples: list[torch.Tensor], shrinkage: float):
        self.means = torch.stack([s.mean(0) for s in samples]).double()
        centred = torch.cat([s.double() - s.double().mean(0) for s in samples])
        dof = max(centred.shape[0] - len(samples), 1)
        covariance = centred.T @ centred / dof
        average = covariance.diagonal().mean().clamp(min=1e-12)
        eye = torch.eye(covariance.shape[0], dtype=covariance.dtype)
        self.precision = torch.linalg.inv((1 - shrinkage) * covariance + shrinkage * average * eye)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, domains] squared Mahalanobis distances, expanded as x'Px - 2x'Pm + m'Pm: rows x hidden^2 work,
        where the difference of every row from every mean (rows x domains x hidden^2) grew with the square of the
        domains a router names (16 names: 44 s and 580 MiB on a 576-wide base)."""
        x = x.double()
        px = x @ self.precision
        own = (px * x).sum(-1, keepdim=True)
        means = ((self.means @ self.precision) * self.means).sum(-1)
        return (own - 2 * px @ self.means.T + means).clamp(min=0)


class Router:
    def __init__(self, names: list[str], signatures: list[Signature]):
        if len(names) < 1:
            raise UserInputError("a router needs at least one signed adapter")
        layers = {s.layer for s in signatures}
        if len(layers) != 1:
            raise UserInputError(f"the signatures of {', '.join(names)} read different layers {sorted(layers)}: sign "
                                 f"them again at one layer (peft-adapt registry sign)")
        self.names, self.layer = list(names), layers.pop()
        self.tokens = float(torch.tensor([s.tokens for s in signatures]).median())
        self.mixable = True
        samples = [s.features for s in signatures]
        self.shrinkage, self.temperature, self.far_distance = self._calibrate(samples)
        self.discriminant = _Discriminant(samples, self.shrinkage)

    @staticmethod
    def _calibrate(samples: list[torch.Tensor]) -> tuple[float, float, float]:
        """Shrinkage and temperature that make held-out rows' posteriors of their own domain most likely, and the
        distance held-out rows stay within; each half of every sample is scored by the discriminant of the other."""
        halves = [(s[0::2], s[1::2]) for s in samples]
        best = None
        for shrinkage in SHRINKAGE:
            held_out, own = [], []
            for a, b in ((0, 1), (1, 0)):
                fitted = _Discriminant([h[a] for h in halves], shrinkage)
                for j, h in enumerate(halves):
                    held_out.append(fitted.distances(h[b]))
                    own += [j] * h[b].shape[0]
            distances, own = torch.cat(held_out), torch.tensor(own)
            temperature, nll = _fit_temperature(distances, own)
            if best is None or nll < best[0]:
                best = (nll, shrinkage, temperature, distances)
        _, shrinkage, temperature, distances = best
        nearest = distances.min(1).values
        far = float(torch.quantile(nearest, FAR_QUANTILE)) * FAR_MARGIN
        return shrinkage, temperature, far

    def far_scale(self, lengths: torch.Tensor | None, rows: int) -> torch.Tensor:
        """Per row, what its distance is multiplied by before the far test: a mean of fewer tokens strays further
        from its own domain (on the quickstart domains, 34 of 300 held-out rows cut to 16 tokens were beyond the
        unscaled threshold, none at sqrt(n / the signatures' length)). The posterior reads the unscaled distances:
        scaled, it was far less confident than it was right (0.52 mean confidence at 97% accuracy, 32 tokens)."""
        if lengths is None:
            return torch.ones(rows, dtype=torch.float64)
        return (lengths.double() / self.tokens).clamp(max=1.0).sqrt()

    def route(self, features: torch.Tensor, lengths: torch.Tensor | None = None, threshold: float = 0.5,
              top_k: int = 2, fallback: str = "mix", has_base: bool = True) -> list[Route]:
        """One Route per row (`lengths`: its tokens). `fallback` below `threshold`: 'mix' (top-k weighted), 'base'
        or 'nearest'."""
        if fallback not in ("mix", "base", "nearest"):
            raise UserInputError(f"routing fallback {fallback!r}: use mix, base or nearest")
        distances = self.discriminant.distances(features)
        posteriors = (-distances / (2 * self.temperature)).softmax(-1)
        scales = self.far_scale(lengths, distances.shape[0])
        routes = []
        for d, p, scale in zip(distances, posteriors, scales):
            best = int(p.argmax())
            nearest, confidence, distance = self.names[best], float(p[best]), float(d.min())
            if distance * float(scale) > self.far_distance:
                routes.append(Route(None if has_base else nearest, confidence, nearest, far=True, distance=distance))
            elif confidence >= threshold or fallback == "nearest" or len(self.names) == 1:
                routes.append(Route(nearest, confidence, nearest, distance=distance))
            elif fallback == "base" and has_base:
                routes.append(Route(None, confidence, nearest, distance=distance))
            else:
                top = p.topk(min(top_k, len(self.names)))
                total = float(top.values.sum())
                weights = {self.names[int(i)]: round(float(v) / total, 2) for v, i in zip(top.values, top.indices)}
                weights = {k: w for k, w in weights.items() if w > 0}
                routes.append(Route(nearest if len(weights) == 1 else None, confidence, nearest,
                                    weights if len(weights) > 1 else {}, distance=distance))
        return routes


def _fit_temperature(distances: torch.Tensor, own: torch.Tensor) -> tuple[float, float]:
    """The temperature (a log grid, then refined) minimising the held-out rows' negative log-likelihood; at least 1,
    the Gaussian model's own posterior (on domains the held-out rows separate perfectly, the likelihood would keep
    rising as the temperature fell to 0, and every route would claim certainty)."""
    def nll(t: float) -> float:
        return float(nn.functional.cross_entropy(-distances / (2 * t), own))

    grid = [10.0 ** (k / 4) for k in range(0, 25)]
    best = min(grid, key=nll)
    fine = [t for t in (best * 10.0 ** (k / 40) for k in range(-10, 11)) if t >= 1.0]
    best = min(fine, key=nll)
    return best, nll(best)


def mix_name(weights: dict[str, float]) -> str:
    """The resident name of a routed mix; it says its parts, so an evicted mix can be loaded again from its name."""
    return str(mix_of(weights))


def is_auto(name) -> bool:
    return isinstance(name, str) and (name == AUTO or name.startswith(AUTO + ":"))


# ---------------------------------------------------------------- routers over the registry


def members(registry, selector: str, fingerprint: str, task: str,
            shape: tuple[int, int] | None = None) -> list[tuple[str, object, Signature]]:
    """The registry entries a router selector names, each checked to be of this base and task and to carry a
    signature whose checksum holds and which fits the base (`shape`: its hidden width and layers). `auto` takes the
    latest version of every signed adapter of the base and task (task adapters that stack on a domain adapter are
    left out: they are served as stacks); one whose signature is unusable is left out with a log line, so it
    never fails the others' requests. An adapter named outright must be usable."""

    router = parse_ref(selector)
    if not isinstance(router, Auto):
        raise UserInputError(f"router {selector!r}: name one as auto, auto:TAG or auto:NAME,NAME,...")
    if router.names:
        entries = [(ref, registry.get(ref)) for ref in router.names]
        named = True
    else:
        latest: dict[str, object] = {}
        for e in registry.list(base=fingerprint, tag=router.tag):
            if e.task == task and (e.name not in latest or e.version > latest[e.name].version):
                latest[e.name] = e
        entries, named = [(e.name, e) for e in latest.values()], False
    chosen = []
    for serve_as, e in entries:
        if e.fingerprint != fingerprint or e.task != task:
            raise UserInputError(f"{e.ref} is a {e.task} adapter of base {e.base_model!r}; a router serves one base "
                                 f"and task ({task} here)")
        manifest = e.manifest
        if manifest.stack_on and not named:
            continue
        if SIGNATURE not in manifest.files:
            if named:
                raise UserInputError(f"{e.ref} has no domain signature: give it one with `peft-adapt registry sign "
                                     f"{e.name} TEXT_FILE`")
            continue
        try:
            signature = _usable_signature(e, shape)
        except UserInputError as exc:
            if named:
                raise
            log.warning("routing leaves %s out: %s", e.ref, exc)
            continue
        chosen.append((serve_as, e, signature))
    if not chosen:
        other = sorted({e.task for e in registry.list(base=fingerprint) if e.task != task
                        and SIGNATURE in e.manifest.files})
        hint = (f"the signed adapters of this base are {', '.join(other)} ones: route with that task "
                f"(--task {other[0]})" if other else "adapters trained by this version are signed, others take "
                "`peft-adapt registry sign NAME FILE`")
        raise UserInputError(f"router {selector!r}: no signed {task} adapter of this base in the registry; {hint}")
    return chosen


def _usable_signature(entry, shape: tuple[int, int] | None) -> Signature:
    """The entry's signature, read only if its checksum holds and it is well formed, and checked against the base."""
    path = entry.path / SIGNATURE
    if sha256_file(path) != entry.manifest.files[SIGNATURE]:
        raise UserInputError(f"{entry.ref}: its signature does not match the manifest's checksum")
    check_signature_file(path)
    signature = read_signature(entry.path)
    if shape is not None:
        width, layers = shape
        if signature.features.shape[1] != width or signature.layer > layers:
            raise UserInputError(f"{entry.ref}: its signature reads {signature.features.shape[1]} features at layer "
                                 f"{signature.layer}; this base has {width} features and {layers} layers. Sign it "
                                 f"again (peft-adapt registry sign {entry.name} TEXT_FILE)")
    return signature


class Routers:
    """The routers one base and task has built, one per canonical selector, each rebuilt when the registry changes;
    bounded, since selectors come from requests. A build reads only the registry and the signatures, never the
    model: it runs in whichever thread asks (the server asks from a worker thread, before the batcher needs it),
    and requests for one selector wait for one build."""

    def __init__(self, fingerprint: str, task: str, limit: int = 64, shape: tuple[int, int] | None = None):
        self.fingerprint, self.task, self.limit, self.shape = fingerprint, task, limit, shape
        self._built: dict[str, tuple[int, Router]] = {}  # selector -> (registry changes when built, router)
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}

    def get(self, registry, selector: str) -> Router:
        selector = str(parse_ref(selector))
        with self._lock:
            building = self._building.setdefault(selector, threading.Lock())
        with building:  # one build per selector at a time; the others find it built
            changes = registry.changes()
            cached = self._built.get(selector)
            if cached is not None and cached[0] == changes:
                return cached[1]
            router = self._build(registry, selector)
            with self._lock:
                if len(self._built) >= self.limit:
                    self._built.clear()
                    self._building = {selector: building}
                self._built[selector] = (changes, router)
            return router

    def _build(self, registry, selector: str) -> Router:
        chosen = members(registry, selector, self.fingerprint, self.task, self.shape)
        router = Router([name for name, _, _ in chosen], [signature for _, _, signature in chosen])
        manifests = [e.manifest for _, e, _ in chosen]
        # classifiers mix only with one label map and pooling; otherwise a low-confidence row takes the nearest
        router.mixable = self.task == "causal_lm" or len({(tuple(m.labels or ()), m.pooling) for m in manifests}) == 1
        return router


def sign_registered(registry, ref: str, texts_file, text_field: str = "text", quantization: str | None = None,
                    device: str = "auto"):
    """A new version of `ref` carrying a signature of the texts in `texts_file` (a data file's `text_field`, or one
    text per line), read by its base as routing reads inputs. Returns the new entry."""
    import tempfile


    entry = registry.get(ref)
    if entry.task == "masked_lm" or entry.task is None:
        raise UserInputError(f"{entry.ref} is a {entry.task} adapter; routing picks adapters that serve requests")
    texts = [text for _, text in read_texts(texts_file, text_field)]
    manifest = entry.manifest
    spec = BaseSpec(model=manifest.base_model, quantization=quantization or manifest.quantization or "nf4",
                    device=device)
    backbone = load_backbone(spec, "causal_lm" if entry.task == "causal_lm" else "encoder")
    if backbone.fingerprint["id"] != entry.fingerprint:
        raise UserInputError(f"{entry.ref} was trained on another base than {manifest.base_model!r} is now")
    signature = sign(backbone.model.eval(), backbone.tokenizer, texts, backbone.device)
    with tempfile.TemporaryDirectory() as scratch:
        path = write_signature(Path(scratch), signature.features, signature.layer, signature.tokens)
        return registry.add_files(entry.ref, {SIGNATURE: path})
