"""The README.md an adapter folder carries: what it is, and how to load it with plain transformers + peft.

peft writes an empty template card; ours says what the adapter was trained for and gives a snippet that runs
without this package (tested), including our classification heads, which are not a transformers architecture.
"""

from __future__ import annotations

from ..models.builtin_models import portable_name

_POOL = {
    "mean": "        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)\n"
            "        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)",
    "cls": "        pooled = hidden[torch.arange(len(hidden)), attention_mask.argmax(1)]  # the first real token",
    "last": "        last = (attention_mask * torch.arange(attention_mask.shape[1])).argmax(1)  # the last real token\n"
            "        pooled = hidden[torch.arange(len(hidden)), last]",
}


def _causal_lm_snippet(base: str) -> str:
    return f'''```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE = "{base}"
ADAPTER = "."  # this folder

tokenizer = AutoTokenizer.from_pretrained(BASE)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER).eval()
batch = tokenizer(["Hello"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
```'''


def _classifier_snippet(base: str, task: str, labels: list[str], pooling: str, max_length: int) -> str:
    if task == "classification":
        head = _POOL[pooling] + "\n        return self.classifier(pooled)"
        what = f"the encoder, {pooling} pooling over real tokens, a linear head"
    else:
        head = "        return self.classifier(hidden)  # a tag per token"
        what = "the encoder and a linear head on every token"
    return f'''```python
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

BASE = "{base}"
ADAPTER = "."  # this folder
LABELS = {labels!r}


class Classifier(torch.nn.Module):
    """The architecture the adapter was trained in: {what}."""

    def __init__(self, encoder, num_labels):
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
{head}


tokenizer = AutoTokenizer.from_pretrained(BASE)
encoder = AutoModel.from_pretrained(BASE)
model = PeftModel.from_pretrained(Classifier(encoder, len(LABELS)), ADAPTER).eval()
batch = tokenizer(["An example text."], truncation=True, max_length={max_length}, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
```'''


def model_card(name: str, task: str, method: str, base_model: str, labels: list[str] | None, pooling: str | None,
               max_length: int, peft_loadable: bool) -> str:
    base = portable_name(base_model)
    lines = [f"# {name}", "", f"A {method} adapter for **{task}** on `{base}`, trained with "
             f"[peft_adapt](https://pypi.org/project/peft-adapt/). `manifest.json` says what it was trained on, how "
             f"well it did, and the sha256 of every file.", ""]
    if labels:
        lines += [f"Labels: {', '.join(f'`{label}`' for label in labels)}.", ""]
    lines += ["## With peft_adapt", "", "```bash", f"peft-adapt registry import . --base {base_model}",
              "```", ""]
    if not peft_loadable:
        lines += ["## Without peft_adapt", "", f"A {method} adapter is in peft_adapt's own format (peft has no "
                  f"such method), so it loads with peft_adapt only.", ""]
    elif task == "causal_lm":
        lines += ["## With plain transformers + peft", "", _causal_lm_snippet(base), ""]
    else:
        lines += ["## With plain transformers + peft", "",
                  "The head is this package's own (it pools as the encoder was trained), so it is defined here:", "",
                  _classifier_snippet(base, task, labels or [], pooling or "mean", max_length), ""]
    return "\n".join(lines)
