"""scripts/env.sh's `launch` with a HOSTFILE: DeepSpeed's pdsh runner (its default multi-node launcher) joins the
command into one string that each node's shell splits again, so the stage's arguments must survive that."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what a data path or a prompt may hold: spaces, quotes, $, a glob, a leading ~, shell operators, a newline, nothing
ODD = ["--data_path", "my data/train.json", "--prompt", "it's \"red\" $HOME `id` a\\b", "*.json", "~/x", "a;b&c|d",
       "#c", "two\nlines", "tab\there", "", "ünï", "--x", "1"]


def _launch_argv(tmp_path, args: list[str], hosts: str) -> list[str]:
    """The deepspeed launcher's arguments as `launch` gives them (a stand-in `deepspeed` on PATH prints them)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "deepspeed").write_text(f'#!/usr/bin/env bash\n{sys.executable} -c '
                                    '"import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n')
    (fake / "deepspeed").chmod(0o755)
    (tmp_path / "hosts").write_text(hosts)
    script = f'source scripts/env.sh; export PATH="{fake}:$PATH"; launch echo_args "$@"'
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS")}
    p = subprocess.run(["bash", "-c", script, "launch", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**base, "HOME": str(tmp_path), "HOSTFILE": str(tmp_path / "hosts"),
                                         "MASTER_PORT": "29999"})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _as_a_node_runs_it(tmp_path, launcher_argv: list[str]) -> list[str]:
    """The rank's sys.argv on the second node: DeepSpeed's own PDSHRunner builds the command, pdsh joins it with
    spaces and the node's shell runs it (as deepspeed.launcher.launch would: python -u -m MODULE ARGS --local_rank=0,
    the stage module being a stand-in that prints its argv)."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    from deepspeed.launcher.runner import parse_args
    args = parse_args(launcher_argv)
    runner = PDSHRunner(args, "WORLD")
    cmd, _, _ = runner.get_cmd({}, {"node1": [0], "node2": [0]})
    remote = cmd[cmd.index("-w") + 2:]
    start = remote.index("deepspeed.launcher.launch") - 3  # the python -u -m of the launcher
    stage = remote[len(remote) - len(runner.user_arguments) - 1:]  # the module and its arguments, at the end
    assert remote[start] == sys.executable and stage[0] == args.user_script
    line = " ".join(remote[:start] + [sys.executable, "-u", "-m"] + stage + ["--local_rank=0"])
    (tmp_path / "echo_args.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    p = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "HOME": "/nonexistent"})
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_arguments_with_spaces_quotes_and_dollars_reach_the_other_nodes_as_given(tmp_path):
    """pdsh's runner wraps an argument holding a space in double quotes alone: "my data/train.json" survived, but a
    $ or backquote in it was expanded on the node, a quote without a space ended the node's command with a syntax
    error, an empty argument vanished, a * was globbed and a ~ became a home folder."""
    argv = _launch_argv(tmp_path, ODD, "node1 slots=1\nnode2 slots=1\n")
    assert _as_a_node_runs_it(tmp_path, argv) == ODD + ["--local_rank=0"]


@pytest.mark.parametrize("hosts", ["node1 slots=1\n", "node1 slots=1\nnode2 slots=1\n"])
def test_plain_arguments_go_as_they_are_and_odd_ones_run_the_same_on_one_host(tmp_path, hosts):
    """A hostfile of one host takes the launcher's local path (no shell): the arguments reach the stage the same."""
    argv = _launch_argv(tmp_path, ["--x", "1", "--data_path", "data/a-b_c.json"], hosts)
    assert argv[argv.index("--module"):] == ["--module", "echo_args", "--x", "1", "--data_path", "data/a-b_c.json"]
    argv = _launch_argv(tmp_path, ODD, hosts)
    rank = argv[argv.index("--module") + 1:] + ["--local_rank=0"]  # deepspeed.launcher.launch, on this machine
    (tmp_path / "echo_args.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-u", "-m", *rank], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == ODD + ["--local_rank=0"]


def test_a_repository_path_a_nodes_shell_would_split_is_refused_by_name(tmp_path):
    """pdsh's runner has each node run `cd ROOT; PYTHON ...` unquoted: from a folder with a space the node's cd failed
    (too many arguments) and its ranks ran from the home folder, relative paths (output/, data/) resolving there."""
    link = tmp_path / "my repo"  # the nodes cd to the physical folder (os.getcwd()): a real one, its parts linked
    link.mkdir()
    for name in ("scripts", "training", ".venv", "requirements.txt"):
        (link / name).symlink_to(ROOT / name)
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text('#!/usr/bin/env bash\necho reached\n')
    (fake / "deepspeed").chmod(0o755)
    script = f'source "{link}/scripts/env.sh"; export PATH="{fake}:$PATH"; launch training.sft.main --x 1'
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS")}
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**base, "HOME": str(tmp_path), "HOSTFILE": str(tmp_path / "hosts")})
    assert p.returncode == 2 and "reached" not in p.stdout, p.stdout + p.stderr
    assert f"{link}" in p.stderr and "no space" in p.stderr


@pytest.mark.parametrize("odd", ["a b", "it's", 'say"', "$HOME", "`id`", "*.json", "~/x", "a;b", "a&b", "a|b", "#c",
                                 "two\nlines", "tab\there", "", "a\\b", "(x)", "<in", "a?", "[ab]", "{a,b}", "!x",
                                 "ünï"])
def test_each_argument_a_shell_would_change_is_encoded_alone(odd):
    """ODD above mixes them, so one character wrongly taken for plain (a ~ or * added to node_argv.PLAIN) went
    unnoticed: the word was made for the others. Each alone, among plain ones, must make the word, and decode back."""
    from training.engine.node_argv import encode, stage_argv
    args = ["--data_path", "data/a-b_c.json", "--x", odd]
    word = encode(args)
    assert word != ""
    assert stage_argv(["mod", word, "--local_rank=0"]) == ("mod", args + ["--local_rank=0"])
    assert encode(["--data_path", "data/a-b_c.json", "--lr=1e-5", "x@y%z+w:v,u"]) == ""
