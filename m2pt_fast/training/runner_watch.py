"""Stop a training process when the `deepspeed` command that started it is stopped.

The `deepspeed` command (DeepSpeed's runner) starts a launcher process, which starts one train.py per
rank. A SIGTERM or SIGINT sent to the runner's PID alone (what `timeout`, a job scheduler or `kill`
sends) ends the runner but is not passed on: on one machine DeepSpeed 0.17 to 0.19 forward signals
only in multi-node runs. The launcher and the ranks would then go on to the end, and a new run
started in the meantime would write the same output directory.

The launcher itself does pass SIGTERM on to every rank, so each rank watches the runner and, once
it is gone, sends the launcher SIGTERM; where the launcher is gone too (killed), the rank stops
itself. A stopped run resumes from its last checkpoint as after any interruption.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


def _is_runner(process) -> bool:
    """Whether `process` runs DeepSpeed's runner: the `deepspeed` script or deepspeed.launcher.runner."""
    args = process.cmdline()[:4]  # the interpreter, its options, then the script or module
    return any(os.path.basename(a) == "deepspeed" or a == "deepspeed.launcher.runner" for a in args)


def _is_launcher(process) -> bool:
    return "deepspeed.launcher.launch" in process.cmdline()[:4]  # python3 -u -m deepspeed.launcher.launch


def watch_runner(poll_seconds: float = POLL_SECONDS) -> bool:
    """Start a daemon thread that ends this run once DeepSpeed's runner above it is gone.

    Returns whether one was started: False outside the `deepspeed` command (a plain `python`, torchrun,
    the launcher started by hand), where there is nothing to watch.
    """
    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        runner = launcher.parent()
        if runner is None or not _is_launcher(launcher) or not _is_runner(runner):
            return False
    except psutil.Error:
        return False

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_seconds):
            # is_running() compares start times too: a new process under a reused PID is not the runner
            try:
                if runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                pass
            log.warning("the deepspeed command (PID %d) has ended: stopping this run", runner.pid)
            try:
                launcher.send_signal(signal.SIGTERM)  # the launcher then stops every rank
            except psutil.Error:  # gone too: stop this rank
                os.kill(os.getpid(), signal.SIGTERM)
            return

    threading.Thread(target=watch, name="m2pt-runner-watch", daemon=True).start()
    return True
