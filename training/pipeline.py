"""Which stages of run_pipeline.sh a rerun can keep.

    python -m training.pipeline prepare                                       # the embedded defaults
    python -m training.pipeline begin OUT [--after DEP ...] -- COMMAND ...   # prints fresh | resume | skip
    python -m training.pipeline end OUT -- COMMAND ...

`prepare` makes the embedded world and the tiny VLM the stages default to (if missing), so that they
are inputs of the first stage's fingerprint, not its products. A stage's fingerprint is the SHA-256 of
its command line, the code it runs (every file under training/, eval/, scripts/, configs/, the run_*.sh
scripts and requirements.txt, except the Python modules its script neither starts nor imports, directly
or through other modules: code_files), those default inputs (data/world, output/tiny_vlm_init), the names,
sizes and modification times of the files that its arguments name (a --data_path, an --image_folder,
a --from_checkpoint outside the pipeline's own stages; a --config profile's too; a folder that holds
the repository's output/ or figure/ less those), the ranks
(NUM_GPUS, HOSTFILE and its lines, DS_ACCELERATOR, how many GPUs a launch sees) and, for each finished stage it
starts from (--after), that
stage's fingerprint and the names, sizes and times of its weight files. `begin` compares it with OUT/pipeline_stage.json:
  skip    the stage finished with this fingerprint and its weight files are those it wrote: its output
          is kept (also after a run of other arguments or code that failed before it wrote anything there);
  resume  it started with this fingerprint and did not finish: it continues from its last resumable
          checkpoint (a stage with none of its own starts over: one an earlier run left there is not its);
  fresh   anything else (no record, other arguments, code, data or inputs): it trains anew.
and records the start (unless skip). `end` records the finish of the command begun: the stage's output
keeps the fingerprint of the code and inputs it started with; a command that wrote no model into OUT (its
weight files are those there when it began: --help, or an --output_dir elsewhere) is not marked finished, and
the record of the run whose model is still there comes back.
PIPELINE_FRESH=1 makes every stage fresh (0, false, no or empty: as unset).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from training.config import REF_CACHE_FOLDER
from training.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RECORD = "pipeline_stage.json"
CODE = ("training", "scripts", "configs")
PACKAGES = ("training", "eval")  # the project's Python packages; a stage's fingerprint holds the modules it imports
INPUTS = ("data/world", "output/tiny_vlm_init")
ENV = ("NUM_GPUS", "HOSTFILE", "DS_ACCELERATOR")  # + the hostfile's text and how many GPUs a launch sees
DERIVED = ("__pycache__", REF_CACHE_FOLDER)  # compiled code; DPO's reference log-probs, cached beside the data
WRITTEN = ("output_dir", "figure_dir", "ref_cache_dir")  # options naming where a stage writes (not its inputs)
# what run_pipeline.sh's arguments (SFT's) may not set: the later stages read output/sft and data/world
PIPELINE_FIXED = ("output_dir", "world_dir", "world_seed")
# folders of the repository that hold what runs write (or its environment), left out of a folder argument that holds
# them (--image_folder .: every stage's output would be an input of it) unless the argument names a path inside
PRODUCTS = ("output", "figure", ".git", ".venv")
WHOLE_FILE_MAX = 64 * 2 ** 20  # larger files enter the fingerprint by size and modification time


def _files(p: Path) -> list[Path]:
    """p itself if a file, else every file below it except those in DERIVED folders."""
    if p.is_file():
        return [p]
    return [f for f in p.rglob("*") if f.is_file() and not set(DERIVED) & set(f.relative_to(p).parts)]


def tree_digest(paths, root: Path = ROOT) -> str:
    """SHA-256 over the relative names and contents of every file below `paths` (in name order), except
    what the stages derive and keep there (DERIVED folders)."""
    h = hashlib.sha256()
    for f in sorted(f for p in paths for f in _files(root / p)):
        st = f.stat()
        h.update(str(f.relative_to(root)).encode() + b"\0")
        if st.st_size > WHOLE_FILE_MAX:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def weight_files(out: Path) -> list[Path]:
    """The weight files a stage wrote (its model or adapters), not its resumable checkpoints."""
    return sorted(f for f in Path(out).rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file()
                  and "checkpoints" not in f.relative_to(out).parts)


def weights_digest(out: Path) -> str:
    """Names, sizes and modification times of the weight files a stage wrote (its model or adapters)."""
    return _stats_digest(weight_files(out), out)


def outputs_digest(out: Path) -> str | None:
    """Names, sizes and modification times of every file in a stage's output folder but its record (None: no
    folder): whether a run that failed changed anything there."""
    if not Path(out).is_dir():
        return None
    return _stats_digest(sorted(f for f in Path(out).rglob("*") if f.is_file() and f.name != RECORD), out)


def _stats_digest(files: list[Path], out: Path) -> str:
    stats = [(str(f.relative_to(out)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def option_values(args: list[str]) -> list[tuple[str, str]]:
    """(option, value) for each value in a command's arguments: --name=VALUE, or VALUE after --name ("" for none)."""
    out = []
    for i, a in enumerate(args):
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if eq:
                out.append((name, value))
        else:
            before = args[i - 1] if i else ""
            out.append((before[2:] if before.startswith("--") and "=" not in before else "", a))
    return out


def arg_values(command: list[str], root: Path = ROOT) -> list[str]:
    """The values of a stage's arguments (after the script, which is code) and the text values of the --config
    profile it names (a JSON file of argument values: its --data_path, ...), but for the options that say where
    the stage writes (WRITTEN: what it writes there is no input of it)."""
    pairs = option_values(command[1:])
    pairs += [(k, v) for _, profile in profiles(pairs, root) for k, v in profile.items() if isinstance(v, str)]
    return [v for k, v in pairs if k not in WRITTEN]


def profiles(pairs: list[tuple[str, str]], root: Path = ROOT) -> list[tuple[str, dict]]:
    """(name, values) of each --config profile among (option, value) pairs that reads as a JSON object (the stage
    says what is wrong with one that does not)."""
    out = []
    for name in [v for k, v in pairs if k == "config"]:
        try:
            loaded = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(loaded, dict):
            out.append((name, loaded))
    return out


def path_args_digest(command: list[str], skip: list[Path], root: Path = ROOT) -> str:
    """Names, sizes and modification times of the files and folders the stage's arguments name (arg_values),
    except those inside `skip` (the stage's output and the stages it starts from, which their records cover)."""
    skip = [(root / s).resolve() for s in skip]
    products = [(root / x).resolve() for x in PRODUCTS]
    stats = []
    for value in arg_values(command, root):
        for part in value.split(","):  # --data_path takes a comma-separated list
            p = (root / part) if part else None
            if p is None or not p.exists() or any(p.resolve().is_relative_to(s) for s in skip):
                continue
            held = [x for x in products if x.is_relative_to(p.resolve()) and x != p.resolve()]
            stats += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(_files(p))
                      if not held or not any(f.resolve().is_relative_to(x) for x in held)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def entry_modules(script: Path) -> list[str]:
    """The project modules a shell script starts (`launch X` or `python -m X`, comments included)."""
    pattern = r"(?:launch|python -m)\s+((?:%s)(?:\.\w+)+)" % "|".join(PACKAGES)
    return re.findall(pattern, script.read_text())


def module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _references(f: Path, name: str, root: Path) -> list[str]:
    """The project modules file f (module `name`) names: its imports at any depth (inside functions too,
    relative ones resolved, `from a import b` as a and a.b) and, because code starts modules and scripts by
    name, every string that is a project module's dotted name or a run_*.sh script's name."""
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"run_\w+\.sh", node.value) and (root / node.value).is_file():
                found += entry_modules(root / node.value)
            elif re.fullmatch(r"\w+(\.\w+)+", node.value):
                found.append(node.value)
    return [m for m in found if m.split(".")[0] in PACKAGES]


def imported_files(modules: list[str], root: Path) -> set[Path]:
    """The files of `modules`, of the packages above them, and of every project module they reference
    (_references), transitively."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            name = ".".join(parts[:i])
            f = module_file(name, root)
            if f is not None and f not in seen:
                seen.add(f)
                todo += _references(f, name, root)
    return seen


def code_files(command: list[str], root: Path = ROOT) -> list[str]:
    """The code a stage's fingerprint holds: every file under training/, eval/, scripts/ and configs/, the
    run_*.sh scripts and requirements.txt, except the project's Python modules that the stage's script
    does not start or import (directly or through others), so a change to one stage's code does not
    retrain the others. A command whose script starts no project module keeps every module."""
    script = root / command[0] if command else None
    modules = entry_modules(script) if script is not None and script.suffix == ".sh" and script.is_file() else []
    used = imported_files(modules, root) if modules else None
    files = [f for p in dict.fromkeys(CODE + PACKAGES) if (root / p).exists() for f in _files(root / p)
             if used is None or f in used or f.suffix != ".py"]
    files += sorted(root.glob("run_*.sh")) + [f for f in [root / "requirements.txt"] if f.is_file()]
    return sorted({str(f.relative_to(root)) for f in files})


def refused_options(args: list[str], root: Path = ROOT) -> list[str]:
    """What in run_pipeline.sh's arguments (given to SFT) sets a PIPELINE_FIXED option: the option by its whole name
    (the stages take no abbreviation: allow_abbrev=False), or a key of a --config profile they name."""
    found = [a.partition("=")[0] for a in args
             if a.startswith("--") and a[2:].partition("=")[0] in PIPELINE_FIXED]
    return found + [f"{name}: {k}" for name, profile in profiles(option_values(args), root) for k in profile
                    if k in PIPELINE_FIXED]


def read_record(out: Path) -> dict | None:
    path = Path(out) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def without_stop_point(command: list[str]) -> list[str]:
    """The command less `--stop_after_steps N` (how far one run goes, not what the stage computes; also as
    --stop_after_steps=N): a stage stopped there (exit status 75) is resumed by a
    rerun with or without it."""
    out, i = [], 0
    while i < len(command):
        name, eq, _ = command[i][2:].partition("=") if command[i].startswith("--") else ("", "", "")
        if name == "stop_after_steps":
            i += 1 if eq else 2
            continue
        out.append(command[i])
        i += 1
    return out


def fingerprint(command: list[str], after: list[str], root: Path = ROOT, out: Path | None = None) -> str:
    command = without_stop_point(command)
    deps = {}
    for d in after:
        rec = read_record(Path(d))
        if not rec or rec.get("status") != "done":
            raise SystemExit(f"pipeline: {d} has no finished run ({Path(d) / RECORD}); run the stage that writes it "
                             "first")
        deps[d] = [rec["fingerprint"], rec["weights"]]
    inputs = [p for p in INPUTS if (root / p).exists()]
    parts = {"command": command, "code": tree_digest(code_files(command, root), root),
             "inputs": tree_digest(inputs, root),
             "paths": path_args_digest(command, [Path(d) for d in after] + ([Path(out)] if out else []), root),
             "env": environment(), "after": deps}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def environment() -> dict:
    """What sets a stage's ranks (its world size, so its data order): the launcher's variables, the hostfile's
    lines and the GPUs this machine has (the launcher uses them all without NUM_GPUS). A stage resumed with
    other ranks is refused by its own check, which stopped the pipeline; it now trains afresh."""
    env = {k: os.environ.get(k, "") for k in ENV}
    hostfile = Path(env["HOSTFILE"]) if env["HOSTFILE"] else None
    env["hostfile_text"] = hostfile.read_text() if hostfile and hostfile.is_file() else ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # how many, not which: a SLURM job gets other ids each time
    env["gpus"] = (len([x for x in visible.split(",") if x.strip()]) if visible is not None
                   else len(list(Path("/dev").glob("nvidia[0-9]*"))))
    if not hostfile and env["NUM_GPUS"] == str(1 if env["DS_ACCELERATOR"] == "cpu" else env["gpus"]):
        env["NUM_GPUS"] = ""  # the count scripts/env.sh's launch runs without it (one CPU rank, every GPU): as unset
    return env


def checkpoint_marks(out: Path) -> list:
    """The resumable checkpoints in a stage's output: each `latest` file's name, text and modification time."""
    return sorted([str(f.relative_to(out)), f.read_text().strip(), f.stat().st_mtime_ns]
                  for f in Path(out).glob("checkpoints/**/latest") if f.is_file())


def fresh_requested() -> bool:
    """PIPELINE_FRESH set to anything but empty, 0, false or no (PIPELINE_FRESH=0 retrained every stage)."""
    return os.environ.get("PIPELINE_FRESH", "").strip().lower() not in ("", "0", "false", "no")


def begin(out: Path, command: list[str], after: list[str], root: Path = ROOT) -> str:
    fp = fingerprint(command, after, root, out)
    rec = read_record(out)
    state = "fresh"
    marks = checkpoint_marks(out)
    if rec and rec["fingerprint"] == fp and not fresh_requested():
        if rec["status"] != "done":  # interrupted: continued from the last checkpoint it wrote, if it wrote one (not
            # one an earlier run with other arguments left there, which the stage removes only once it starts training)
            state = "resume" if marks and marks != rec.get("checkpoints_at_start") else "fresh"
        elif rec["weights"] == weights_digest(out):  # not rewritten since (by a stage run outside the pipeline)
            state = "skip"
    elif rec and rec["status"] != "done" and not fresh_requested():
        # another command (or code) began and failed before it wrote anything into `out` (its data, say, unreadable),
        # where the model of a finished run with this fingerprint lies as that run left it
        before = rec.get("finished_before")
        if (before and before["fingerprint"] == fp and before["weights"] == weights_digest(out)
                and rec.get("outputs_at_start") == outputs_digest(out)):
            _write(out, before)  # (what follows reads this record)
            state = "skip"
    if state != "skip":  # (the weights there now: `end` refuses a stage that leaves them as they were)
        _write(out, {"status": "started", "fingerprint": fp, "command": command, "after": after,
                     "weights_at_start": weights_digest(out) if Path(out).is_dir() else None,
                     "outputs_at_start": outputs_digest(out),
                     "checkpoints_at_start": rec.get("checkpoints_at_start") if state == "resume" else marks,
                     # the finished run whose model is there: `end` puts its record back if this one writes none
                     "finished_before": rec if rec and rec["status"] == "done" else (rec or {}).get("finished_before")})
    return state


def end(out: Path, command: list[str]) -> None:
    rec = read_record(out)
    if not rec or rec["status"] != "started" or rec["command"] != command:
        raise SystemExit(f"pipeline: {Path(out) / RECORD} does not record a start of {command}; not marked finished")
    # e.g. a --config profile's output_dir, or --help: the later stages read `out`, where an earlier run's model
    # may still lie (it would be marked as this command's)
    if not weight_files(out) or weights_digest(out) == rec.get("weights_at_start"):
        before = rec.get("finished_before")
        if before and before["weights"] == weights_digest(out):  # its model is still there, and still its
            _write(out, before)
        raise SystemExit(f"pipeline: the stage wrote no model into {out}, where the later stages read it (did an "
                         "argument or a --config profile send its output elsewhere?); not marked finished")
    done = {k: v for k, v in rec.items() if k != "finished_before"}
    _write(out, {**done, "status": "done", "weights": weights_digest(out)})


def prepare(root: Path = ROOT) -> None:
    from training.model.tiny import ensure_tiny_vlm
    from training.world.generate import ensure_world
    ensure_world(root / INPUTS[0])
    ensure_tiny_vlm(root / INPUTS[1])


def _write(out: Path, rec: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rec["time"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_text_atomic(out / RECORD, json.dumps(rec, indent=1))


def main(argv=None) -> str | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("action", choices=["prepare", "check", "begin", "end"])
    p.add_argument("out", nargs="?")
    p.add_argument("--after", nargs="*", default=[])
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a, command = p.parse_args(argv[:cut]), argv[cut + 1:]
    if a.action == "prepare":
        prepare()
        return None
    if a.action == "check":  # run_pipeline.sh's arguments, for SFT
        for what in refused_options(command):
            print(f"run_pipeline.sh: {what} is not a pipeline option (the later stages read output/sft and data/world);"
                  " run the stages' scripts one by one to use another", file=sys.stderr)
            raise SystemExit(2)
        return None
    if not a.out or not command:  # (check: its arguments are all after --)
        raise SystemExit("pipeline: give the stage's output folder, and its command after --")
    if a.action == "begin":
        state = begin(Path(a.out), command, a.after)
        print(state)
        return state
    end(Path(a.out), command)
    return None


if __name__ == "__main__":
    main()
