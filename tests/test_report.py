"""The report (issue 11): margins, verdict lines, markdown and figures from evaluations."""
import json

import pytest

from kamal_attr import KamalError
from kamal_attr.report import check_out, explain, figures, margins, shortfalls, summarise, write_markdown


def evaluation(offset: float) -> dict:
    attributes = {"Black_Hair": {"best_source": 0.90, "min_entropy": 0.92, "component": 0.915 + offset,
                                 "target": 0.91 + offset},
                  "Bangs": {"best_source": 0.80, "min_entropy": 0.79, "component": 0.795,
                            "target": 0.78}}
    mean = {k: sum(r[k] for r in attributes.values()) / 2 for k in ("component", "target")}
    return {"attributes": attributes, "mean": mean,
            "claims": {"1_entropy_lower_when_correct": {"holds": True}},
            "entropy": {"correct": 0.2, "wrong": 0.4, "histogram": {
                "edges": [0.0, 0.3, 0.6931], "correct": [90.0, 10.0], "wrong": [40.0, 60.0]}},
            "cost": {"target": {"params": 1e6, "mflops": 40.0}, "num_teachers": 2,
                     "teachers_sum": {"params": 2e6, "mflops": 80.0}}}


def test_margins_and_the_verdict_name_the_smallest_margin():
    m = margins(evaluation(0.0))
    assert m["Black_Hair"]["component_vs_min_entropy"] == pytest.approx(-0.5)
    assert m["Bangs"]["target_vs_component"] == pytest.approx(-1.5)
    lines = summarise({"hair": {"1": evaluation(0.0), "2": evaluation(0.01)}})
    text = "\n".join(lines)
    assert "claim 1 (entropy lower when a teacher is right) holds for 2 of 2 seeds" in text
    assert "target within 1 point of its component (claim 3): **2/4** attribute runs; smallest " \
           "margin -1.50 (Bangs, seed 1)" in text
    assert "component ≥ its min-entropy choice − 0.5: **4/4**" in text


def test_a_missed_margin_is_explained_by_the_method_or_by_fitting():
    test = {"best_source": 0.86, "min_entropy": 0.85, "component": 0.81, "target": 0.76}
    under = {"best_source": 0.87, "min_entropy": 0.87, "component": 0.83, "target": 0.81}
    why = explain(test, under)
    assert why[0] == ("the component is -5.00 vs the best teacher: its min-entropy choice -1.00 "
                      "vs that teacher (the method's limit)")  # the rest: the next line
    assert why[1] == ("the component is -4.00 vs its min-entropy choice: -4.00 already on the "
                      "training images it learnt from (under-fitting), +0.00 more on unseen images")
    assert why[2] == ("the target is -5.00 vs its component: -2.00 already on the training images "
                      "it learnt from (under-fitting), -3.00 more on unseen images")
    fits = {"best_source": 0.87, "min_entropy": 0.87, "component": 0.87, "target": 0.87}
    assert [w.split(": ")[-1] for w in explain(test, fits)[1:]] == ["it generalises worse"] * 2
    # both steps within their tolerance, the sum beyond it: the split still names them
    small = {"best_source": 0.90, "min_entropy": 0.896, "component": 0.893, "target": 0.893}
    assert explain(small, None) == ["the component is -0.70 vs the best teacher: its min-entropy "
                                    "choice -0.40 vs that teacher, the component -0.30 vs its choice"]
    assert explain({"best_source": 0.9, "min_entropy": 0.91, "component": 0.907, "target": 0.9}, None) == []
    run = evaluation(0.0)
    run["train_split"] = {"Bangs": run["attributes"]["Bangs"]}
    lines = shortfalls({"hair": {"3256": run}})
    assert lines == ["- hair Bangs, seed 3256: the target is -1.50 vs its component: -1.50 already "
                     "on the training images it learnt from (under-fitting), +0.00 more on unseen images."]


def test_markdown_and_figures_are_written(tmp_path):
    runs = {"hair": {"3256": evaluation(0.0), "3257": evaluation(0.005)}}
    report = {"seeds": [3256, 3257], "runs": runs, "command": "python -m kamal_attr.report --demo",
              "seconds": 60.0, "torch": "x",
              "ablations": {"average": {"3256": evaluation(-0.01), "3257": evaluation(-0.02)}},
              "bridge_rms": {"with penalty": {"Bangs": [1.0, 0.9]},
                             "without penalty": {"Bangs": [1.0, 0.1]}}}
    pictures = figures(report, tmp_path)
    assert sorted(pictures) == ["ablations.png", "accuracy.png", "bridge_norms.png", "cost.png",
                                "entropy_histograms.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in pictures)
    text = write_markdown(report, pictures, tmp_path).read_text()
    assert "| Black_Hair | 90.00 ± 0.00 | 92.00 ± 0.00 | 91.75 ± 0.25 | 91.25 ± 0.25 |" in text
    assert "| average |" in text and "- without penalty: 1.000 -> 0.100" in text
    assert "## Where and why not" in text and "- hair Bangs, seed 3256: the target is -1.50" in text


THREE = "python -m kamal_attr.report --demo --seeds 3"


def test_a_folder_with_someone_elses_report_is_refused(tmp_path):
    (tmp_path / "report.md").write_text("my notes")
    (tmp_path / "cost.png").write_bytes(b"a picture")
    with pytest.raises(KamalError, match="holds report.md, cost.png, which this command did not write"):
        check_out(tmp_path, THREE, overwrite=True)
    (tmp_path / "report.json").write_text(json.dumps({"seeds": [1], "mine": "notes"}))
    with pytest.raises(KamalError, match="holds report.md, report.json, cost.png, which this"):
        check_out(tmp_path, THREE, overwrite=True)  # a "seeds" key alone proves nothing
    (tmp_path / "report.json").write_text(json.dumps({"seeds": [1], "runs": {}, "command": THREE}))
    assert check_out(tmp_path, THREE, overwrite=False) == ["report.md", "report.json", "cost.png"]


def test_a_report_of_other_settings_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"seeds": [1, 2, 3], "runs": {},
                                                      "command": THREE}))
    one = THREE.replace("3", "1") + " --no_ablations"
    with pytest.raises(KamalError, match=f"holds the report of `{THREE}`; this run .* pass another "
                                         "--out, or --overwrite"):
        check_out(tmp_path, one, overwrite=False)
    check_out(tmp_path, one, overwrite=True)
    check_out(tmp_path, None, overwrite=False)  # --replot redraws the report that is there


def test_an_output_folder_that_cannot_be_written_stops_before_the_work(tmp_path):
    (tmp_path / "notes").write_text("a file")
    with pytest.raises(KamalError, match="notes is a file, not a folder; pass another --out"):
        check_out(tmp_path / "notes" / "results", THREE, overwrite=False)


def test_replot_redraws_from_the_json_alone(tmp_path):
    from kamal_attr import report as module
    data = {"seeds": [3256], "runs": {"hair": {"3256": evaluation(0.0)}}, "ablations": {},
            "bridge_rms": {}, "command": "python -m kamal_attr.report --demo --seeds 1",
            "seconds": 6.0, "torch": "x"}
    (tmp_path / "report.json").write_text(json.dumps(data))
    module.main(module.get_args_parser().parse_args(["--demo", "--replot", "--out", str(tmp_path)]))
    assert "in 0.1 min" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "accuracy.png").exists() and not (tmp_path / "ablations.png").exists()


def test_figures_of_an_earlier_report_that_this_one_does_not_draw_are_removed(tmp_path):
    from kamal_attr import report as module
    data = {"seeds": [3256], "runs": {"hair": {"3256": evaluation(0.0)}}, "ablations": {},
            "bridge_rms": {}, "command": THREE, "seconds": 6.0, "torch": "x"}
    (tmp_path / "report.json").write_text(json.dumps({**data, "ablations": {"x": {}}}))
    (tmp_path / "ablations.png").write_bytes(b"the last report's ablations")
    (tmp_path / "mine.png").write_bytes(b"a picture of the user's")
    ours = check_out(tmp_path, THREE, overwrite=False)
    (tmp_path / "bridge_norms.png").write_bytes(b"put there after the check: not proven ours")
    module.write_report(data, tmp_path, ours)
    assert not (tmp_path / "ablations.png").exists() and (tmp_path / "mine.png").exists()
    assert (tmp_path / "bridge_norms.png").exists()
    assert json.loads((tmp_path / "report.json").read_text()) == data


def test_replot_draws_without_rewriting_the_record_and_an_incomplete_one_is_one_error(tmp_path):
    from kamal_attr import report as module
    record = json.dumps({"seeds": [3256], "runs": {"hair": {"3256": evaluation(0.0)}}}, indent=3)
    (tmp_path / "report.json").write_text(record)
    with pytest.raises(KamalError, match="report.json lacks 'ablations'; run the report again"):
        module.main(module.get_args_parser().parse_args(["--demo", "--replot", "--out", str(tmp_path)]))
    assert (tmp_path / "report.json").read_text() == record
    with pytest.raises(KamalError, match="--replot redraws the report in --out, so --overwrite"):
        module.main(module.get_args_parser().parse_args(["--demo", "--replot", "--overwrite",
                                                         "--out", str(tmp_path)]))
