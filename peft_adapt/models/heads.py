"""Sequence-classification head that pools the way the encoder was trained.

`AutoModelForSequenceClassification` puts BERT's head on the pooler (CLS token), which a
sentence-transformer such as all-MiniLM-L6-v2 never trained; a head on it stays near chance. This
head pools `mean` (sentence-transformers), `cls` (the first token's hidden state) or `last` (the last
real token, for decoder-only models), chosen in the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput, TokenClassifierOutput

from .crf import CRF, words_of

POOLINGS = ("mean", "cls", "last")


def default_pooling(model_path: Path, is_decoder: bool) -> str:
    """`mean` for sentence-transformers folders that say so, `last` for decoders, else `cls`."""
    pooling_config = Path(model_path) / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        modes = json.loads(pooling_config.read_text())
        if modes.get("pooling_mode_mean_tokens"):
            return "mean"
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "last" if is_decoder else "cls"


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, tokens, hidden] -> [batch, hidden], over real tokens only."""
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "cls":  # the first real token, with padding on either side
        first = attention_mask.argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    # last real token; works with padding on either side
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy over the labelled items, or their sum over `num_items_in_batch` when Trainer passes it.

    Trainer counts the labelled items of the whole step (all micro-batches, all processes) and then
    multiplies the loss by the number of processes; a head that ignored the count and returned a mean
    trained on a loss (and gradients) scaled by that number.
    """
    logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    total = nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)


class EncoderWithHead(nn.Module):
    """A transformer encoder (`AutoModel`, kept as `encoder`) under a head of our own: what every head shares."""

    # Trainer passes `num_items_in_batch` to models that accept loss kwargs; these heads use it
    accepts_loss_kwargs = True

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # Trainer and peft read model.config
        self.name_or_path = getattr(encoder, "name_or_path", None)  # peft records it as the base

    @property
    def device(self) -> torch.device:
        return self.encoder.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def enable_input_require_grads(self):
        self.encoder.enable_input_require_grads()

    def encode(self, input_ids, attention_mask, past_key_values, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states [batch, tokens, hidden] and the mask of their real tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for unused in ("output_attentions", "output_hidden_states", "return_dict", "inputs_embeds"):
            if kwargs.get(unused) is None:
                kwargs.pop(unused, None)
        if past_key_values is not None:  # prefix tuning: peft passes the prefixes as a cache
            kwargs["past_key_values"] = past_key_values
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        # with prefix tuning the mask also covers the virtual tokens in front: keep the real tokens' part
        return hidden.float(), attention_mask[:, -hidden.shape[1]:]


class SequenceClassifier(EncoderWithHead):
    """A transformer encoder (`AutoModel`) + pooling + a linear head named `classifier`."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__(encoder)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels, dtype=torch.float32, device=self.device)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool_hidden(hidden, attention_mask, self.pooling)

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, return_pooled=False,
                num_items_in_batch=None, **kwargs):
        hidden, mask = self.encode(input_ids, attention_mask, past_key_values, kwargs)
        pooled = self.pool(hidden, mask)
        logits = self.classifier(self.dropout(pooled))
        loss = summed_cross_entropy(logits, labels, num_items_in_batch) if labels is not None else None
        # return_pooled: the pooled features, for domain-adaptation objectives
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=(pooled,) if return_pooled else None)


class TokenClassifier(SequenceClassifier):
    """A tag per token: the same encoder, a linear head on every token's hidden state."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, return_pooled=False,
                num_items_in_batch=None, **kwargs):
        hidden, mask = self.encode(input_ids, attention_mask, past_key_values, kwargs)
        logits = self.classifier(self.dropout(hidden))
        loss = summed_cross_entropy(logits, labels, num_items_in_batch) if labels is not None else None
        pooled = (pool_hidden(hidden, mask, "mean"),) if return_pooled else None
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=pooled)


class CRFTokenClassifier(TokenClassifier):
    """The token classifier's head as emissions under a CRF over the words' tags (crf.py): with labels it returns
    the sequences' negative log-likelihood (per labelled word, as the softmax head's loss is) and, in eval mode,
    logits whose argmax at each word start is the Viterbi tag, so every argmax reader scores the CRF's decoding.
    Without labels the word starts are unknown: the logits are the emissions."""

    def __init__(self, encoder: nn.Module, tags: list[str], pooling: str = "mean", dropout: float = 0.1):
        super().__init__(encoder, len(tags), pooling, dropout)
        self.crf = CRF(tags).to(self.device)

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, return_pooled=False,
                num_items_in_batch=None, **kwargs):
        out = super().forward(input_ids, attention_mask, None, past_key_values, return_pooled, None, **kwargs)
        if labels is None:
            return out
        starts = labels != -100
        rows = starts.any(1)  # a row whose words were all cut off has nothing to score
        emissions, mask = words_of(out.logits[rows], starts[rows])
        tags, _ = words_of(labels[rows], starts[rows])
        loss = self.crf.neg_log_likelihood(emissions, tags, mask).sum() / (num_items_in_batch or mask.sum())
        logits = out.logits
        if not self.training:
            logits = logits.detach().clone()
            for row, path in zip(rows.nonzero().flatten().tolist(), self.crf.decode(emissions, mask)):
                positions = starts[row].nonzero().flatten()
                logits[row, positions, torch.tensor(path, device=logits.device)] += 1e4
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class MaskedLMHead(nn.Module):
    """BERT's prediction head: a dense layer, GELU and LayerNorm, then the input embeddings (tied, frozen) and a
    bias over the vocabulary. Trained in full with the adapter; the dense layer starts as the identity."""

    def __init__(self, hidden: int, vocab: int, eps: float, device):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, dtype=torch.float32, device=device)
        with torch.no_grad():
            self.dense.weight.copy_(torch.eye(hidden))
            self.dense.bias.zero_()
        self.norm = nn.LayerNorm(hidden, eps=eps, dtype=torch.float32, device=device)
        self.bias = nn.Parameter(torch.zeros(vocab, dtype=torch.float32, device=device))

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        h = self.norm(nn.functional.gelu(self.dense(hidden)))
        return h @ embeddings.float().T + self.bias


class MaskedLanguageModel(EncoderWithHead):
    """An encoder + `MaskedLMHead` named `mlm_head`: trains a domain adapter on unlabeled text. While training, the
    vocabulary logits are computed at the masked positions only (the loss needs no others)."""

    def __init__(self, encoder: nn.Module):
        super().__init__(encoder)
        config = encoder.config
        self.mlm_head = MaskedLMHead(config.hidden_size, config.vocab_size, getattr(config, "layer_norm_eps", 1e-12),
                                     self.device)

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, num_items_in_batch=None,
                **kwargs):
        kwargs.pop("return_pooled", None)
        hidden, _ = self.encode(input_ids, attention_mask, past_key_values, kwargs)
        embeddings = self.encoder.get_input_embeddings().weight
        if labels is not None and self.training:
            chosen = labels != -100
            logits = self.mlm_head(hidden[chosen], embeddings)
            return MaskedLMOutput(loss=summed_cross_entropy(logits, labels[chosen], num_items_in_batch), logits=logits)
        logits = self.mlm_head(hidden, embeddings)
        loss = summed_cross_entropy(logits, labels, num_items_in_batch) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)
