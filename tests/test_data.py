"""Data: every format reads the same rows; tokenization masks prompts and packs; bad rows name file and row."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from peft_adapt import UserInputError
from peft_adapt.data import (
    IGNORE_INDEX,
    Example,
    TaskSpec,
    build_label_map,
    parse_examples,
    read_domain,
    read_rows,
    split_off_eval,
    tokenize_causal_lm,
)

ROWS = [{"text": "first row", "label": 0}, {"text": "second, with a comma", "label": 1}, {"text": "third", "label": 1}]


def test_jsonl_csv_parquet_and_datasets_folder_read_the_same_rows(tmp_path):
    import datasets
    import pandas as pd

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    task = TaskSpec(type="classification")
    expected = parse_examples(read_rows(tmp_path / "d.jsonl"), task, tmp_path, build_label_map(read_rows(tmp_path / "d.jsonl"), tmp_path))
    for name in ("d.csv", "d.parquet", "folder", "dict"):
        rows = read_rows(tmp_path / name)
        got = parse_examples(rows, task, tmp_path / name, build_label_map(rows, tmp_path / name))
        assert [(e.text, e.label) for e in got] == [(e.text, e.label) for e in expected], name


def test_prompt_tokens_are_masked_out_of_the_loss(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = Example(1, prompt="Question: what is x?", completion=" Answer: x is a name.")
    (feature,) = tokenize_causal_lm([ex], tok, max_length=200, packing=False)
    n_prompt = len(tok(ex.prompt)["input_ids"])
    assert feature["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    completion = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert feature["labels"][n_prompt:] == completion
    assert feature["input_ids"][n_prompt:] == completion


def test_packing_fills_blocks_of_max_length_with_every_token(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = [f"sentence number {i} about packing" for i in range(20)]
    features = tokenize_causal_lm([Example(i, text=t) for i, t in enumerate(texts)], tok, 16, packing=True)
    total = sum(len(tok(t)["input_ids"]) + 1 for t in texts)
    assert all(len(f["input_ids"]) == 16 for f in features[:-1])
    assert sum(len(f["input_ids"]) for f in features) == total


def test_eval_split_is_carved_from_train_without_overlap():
    examples = [Example(i, text=f"t{i}") for i in range(50)]
    train, held = split_off_eval(examples, 0.2, seed=1, source="x")
    assert len(held) == 10 and len(train) == 40
    assert not {e.row for e in train} & {e.row for e in held}
    again_train, again_held = split_off_eval(examples, 0.2, seed=1, source="x")
    assert [e.row for e in again_held] == [e.row for e in held]


def test_label_map_keeps_integer_ids_and_their_names():
    rows = list(enumerate([{"text": "a", "label": 1, "label_name": "pos"}, {"text": "b", "label": 0, "label_name": "neg"}], 1))
    assert build_label_map(rows, "f").names == ["neg", "pos"]
    named = list(enumerate([{"text": "a", "label_name": "sports"}, {"text": "b", "label_name": "arts"}], 1))
    labels = build_label_map(named, "f")
    assert labels.names == ["arts", "sports"]
    assert [e.label for e in parse_examples(named, TaskSpec(type="classification"), "f", labels)] == [1, 0]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "ok", "label": 0}, {"body": "no text", "label": 1}], "row 2: missing field 'text'"),
        ([{"text": "", "label": 0}, {"text": "ok", "label": 1}], "row 1: field 'text' must be a non-empty string"),
        ([{"text": "no label"}], "row 1: missing field 'label'"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": None}], r"row 2: label is null"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": "pos"}], r"labels mix integer ids and names \(row 1 has 0, "
                                                                    r"row 2 has 'pos'\)"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": 1.0}], r"row 2: label 1.0 is a number with a fraction part"),
        ([{"text": "a", "label": 0.5}, {"text": "b", "label": 1}], r"row 1: label 0.5 is a fraction"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], r"every training row has label '1'"),
    ],
)
def test_bad_rows_name_the_file_and_row(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserInputError, match=message) as err:
        read_domain(TaskSpec(type="classification"), path)
    assert "bad.jsonl" in str(err.value)


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserInputError, match=r"broken.jsonl: line 2: not valid JSON"):
        read_rows(path)


def test_empty_dataset_and_missing_file_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserInputError, match="empty.jsonl: the dataset is empty"):
        read_rows(tmp_path / "empty.jsonl")
    with pytest.raises(UserInputError, match="nothere.jsonl does not exist"):
        read_rows(tmp_path / "nothere.jsonl")


def test_eval_label_outside_the_training_label_map_is_refused(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label": 1}, {"text": "c", "label": 7}])
    with pytest.raises(UserInputError, match=r"eval.jsonl: row 2: label 7 is outside the label map"):
        read_domain(TaskSpec(type="classification"), train, eval_path=held)


def test_causal_lm_rows_need_text_or_prompt_and_completion(tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "fine"}, {"prompt": "only a prompt"}])
    with pytest.raises(UserInputError, match="lm.jsonl: row 2: missing field 'completion'"):
        read_domain(TaskSpec(type="causal_lm"), path)


def test_non_utf8_bytes_are_named_with_their_line(tmp_path):
    from peft_adapt import load_recipe

    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "fine"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserInputError, match=r"latin1.jsonl: line 2: byte 0xe9 is not UTF-8"):
        read_rows(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("name: caf\xe9\nbase: {model: x}\n".encode("latin-1"))
    with pytest.raises(UserInputError, match=r"recipe.yaml: line 1: byte 0xe9 is not UTF-8"):
        load_recipe(recipe)
