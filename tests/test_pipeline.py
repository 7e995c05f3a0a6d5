"""run_pipeline.sh's reruns: a finished stage is kept only while its command, code, inputs and the stages it
starts from are unchanged; an interrupted one continues with --resume; anything else trains anew."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training import pipeline
from training.dpo.refcache import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def fake_project(root: Path) -> Path:
    (root / "training").mkdir(parents=True)
    (root / "training" / "stage.py").write_text("x = 1\n")
    (root / "run_sft.sh").write_text("echo sft\n")
    (root / "data" / "world").mkdir(parents=True)
    (root / "data" / "world" / "pairs.json").write_text("[]")
    return root


def test_fingerprint_follows_command_code_inputs_ranks_and_dependencies(tmp_path, monkeypatch):
    root = fake_project(tmp_path / "proj")
    monkeypatch.delenv("NUM_GPUS", raising=False)
    cmd = ["run_sft.sh", "--lr", "1"]
    base = pipeline.fingerprint(cmd, [], root)
    assert pipeline.fingerprint(list(cmd), [], root) == base
    assert pipeline.fingerprint(["run_sft.sh", "--lr", "2"], [], root) != base
    (root / "training" / "__pycache__").mkdir()
    (root / "training" / "__pycache__" / "stage.pyc").write_bytes(b"\0")  # compiled files do not count,
    cache = default_cache_dir([str(root / "data" / "world" / "pairs.json")], str(tmp_path / "o"))
    assert cache.parent == root / "data" / "world"  # nor DPO's reference cache, written beside the data
    cache.mkdir()
    (cache / "k.safetensors").write_bytes(b"\0")
    assert pipeline.fingerprint(cmd, [], root) == base
    for path, text in (("training/stage.py", "x = 2\n"), ("run_sft.sh", "echo sft2\n"),
                       ("data/world/pairs.json", "[1]")):
        old = (root / path).read_text()
        (root / path).write_text(text)
        assert pipeline.fingerprint(cmd, [], root) != base, path
        (root / path).write_text(old)
    assert pipeline.fingerprint(cmd, [], root) == base
    (root / "output" / "tiny_vlm_init").mkdir(parents=True)
    (root / "output" / "tiny_vlm_init" / "config.json").write_text("{}")
    assert pipeline.fingerprint(cmd, [], root) != base
    base = pipeline.fingerprint(cmd, [], root)
    monkeypatch.setenv("NUM_GPUS", "2")
    assert pipeline.fingerprint(cmd, [], root) != base
    monkeypatch.delenv("NUM_GPUS")
    # the GPUs a launch uses, and the hostfile's machines (its name alone counted): another world size
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    one_gpu = pipeline.fingerprint(cmd, [], root)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # another GPU, the same count: the same stage
    assert pipeline.fingerprint(cmd, [], root) == one_gpu
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert pipeline.fingerprint(cmd, [], root) != one_gpu
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=2\n")
    monkeypatch.setenv("HOSTFILE", str(hosts))
    one = pipeline.fingerprint(cmd, [], root)
    hosts.write_text("node1 slots=2\nnode2 slots=2\n")
    assert pipeline.fingerprint(cmd, [], root) != one
    monkeypatch.delenv("HOSTFILE")

    dep = tmp_path / "out_sft"
    with pytest.raises(SystemExit, match="no finished run"):
        pipeline.fingerprint(cmd, [str(dep)], root)
    assert pipeline.begin(dep, ["a"], [], root) == "fresh"
    with pytest.raises(SystemExit, match="no finished run"):  # begun, not finished
        pipeline.fingerprint(cmd, [str(dep)], root)
    _finish(dep, ["a"])
    with_dep = pipeline.fingerprint(cmd, [str(dep)], root)
    assert with_dep != base
    assert pipeline.begin(dep, ["a", "b"], [], root) == "fresh"  # the dependency retrained with other arguments
    _finish(dep, ["a", "b"])
    assert pipeline.fingerprint(cmd, [str(dep)], root) != with_dep
    with_dep = pipeline.fingerprint(cmd, [str(dep)], root)
    assert pipeline.begin(dep, ["a", "b"], [], root) == "skip"
    (dep / "model.safetensors").write_bytes(b"weights")  # rewritten outside the pipeline (a stage run by hand)
    assert pipeline.begin(dep, ["a", "b"], [], root) == "fresh"
    _finish(dep, ["a", "b"])  # same command, code and inputs; other weights
    assert pipeline.fingerprint(cmd, [str(dep)], root) != with_dep


def test_a_stage_fingerprint_holds_only_the_modules_its_script_reaches(tmp_path):
    root = tmp_path / "proj"
    files = {"run_a.sh": 'launch training.a.main "$@"\n', "run_b.sh": "python -m training.b.main\n",
             "run_c.sh": "launch training.c.main\n", "run_x.sh": "echo no module\n",
             "training/__init__.py": "", "training/common.py": "X = 1\n", "training/table.json": "{}",
             "training/a/__init__.py": "", "training/a/main.py": "from training.common import X\n",
             "training/b/__init__.py": "",
             "training/b/main.py": "def f():\n    from . import helper\n    from eval.score import s\n"
                                   "    return 'run_c.sh', 'training.e'\n",
             "training/b/helper.py": "", "training/c/__init__.py": "", "training/c/main.py": "",
             "training/d.py": "", "training/e.py": "", "eval/__init__.py": "", "eval/score.py": "s = 1\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    a, b = set(pipeline.code_files(["run_a.sh"], root)), set(pipeline.code_files(["run_b.sh", "--x"], root))
    shared = {"run_a.sh", "run_b.sh", "run_c.sh", "run_x.sh", "training/table.json", "training/__init__.py"}
    assert a == shared | {"training/common.py", "training/a/__init__.py", "training/a/main.py"}
    assert b == shared | {"training/b/__init__.py", "training/b/main.py", "training/b/helper.py",  # relative import
                          "eval/__init__.py", "eval/score.py",  # inside a function
                          "training/c/__init__.py", "training/c/main.py",  # a script started by name
                          "training/e.py"}  # a module named by a string
    assert set(pipeline.code_files(["run_x.sh"], root)) == set(files)  # no module: all code counts

    fp = {s: pipeline.fingerprint([s], [], root) for s in ("run_a.sh", "run_b.sh", "run_x.sh")}
    for name, changed in (("training/b/helper.py", {"run_b.sh", "run_x.sh"}), ("training/d.py", {"run_x.sh"}),
                          ("training/common.py", {"run_a.sh", "run_x.sh"}), ("training/table.json", set(fp))):
        (root / name).write_text((root / name).read_text() + "\n# edited\n")
        now = {s: pipeline.fingerprint([s], [], root) for s in fp}
        assert {s for s in fp if now[s] != fp[s]} == changed, name
        fp = now


def test_the_real_stages_reach_their_own_code():
    sft, dpo, opa = (set(pipeline.code_files([s])) for s in ("run_sft.sh", "run_dpo_training.sh", "run_opa_dpo.sh"))
    assert {"training/sft/main.py", "training/model/builder.py", "training/engine/strategy.py"} <= sft
    assert not {"training/ppo/trainer.py", "training/dpo/main.py", "eval/embedded.py"} & sft
    assert {"training/dpo/refcache.py", "training/losses.py"} <= dpo and "training/sft/trainer.py" not in dpo
    assert {"training/sft/main.py", "training/dpo/main.py", "eval/embedded.py"} <= opa  # stages it runs by name


def test_fingerprint_follows_files_named_by_arguments(tmp_path):
    root = fake_project(tmp_path / "proj")
    data, images, out, dep = tmp_path / "pairs.json", tmp_path / "images", tmp_path / "out", tmp_path / "dep"
    data.write_text("[]")
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
    assert pipeline.begin(dep, ["d"], [], root) == "fresh"
    _finish(dep, ["d"])
    cmd = ["run_sft.sh", "--data_path", f"{data},{data}", "--image_folder", str(images), "--output_dir", str(out),
           "--from_checkpoint", str(dep)]
    base = pipeline.fingerprint(cmd, [str(dep)], root, out)
    (out / "checkpoints").mkdir(parents=True)  # the stage's own output and
    (dep / "predictions.jsonl").write_text("x")  # what is written beside a stage it starts from do not count
    assert pipeline.fingerprint(cmd, [str(dep)], root, out) == base
    data.write_text("[1]")
    assert pipeline.fingerprint(cmd, [str(dep)], root, out) != base
    base = pipeline.fingerprint(cmd, [str(dep)], root, out)
    (images / "b.png").write_bytes(b"png")
    assert pipeline.fingerprint(cmd, [str(dep)], root, out) != base
    # the same files named as --option=VALUE (argparse's other spelling): their changes counted as well
    cmd = ["run_sft.sh", f"--data_path={data}", f"--image_folder={images}", f"--output_dir={out}"]
    base = pipeline.fingerprint(cmd, [], root, out)
    data.write_text("[1, 2]")
    assert pipeline.fingerprint(cmd, [], root, out) != base
    base = pipeline.fingerprint(cmd, [], root, out)
    (images / "c.png").write_bytes(b"png")
    assert pipeline.fingerprint(cmd, [], root, out) != base
    base = pipeline.fingerprint(cmd, [], root, out)
    (out / "model.safetensors").write_bytes(b"w")  # (its own output still does not count)
    assert pipeline.fingerprint(cmd, [], root, out) == base
    # and those a --config profile names (a JSON file of argument values): its data changed, the stage retrains
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"data_path": str(data), "image_folder": str(images), "learning_rate": 1e-3}))
    for cmd in (["run_sft.sh", "--config", str(profile)], ["run_sft.sh", f"--config={profile}"]):
        base = pipeline.fingerprint(cmd, [], root, out)
        data.write_text(data.read_text() + " ")
        assert pipeline.fingerprint(cmd, [], root, out) != base
    # but not where the stage writes besides its output (its figures, DPO's reference cache): a stage given
    # --figure_dir DIR retrained on every rerun, its own plot being one of its inputs
    figures, cache = tmp_path / "figures", tmp_path / "cache"
    for cmd in (["run_sft.sh", "--figure_dir", str(figures), "--ref_cache_dir", str(cache)],
                ["run_sft.sh", f"--figure_dir={figures}", f"--ref_cache_dir={cache}"]):
        figures.mkdir(exist_ok=True)
        cache.mkdir(exist_ok=True)
        base = pipeline.fingerprint(cmd, [], root, out)
        (figures / "sft_metrics.png").write_bytes(b"png" * len(cmd))
        (cache / "k.safetensors").write_bytes(b"x" * len(cmd))
        assert pipeline.fingerprint(cmd, [], root, out) == base


def test_a_folder_argument_holding_the_repository_leaves_out_what_runs_write(tmp_path):
    """--image_folder . named the repository, whose output/ and figure/ every stage writes: each stage's fingerprint
    then changed with the others' outputs, and every rerun retrained it. A file named inside output/ still counts."""
    root = fake_project(tmp_path / "proj")
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(b"png")
    (root / "output" / "opa").mkdir(parents=True)
    (root / "output" / "opa" / "pairs.json").write_text("[]")
    cmd = ["run_sft.sh", "--image_folder", ".", "--data_path", "output/opa/pairs.json"]
    base = pipeline.fingerprint(cmd, [], root)
    for written in ("output/dpo/model.safetensors", "figure/dpo_metrics.png", ".venv/x.py"):
        (root / written).parent.mkdir(parents=True, exist_ok=True)
        (root / written).write_bytes(b"w")
    assert pipeline.fingerprint(cmd, [], root) == base
    (root / "images" / "a.png").write_bytes(b"png2")
    assert pipeline.fingerprint(cmd, [], root) != base
    base = pipeline.fingerprint(cmd, [], root)
    (root / "output" / "opa" / "pairs.json").write_text("[1]")
    assert pipeline.fingerprint(cmd, [], root) != base


def test_a_refused_command_leaves_the_finished_run_kept(tmp_path, monkeypatch):
    """A command that wrote no model into the stage's output (--help, an output_dir elsewhere) is not marked
    finished; its start replaced the finished run's record, so the next run of the original command retrained."""
    root = fake_project(tmp_path / "proj")
    monkeypatch.delenv("PIPELINE_FRESH", raising=False)
    out = tmp_path / "out"
    assert pipeline.begin(out, ["s"], [], root) == "fresh"
    _finish(out, ["s"])
    assert pipeline.begin(out, ["s", "--help"], [], root) == "fresh"
    with pytest.raises(SystemExit, match="wrote no model"):
        pipeline.end(out, ["s", "--help"])
    assert pipeline.begin(out, ["s"], [], root) == "skip"
    # one that did write its model is that model's record from then on
    assert pipeline.begin(out, ["s", "--lr", "2"], [], root) == "fresh"
    _finish(out, ["s", "--lr", "2"])
    rec = json.loads((out / pipeline.RECORD).read_text())
    assert rec["status"] == "done" and rec["command"] == ["s", "--lr", "2"] and "finished_before" not in rec
    assert pipeline.begin(out, ["s"], [], root) == "fresh"


def test_fingerprint_reads_options_as_the_stage_does(tmp_path):
    """run_pipeline.sh passes its arguments to SFT: --figure_dir DIR's plot must not enter the fingerprint (it
    retrained on every rerun); --config FILE's data must (kept after it changed); --stop_after_steps N must not (a
    rerun without it trained anew instead of resuming). Each as --name VALUE and --name=VALUE."""
    root = fake_project(tmp_path / "proj")
    figures, data, profile = tmp_path / "figs", tmp_path / "pairs.json", tmp_path / "profile.json"
    figures.mkdir()
    data.write_text("[]")
    profile.write_text(json.dumps({"data_path": str(data)}))
    for cmd in (["run_sft.sh", "--figure_dir", str(figures)], ["run_sft.sh", f"--figure_dir={figures}"]):
        base = pipeline.fingerprint(cmd, [], root)
        (figures / "sft_metrics.png").write_bytes(b"png" * len(cmd[-1]))
        assert pipeline.fingerprint(cmd, [], root) == base, cmd
    for cmd in (["run_sft.sh", "--config", str(profile)], ["run_sft.sh", f"--config={profile}"]):
        base = pipeline.fingerprint(cmd, [], root)
        data.write_text(data.read_text() + " ")
        assert pipeline.fingerprint(cmd, [], root) != base, cmd
    plain = pipeline.fingerprint(["run_sft.sh", "--lr", "1"], [], root)
    for stop in (["--stop_after_steps=2"], ["--stop_after_steps", "2"]):
        assert pipeline.fingerprint(["run_sft.sh", *stop, "--lr", "1"], [], root) == plain, stop


def test_begin_and_end_states(tmp_path, monkeypatch):
    root = fake_project(tmp_path / "proj")
    monkeypatch.delenv("PIPELINE_FRESH", raising=False)
    out = tmp_path / "out"
    assert pipeline.begin(out, ["s"], [], root) == "fresh"
    assert pipeline.begin(out, ["s"], [], root) == "fresh"  # started, never finished, no checkpoint written
    (out / "checkpoints" / "actor").mkdir(parents=True)
    (out / "checkpoints" / "actor" / "latest").write_text("step1")
    assert pipeline.begin(out, ["s"], [], root) == "resume"  # continued from its checkpoint
    with pytest.raises(SystemExit, match="does not record a start"):
        _finish(out, ["other"])
    _finish(out, ["s"])
    rec = json.loads((out / pipeline.RECORD).read_text())
    assert rec["status"] == "done" and rec["command"] == ["s"]
    assert pipeline.begin(out, ["s"], [], root) == "skip"
    assert json.loads((out / pipeline.RECORD).read_text()) == rec  # a kept stage's record is untouched
    monkeypatch.setenv("PIPELINE_FRESH", "0")  # (it retrained every stage: any value did)
    assert pipeline.begin(out, ["s"], [], root) == "skip"
    monkeypatch.setenv("PIPELINE_FRESH", "1")
    assert pipeline.begin(out, ["s"], [], root) == "fresh"
    monkeypatch.delenv("PIPELINE_FRESH")
    _finish(out, ["s"])
    (root / "training" / "stage.py").write_text("x = 3\n")  # the code changed since it finished
    assert pipeline.begin(out, ["s"], [], root) == "fresh"


def _finish(out: Path, command: list[str]) -> None:
    """pipeline.end after a stage that wrote its model (a stand-in weight file, of another size each time)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    model = Path(out) / "model.safetensors"
    model.write_bytes(b"w" * (model.stat().st_size + 1 if model.exists() else 1))
    pipeline.end(out, command)


FAKE_STAGE = """out="$1"; shift
echo "$(basename "$out")${*:+ $*}" >> "$LOG"
mkdir -p "$out"
if [ -z "${NO_CHECKPOINT:-}" ]; then mkdir -p "$out/checkpoints"; echo step1 > "$out/checkpoints/latest"; fi
if [ -n "${FAIL:-}" ]; then exit 3; fi
case "${1:-}" in --stop_after_steps*) exit 75 ;; esac
if [ -z "${NO_MODEL:-}" ]; then echo w > "$out/model.safetensors"; fi
"""


def test_stage_function_keeps_resumes_and_retrains(tmp_path):
    """scripts/stage.sh as run_pipeline.sh uses it, with stand-in stage scripts."""
    fake = tmp_path / "fake_stage.sh"
    fake.write_text(FAKE_STAGE)
    log = tmp_path / "log"
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    env = {**os.environ, "LOG": str(log), "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("PIPELINE_FRESH", None)

    def pipeline_run(a_args="", extra_env=None):
        script = (f"set -euo pipefail; cd {ROOT}; source scripts/stage.sh\n"
                  f"stage {a} -- {fake} {a} {a_args}\n"
                  f"stage {b} {a} -- {fake} {b}\n"
                  f"stage {c} {a} {b} -- {fake} {c} --x 1\n")  # two stages to start from, as PPO
        p = subprocess.run(["bash", "-c", script], env={**env, **(extra_env or {})}, capture_output=True, text=True)
        ran = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return p.returncode, ran, p.stdout

    rc, ran, stdout = pipeline_run()
    assert (rc, ran) == (0, ["a", "b", "c --x 1"]) and stdout.count("== ") == 3 and stdout.count("training (") == 3
    rc, ran, stdout = pipeline_run()
    assert (rc, ran) == (0, []) and stdout.count("kept") == 3
    assert json.loads((c / pipeline.RECORD).read_text())["after"] == [str(a), str(b)]
    assert pipeline_run("--lr 2")[:2] == (0, ["a --lr 2", "b", "c --x 1"])  # b, c start from a retrained a
    assert pipeline_run("--lr 3", {"FAIL": "1"})[:2] == (3, ["a --lr 3"])  # interrupted: b never starts
    assert pipeline_run("--lr 3")[:2] == (0, ["a --lr 3 --resume", "b", "c --x 1"])
    assert pipeline_run("--lr 3", {"PIPELINE_FRESH": "1"})[:2] == (0, ["a --lr 3", "b", "c --x 1"])
    assert pipeline_run("--lr 6", {"FAIL": "1", "NO_CHECKPOINT": "1"})[:2] == (3, ["a --lr 6"])
    # interrupted before writing any: trained anew, not resumed from the checkpoint of the earlier run (--lr 3) still
    # there (a stage removes it once it starts training; killed before, its `--resume` was refused: other options)
    assert pipeline_run("--lr 6", {"FAIL": "1", "NO_CHECKPOINT": "1"})[:2] == (3, ["a --lr 6"])
    assert pipeline_run("--lr 6")[:2] == (0, ["a --lr 6", "b", "c --x 1"])
    assert pipeline_run("--lr 7", {"FAIL": "1"})[:2] == (3, ["a --lr 7"])  # one that wrote its own: continued
    assert pipeline_run("--lr 7", {"FAIL": "1", "NO_CHECKPOINT": "1"})[:2] == (3, ["a --lr 7 --resume"])
    assert pipeline_run("--lr 7", {"FAIL": "1", "NO_CHECKPOINT": "1"})[:2] == (3, ["a --lr 7 --resume"])
    assert pipeline_run("--lr 3")[:2] == (0, ["a --lr 3", "b", "c --x 1"])
    (b / "model.safetensors").write_bytes(b"new")  # b rewritten by hand: b and what starts from it retrain
    assert pipeline_run("--lr 3")[:2] == (0, ["b", "c --x 1"])
    # a run stopped at --stop_after_steps (exit status 75) is continued by a rerun, with or without the flag
    assert pipeline_run("--stop_after_steps 2 --lr 4")[:2] == (75, ["a --stop_after_steps 2 --lr 4"])
    assert pipeline_run("--lr 4")[:2] == (0, ["a --lr 4 --resume", "b", "c --x 1"])
    assert pipeline_run("--stop_after_steps=2 --lr 5")[:2] == (75, ["a --stop_after_steps=2 --lr 5"])
    assert pipeline_run("--stop_after_steps 9 --lr 5")[:2] == (75, ["a --stop_after_steps 9 --lr 5 --resume"])
    # a stage that wrote its model elsewhere (an --output_dir in a --config profile): not marked finished, and the
    # stages after it do not start (they were marked done over an empty folder, and read it)
    (a / "model.safetensors").unlink()
    rc, ran, _ = pipeline_run("--lr 7", {"NO_MODEL": "1"})
    assert rc != 0 and ran == ["a --lr 7"] and json.loads((a / pipeline.RECORD).read_text())["status"] == "started"
    # nor is one that left an earlier run's model there (run_pipeline.sh --help: SFT printed its help and exited 0,
    # and RM, DPO, ORPO and PPO then trained from the old SFT model, recorded as the `--help` command's)
    assert pipeline_run("--lr 7")[:2] == (0, ["a --lr 7 --resume", "b", "c --x 1"])
    rc, ran, _ = pipeline_run("--help", {"NO_MODEL": "1"})
    rec = json.loads((a / pipeline.RECORD).read_text())  # not the --help command's: the finished run's, kept
    assert rc != 0 and ran == ["a --help"] and (rec["status"], rec["command"][-2:]) == ("done", ["--lr", "7"])
    assert pipeline_run("--lr 7")[:2] == (0, [])  # kept (a retrained once when --help replaced its record)


def test_stage_function_without_separator_stops(tmp_path):
    p = subprocess.run(["bash", "-c", f"set -euo pipefail; cd {ROOT}; source scripts/stage.sh; stage {tmp_path} a b; "
                        "echo went on"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage: stage OUT" in p.stderr and "went on" not in p.stdout


@pytest.mark.parametrize("arg", ["--output_dir", "--output_dir=x", "--world_seed", "--world_dir=w"])
def test_the_pipeline_refuses_sft_options_the_later_stages_would_not_follow(arg):
    """run_pipeline.sh passes its arguments to SFT: --output_dir X trained into X while RM, DPO, ORPO and PPO
    loaded output/sft; another world seed or folder made SFT train on another world than the benchmarks'."""
    proc = subprocess.run(["bash", str(ROOT / "run_pipeline.sh"), arg, "x"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "is not a pipeline option" in proc.stderr


@pytest.mark.parametrize("key", ["output_dir", "world_dir", "world_seed"])
def test_the_pipeline_refuses_them_in_a_profile(tmp_path, key):
    """The same options set by a --config profile went to SFT unchecked."""
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"learning_rate": 1e-3, key: 1 if key == "world_seed" else "elsewhere"}))
    for args in (["--config", str(profile)], [f"--config={profile}"]):
        proc = subprocess.run(["bash", str(ROOT / "run_pipeline.sh"), *args], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert proc.returncode == 2 and f"{profile}: {key} is not a pipeline option" in proc.stderr, proc.stderr


@pytest.mark.parametrize("arg", ["--help", "-h", "--he"])  # (argparse takes --he, --hel for --help)
def test_the_pipeline_help_prints_its_usage_and_trains_nothing(tmp_path, arg):
    """`bash run_pipeline.sh --help` went to SFT: SFT printed its help and exited 0, and the pipeline went on (the
    embedded defaults built, RM, DPO, ORPO and PPO trained from whatever output/sft held)."""
    p = subprocess.Popen(["bash", str(ROOT / "run_pipeline.sh"), arg], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0 and out.startswith("The main job") and "training.sft.main --help" in out
    assert "== " not in out


def test_the_pipeline_runs_from_another_directory(tmp_path):
    """scripts/env.sh moves to the repository root, after which `$(dirname "$0")` (a relative path) named nothing:
    `bash proj/run_pipeline.sh` stopped at `source .../scripts/stage.sh: No such file or directory`."""
    proc = subprocess.run(["bash", f"{ROOT.name}/run_pipeline.sh", "--world_seed", "1"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT.parent)
    assert proc.returncode == 2 and "is not a pipeline option" in proc.stderr, proc.stderr


def test_the_default_rank_count_spelled_out_keeps_the_stages(tmp_path, monkeypatch):
    """NUM_GPUS=1 on a CPU machine (or NUM_GPUS=N with N GPUs) runs the ranks that leaving it unset runs: the
    value alone changed the fingerprint, so every stage trained anew."""
    root = fake_project(tmp_path / "proj")
    for name in ("NUM_GPUS", "HOSTFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cmd = ["run_sft.sh"]
    unset = pipeline.fingerprint(cmd, [], root)
    monkeypatch.setenv("NUM_GPUS", "1")
    assert pipeline.fingerprint(cmd, [], root) == unset
    monkeypatch.setenv("NUM_GPUS", "2")
    assert pipeline.fingerprint(cmd, [], root) != unset
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("NUM_GPUS")
    every = pipeline.fingerprint(cmd, [], root)
    monkeypatch.setenv("NUM_GPUS", "2")
    assert pipeline.fingerprint(cmd, [], root) == every
    monkeypatch.setenv("NUM_GPUS", "1")
    assert pipeline.fingerprint(cmd, [], root) != every


def test_the_results_table_holds_the_models_the_job_evaluated(tmp_path):
    """The table read output/*/eval_embedded.json: a results file another command left in output/ (say
    output/opa_dpo's, of a model trained from an earlier SFT model) was a row of the main job's table."""
    lines = (ROOT / "run_pipeline.sh").read_text().splitlines()
    last_stage = max(i for i, line in enumerate(lines) if line.startswith("stage "))
    for name in ("sft", "dpo", "orpo", "ppo", "opa_dpo"):
        (tmp_path / "output" / name).mkdir(parents=True)
        (tmp_path / "output" / name / "eval_embedded.json").write_text("{}")
    script = 'python() { echo "python $*"; }\n' + "\n".join(lines[last_stage + 1:])  # the evaluation and the table
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    evaluated, table = [line.split() for line in p.stdout.splitlines()]
    models = evaluated[evaluated.index("--models") + 1:evaluated.index("--world")]
    results = table[table.index("--results") + 1:table.index("--table_file")]
    assert p.returncode == 0 and models == ["output/sft", "output/dpo", "output/orpo", "output/ppo"]
    assert results == [f"{m}/eval_embedded.json" for m in models]


def test_a_failed_run_of_other_arguments_leaves_the_finished_model_kept(tmp_path, monkeypatch):
    """`run_pipeline.sh --data_path typo.json` stopped in SFT before it wrote anything; the rerun without it (the
    command, code and inputs of the model still there) trained SFT, and every stage after it, anew."""
    root = fake_project(tmp_path / "proj")
    monkeypatch.delenv("PIPELINE_FRESH", raising=False)
    out = tmp_path / "out"
    assert pipeline.begin(out, ["s"], [], root) == "fresh"
    _finish(out, ["s"])
    finished = json.loads((out / pipeline.RECORD).read_text())
    downstream = pipeline.fingerprint(["t"], [str(out)], root)
    assert pipeline.begin(out, ["s", "--data_path", "typo.json"], [], root) == "fresh"  # (it fails: no `end`)
    assert pipeline.begin(out, ["s"], [], root) == "skip"
    rec = json.loads((out / pipeline.RECORD).read_text())  # the finished run's record is back: what follows reads it
    assert {k: v for k, v in rec.items() if k != "time"} == {k: v for k, v in finished.items() if k != "time"}
    assert pipeline.fingerprint(["t"], [str(out)], root) == downstream
    # one that wrote into the output before it failed (its run_config.json, metrics, the model): trained anew; so is
    # one asked for with PIPELINE_FRESH
    for written in ("run_config.json", "model.safetensors"):
        assert pipeline.begin(out, ["s", "--lr", "2"], [], root) == "fresh"
        (out / written).write_text("of the failed run")
        assert pipeline.begin(out, ["s"], [], root) == "fresh", written
        _finish(out, ["s"])
    assert pipeline.begin(out, ["s", "--lr", "2"], [], root) == "fresh"
    monkeypatch.setenv("PIPELINE_FRESH", "1")
    assert pipeline.begin(out, ["s"], [], root) == "fresh"
