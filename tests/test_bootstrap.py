"""eval.bootstrap: the paired bootstrap of CHAIR over scenes, against hand-derived values and eval.embedded's CHAIR."""
import json

import numpy as np
import pytest

from eval import bootstrap
from eval.embedded import chair_of, objhal_fields


def rec(qid, hallucinated=(), n_mentions=1, gt=("circle",), missed=()):
    return {"bench": "objhal", "question_id": qid, "hallucinated": list(hallucinated), "n_mentions": n_mentions,
            "gt_objects": list(gt), "missed": list(missed), "mentioned": []}


def test_a_two_scene_difference_has_the_hand_derived_resample_distribution():
    # base hallucinates nowhere; other hallucinates its one mention in scene a only. A resample of two scenes is
    # {a, a} (diff 2/2 = 1) with probability 1/4, {a, b} or {b, a} (1/2) with 1/2, {b, b} (0) with 1/4.
    base = [rec("a"), rec("b")]
    other = [rec("a", hallucinated=["star"]), rec("b")]
    idx = bootstrap.resample_indices(2, 4000, seed=0)
    c = bootstrap.compare(base, other, "CHAIRi", idx)
    assert (c["base"], c["value"], c["diff"]) == (0.0, 0.5, 0.5)
    assert c["diff_ci"] == (0.0, 1.0) and c["value_ci"] == (0.0, 1.0)
    nb, db = bootstrap.scene_parts(base, "CHAIRi")
    no, do = bootstrap.scene_parts(other, "CHAIRi")
    diffs = bootstrap.ratio_of_sums(no, do, idx) - bootstrap.ratio_of_sums(nb, db, idx)
    shares = [np.mean(diffs == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_chair_i_is_a_ratio_of_sums_and_a_scene_without_mentions_adds_nothing():
    rows = [rec("a", hallucinated=["star"], n_mentions=4), rec("b", n_mentions=0), rec("c", n_mentions=4)]
    num, den = bootstrap.scene_parts(rows, "CHAIRi")
    everything = np.arange(3)[None]
    assert bootstrap.ratio_of_sums(num, den, everything)[0] == pytest.approx(1 / 8)  # a mean of ratios: 1/12
    # scene b alone, resampled three times, has no mentions at all: CHAIR_i 0 as chair_of gives it
    assert bootstrap.ratio_of_sums(num, den, np.array([[1, 1, 1]]))[0] == 0.0
    assert bootstrap.ratio_of_sums(num, den, np.array([[0, 0, 2]]))[0] == pytest.approx(2 / 12)  # not mean(1/4, 1/4, 0)


def test_point_values_equal_the_benchmarks_own_chair():
    texts = ["a circle and a star", "two squares", "a cross, a cross and a circle", "nothing here"]
    truth = [["circle"], ["square", "triangle"], ["cross"], ["diamond"]]
    rows = [{**objhal_fields(t, g), "question_id": str(i), "bench": "objhal"}
            for i, (t, g) in enumerate(zip(texts, truth))]
    want = chair_of(rows)
    assert want["CHAIRi"] > 0 and want["recall"] < 1  # the example exercises both
    idx = bootstrap.resample_indices(len(rows), 10, seed=1)
    for metric in bootstrap.PARTS:
        assert bootstrap.compare(rows, rows, metric, idx)["value"] == pytest.approx(want[metric])


def test_a_model_against_itself_differs_by_exactly_zero_on_every_resample():
    rows = [rec(str(i), hallucinated=["star"] * (i % 3), n_mentions=3) for i in range(30)]
    c = bootstrap.compare(rows, rows, "CHAIRi", bootstrap.resample_indices(30, 500, seed=2))
    assert c["diff"] == 0.0 and c["diff_ci"] == (0.0, 0.0)
    assert c["value_ci"][0] < c["value"] < c["value_ci"][1]


def write(model_dir, rows, run_name="quality"):
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / f"eval_embedded_{run_name}.per_question.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_command_prints_each_model_against_the_baseline(tmp_path, capsys):
    base = [rec(str(i), n_mentions=2) for i in range(20)]
    other = [rec(str(i), hallucinated=["star"] if i < 4 else [], n_mentions=2) for i in range(20)]
    write(tmp_path / "base", base + [{"bench": "count", "question_id": "c0"}])  # other benchmarks' rows are skipped
    write(tmp_path / "other", list(reversed(other)))  # paired by question id, not by order
    figure = tmp_path / "figs" / "intervals.png"
    out = bootstrap.main(["--baseline", str(tmp_path / "base"), "--models", str(tmp_path / "other"),
                          "--run_name", "quality", "--resamples", "300", "--figure", str(figure)])
    assert out.endswith(f"plotted to {figure}") and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = [line for line in out.splitlines() if line.startswith(f"| {tmp_path / 'other'} ")][0]
    assert "0.100 [" in row and "+0.100 [" in row  # 4 of 40 mentions
    assert "over 20 scenes" in out


def test_bad_inputs_name_the_file_and_what_is_wrong(tmp_path):
    write(tmp_path / "base", [rec("a"), rec("b")])
    write(tmp_path / "other", [rec("a"), rec("c")])
    with pytest.raises(SystemExit, match=r"other/eval_embedded_quality.per_question.jsonl hold other scenes.*b is "
                                         r"missing from .*other"):
        bootstrap.main(["--baseline", str(tmp_path / "base"), "--models", str(tmp_path / "other"),
                        "--run_name", "quality"])
    with pytest.raises(SystemExit, match=r"nothing/eval_embedded_val.per_question.jsonl: no per-question records"):
        bootstrap.main(["--baseline", str(tmp_path / "nothing"), "--models", str(tmp_path / "other"),
                        "--run_name", "val"])
    write(tmp_path / "counts", [{"bench": "count", "question_id": "c0"}])
    with pytest.raises(SystemExit, match="no objhal records"):
        bootstrap.main(["--baseline", str(tmp_path / "counts"), "--models", str(tmp_path / "other"),
                        "--run_name", "quality"])
    bad = write(tmp_path / "bad", [rec("a"), {"bench": "objhal", "question_id": "b", "n_mentions": 1}])
    with pytest.raises(SystemExit, match=rf"{bad}, line 2: an objhal record without hallucinated, gt_objects, "):
        bootstrap.main(["--baseline", str(tmp_path / "bad"), "--models", str(tmp_path / "other"),
                        "--run_name", "quality"])
    broken = write(tmp_path / "broken", [rec("a")])
    broken.write_text(broken.read_text() + '{"bench": "objhal", \n')
    with pytest.raises(SystemExit, match=rf"{broken}, line 2: not JSON"):
        bootstrap.main(["--baseline", str(tmp_path / "broken"), "--models", str(tmp_path / "other"),
                        "--run_name", "quality"])
    twice = write(tmp_path / "twice", [rec("a"), rec("b"), rec("a")])
    with pytest.raises(SystemExit, match=rf"{twice}, line 3: question_id a again"):
        bootstrap.main(["--baseline", str(tmp_path / "twice"), "--models", str(tmp_path / "other"),
                        "--run_name", "quality"])
    with pytest.raises(SystemExit, match="at least 1 resample"):
        bootstrap.main(["--baseline", str(tmp_path / "base"), "--models", str(tmp_path / "base"),
                        "--run_name", "quality", "--resamples", "0"])
