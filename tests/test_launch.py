"""scripts/env.sh's `launch`: the deepspeed launcher's arguments for the ranks asked for (a stand-in
`deepspeed` on PATH prints them)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launch(tmp_path, **env) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "deepspeed").write_text('#!/usr/bin/env bash\necho "$@"\n')
    (fake / "deepspeed").chmod(0o755)
    script = (f'source scripts/env.sh; export PATH="{fake}:$PATH"; unset DS_ACCELERATOR; '
              'launch training.sft.main --x 1')
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HOSTFILE")}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env={**base, "MASTER_PORT": "29999", **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env, want", [
    ({}, ""),
    ({"NUM_GPUS": "2"}, "--num_gpus 2 "),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "--include localhost:2,3 "),
    # the launcher dropped CUDA_VISIBLE_DEVICES when given --num_gpus: GPUs 0 and 1 ran instead of 2 and 3
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NUM_GPUS": "2"}, "--include localhost:2,3 "),
    ({"CUDA_VISIBLE_DEVICES": "5,1,7", "NUM_GPUS": "2"}, "--include localhost:5,1 "),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "HOSTFILE": "HOSTS"}, "--hostfile HOSTS "),
    ({"NUM_GPUS": "4", "HOSTFILE": "HOSTS"}, "--hostfile HOSTS --num_gpus 4 "),
])
def test_launch_arguments(tmp_path, env, want):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=2\nnode2 slots=2\n")
    env = {k: str(hosts) if v == "HOSTS" else v for k, v in env.items()}
    want = want.replace("HOSTS", str(hosts))
    p = _launch(tmp_path, **env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"{want}--master_port 29999 --module training.sft.main --x 1"


def test_more_gpus_than_visible_devices_stops(tmp_path):
    p = _launch(tmp_path, CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="4")
    assert p.returncode == 2 and "NUM_GPUS=4 but CUDA_VISIBLE_DEVICES=2,3 names 2 device(s)" in p.stderr


def test_a_missing_hostfile_stops(tmp_path):
    """The deepspeed launcher warns and trains on this machine alone when the hostfile is not there."""
    p = _launch(tmp_path, HOSTFILE=str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "nowhere: no such file" in p.stderr


def test_a_hostfile_run_from_a_machine_without_gpus_takes_the_hostfiles_slots(tmp_path):
    """On a head node without CUDA the CPU branch passed --num_accelerators 1: one GPU per node."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text('#!/usr/bin/env bash\necho "$@"\necho "FILE=$DS_ENV_FILE"\ncat "$DS_ENV_FILE"\n')
    (fake / "deepspeed").chmod(0o755)
    script = f'source scripts/env.sh; export PATH="{fake}:$PATH" DS_ACCELERATOR=cpu; launch training.sft.main'
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "HF_TOKEN")}
    (tmp_path / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=ib0")  # the user's, without a last newline
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**base, "HOME": str(tmp_path), "HOSTFILE": str(hosts), "MASTER_PORT": "29999",
                            "VLM_ALIGN_CACHE": "/shared/cache", "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret",
                            "HF_DATASETS_CACHE": "/shared/datasets", "HF_DATASETS_OFFLINE": "1",
                            "NCCL_SOCKET_IFNAME": "eth1", "GLOO_SOCKET_IFNAME": "eth0"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == f"--hostfile {hosts} --master_port 29999 --module training.sft.main"
    # the other nodes' ranks get the variables they read (pdsh passes PYTHON* only from a CPU head), never the
    # token; the user's .deepspeed_env comes last, so its value wins (DeepSpeed keeps the last of a name)
    # (HF_DATASETS_CACHE did not: another node's ranks, offline, looked for a Hub data set in the default cache)
    assert {"VLM_ALIGN_CACHE=/shared/cache", "HF_HUB_OFFLINE=1", "TOKENIZERS_PARALLELISM=false",
            "NCCL_SOCKET_IFNAME=eth1", "HF_DATASETS_CACHE=/shared/datasets", "HF_DATASETS_OFFLINE=1"} <= set(lines[1:])
    assert [x for x in lines if x.startswith("GLOO_SOCKET_IFNAME=")][-1] == "GLOO_SOCKET_IFNAME=ib0"
    assert not any("hf_secret" in x for x in lines)
    env_file = Path(next(x for x in lines if x.startswith("FILE=")).removeprefix("FILE="))
    assert env_file.name.startswith("vlm_align_env.") and not env_file.exists()  # removed at exit


@pytest.mark.parametrize("in_process", [False, True])
def test_an_opa_step_that_did_not_finish_stops_opa_dpo_with_its_status(tmp_path, monkeypatch, in_process):
    """run_opa_dpo.sh's SFT step stopped by --stop_after_steps (exit status 75, not finished): through run_sft.sh
    it ended in a CalledProcessError traceback (status 1); in process the DPO step started from the unfinished one."""
    from training.dpo.opa import main as opa
    (tmp_path / "run_sft.sh").write_text("exit 75\n")
    monkeypatch.setattr(opa, "ROOT", tmp_path)
    monkeypatch.setattr("training.sft.main.main", lambda args: {"interrupted": True})
    with pytest.raises(SystemExit) as e:
        opa._stage("run_sft.sh", ["--stop_after_steps", "1"], in_process)
    assert e.value.code == 75


@pytest.mark.parametrize("env", [{}, {"NUM_GPUS": "2"}, {"NUM_GPUS": "3"}, {"NUM_GPUS": "2", "OMP_NUM_THREADS": "5"}])
def test_cpu_ranks_share_the_cores(env):
    """On a machine without CUDA every rank ran `nproc` threads: two SFT ranks on two cores spun against each other,
    7.2 s a step instead of 0.3 with one thread each. A value the user sets stays."""
    base = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "OMP_NUM_THREADS", "DS_ACCELERATOR")}
    p = subprocess.run(["bash", "-c", 'source scripts/env.sh; echo "${DS_ACCELERATOR:-}|${OMP_NUM_THREADS:-}"'],
                       cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120)
    accelerator, threads = p.stdout.strip().split("|")
    cores = len(os.sched_getaffinity(0))
    if accelerator == "cpu":
        want = env.get("OMP_NUM_THREADS") or str(max(1, cores // int(env.get("NUM_GPUS", "1"))))
    else:  # a machine with CUDA: its ranks run on GPUs, the thread count is left as the user set it (or unset)
        want = env.get("OMP_NUM_THREADS", "")
    assert threads == want


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5"])
def test_a_num_gpus_that_is_no_rank_count_is_refused_by_name(value):
    """NUM_GPUS=abc printed "integer expression expected" and went on (run_predict.sh), or reached the launcher."""
    base = {k: v for k, v in os.environ.items() if k != "NUM_GPUS"}
    p = subprocess.run(["bash", "-c", "source scripts/env.sh; echo reached"], cwd=ROOT, env={**base, "NUM_GPUS": value},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "reached" not in p.stdout and f"NUM_GPUS={value}: expected" in p.stderr


def _two_host_launch(tmp_path, deepspeed_body: str, env: dict) -> subprocess.CompletedProcess:
    """scripts/env.sh's launch with a two-host HOSTFILE and a stand-in deepspeed running deepspeed_body (bash); HOME is
    tmp_path (its .deepspeed_env the user's), env added to this process's environment."""
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=1\nnode2 slots=1\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text(f"#!/usr/bin/env bash\n{deepspeed_body}\n")
    (fake / "deepspeed").chmod(0o755)
    script = f'source scripts/env.sh; export PATH="{fake}:$PATH"; launch training.sft.main'
    base = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", *env)}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**base, "HOME": str(tmp_path), "HOSTFILE": str(hosts), **env})


@pytest.mark.parametrize("user_file", ["GLOO_SOCKET_IFNAME=ib0\n", "A=1\n\nB=2\n  \n", "GLOO_SOCKET_IFNAME=ib0"])
def test_the_node_env_file_reads_as_deepspeed_reads_it(tmp_path, user_file):
    """A user's .deepspeed_env ending in a newline (as editors write it) left an empty line in DS_ENV_FILE: DeepSpeed's
    launcher splits every line at "=" and stopped there (ValueError: not enough values to unpack) before any node
    started."""
    (tmp_path / ".deepspeed_env").write_text(user_file)
    # DeepSpeed 0.19.8's runner.py reading the file: `key, val = var.split('=', maxsplit=1)` for every line
    p = _two_host_launch(tmp_path, 'python3 -c "import os, sys\n'
                                   'for var in open(os.environ[\'DS_ENV_FILE\']).readlines():\n'
                                   '    key, val = var.split(\'=\', maxsplit=1)\n    print(key, val.strip())"',
                         {"MASTER_PORT": "29999"})
    assert p.returncode == 0, p.stderr
    want = {line.replace("=", " ") for line in user_file.split("\n") if line.strip()}
    assert want <= set(p.stdout.splitlines())


@pytest.mark.parametrize("name, value", [("VLM_ALIGN_CACHE", "/shared/$USER/cache"), ("GLOO_SOCKET_IFNAME", 'e"th0')])
def test_a_node_variable_a_nodes_shell_would_change_is_refused_by_name(tmp_path, name, value):
    """DeepSpeed's runners double-quote each DS_ENV_FILE value on the other nodes' command lines: $USER was expanded
    there as the remote user's, a quote cut the command. Refused naming the variable, not its value."""
    p = _two_host_launch(tmp_path, "echo launched", {name: value})
    assert p.returncode == 2 and "launched" not in p.stdout
    assert f"the value of {name} " in p.stderr and value not in p.stderr
