"""lm-evaluation-harness, a client nobody here wrote, against `peft-adapt serve` (issue 31).

Its `local-completions` backend scores a loglikelihood task (AG News topics as multiple choice: `logprobs` + `echo`
over token-array prompts) and a generation task (MedQuAD questions, greedy until a newline) through the server, a
registered adapter named as the model; its `hf` backend runs the same tasks on the plain transformers + peft model.
Every document's loglikelihoods agree within 1e-3 and the scores are equal.
"""

from __future__ import annotations

import json

import pytest
from test_runtime import make_lora
from test_server import KEY, _start

from peft_adapt import Registry

DOCS = 8
TOPICS = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, shared_data):
    """Two small tasks written as lm-eval task files over a few documents of the shared data."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    news = [json.loads(line) for line in (shared_data / "domain_text" / "news.jsonl").open()][:DOCS]
    with (folder / "topics.jsonl").open("w") as f:
        for row in news:
            f.write(json.dumps({"text": row["text"][:160], "label": row["label"]}) + "\n")
    medical = [json.loads(line) for line in (shared_data / "domain_text" / "medical.jsonl").open()][:DOCS]
    with (folder / "answers.jsonl").open("w") as f:
        for row in medical:
            question, _, answer = row["text"].partition("\nAnswer:")
            f.write(json.dumps({"question": question[:160], "answer": answer.strip()[:40]}) + "\n")
    (folder / "topics.yaml").write_text(f"""task: pa_topics
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'topics.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nTopic:"
doc_to_choice: {json.dumps([' ' + t for t in TOPICS])}
doc_to_target: label
metric_list:
  - metric: acc
""")
    (folder / "answers.yaml").write_text(f"""task: pa_answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'answers.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return folder


def _evaluate(model: str, model_args: str, task_folder) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["pa_topics", "pa_answers"],
                                   task_manager=TaskManager(include_path=str(task_folder)), log_samples=True,
                                   batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def _per_doc(results: dict) -> tuple[list[list[float]], list[str]]:
    choices = [[float(r[0][0]) for r in s["resps"]] for s in sorted(results["samples"]["pa_topics"],
                                                                   key=lambda s: s["doc_id"])]
    answers = [s["resps"][0][0] for s in sorted(results["samples"]["pa_answers"], key=lambda s: s["doc_id"])]
    return choices, answers


def test_lm_eval_through_the_server_scores_as_the_hf_backend(tmp_path, tiny_llama, task_folder, monkeypatch):
    adapter = make_lora(tiny_llama, tmp_path / "news-lora", 4, ["q_proj", "v_proj"], seed=5)
    registry = Registry(tmp_path / "reg")
    registry.import_peft(adapter, base=str(tiny_llama), name="news")
    proc, url = _start(tiny_llama, registry.root)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    try:
        served = _evaluate("local-completions", f"model=news,base_url={url}/v1/completions,tokenizer={tiny_llama},"
                                                f"tokenizer_backend=huggingface,tokenized_requests=True,"
                                                f"num_concurrent=1,max_retries=1,max_length=512", task_folder)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local = _evaluate("hf", f"pretrained={tiny_llama},peft={adapter},dtype=float32,max_length=512,device=cpu", task_folder)
    served_choices, served_answers = _per_doc(served)
    local_choices, local_answers = _per_doc(local)
    assert len(served_choices) == DOCS and all(len(c) == len(TOPICS) for c in served_choices)
    worst = max(abs(a - b) for s, h in zip(served_choices, local_choices) for a, b in zip(s, h))
    assert worst < 1e-3, worst
    assert served_answers == local_answers and any(served_answers)
    for task, metric in (("pa_topics", "acc,none"), ("pa_answers", "exact_match,none")):
        assert served["results"][task][metric] == local["results"][task][metric]
