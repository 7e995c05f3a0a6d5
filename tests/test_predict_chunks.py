"""Answering one question file in chunks (--num_chunks / --chunk_idx; `NUM_GPUS=N bash run_predict.sh` starts one
process per GPU): every question answered once, as one process answers it, into one answers file."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from training.predict.main import parse, predict

ROOT = Path(__file__).resolve().parents[1]


def _questions(world, out: Path, n: int) -> Path:
    rows = [json.loads(x) for x in (world / "bench_pope_random.jsonl").read_text().splitlines()[:n]]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _argv(world, tiny, qfile, afile, *extra):
    return ["--model_path", str(tiny), "--data_path", str(qfile), "--image_folder", str(world / "images"),
            "--output_file", str(afile), "--max_new_tokens", "6", "--batch_size", "1", "--no-progress", *extra]


def _rows(afile: Path) -> dict:
    rows = [json.loads(x) for x in afile.read_text().splitlines()]
    by_id = {r["question_id"]: r for r in rows}
    assert len(by_id) == len(rows), "a question answered twice"
    return by_id


def test_two_processes_answer_every_question_once_as_one_does(world, tiny, tmp_path):
    qfile = _questions(world, tmp_path / "q.jsonl", 9)
    predict(parse(_argv(world, tiny, qfile, tmp_path / "one.jsonl")))
    env = {**os.environ, "NUM_GPUS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "run_predict.sh"), *_argv(world, tiny, qfile, tmp_path / "two.jsonl")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count(str(tmp_path / "two.jsonl")) == 2  # two processes, each printing the file it wrote
    one, two = _rows(tmp_path / "one.jsonl"), _rows(tmp_path / "two.jsonl")
    assert len(one) == 9 and set(two) == set(one)
    assert all(two[q]["text"] == one[q]["text"] for q in one)  # batch 1: each question decoded alone either way
    # one settings record for the file, whole (each process writes it), without the chunking in it
    settings = json.loads((tmp_path / "two.predict.json").read_text())
    assert settings == json.loads((tmp_path / "one.predict.json").read_text())


def test_a_chunk_answers_its_share_of_what_is_unanswered(world, tiny, tmp_path):
    qfile = _questions(world, tmp_path / "q.jsonl", 6)
    afile = tmp_path / "a.jsonl"
    predict(parse(_argv(world, tiny, qfile, afile, "--num_chunks", "3", "--chunk_idx", "1")))
    ids = [str(json.loads(x)["question_id"]) for x in qfile.read_text().splitlines()]
    assert sorted(map(str, _rows(afile))) == sorted([ids[1], ids[4]])
    predict(parse(_argv(world, tiny, qfile, afile)))  # the whole file afterwards: only the rest is answered
    assert sorted(map(str, _rows(afile))) == sorted(ids)
    with pytest.raises(SystemExit):
        parse(_argv(world, tiny, qfile, afile, "--num_chunks", "2", "--chunk_idx", "2"))


def test_each_bad_row_is_reported_by_one_chunk(world, tiny, tmp_path):
    """Rows unreadable in the question file were listed in every chunk's bad-rows report."""
    qfile = _questions(world, tmp_path / "q.jsonl", 6)
    lines = qfile.read_text().splitlines()
    qfile.write_text("\n".join(lines[:2] + ["{not json", json.dumps({"question_id": "x", "image": "none.png"})]
                               + lines[2:]) + "\n")
    predict(parse(_argv(world, tiny, qfile, tmp_path / "one.jsonl", "--skip_bad_rows")))
    one = json.loads((tmp_path / "one.bad_rows.json").read_text())["rows"]
    assert len(one) == 2
    for i in range(2):
        predict(parse(_argv(world, tiny, qfile, tmp_path / "two.jsonl", "--skip_bad_rows", "--num_chunks", "2",
                            "--chunk_idx", str(i))))
    chunks = [tmp_path / f"two.bad_rows.chunk{i}of2.json" for i in range(2)]
    found = [r for c in chunks if c.exists() for r in json.loads(c.read_text())["rows"]]
    assert sorted(map(json.dumps, found)) == sorted(map(json.dumps, one))  # each once, none lost
    assert set(_rows(tmp_path / "two.jsonl")) == set(_rows(tmp_path / "one.jsonl"))


def test_a_line_cut_by_another_chunks_dead_process_is_not_appended_after(world, tiny, tmp_path, monkeypatch):
    """A chunk's process stopped while writing leaves a cut last line; the processes still answering appended their
    batches after it, and every later read of the file stopped on that line."""
    import training.predict.main as predict_main
    qfile = _questions(world, tmp_path / "q.jsonl", 4)
    afile = tmp_path / "a.jsonl"
    real, cut = predict_main.fitting, []

    def dies_mid_batch(*args):  # the other process writes half a row while this one generates its first batch
        if not cut:
            cut.append(1)
            with afile.open("a") as f:
                f.write('{"question_id": "half')
        return real(*args)
    monkeypatch.setattr(predict_main, "fitting", dies_mid_batch)
    predict(parse(_argv(world, tiny, qfile, afile, "--num_chunks", "2", "--chunk_idx", "0")))
    assert cut and len(_rows(afile)) == 2  # every line whole: the half row is gone, this chunk's two answers there


def test_a_benchmark_is_answered_by_several_processes_as_by_one(world, tiny, tmp_path, monkeypatch):
    """`NUM_GPUS=N bash run_predict.sh --benchmark ...` generated in one process whatever N was."""
    from eval.benchmark import main as bench_main
    import training.predict.parallel as parallel
    calls, real = [], parallel.run_chunks
    monkeypatch.setattr(parallel, "run_chunks", lambda argv, n: calls.append(n) or real(argv, n))

    def run(out, *extra):
        return bench_main(["--benchmark", "pope", "--model_path", str(tiny), "--data", str(world), "--output_dir",
                           str(out), "--max_new_tokens", "3", "--batch_size", "1", "--no-progress", "--pope_suffix", "",
                           *extra])
    one, two = run(tmp_path / "one"), run(tmp_path / "two", "--num_processes", "2")
    assert calls == [2, 2, 2]  # each of POPE's three splits, in two processes
    assert two["metrics"] == one["metrics"] and two["decoding"] == one["decoding"]
    for split in one["answers"]:
        assert {q: r["text"] for q, r in _rows(Path(two["answers"][split])).items()} == \
            {q: r["text"] for q, r in _rows(Path(one["answers"][split])).items()}
    with pytest.raises(SystemExit, match="each process answers on a GPU of its own"):
        run(tmp_path / "three", "--num_processes", "2", "--device", "cuda:1")


def test_processes_get_one_gpu_each_and_stop_together(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    import torch

    import training.predict.parallel as parallel
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert parallel.process_devices(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parallel.process_devices(2) == ["2", "3"]
    with pytest.raises(SystemExit, match="3 processes, one per GPU, but 2 GPUs are there to use"):
        parallel.process_devices(3)  # two of the four visible: the third would answer on the CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert parallel.process_devices(3) == [None] * 3  # a CPU-only machine: the processes share its cores

    # a process that fails gives the exit status; an interrupt (Ctrl-C) stops every process
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n[ "$FAIL" = 1 ] && exit 3\nsleep 60\n')
    fake.chmod(0o755)
    python = sys.executable
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setenv("FAIL", "1")
    assert parallel.run_chunks([], 2) == 3
    monkeypatch.setenv("FAIL", "0")
    started, interrupted = [], []
    real_popen = subprocess.Popen

    class Interrupted(real_popen):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self)

        def wait(self, timeout=None):
            if self.poll() is None and len(started) == 2 and not interrupted:
                interrupted.append(self)  # Ctrl-C once, while waiting for the first process
                raise KeyboardInterrupt
            return super().wait(timeout)
    monkeypatch.setattr(subprocess, "Popen", Interrupted)
    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        parallel.run_chunks([], 2)
    assert len(started) == 2 and all(p.poll() is not None for p in started) and time.time() - t0 < 30
    monkeypatch.setattr(subprocess, "Popen", real_popen)

    # a chunk process killed by a signal: the shell's 128 + signal (137 for SIGKILL, an out-of-memory kill), not 247
    fake.write_text('#!/usr/bin/env bash\nkill -KILL $$\n')
    assert parallel.run_chunks([], 2) == 137

    # a termination signal to a caller that is not parallel's own main (eval.benchmark's generate) stops the chunk
    # processes too: they were left running, answering into the file
    pids = tmp_path / "pids"
    fake.write_text(f'#!/usr/bin/env bash\necho $$ >> {pids}\nsleep 60\n')
    caller = real_popen([python, "-c", f"import sys; sys.executable = {str(fake)!r}; "
                         "from training.predict.parallel import run_chunks; run_chunks([], 2)"],
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    caller.terminate()
    assert caller.wait(30) == 143
    time.sleep(0.5)
    alive = [p for p in pids.read_text().split() if os.path.exists(f"/proc/{p}") and
             "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"chunk processes {alive} still running after their caller was terminated"


def test_a_rerun_with_every_question_answered_loads_no_model(world, tiny, tmp_path, monkeypatch, capsys):
    """A rerun after every question was answered loaded the model (minutes for a 7B one) to answer nothing."""
    import training.model.builder as builder
    qfile, afile = _questions(world, tmp_path / "q.jsonl", 2), tmp_path / "a.jsonl"
    predict(parse(_argv(world, tiny, qfile, afile)))
    before = afile.read_text()

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(builder, "load_model_and_processor", no_load)
    assert predict(parse(_argv(world, tiny, qfile, afile))) == afile
    assert afile.read_text() == before and "is answered" in capsys.readouterr().out


def test_cpu_processes_share_the_cores_this_job_may_use(monkeypatch):
    """Each process got os.cpu_count() / N threads: every core of the machine, not the share a SLURM job's cpuset
    or taskset gives (which scripts/env.sh counts, with nproc): 2 processes x 32 threads spun on 8 cores."""
    import subprocess

    import training.predict.parallel as parallel
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    threads = []

    class Started:
        def __init__(self, cmd, env):
            threads.append(env["OMP_NUM_THREADS"])

        def wait(self):
            return 0

        def poll(self):
            return 0
    monkeypatch.setattr(subprocess, "Popen", Started)
    assert parallel.run_chunks([], 2) == 0 and threads == ["4", "4"]


@pytest.mark.parametrize("device", [["--device", "cuda:1"], ["--device=cuda:0"]])
def test_processes_given_one_gpu_index_are_refused_before_any_starts(monkeypatch, device):
    """NUM_GPUS=N bash run_predict.sh --device cuda:1 (without --benchmark, which refused it) started N processes, each
    seeing one GPU (CUDA_VISIBLE_DEVICES) and failing alone on a device it could not see."""
    import subprocess

    from training.predict import parallel

    def no_start(*a, **k):
        raise AssertionError("a process started")
    monkeypatch.setattr(subprocess, "Popen", no_start)
    with pytest.raises(SystemExit, match="with 2 processes: each process answers on a GPU of its own"):
        parallel.run_chunks(["--model_path", "m", "--data_path", "q.jsonl", *device], 2)


def test_sampled_answers_of_two_chunks_are_those_of_one_process(world, tiny, tmp_path):
    """Each batch's samples are seeded by where its first question stands in the whole file, so chunks and a resumed
    run sample as one process does; every test decoded greedily, and seeding by the batch's place in its chunk
    passed them all."""
    qfile = _questions(world, tmp_path / "q.jsonl", 6)
    sample = ("--do_sample", "--temperature", "1.5", "--max_new_tokens", "8", "--seed", "7")
    predict(parse(_argv(world, tiny, qfile, tmp_path / "one.jsonl", *sample)))
    for idx in ("1", "0"):
        predict(parse(_argv(world, tiny, qfile, tmp_path / "two.jsonl", *sample, "--num_chunks", "2",
                            "--chunk_idx", idx)))
    one, two = _rows(tmp_path / "one.jsonl"), _rows(tmp_path / "two.jsonl")
    assert {q: r["text"] for q, r in two.items()} == {q: r["text"] for q, r in one.items()}
    assert len({r["text"] for r in one.values()}) > 1  # sampled answers that differ: the seeds matter
