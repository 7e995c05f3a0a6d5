"""eval.benchmark end to end with the tiny VLM: generate, score, resume, refuse mixed answers;
run_predict.sh's dispatch; eval.run_embedded's table; eval.report's table and figures."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from eval.answers import AnswersMismatch
from eval.benchmark import main as bench_main

ROOT = Path(__file__).resolve().parents[1]


def _pope_argv(world, tiny, out, *extra):
    return ["--benchmark", "pope", "--model_path", str(tiny), "--data", str(world), "--output_dir", str(out),
            "--max_new_tokens", "3", "--batch_size", "8", "--no-progress", "--pope_suffix", "", *extra]


def test_pope_generate_score_resume(tmp_path, world, tiny, monkeypatch):
    out = tmp_path / "sft"
    rec = bench_main(_pope_argv(world, tiny, out))
    assert set(rec["answers"]) == {"random", "popular", "adversarial"}
    assert rec["decoding"]["mode"] == "greedy" and rec["decoding"]["max_new_tokens"] == 3
    assert 0.0 <= rec["metrics"]["f1_mean"] <= 1.0 and rec["judge"] is None
    saved = json.loads((out / "eval_pope.json").read_text())
    assert saved["metrics"] == rec["metrics"] and len(saved["dataset"]["files_sha256"]) == 3
    n = len((world / "bench_pope_random.jsonl").read_text().splitlines())

    # interrupted run: drop the last answers of one split; the re-run generates only those
    afile = Path(rec["answers"]["random"])
    lines = afile.read_text().splitlines()
    assert len(lines) == n
    afile.write_text("\n".join(lines[: n // 2]) + "\n")
    rerun = bench_main(_pope_argv(world, tiny, out))
    new = afile.read_text().splitlines()
    assert new[: n // 2] == lines[: n // 2] and len(new) == n  # kept, completed, no duplicates
    assert rerun["metrics"] == rec["metrics"]  # greedy: the regenerated answers are the same

    # a finished run loads no model at all
    import training.predict.main as pm
    monkeypatch.setattr(pm, "predict", lambda a: pytest.fail("predict called on a finished run"))
    assert bench_main(_pope_argv(world, tiny, out))["metrics"] == rec["metrics"]

    # other decoding on the same answer files is refused, a new run name starts fresh files
    with pytest.raises(AnswersMismatch):
        bench_main(_pope_argv(world, tiny, out, "--num_beams", "2"))
    with pytest.raises(AnswersMismatch):  # other numerics too: precision is part of the settings
        bench_main(_pope_argv(world, tiny, out, "--precision", "bf16"))
    from training.model.builder import inference_device
    device, precision = inference_device()  # what "auto" resolves to on this machine (CPU here: fp32)
    assert rec["decoding"]["precision"] == precision and rec["decoding"]["device"] == device.split(":")[0]
    monkeypatch.undo()
    beams = bench_main(_pope_argv(world, tiny, out, "--num_beams", "2", "--run_name", "beam2"))
    assert beams["decoding"]["mode"] == "beam" and (out / "eval_pope_beam2.json").exists()


def test_a_benchmark_resumes_past_a_row_cut_by_a_killed_run(tmp_path, world, tiny):
    """A run killed while writing a batch leaves half a row at the end of an answer file; predict removes it and
    answers that question again, but the benchmark read the file first and stopped on the cut row ("not JSON"),
    so the run could not resume."""
    out = tmp_path / "sft"
    rec = bench_main(_pope_argv(world, tiny, out))
    afile = Path(rec["answers"]["random"])
    full = afile.read_text()
    afile.write_text(full[:-30])  # killed inside its last row
    assert bench_main(_pope_argv(world, tiny, out))["metrics"] == rec["metrics"]
    assert afile.read_text() == full  # the cut row answered again (greedy: the same), nothing glued or doubled


def test_run_embedded_table(tmp_path, world, tiny, capsys):
    from eval.run_embedded import main as run_embedded
    model = tmp_path / "sft"
    shutil.copytree(tiny, model)
    table_file = tmp_path / "results.md"
    t = run_embedded(["--models", str(model), "--world", str(world), "--table_file", str(table_file),
                      "--no-progress", "--benches", "objhal", "count", "--run_name", ""])  # as the main results
    assert t.splitlines()[0].startswith("| model | objhal CHAIRi | objhal CHAIRs |")
    assert f"| {model} |" in t and table_file.read_text().strip() == t
    saved = json.loads((model / "eval_embedded.json").read_text())
    assert saved["benchmark"] == "embedded" and "objhal/CHAIRi" in saved["metrics"]
    # benchmarks.quality scores objhal alone under its own run name: the model's eval_embedded.json (what
    # eval.report reads) keeps its count results (it was rewritten with objhal only)
    from benchmarks.quality import run_name_for, score
    assert "CHAIRi" in score(str(model), str(world))
    assert "count/accuracy" in json.loads((model / "eval_embedded.json").read_text())["metrics"]
    assert (model / f"eval_embedded_{run_name_for(str(world))}.json").is_file()
    assert not (model / "eval_embedded_quality.json").exists()  # the reported benchmark's name: data/world's alone


def test_run_predict_sh_dispatches(tmp_path):
    """--benchmark goes to eval.benchmark, anything else to training.predict.main (python stubbed)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "run_predict.sh", tmp_path / "run_predict.sh")
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "python $*"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "scripts" / "env.sh").write_text(f'export PATH="{stub.parent}:$PATH"\n')
    env = {**os.environ, "PATH": os.environ["PATH"]}

    def run(*args):
        return subprocess.run(["bash", str(tmp_path / "run_predict.sh"), *args], capture_output=True, text=True,
                              env=env, check=True).stdout.strip()
    assert run("--benchmark", "pope", "--model_path", "m") == "python -m eval.benchmark --benchmark pope --model_path m"
    assert run("--benchmark=mmhal") == "python -m eval.benchmark --benchmark=mmhal"
    assert run("--model_path", "m", "--data_path", "q.jsonl") == \
        "python -m training.predict.main --model_path m --data_path q.jsonl"
    env["NUM_GPUS"] = "3"  # one process per GPU: training.predict.parallel, or the benchmark's generation
    assert run("--model_path", "m") == "python -m training.predict.parallel 3 --model_path m"
    assert run("--benchmark", "pope") == "python -m eval.benchmark --benchmark pope --num_processes 3"


def _result(path: Path, model: str, bench: str, metrics: dict, created: str = "2026-01-01T00:00:00"):
    path.mkdir(parents=True, exist_ok=True)
    rec = {"benchmark": bench, "model": f"output/{model}", "model_name": model, "run_name": "", "created": created,
           "decoding": {"mode": "beam" if bench == "objhal" else "greedy", "num_beams": 3 if bench == "objhal" else 1,
                        "max_new_tokens": 1024},
           "dataset": {"path": "d", "version": "v1", "files_sha256": {"d/file.jsonl": "0123456789abcdef"}},
           "judge": {"model": "gpt-4-0314", "decoding": [{"temperature": 0.0, "max_tokens": None}]}
           if bench == "mmhal" else None, "metrics": metrics}
    (path / f"eval_{bench}.json").write_text(json.dumps(rec))


def test_report_table_and_figures_from_one_command(tmp_path):
    out = tmp_path / "output"
    chair = {"sft": 0.536, "dpo": 0.31, "orpo": 0.25, "ppo": 0.402}
    for m, c in chair.items():
        _result(out / m, m, "objhal", {"CHAIRs": c, "CHAIRs_refine": c + 0.01, "CHAIRi": c / 2, "obj_rec": 0.7})
        _result(out / m, m, "pope", {"f1_mean": 0.859, "accuracy_mean": 0.87, "yes_ratio_mean": 0.5})
    _result(out / "dpo", "dpo", "mmhal", {"score": 2.83, "hallucination_rate": 0.45})
    figs = tmp_path / "figure"
    cmd = f"{sys.executable} -m eval.report --results {out}/*/eval_*.json --figure_dir {figs} " \
          f"--table_file {tmp_path / 'results.md'}"
    done = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| model | Object HalBench CHAIRs ↓ | Object HalBench CHAIRs_refine ↓ |")
    assert "POPE F1 (split mean) ↑" in lines[0] and "MMHal-Bench score (0-6) ↑" in lines[0]
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [r[0] for r in rows] == ["| sft", "| dpo", "| orpo", "| ppo"]  # SFT first, then the stages
    assert rows[0][1:3] == ["53.6", "54.6"] and rows[0][-2:] == ["-", "- |"]  # no MMHal run for sft
    assert rows[1][-2:] == ["2.83", "45.0 |"]
    assert "judge gpt-4-0314 (T=0.0)" in table and "file.jsonl@01234567 (version v1)" in table
    for b in ("objhal", "pope", "mmhal"):
        assert (figs / f"{b}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_hold_what_changes_answers(tmp_path, world, tiny):
    """Another maximum length (or image folder) on the same answer files is refused like other decoding;
    the batch size, the progress bar and the device index are not part of the settings."""
    out = tmp_path / "sft"
    bench_main(_pope_argv(world, tiny, out))
    with pytest.raises(AnswersMismatch):
        bench_main(_pope_argv(world, tiny, out, "--max_seq_len", "300"))
    argv = [a if a != "8" else "4" for a in _pope_argv(world, tiny, out)]  # --batch_size 4
    bench_main(argv + ["--progress"])


def test_predict_does_not_resume_answers_written_with_other_settings(tmp_path, world, tiny):
    """A rerun into the same answer file with another decoding (or a retrained model in the same folder) took
    every question as done and returned the old answers: refused, naming what differs."""
    from training.predict.main import parse, predict
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(x + "\n" for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:3]))
    argv = ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(tmp_path / "a.jsonl"), "--no-progress"]
    predict(parse([*argv, "--max_new_tokens", "3"]))
    predict(parse([*argv, "--max_new_tokens", "3"]))  # the same settings: a finished file, nothing to do
    with pytest.raises(SystemExit, match="other settings \\(decoding differ"):
        predict(parse([*argv, "--max_new_tokens", "5"]))


def test_predict_does_not_resume_answers_to_questions_the_file_now_asks_otherwise(tmp_path, world, tiny):
    """The settings record names the question file, not what it asks: a question file rewritten in place (another
    prompt for the same question_id) took every question as done and kept the answers to the old prompts."""
    from training.predict.main import parse, predict
    qfile = tmp_path / "q.jsonl"
    rows = [json.loads(x) for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:2]]
    qfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(tmp_path / "a.jsonl"), "--no-progress", "--max_new_tokens", "3"]
    predict(parse(argv))
    qfile.write_text("".join(json.dumps({**r, "text": "Describe the image."}) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="now asks otherwise"):
        predict(parse(argv))


def test_scoring_refuses_repeated_question_ids_and_answers_of_several_models(tmp_path, world):
    """Two questions sharing an id were both scored against its one answer; answers of two models were scored as
    one result, credited to --model_path."""
    from eval.benchmark import main as bench
    rows = [json.loads(x) for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:2]]
    qfile = tmp_path / "pope_random.jsonl"
    qfile.write_text("".join(json.dumps({**r, "question_id": 1}) + "\n" for r in rows))
    afile = tmp_path / "answers.jsonl"
    afile.write_text(json.dumps({"question_id": 1, "text": "Yes", "model_id": "a"}) + "\n")
    args = ["--benchmark", "pope", "--data", str(qfile), "--image_folder", str(world / "images"), "--answers",
            str(afile), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="question_id '1' appears twice"):
        bench(args)
    qfile.write_text("".join(json.dumps({**r, "question_id": i}) + "\n" for i, r in enumerate(rows)))
    afile.write_text("".join(json.dumps({"question_id": i, "text": "Yes", "model_id": m}) + "\n"
                             for i, m in enumerate(["a", "b"])))
    with pytest.raises(ValueError, match="several models \\(a, b\\)"):
        bench(args)
    afile.write_text("".join(json.dumps({"question_id": i, "text": "Yes", "model_id": "a"}) + "\n" for i in range(2)))
    assert bench(args)["answers_model_id"] == "a"


def test_pope_folder_with_several_datasets_is_refused(tmp_path):
    from eval.pope import split_files
    for name in ("coco", "aokvqa"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}_pope_random.json").write_text("")
    with pytest.raises(ValueError, match="2 files for POPE's random split"):
        split_files(tmp_path)
    assert split_files(tmp_path / "coco") == {"random": tmp_path / "coco" / "coco_pope_random.json"}


def test_predict_resumes_past_a_cut_last_line_and_names_bad_rows(tmp_path, world, tiny):
    """An interrupted run can leave half a JSON line: the next run removes it and answers that question
    again; an unreadable line elsewhere, or a question answered twice, is an error naming file and row."""
    from eval.answers import read_answers
    from training.predict.main import parse, predict
    qfile = tmp_path / "q.jsonl"
    rows = [json.loads(x) for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:5]]
    qfile.write_text("".join(json.dumps({**r, "image_id": 7}) + "\n" for r in rows))
    afile = tmp_path / "a.jsonl"
    argv = ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(afile), "--max_new_tokens", "3", "--no-progress"]
    predict(parse(argv))
    full = afile.read_text()
    lines = full.splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"question_id", "image_id", "image", "prompt", "text", "model_id"} and first["image_id"] == 7
    afile.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # cut inside the fourth row
    predict(parse(argv))
    assert afile.read_text() == full  # the cut row answered again (greedy: the same), nothing glued or doubled
    assert len(read_answers(afile)) == 5

    afile.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(SystemExit, match="line 2"):
        predict(parse(argv))
    with pytest.raises(ValueError, match="line 2: not JSON"):
        read_answers(afile)
    afile.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match="answered twice"):
        read_answers(afile)


def test_a_resumed_or_chunked_sampling_run_draws_what_one_uninterrupted_run_draws(tmp_path, world, tiny):
    """Sampling was seeded once, as a run started: a run resumed after its first batch drew the next questions'
    answers from the first batch's random numbers (the same image's questions got the first ones' very answers),
    and each chunk's process drew from the same numbers as the others. Each batch is now seeded by the seed and
    where its first question stands in the question file."""
    from training.predict.main import parse, predict
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(x + "\n" for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:4]))

    def run(afile, *extra):
        predict(parse(["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
                       "--output_file", str(afile), "--max_new_tokens", "8", "--no-progress", "--do_sample",
                       *extra]))
        return {r["question_id"]: r["text"] for r in map(json.loads, afile.read_text().splitlines())}

    full = run(tmp_path / "full.jsonl", "--batch_size", "2")
    assert len(set(full.values())) == 4  # four questions of one image, four samples
    cut = tmp_path / "cut.jsonl"
    run(cut, "--batch_size", "2")
    cut.write_text("".join(cut.read_text().splitlines(True)[:2]))  # stopped after its first batch
    assert run(cut, "--batch_size", "2") == full
    one = run(tmp_path / "one.jsonl", "--batch_size", "1")
    for i in range(2):
        run(tmp_path / "chunks.jsonl", "--batch_size", "1", "--num_chunks", "2", "--chunk_idx", str(i))
    assert run(tmp_path / "chunks.jsonl", "--batch_size", "1") == one
