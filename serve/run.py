"""`ray-lipsync serve`: start Ray (or join a cluster) and Serve, deploy the app, block until
SIGINT or SIGTERM, then shut down in bounded time.

Both signals stop it the same way, at any time:

- Their handlers are installed here, explicitly. A SIGINT inherited as "ignored" would
  otherwise stay ignored: a command started with `&` by a script (any non-interactive shell)
  gets SIGINT and SIGQUIT ignored, and Python then installs no KeyboardInterrupt handler;
  `kill -INT` did nothing. `ray.init` also replaces the SIGTERM handler (with `sys.exit`).
- A signal during `ray.init` is acted on once it returns: interrupting it half-way leaves
  processes ray.shutdown() does not know of and a driver whose exit hangs (15 s seen).
  Elsewhere the handler raises `Stop` in the main thread.
- Shutdown is bounded: Serve gets SERVE_SHUTDOWN_TIMEOUT_S (its own default waits up to
  30 s for the controller), then `ray.shutdown()` ends the Ray processes this command started
  (on a joined cluster it only disconnects), then any process of ours still running is ended.
- A watchdog makes sure: a Stop that Ray code swallowed is raised again, and whatever still
  runs STOP_DEADLINE_S after the first signal is killed, with this process. Should Ray's
  compiled code hold the GIL then (the watchdog is Python), SIGALRM, left at its default
  action, ends the process a moment later; Ray's own processes share its fate.
"""

from __future__ import annotations

import _thread
import enum
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import ray
from ray import serve

from actors.runtime import init_ray
from ray_lipsync.config import Settings
from ray_lipsync.errors import LipsyncError

from .deployment import APP_NAME, build_app

logger = logging.getLogger("ray_lipsync.serve")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SERVE_SHUTDOWN_TIMEOUT_S = 4.0
STOP_DEADLINE_S = 9.5  # after the first signal: the process and its Ray are gone by 10 s
ALARM_AFTER_S = 9.8  # the last resort, needing no GIL
RAISE_AGAIN_S = 1.0  # a Stop not caught by run() within this is raised again


class Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM: unwinds start-up and the wait alike (a
    BaseException, so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _State(enum.Enum):
    DEFER = "a signal is only recorded (ray.init running)"
    ARMED = "a signal raises Stop"
    RAISED = "Stop raised, not caught by run() yet: raise it again"
    STOPPING = "caught: shutting down, a signal is only logged"


class _Signals:
    """The stop signals' handler while `run` runs, and the watchdog of the shutdown."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.state = _State.DEFER
        self.finished = threading.Event()
        self._raised_at = 0.0
        self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def arm(self) -> None:
        """From now on a signal raises Stop; raises it at once if one came while deferred."""
        self.state = _State.ARMED
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)  # again: ray.init installed its own SIGTERM one
        if self.received is not None:
            self._raise(self.received)

    def stopping(self) -> None:
        self.state = _State.STOPPING

    def restore(self) -> None:
        """The previous handlers back, the watchdog off. After a signal the alarm stays set:
        run() then returns only for this process to exit, and that exit is bounded too (a
        driver whose ray.init was interrupted was seen to hang 15 s in it)."""
        self.finished.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.setitimer(signal.ITIMER_REAL, ALARM_AFTER_S)
            threading.Thread(target=self._watch, name="stop-watchdog", daemon=True).start()
        if self.state in (_State.ARMED, _State.RAISED):
            self._raise(signum)
        elif self.state is _State.STOPPING and not self.finished.is_set():
            logger.warning("%s: already stopping", signal.Signals(signum).name)

    def _raise(self, signum: int) -> None:
        self.state, self._raised_at = _State.RAISED, time.monotonic()
        raise Stop(signum)

    def _watch(self) -> None:
        deadline = time.monotonic() + STOP_DEADLINE_S
        while not self.finished.wait(0.25):
            if time.monotonic() >= deadline:
                _force_exit()
            if self.state is _State.RAISED and time.monotonic() - self._raised_at >= RAISE_AGAIN_S:
                # swallowed (an exception in an at-fork hook is only printed, for one): again
                _thread.interrupt_main(self.received or signal.SIGINT)


def run(settings: Settings, address: str | None = None, dashboard: bool = False) -> None:
    """Start Ray (or join `address`), deploy the app on settings.serve.host:port, block until
    SIGINT/SIGTERM, shut down.

    Without an address a new local Ray instance is started (with its dashboard if
    `dashboard`): a bare ray.init() would join whatever local cluster happens to be running
    (another user's, a test's).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("ray-lipsync serve must run in the main thread (it handles SIGINT/SIGTERM)")
    if address is None:  # the proxy will listen on this machine: say so now if it cannot
        check_port_free(settings.serve.host, settings.serve.port)
    signals = _Signals()
    try:
        init_ray(address, ignore_reinit_error=True, include_dashboard=None if address else dashboard)
        signals.arm()
        serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        logger.info("ray-lipsync is serving: open http://%s:%d/ (API docs at /docs)",
                    settings.serve.host, settings.serve.port)
        while True:
            time.sleep(3600)  # a signal interrupts the sleep: its handler raises Stop
    except BaseException as error:
        # A Stop raised inside Ray's compiled code may come out wrapped (seen: a SystemError
        # whose __cause__ is the Stop, from a ray.get in serve.start).
        if signals.received is None or not _caused_by_stop(error):
            raise
    finally:
        signals.stopping()  # also when start-up failed: nothing may interrupt the shutdown
        try:
            if signals.received is not None:
                logger.info("%s: stopping", signal.Signals(signals.received).name)
            shutdown()
        finally:
            signals.restore()


def check_port_free(host: str, port: int) -> None:
    """Raise LipsyncError if `host:port` cannot be bound, as Serve's proxy will bind it.

    Checked before Ray starts: Serve's own failure comes ~10 s later, as a traceback of its
    proxy actor."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as error:
        raise LipsyncError(f"cannot listen on {host}:{port}: {error.strerror or error}; stop what "
                           "uses it or choose another address with --host / --port") from None


def _caused_by_stop(error: BaseException | None) -> bool:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Stop):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def shutdown(serve_timeout_s: float = SERVE_SHUTDOWN_TIMEOUT_S) -> None:
    """Serve (waited for at most `serve_timeout_s`), then Ray: the processes started by this
    driver end; a joined cluster is only disconnected from."""
    started = time.monotonic()
    ours = _descendants()
    if ray.is_initialized():
        done = threading.Thread(target=_shutdown_serve, name="serve-shutdown", daemon=True)
        done.start()
        done.join(serve_timeout_s)
        if done.is_alive():
            logger.warning("Serve did not shut down within %.0f s; stopping Ray anyway", serve_timeout_s)
    serve_s = time.monotonic() - started
    ray.shutdown()
    left = _end(ours)
    if left:
        logger.warning("ended %d process(es) still running after ray.shutdown(): %s",
                       len(left), ", ".join(left))
    logger.info("stopped in %.1f s (Serve %.1f s, Ray %.1f s)", time.monotonic() - started, serve_s,
                time.monotonic() - started - serve_s)


def _shutdown_serve() -> None:
    try:
        serve.shutdown()
    except Exception:  # noqa: BLE001 - Ray is stopped next either way
        logger.warning("Serve shutdown failed", exc_info=True)


def _descendants() -> list[Any]:
    """Every process below this one: the Ray processes this command started."""
    import psutil  # Ray's own copy (ray/thirdparty_files, on sys.path once ray is imported)

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _end(processes: list[Any], wait_s: float = 1.0, grace_s: float = 1.0) -> list[str]:
    """Of `processes`, those still running `wait_s` from now are terminated (killed after
    `grace_s` more); returned as 'pid name'."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    running, names = [], []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:  # exited, its parent not reaping yet
                name = f"{proc.pid} {proc.name()}"
                proc.terminate()  # psutil refuses a pid reused by another process
                running.append(proc)
                names.append(name)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(running, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return names


def _force_exit() -> None:
    """The stop deadline passed: kill what runs below this process, then this process."""
    logger.error("not stopped %.1f s after the signal: killing Ray's processes and exiting",
                 STOP_DEADLINE_S)
    for proc in _descendants():
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - gone already
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(1)
