"""benchmarks/amazon_table.py pools the safeguard lines of runs split across processes: means over seeds per pair,
the issue's 0.5-point bar, the oracle agreement of the safeguard and of each criterion alone."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("amazon_table", ROOT / "benchmarks" / "amazon_table.py")
amazon_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(amazon_table)


def _criteria(dev_adapted: float, dev_plain: float) -> dict:
    common = {"snd": 5.0, "source_accuracy": 0.8, "target_entropy": 0.2}
    return {"adapted": common | {"dev_risk": dev_adapted}, "source_only": common | {"dev_risk": dev_plain}}


def _line(pair, seed, adapted, plain, selected, dev=(0.3, 0.4), rows=400) -> str:
    oracle = "adapted" if adapted > plain else "source_only" if adapted < plain else "either"
    return json.dumps({"name": "amazon_cross_domain_safeguard", "pair": pair, "method": "dann", "seed": seed,
                       "selected": selected, "oracle": oracle, "agrees": oracle in ("either", selected),
                       "adapted_accuracy": adapted, "source_only_accuracy": plain, "criteria": _criteria(*dev),
                       "rows": rows})


def test_runs_split_by_seed_pool_into_means_the_bar_and_agreement(tmp_path):
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    in_domain = json.dumps({"name": "amazon_cross_domain_in_domain", "domain": "kitchen", "seed": 0, "rows": 400,
                            "accuracy": 0.90})
    a.write_text("training noise\n" + "\n".join([
        in_domain,
        _line("books->kitchen", 0, 0.84, 0.80, "adapted"),
        _line("dvd->books", 0, 0.70, 0.75, "adapted", dev=(0.3, 0.4))]) + "\n")  # kept, wrong: -5
    b.write_text("\n".join([
        _line("books->kitchen", 1, 0.80, 0.80, "source_only", dev=(0.5, 0.4)),
        _line("dvd->books", 1, 0.745, 0.75, "source_only", dev=(0.5, 0.4))]) + "\n")  # fell back, right
    choices, domains = amazon_table.read_lines([a, b], None)
    report = amazon_table.summarise(choices, domains)[400]
    assert report["mean"][("books->kitchen", "dann")] == pytest.approx(0.82)
    assert report["mean"][("dvd->books", "dann+safeguard")] == pytest.approx(0.725)
    guarded = report["per_method"]["dann+safeguard"]
    assert guarded["below_bar"] == ["dvd->books"] and guarded["worst_gain"] == pytest.approx(-0.025)
    assert (guarded["agrees"], guarded["runs"]) == (3, 4)
    assert guarded["criteria_agree"]["dev_risk"] == 3  # DEV chose as the safeguard did in every run here
    assert guarded["criteria_agree"]["source_accuracy"] == 2  # equal accuracies vote adapted: wrong on dvd, both seeds
    assert "prior_gap" not in guarded["criteria_agree"]  # no line here reports it
    # the gap needs every target's in-domain figure: books has none here, so it is unknown rather than guessed
    assert guarded["gap_closed"] is None
    raw = report["per_method"]["dann"]
    assert raw["below_bar"] == ["dvd->books"] and raw["gain"] == pytest.approx((0.02 - 0.0275) / 2)


def test_a_drop_of_exactly_half_a_point_meets_the_bar_and_a_log_without_sizes_is_named(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(_line("books->dvd", 0, 0.810, 0.815, "adapted") + "\n")
    report = amazon_table.summarise(*amazon_table.read_lines([log], None))
    assert report[400]["per_method"]["dann+safeguard"]["below_bar"] == []
    # a criterion counts only where every line reports it: one line with the class-shares guard, one without
    line = json.loads(_line("books->dvd", 1, 0.82, 0.80, "source_only"))
    line["criteria"]["adapted"]["prior_gap"], line["criteria"]["source_only"]["prior_gap"] = 0.02, 0.05
    log.write_text(json.dumps(line) + "\n")
    assert amazon_table.summarise(*amazon_table.read_lines([log], None))[400]["per_method"]["dann+safeguard"][
        "criteria_agree"]["prior_gap"] == 1  # the adapted model leans less and the oracle kept it
    log.write_text(json.dumps(line) + "\n" + _line("books->dvd", 0, 0.810, 0.815, "adapted") + "\n")
    assert "prior_gap" not in amazon_table.summarise(*amazon_table.read_lines([log], None))[400]["per_method"][
        "dann+safeguard"]["criteria_agree"]
    old = tmp_path / "old.log"
    old.write_text(json.dumps(json.loads(_line("books->dvd", 0, 0.8, 0.8, "adapted")) | {"rows": None}) + "\n")
    with pytest.raises(SystemExit, match="old.log.*--rows"):
        amazon_table.read_lines([old], None)
    assert amazon_table.read_lines([old], 800)[0][0]["rows"] == 800


def test_in_domain_is_the_mean_over_seeds_from_lines_and_saved_runs_together(tmp_path):
    log = tmp_path / "s1.log"
    log.write_text(json.dumps({"name": "amazon_cross_domain_in_domain", "domain": "dvd", "seed": 1, "rows": 400,
                               "accuracy": 0.80}) + "\n" + _line("books->dvd", 1, 0.76, 0.74, "adapted") + "\n")
    for seed, accuracy in ((0, 0.70), (1, 0.99)):  # seed 1's saved figure is the line's run: the line wins
        folder = tmp_path / "out" / "runs" / f"source_only-{seed}" / "dvd"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"rows": {"train": 400}, "test": {"accuracy": accuracy}}))
    choices, in_domain = amazon_table.read_lines([log], None)
    amazon_table.in_domain_from_runs([tmp_path / "out"], in_domain)
    report = amazon_table.summarise(choices, in_domain)[400]
    assert report["in_domain"]["dvd"] == pytest.approx(0.75)
    assert report["per_method"]["dann"]["gap_closed"] == pytest.approx(0.02 / 0.01)  # gain 0.02 on a gap of 0.01


def test_rechoose_judges_logged_criteria_by_the_rule_now_in_the_code(tmp_path):
    """A line logged under an earlier rule (its cross-entropy DEV higher: fell back) is kept by the current one, which
    reads the base-space weighted errors, and its agreement with the oracle follows."""
    line = json.loads(_line("books->kitchen", 0, 0.84, 0.80, "source_only", dev=(0.5, 0.4)))
    for side, errors in (("adapted", 0.15), ("source_only", 0.2)):
        line["criteria"][side] |= {"dev_error_base": errors, "target_diversity": 0.99, "prior_gap": 0.01}
    line["criteria"]["adapted"]["source_drop_p"] = 0.5
    (again,) = amazon_table.rechoose([line])
    assert (line["selected"], line["agrees"]) == ("source_only", False)
    assert (again["selected"], again["agrees"]) == ("adapted", True) and "dev_error_base" in again["why"]


def test_a_run_started_again_into_the_same_folder_counts_once(tmp_path, capsys):
    """The second start appends what the first had written (deterministic: the same lines) and one run the first did
    not reach; a line for the same run that differs (a rerun on another machine) replaces the earlier one."""
    first = [_line("books->dvd", 0, 0.80, 0.78, "adapted"), _line("books->dvd", 1, 0.70, 0.78, "source_only")]
    log = tmp_path / "amazon_cross_domain.jsonl"
    log.write_text("\n".join(first + first + [_line("books->dvd", 2, 0.79, 0.78, "adapted")]) + "\n")
    choices, _ = amazon_table.read_lines([log], None)
    assert [c["seed"] for c in choices] == [0, 1, 2]
    report = amazon_table.summarise(choices, {})[400]
    assert report["mean"][("books->dvd", "dann")] == pytest.approx((0.80 + 0.70 + 0.79) / 3)
    assert report["per_method"]["dann+safeguard"]["runs"] == 3
    assert "again with other results" not in capsys.readouterr().err  # identical lines: nothing to say
    log.write_text(log.read_text() + _line("books->dvd", 0, 0.76, 0.78, "adapted") + "\n")
    choices, _ = amazon_table.read_lines([log], None)
    assert [(c["seed"], c["adapted_accuracy"]) for c in choices] == [(1, 0.70), (2, 0.79), (0, 0.76)]
    assert "dann on books->dvd at 400 rows, seed 0 again with other results" in capsys.readouterr().err


def test_a_method_cut_short_is_measured_against_source_only_on_its_own_seeds(tmp_path):
    """dann ran seeds 0 and 1, mmd only seed 0: mmd's gain is against seed 0's source-only, not the two seeds' mean."""
    mmd = json.loads(_line("books->dvd", 0, 0.82, 0.80, "adapted")) | {"method": "mmd"}
    log = tmp_path / "run.log"
    dann = [_line("books->dvd", 0, 0.81, 0.80, "adapted"), _line("books->dvd", 1, 0.75, 0.70, "adapted")]
    log.write_text("\n".join(dann + [json.dumps(mmd)]))
    report = amazon_table.summarise(*amazon_table.read_lines([log], None))[400]
    assert report["mean"][("books->dvd", "source_only")] == pytest.approx(0.75)  # the table's column: every seed
    assert report["per_method"]["mmd"]["gain"] == pytest.approx(0.02)  # not 0.82 - 0.75
    assert report["per_method"]["mmd"]["source_only"] == pytest.approx(0.80)
    assert report["per_method"]["dann"]["gain"] == pytest.approx(0.03)
