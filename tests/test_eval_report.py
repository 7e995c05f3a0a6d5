"""eval.report's model labels (unique, nothing dropped silently) and MMHal's response file per run name."""
import json
from argparse import Namespace
from pathlib import Path

from eval import report


def _result(path: Path, model: str, bench: str, chair: float, created: str, model_name: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": bench, "model": model, "model_name": model_name or Path(model).name, "run_name": "",
           "created": created, "decoding": {"mode": "beam", "num_beams": 3, "max_new_tokens": 1024},
           "dataset": {"files_sha256": {}}, "judge": None,
           "metrics": {"CHAIRs": chair, "CHAIRs_refine": chair, "CHAIRi": chair, "obj_rec": 0.5}}
    f = path / f"eval_{bench}_{created[-2:]}.json"
    f.write_text(json.dumps(rec))
    return f


def _rows(table: str) -> dict[str, str]:
    lines = table.splitlines()[2:]
    return {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in lines if line.startswith("| ")}


def test_report_models_with_one_folder_name_keep_their_rows(tmp_path):
    out = tmp_path / "output"
    files = [_result(out / "dpo", "output/dpo/checkpoint-1000", "objhal", 0.31, "2026-01-01T00:00:01"),
             _result(out / "orpo", "output/orpo/checkpoint-1000", "objhal", 0.25, "2026-01-01T00:00:02"),
             _result(out / "sft", "output/sft", "objhal", 0.536, "2026-01-01T00:00:03"),
             _result(out / "x", "runs/a/dpo/checkpoint-1000", "objhal", 0.4, "2026-01-01T00:00:04")]
    rows = _rows(report.table(report.load(files)))
    assert rows == {"sft": "53.6", "output/dpo/checkpoint-1000": "31.0", "orpo/checkpoint-1000": "25.0",
                    "a/dpo/checkpoint-1000": "40.0"}


def test_report_same_name_given_to_two_models(tmp_path):
    files = [_result(tmp_path / "a", "output/dpo/checkpoint-1000", "objhal", 0.31, "2026-01-01T00:00:01", "mine"),
             _result(tmp_path / "b", "output/orpo/checkpoint-1000", "objhal", 0.25, "2026-01-01T00:00:02", "mine")]
    assert _rows(report.table(report.load(files))) == {"mine (dpo/checkpoint-1000)": "31.0",
                                                       "mine (orpo/checkpoint-1000)": "25.0"}


def test_report_names_a_replaced_run(tmp_path):
    old = _result(tmp_path / "dpo", "output/dpo", "objhal", 0.31, "2026-01-01T00:00:01")
    new = _result(tmp_path / "dpo", "output/dpo", "objhal", 0.29, "2026-01-01T00:00:02")
    t = report.table(report.load([new, old]))
    assert _rows(t) == {"dpo": "29.0"}
    assert f"- dpo, Object HalBench: {old} (created 2026-01-01T00:00:01); shown: {new}" in t


def test_mmhal_response_file_has_run_name(tmp_path):
    from eval import mmhal
    records = [{"question_type": "x", "image_id": f"i{i}", "image_src": f"http://x/{i}.png", "image_content": ["a"],
                "question": f"q{i}?", "gt_answer": "g", "model_answer": ""} for i in range(2)]
    data = tmp_path / "response_template.json"
    data.write_text(json.dumps(records))

    class Judge:
        def chat(self, messages, **kw):
            return "rating: 4"
    files = []
    for run, answer in (("greedy", "A"), ("beam", "B"), ("", "C")):
        args = Namespace(data=str(data), answers_dir=str(tmp_path), run_name=run)
        answers = {"": {str(i): f"{answer}{i}" for i in range(2)}}
        _, details, _ = mmhal.score(args, mmhal.questions(args), answers, Judge(), {})
        files.append(details["response_file"])
    assert [Path(f).name for f in files] == ["mmhal_greedy_response.json", "mmhal_beam_response.json",
                                             "mmhal_response.json"]
    assert [json.loads(Path(f).read_text())[1]["model_answer"] for f in files] == ["A1", "B1", "C1"]


def test_report_says_when_amber_nouns_came_from_the_rule_finder(tmp_path):
    """AMBER scored with the rule-based noun finder (the default: no spaCy download) sat beside published AMBER
    figures as if comparable; the settings line says which finder it was."""
    f = _result(tmp_path / "m", "output/dpo", "amber", 0.1, "2026-01-01T00:00:01")
    rec = json.loads(f.read_text())
    rec["metrics"] = {"CHAIR": 0.1, "Cover": 0.5, "Hal": 0.3, "Cog": 0.02, "F1": 0.8, "AMBER_score": 0.85}
    rec["details"] = {"nlp": "rule"}
    f.write_text(json.dumps(rec))
    assert "nouns by rule (not comparable with published AMBER figures)" in report.table(report.load([f]))


def test_figures_draw_no_bar_for_a_missing_value(tmp_path, monkeypatch):
    """A model without a benchmark's result (or a metric) was drawn as a bar of 0 where the table shows '-': for a
    lower-is-better rate such as CHAIR_i, the best bar of the chart."""
    import math

    import matplotlib.axes
    drawn = {}
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, xs, heights, *args, label=None, **kw):
        drawn[(len(drawn), label)] = list(heights)
        return real_bar(self, xs, heights, *args, label=label, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    sft = _result(tmp_path / "sft", "output/sft", "objhal", 0.5, "2026-01-01T00:00:01")
    dpo = _result(tmp_path / "dpo", "output/dpo", "objhal", 0.2, "2026-01-01T00:00:02")
    rec = json.loads(dpo.read_text())
    del rec["metrics"]["obj_rec"]
    dpo.write_text(json.dumps(rec))
    pope = _result(tmp_path / "sft", "output/sft", "pope", 0.0, "2026-01-01T00:00:03")
    rec = json.loads(pope.read_text())
    rec["metrics"] = {"f1_mean": 0.8, "accuracy_mean": 0.7, "yes_ratio_mean": 0.5}
    pope.write_text(json.dumps(rec))
    report.figures(report.load([sft, dpo, pope]), tmp_path / "figs")
    heights = {label: h for (_, label), h in drawn.items() if len(h) == 4}  # Object HalBench's four metrics
    assert heights["sft"] == [50.0, 50.0, 50.0, 50.0] and heights["dpo"][:3] == [20.0, 20.0, 20.0]
    assert math.isnan(heights["dpo"][3])  # no object recall: no bar (the table's '-')
    pope_bars = {label: h for (_, label), h in drawn.items() if len(h) == 3}
    assert pope_bars["sft"] == [80.0, 70.0, 50.0] and all(math.isnan(v) for v in pope_bars["dpo"])
    assert "| dpo | 20.0 | 20.0 | 20.0 | - | - | - | - |" in report.table(report.load([sft, dpo, pope]))
