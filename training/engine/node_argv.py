"""A stage's arguments through the deepspeed launcher's multi-node runners, intact.

DeepSpeed's pdsh runner (its default with a hostfile) joins each node's command into one string that the node's
shell splits again, double-quoting only the arguments that hold a space: a $ or backquote in one was expanded there,
a lone quote ended the command with a syntax error, a * was globbed, a leading ~ became a home folder and an empty
argument vanished. scripts/env.sh's `launch` therefore passes arguments like those as one base64 word
(`python -m training.engine.node_argv --encode ARGS...` prints it, or nothing when every argument is plain), and each
rank runs `python -m training.engine.node_argv MODULE WORD [what the launcher appends]`, which runs MODULE as
`python -m MODULE` with the arguments given."""
import base64
import json
import re
import runpy
import sys

PLAIN = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")  # what no shell changes (DeepSpeed's own test for its exports)


def encode(args: list[str]) -> str:
    """One word of base64 for args ("" when every argument is plain: they go as they are)."""
    if all(PLAIN.fullmatch(a) for a in args):
        return ""
    # (JSON's \u escapes bring back an argument that is not UTF-8, held in argv as surrogates, as it was)
    return base64.urlsafe_b64encode(json.dumps(args).encode()).decode()


def stage_argv(argv: list[str]) -> tuple[str, list[str]]:
    """[MODULE, WORD, *rest] -> (MODULE, the arguments WORD encodes + rest: what the launcher appended)."""
    if len(argv) < 2:
        raise SystemExit("usage: python -m training.engine.node_argv MODULE WORD [ARGS...] (scripts/env.sh's launch)")
    module, word, *rest = argv
    try:
        args = json.loads(base64.urlsafe_b64decode(word.encode()))
    except ValueError as e:
        raise SystemExit(f"training.engine.node_argv: {word[:40]!r} is no encoded argument list ({e})") from None
    return module, [*args, *rest]


def main() -> None:
    if sys.argv[1:2] == ["--encode"]:
        print(encode(sys.argv[2:]))
        return
    module, args = stage_argv(sys.argv[1:])
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
