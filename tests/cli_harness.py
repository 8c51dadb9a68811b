"""Runs several command lines of one command in one interpreter, each through the real
entry point (`launch.common.run`, flag parsing included), for tests/test_cli_errors.py.

    python tests/cli_harness.py MODULE ROOT < cases.json > results.json

cases.json is a list of argument lists. For each case it records the exit status,
stdout, stderr (the traceback of an exception that escaped, if any) and which files
under ROOT (files by SHA-256, and directories) were created, changed or removed.
"""

import contextlib
import hashlib
import importlib
import io
import json
import os
import sys
import traceback

# Run from the repository root, like `python -m`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402


def digest(root: str) -> dict[str, str]:
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(directory, name), root) + "/"] = "directory"
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_case(module, args: list[str], root: str) -> dict:
    from launch import common

    flags.FLAGS.unparse_flags()
    # ml_collections defines a flag per --config.X override as it parses: the next
    # case's overrides would define them again.
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    sys.argv = [module.__name__, *args]
    before = digest(root)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.run(module.main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - recorded: the test fails on it
            code = "uncaught"
            err.write(traceback.format_exc())
    after = digest(root)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    return {
        "args": args,
        "code": code,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "created": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "changed": changed,
    }


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    root = sys.argv[2]
    cases = json.load(sys.stdin)
    results = [run_case(module, args, root) for args in cases]
    sys.__stdout__.write(json.dumps(results))


if __name__ == "__main__":
    main()
