"""benchmarks.quality's seed handling (the training runs themselves are the benchmark, not a test)."""
import json
from pathlib import Path

import pytest

from benchmarks.quality import mean_sd, per_seed_line, seed_runs


def test_seed_runs_first_is_the_default_then_named_seeds():
    runs = seed_runs("output/ppo", ["--from_checkpoint", "s"], 3, "--seed", 1234)
    assert runs == [("output/ppo", ["--from_checkpoint", "s"]),
                    ("output/ppo_seed1", ["--from_checkpoint", "s", "--seed", "1235"]),
                    ("output/ppo_seed2", ["--from_checkpoint", "s", "--seed", "1236"])]
    assert seed_runs("output/dpo", [], 1, "--seed", 1234) == [("output/dpo", [])]


def test_mean_and_sample_sd_over_seeds():
    mean, sd = mean_sd([{"recall": 0.94, "CHAIRi": 0.02}, {"recall": 0.96, "CHAIRi": 0.04}])
    assert mean == pytest.approx({"recall": 0.95, "CHAIRi": 0.03})
    assert sd["recall"] == pytest.approx(0.02 / 2 ** 0.5)  # sample sd of two values: |a - b| / sqrt(2)
    assert mean_sd([{"recall": 0.9}])[1] == {"recall": 0.0}


def test_each_seed_is_printed_with_its_seed():
    """With --seeds only the means and sds were printed: the seeds behind a mean near a target had to be dug out."""
    rows = [{"CHAIRi": 0.0601, "recall": 0.948}, {"CHAIRi": 0.056, "recall": 0.9372}, {"CHAIRi": 0.044, "recall": 0.91}]
    assert per_seed_line("ppo", rows, "--seed", 1234) == (
        "ppo per seed (--seed 1234, 1235, 1236), CHAIR_i / recall: 0.060 / 0.948, 0.056 / 0.937, 0.044 / 0.910")


def test_a_model_is_reused_only_if_trained_after_the_models_it_starts_from(tmp_path):
    """Any output/rm was reused for PPO (its reward and critic) and --reuse kept output/dpo ... whatever SFT model
    they came from: after SFT was retrained, the verdicts judged the new SFT against models of the old one."""
    import os

    from benchmarks.quality import trained_after
    sft, rm, ppo = (tmp_path / d for d in ("sft", "rm", "ppo"))
    for i, d in enumerate((sft, rm, ppo)):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"w")
        os.utime(d / "model.safetensors", (1000 + i, 1000 + i))
    assert trained_after(str(rm), str(sft)) and trained_after(str(ppo), str(sft), str(rm))
    os.utime(sft / "model.safetensors", (2000, 2000))  # SFT retrained
    assert not trained_after(str(rm), str(sft)) and not trained_after(str(ppo), str(sft), str(rm))
    assert not trained_after(str(tmp_path / "missing"), str(sft))


def test_the_target_reads_as_written_at_its_edges():
    """An SFT CHAIR_i of 0 made the ratio NaN (every model failed, one with CHAIR_i 0 too); a recall drop of exactly
    0.03 failed by float rounding (0.87 - 0.9 = -0.030000000000000027)."""
    from benchmarks.quality import meets_target
    sft = {"CHAIRi": 0.1, "recall": 0.96}
    assert meets_target({"CHAIRi": 0.05, "recall": 0.93}, sft)
    assert meets_target({"CHAIRi": 0.05, "recall": 0.87}, {"CHAIRi": 0.1, "recall": 0.9})
    assert not meets_target({"CHAIRi": 0.051, "recall": 0.95}, sft)
    assert not meets_target({"CHAIRi": 0.02, "recall": 0.929}, sft)
    assert meets_target({"CHAIRi": 0.0, "recall": 0.96}, {"CHAIRi": 0.0, "recall": 0.96})
    dpo = {"CHAIRi": 0.03, "recall": 0.95}
    assert meets_target({"CHAIRi": 0.03, "recall": 0.95}, sft, dpo, 600 / 2000)
    assert not meets_target({"CHAIRi": 0.03, "recall": 0.95}, sft, dpo, 700 / 2000)
    assert not meets_target({"CHAIRi": 0.031, "recall": 0.95}, sft, dpo, 0.3)


def _stand_ins(monkeypatch, tmp_path, scores):
    """benchmarks.quality with its training, scoring and data counts stood in for; returns the SFT folder."""
    from benchmarks import quality
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quality, "ROOT", tmp_path)
    monkeypatch.setattr(quality, "train", lambda script, out, *args: None)
    monkeypatch.setattr(quality, "trained_after", lambda out, *inputs: True)
    monkeypatch.setattr(quality, "score", lambda model, world: dict(scores[Path(model).name]))
    monkeypatch.setattr(quality, "intervals", lambda sft, first_seed, run_name: [])  # tested below
    monkeypatch.setattr(quality, "pairs_used", lambda out: {"dpo": 2000, "opa_dpo": 600}.get(Path(out).name, 2000))
    return sft


def test_opa_dpo_is_judged_against_dpo_even_when_dpo_is_not_asked_for(tmp_path, monkeypatch):
    """`--methods ppo --with_opa` (or `--methods opa_dpo`) left DPO out, and OPA-DPO was then judged by DPO's own
    target (CHAIR_i at most half of SFT's): a PASS printed under the line saying OPA-DPO must reach DPO's CHAIR_i."""
    from benchmarks import quality
    scores = {"sft": {"CHAIRi": 0.1, "CHAIRs": 0.2, "recall": 0.96},
              "dpo": {"CHAIRi": 0.02, "CHAIRs": 0.04, "recall": 0.95},
              "opa_dpo": {"CHAIRi": 0.04, "CHAIRs": 0.08, "recall": 0.95}}
    sft = _stand_ins(monkeypatch, tmp_path, scores)
    for methods in (["opa_dpo"], ["dpo", "--with_opa"]):
        out = quality.main(["--sft", str(sft), "--reuse", "--methods", *methods])
        assert out["verdicts"] == {"sft": "baseline", "dpo": "PASS", "opa_dpo": "FAIL"}, methods


def test_an_unknown_method_is_refused_before_anything_is_scored(tmp_path, monkeypatch, capsys):
    """`--methods opa` (for opa_dpo) scored the SFT model first (minutes), then stopped with KeyError: 'opa'."""
    from benchmarks import quality
    sft = _stand_ins(monkeypatch, tmp_path, {"sft": {"CHAIRi": 0.1, "CHAIRs": 0.2, "recall": 0.96}})
    with pytest.raises(SystemExit):
        quality.main(["--sft", str(sft), "--methods", "opa"])
    assert "invalid choice: 'opa'" in capsys.readouterr().err


def test_opa_dpo_is_trained_anew_like_the_other_methods(tmp_path, monkeypatch):
    """The other stages train afresh when the benchmark trains them; OPA-DPO's steps resumed from its work folder,
    whose rollouts came from an earlier SFT model after the main job ran again: refused, the benchmark stopped."""
    from benchmarks import quality
    scores = {"sft": {"CHAIRi": 0.1, "CHAIRs": 0.2, "recall": 0.96},
              "dpo": {"CHAIRi": 0.02, "CHAIRs": 0.04, "recall": 0.95},
              "opa_dpo": {"CHAIRi": 0.04, "CHAIRs": 0.08, "recall": 0.95}}
    sft = _stand_ins(monkeypatch, tmp_path, scores)
    calls = []
    monkeypatch.setattr(quality, "train", lambda script, out, *args: calls.append((script, args)))
    quality.main(["--sft", str(sft), "--methods", "dpo", "--with_opa"])
    assert [s for s, _ in calls] == ["run_dpo_training.sh", "run_opa_dpo.sh"]
    assert "--force" in calls[1][1] and "--force" not in calls[0][1]


def test_the_benchmark_prints_the_first_seeds_intervals_against_sft_and_opa_dpo_against_dpo(tmp_path, monkeypatch):
    from benchmarks.quality import intervals
    monkeypatch.chdir(tmp_path)  # the figure goes to figure/ under the working folder

    def write(name, n_hal):
        d = tmp_path / name
        d.mkdir()
        rows = [{"bench": "objhal", "question_id": str(i), "hallucinated": ["star"] if i < n_hal else [],
                 "n_mentions": 2, "gt_objects": ["circle"], "missed": []} for i in range(10)]
        (d / "eval_embedded_quality.per_question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    sft, dpo, opa = write("sft", 6), write("dpo", 1), write("opa_dpo", 2)
    text = "\n".join(intervals(sft, {"dpo": dpo, "opa_dpo": opa}))
    assert text.count("Paired bootstrap over 10 scenes") == 2
    assert f"differences are model - {sft}" in text and f"differences are model - {dpo}" in text
    dpo_vs_sft = next(line for line in text.splitlines() if line.startswith(f"| {dpo} "))
    assert dpo_vs_sft.split(" | ")[1].startswith("0.050 [") and dpo_vs_sft.split(" | ")[2].startswith("-0.250 [")
    opa_vs_dpo = [line for line in text.splitlines() if line.startswith(f"| {opa} ")]
    assert len(opa_vs_dpo) == 2 and opa_vs_dpo[1].split(" | ")[2].startswith("+0.050 [")
    assert "opa_dpo" not in "\n".join(intervals(sft, {"dpo": dpo}))
    assert "plotted to figure/quality_intervals.png" in text
    assert (tmp_path / "figure" / "quality_intervals.png").stat().st_size > 0


def test_each_world_keeps_its_scores_under_its_own_run_name(tmp_path):
    """`--world /tmp/valworld` wrote its scores as eval_embedded_quality.json, over the reported benchmark's: a later
    `python -m eval.bootstrap --run_name quality` read the other world's answers under the reported one's name."""
    from benchmarks.quality import ROOT, run_name_for
    assert run_name_for(str(ROOT / "data" / "world")) == "quality"
    a, b = tmp_path / "a" / "valworld", tmp_path / "b" / "valworld"
    assert run_name_for(str(a)).startswith("quality_valworld_") and run_name_for(str(a)) != run_name_for(str(b))
    assert run_name_for(str(a)) == run_name_for(str(a / ".." / "valworld"))  # one world, one name
