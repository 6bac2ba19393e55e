"""Run documented commands one after another in this interpreter, for tests/test_docs_commands.py.

    python tests/helpers/run_commands.py COMMANDS.json RESULTS.json

COMMANDS.json is a list of command lines (``python script args...``), run in the current directory exactly as
``python script args`` would run them (``runpy`` with ``__main__``), minus one interpreter start-up each. The
pytest process never runs them itself: Hydra binds logging handlers to the streams of the moment, and a run
inside pytest's capture left them pointing at a closed stream. Between commands the logging handlers, Hydra's
global state and ``sys.argv`` are reset. A command whose line has ``trainer=ddp`` starts its ranks from the
command line, so it runs in a subprocess (unless it only composes its config: ``--cfg``). RESULTS.json gets, per
command, the seconds it took and ``null`` or what went wrong; it is rewritten after every command, so a crash still
leaves the finished results.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import runpy
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

INPUT_KEYS = ("pretrained", "data.path", "data.query_path", "paths.corpus", "ckpt_path")


def _reset_logging() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        with contextlib.suppress(Exception):
            handler.close()
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                with contextlib.suppress(Exception):
                    handler.close()
            logger.propagate = True
            logger.disabled = False


def _reset_hydra() -> None:
    with contextlib.suppress(Exception):
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


def argv_of(run: str, ws: Path) -> list[str]:
    """The script and its arguments, ``$VARS`` expanded and ``*`` globbed as bash would."""
    argv: list[str] = []
    for token in shlex.split(run)[1:]:
        token = os.path.expandvars(token)
        argv += (sorted(glob.glob(token, root_dir=ws)) or [token]) if "*" in token else [token]
    if (
        argv[0] == "train.py"
        and "--cfg" not in argv
        and any(not (ws / t.split("=", 1)[1]).exists() for t in argv if t.split("=", 1)[0] in INPUT_KEYS)
    ):  # an illustrative input (pretrained=CKPT, a paper file): check that the command composes
        argv += ["--cfg", "job"]
    return argv


def execute(run: str, ws: Path) -> str | None:
    """Run one command; None on success, else what went wrong."""
    if "trainer=ddp" in run and "--cfg" not in shlex.split(run):  # with --cfg no rank starts
        proc = subprocess.run(["bash", "-c", run], cwd=ws, capture_output=True, text=True, timeout=900)
        return None if proc.returncode == 0 else f"exit {proc.returncode}\n{proc.stderr[-2500:]}"
    argv = argv_of(run, ws)
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    sys.argv = argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "-c":  # python -c CODE
                sys.argv = ["-c", *argv[2:]]
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                runpy.run_path(str(ws / argv[0]), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            return f"exit {e.code}\n{err.getvalue()[-2500:]}"
    except BaseException:
        return f"{traceback.format_exc()[-2500:]}\n{err.getvalue()[-1500:]}"
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        _reset_logging()
        _reset_hydra()
    return None


def main() -> int:
    commands = json.loads(Path(sys.argv[1]).read_text())
    results_path = Path(sys.argv[2])
    ws = Path.cwd()
    results = []
    for run in commands:
        start = time.perf_counter()
        problem = execute(run, ws)
        results.append({"run": run, "seconds": round(time.perf_counter() - start, 1), "problem": problem})
        print(f"{results[-1]['seconds']:6.1f} s  {'FAIL' if problem else 'ok  '}  {run}", flush=True)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
