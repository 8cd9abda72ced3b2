"""Run a Python script and log every file it creates, writes, renames or removes under a folder.

    python tests/audit_writes.py LOG_DIR WATCHED SCRIPT [ARGS...]

Each process appends to LOG_DIR/rank{RANK}.txt (RANK from the environment, as torchrun sets it;
0 without) one line per event under WATCHED: "EVENT PATH". tests/test_distributed.py runs
tools/train.py through it under torchrun to check that only rank 0 writes. It sees what goes
through Python's audit events (open, os.remove, os.rename, ...), which is every file the tools
write with open/pathlib/matplotlib.
"""

from __future__ import annotations

import os
import runpy
import sys

_WRITE_EVENTS = {"os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.truncate", "shutil.move"}


def main() -> None:
    log_dir, watched, script, *script_args = sys.argv[1:]
    watched = os.path.realpath(watched)
    log = open(os.path.join(log_dir, f"rank{os.environ.get('RANK', '0')}.txt"), "a", buffering=1)  # before the hook

    def under_watched(path: object) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        text = os.path.realpath(os.fsdecode(path))
        return text if text == watched or text.startswith(watched + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
            paths = [path] if writes else []
        elif event in _WRITE_EVENTS:
            paths = list(args[:2]) if event in ("os.rename", "os.replace", "shutil.move") else [args[0]]
        else:
            return
        for path in paths:
            hit = under_watched(path)
            if hit is not None:
                log.write(f"{event} {hit}\n")

    sys.addaudithook(hook)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
