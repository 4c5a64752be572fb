"""The master process: nginx's, for the workers of `edgeproxy run`.

It binds every listener, forks `workers` processes that inherit them, replaces one that
dies, and tells systemd (sd_notify) where it stands:

- start: READY=1 once every worker reported that all its listeners accept.
- SIGHUP: reload. The config is read and checked again (certificates included); if it is
  not usable, a log line says why and the running workers go on. Otherwise RELOADING=1, a
  new generation of workers starts on the same sockets (an address still configured keeps
  its socket: no connection is refused meanwhile); once all of them are ready, the old ones
  drain (stop accepting, finish what is in flight, `shutdown_timeout` at most), then READY=1.
  A SIGHUP during a reload is another reload, once that one is done.
- SIGTERM/SIGINT (or SIGQUIT, nginx's graceful stop): STOPPING=1, the master closes its copies
  of the listeners, the workers drain and the master exits 0 when they are gone. A second
  signal forces them (the master sends them SIGQUIT).
- SIGUSR1: the workers reopen the access log (logrotate moved it), as nginx's do.
- SIGUSR2 (nginx's binary upgrade): refused with a log line, nothing stops. A new version is
  run by a restart; new workers forked by a reload would run the master's old code.

The master waits in one `select` on the signals (`signal.set_wakeup_fd`) and on a pipe on
which the workers report "ready PID" and "closed PID".
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import selectors
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgeproxy import metrics
from edgeproxy.config import Config, ConfigError, load_config
from edgeproxy.server import Bound, Listeners, bind_listeners
from edgeproxy.service import notify

log = logging.getLogger("edgeproxy")

START_GRACE = 2.0  # a worker failing sooner than this after its start is not replaced
METRICS_PREFIX = "edgeproxy-metrics-"  # the workers' metric files: $TMPDIR/edgeproxy-metrics-*

Work = Callable[[Config, Listeners, int], None]
HANDLED = (  # the master's signals; the handler does nothing: the wakeup fd carries them
    *(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT),
    *(signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2),
)


@dataclass
class Generation:
    """The workers started with one config."""

    config: Config
    listeners: Listeners
    pids: set[int] = field(default_factory=set)
    ready: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)


class Master:
    def __init__(self, path: Path, config: Config, work: Work) -> None:
        self.path = path
        self.work = work
        self.bound: Bound = {}
        self.current = Generation(config, bind_listeners(config, self.bound))
        self.next: Generation | None = None  # a reload's workers, until they are all ready
        self.draining: list[Generation] = []  # old generations finishing their requests
        self.started: dict[int, float] = {}  # pid -> monotonic start time
        self.stopping = False
        self.failed = False
        self.announced = False  # READY=1 sent for the current generation
        self.reload_pending = False  # a SIGHUP during a reload: it read the config before
        self._reports, self._report_fd = os.pipe()
        self._pending = b""

    # The loop
    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.getsignal(sig) for sig in HANDLED}
        for sig in HANDLED:
            signal.signal(sig, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(wake_r, selectors.EVENT_READ)
        selector.register(self._reports, selectors.EVENT_READ)
        try:
            if not self._spawn_all(self.current):
                self.failed = True
                self._stop(force=False)
            while self._workers():
                for key, _ in selector.select():
                    if key.fileobj is wake_r:
                        for signum in wake_r.recv(512):
                            self._on_signal(signum)
                    else:
                        self._on_reports(os.read(self._reports, 4096))
                self._reap()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():  # None: set outside Python, unknown here
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            selector.close()
            wake_r.close()
            wake_w.close()
            for sock in self.bound.values():
                sock.close()
        return 1 if self.failed else 0

    def _workers(self) -> set[int]:
        return set(self.started)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP and not self.stopping:
            self._reload()
        elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):  # QUIT: nginx's drain
            self._stop(force=self.stopping)
        elif signum == signal.SIGUSR1:  # nginx's: reopen the logs (logrotate moved them)
            log.info("reopening the access log")
            for pid in self._workers():
                _signal(pid, signal.SIGUSR1)
        elif signum == signal.SIGUSR2:
            log.warning("SIGUSR2 ignored: no binary upgrade here; restart to run a new version")

    # Workers
    def _spawn_all(self, generation: Generation) -> bool:
        return all(self._spawn(generation) for _ in range(generation.config.worker_count))

    def _spawn(self, generation: Generation) -> bool:
        """Start a worker; False when the system refuses the fork (EAGAIN, ENOMEM): the
        running workers go on, as nginx's master goes on after "fork() failed"."""
        # Held until the child has handlers of its own: one arriving before would run the
        # master's there, lost to the worker and written to the master's wakeup fd (under
        # load, a worker SIGTERMed as it started served on, and its master took the signal).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            log.error("cannot start a worker: fork failed: %s", exc.strerror or exc)
            return False
        if pid == 0:  # pragma: no cover - the child's life ends in os._exit
            self._child(generation, held)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        generation.pids.add(pid)
        self.started[pid] = time.monotonic()
        log.info("worker %d started", pid)
        return True

    def _child(self, generation: Generation, held: Iterable[int]) -> None:
        code = 0
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the master's business
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # sent to the group: the master's
            # A SIGTERM held ends us here. SIGUSR1 stays held (with the master's no-op handler:
            # SIG_IGN would drop it) until the worker can reopen its log (server.serve):
            # logrotate's move after the worker opened the file was otherwise missed.
            signal.pthread_sigmask(signal.SIG_SETMASK, {*held, signal.SIGUSR1})
            os.close(self._reports)
            mine = {id(sock) for sock in generation.listeners.bound()}
            for sock in self.bound.values():  # another generation's address: not ours to hold
                if id(sock) not in mine:
                    sock.close()
            os.environ.pop("NOTIFY_SOCKET", None)  # only the master speaks to systemd
            self.work(generation.config, generation.listeners, self._report_fd)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %d failed", os.getpid())
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self) -> None:
        while self.started:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.started.clear()
                return
            if pid == 0:
                return
            self._exited(pid, os.waitstatus_to_exitcode(status))

    def _exited(self, pid: int, code: int) -> None:
        started = self.started.pop(pid, time.monotonic())
        metrics.mark_worker_dead(pid)
        generation = self._generation_of(pid)
        if generation is None:
            return
        generation.pids.discard(pid)
        if generation in self.draining:
            if not generation.pids:
                self.draining.remove(generation)
                log.info("old workers drained")
                self._close_unused()
            self._announce_if_done()
            return
        if self.stopping:
            return
        early = time.monotonic() - started < START_GRACE and code > 0
        if generation is self.next and (early or pid not in generation.ready):
            log.error("reload failed: worker %d exited with %d; keeping the running config",
                      pid, code)  # fmt: skip
            self._abandon(generation)
            return
        if early:
            log.error("worker %d exited with %d at start; stopping", pid, code)
            self.failed = True
            self._stop(force=False)
            return
        log.warning("worker %d exited with %d; starting another", pid, code)
        self._spawn(generation)

    def _generation_of(self, pid: int) -> Generation | None:
        for generation in (self.current, self.next, *self.draining):
            if generation is not None and pid in generation.pids:
                return generation
        return None

    def _on_reports(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            event, _, pid_text = line.decode().partition(" ")
            pid = int(pid_text)
            generation = self._generation_of(pid)
            if generation is None:
                continue
            (generation.ready if event == "ready" else generation.closed).add(pid)
        if self.next is not None and self.next.ready >= self.next.pids:
            self._switch()
        self._announce_if_done()

    def _announce_if_done(self) -> None:
        """READY=1 once the current workers all accept and no old one still accepts."""
        if self.announced or self.stopping or self.next is not None:
            return
        if not self.current.ready >= self.current.pids:
            return
        if any(not g.closed >= g.pids for g in self.draining):
            return
        self.announced = True
        notify.ready()
        log.info("ready: %d workers serving %s", len(self.current.pids), self.path)

    # Reload
    def _reload(self) -> None:
        if self.next is not None:
            log.warning("reload: one is already under way; another follows it")
            self.reload_pending = True
            return
        log.info("reload: reading %s", self.path)
        bound = dict(self.bound)
        try:
            config = load_config(self.path)
            listeners = bind_listeners(config, bound)
            _make_root(config)
        except (SystemExit, Exception) as exc:  # nothing in a config may stop the master
            for address, sock in bound.items():
                if address not in self.bound:
                    sock.close()
            if isinstance(exc, SystemExit):
                reason = exc.code
            elif isinstance(exc, ConfigError):
                reason = str(exc)
            else:  # a bug: say what it was
                reason = f"{type(exc).__name__}: {exc}"
            log.error("reload refused, the running config stays: %s", reason)
            return
        self.bound = bound
        notify.reloading()
        self.announced = False
        self.next = Generation(config, listeners)
        if not self._spawn_all(self.next):
            log.error("reload failed: a new worker could not start; keeping the running config")
            self._abandon(self.next)

    def _switch(self) -> None:
        """The new workers all accept: the old ones drain."""
        assert self.next is not None
        old, self.current, self.next = self.current, self.next, None
        self.draining.append(old)
        for pid in old.pids:
            _signal(pid, signal.SIGTERM)
        log.info("reload: %d new workers serving; %d old ones draining",
                 len(self.current.pids), len(old.pids))  # fmt: skip
        if not old.pids:
            self.draining.remove(old)
        self._reload_again()

    def _abandon(self, generation: Generation) -> None:
        self.next = None
        for pid in generation.pids:  # TERM: one still starting dies (QUIT would dump its
            _signal(pid, signal.SIGTERM)  # core), one that serves finishes what it took
        self.draining.append(generation)
        generation.closed = set(generation.pids)  # they are stopped, not awaited for READY
        self._close_unused()
        self._announce_if_done()
        self._reload_again()

    def _reload_again(self) -> None:
        """The reload asked for while the last one ran: the config may have changed after
        that one read it (a certificate renewed just after a config change)."""
        if self.reload_pending and not self.stopping:
            self.reload_pending = False
            self._reload()

    def _close_unused(self) -> None:
        """Close the sockets of addresses that no running generation listens on."""
        live = [self.current, *self.draining] + ([self.next] if self.next else [])
        used = {id(sock) for g in live for sock in g.listeners.bound()}
        for address, sock in list(self.bound.items()):
            if id(sock) not in used:
                sock.close()
                del self.bound[address]

    # Stop
    def _stop(self, force: bool) -> None:
        if not self.stopping:
            self.stopping = True
            notify.stopping()
            log.info("stopping: draining %d workers", len(self.started))
            for sock in self.bound.values():
                sock.close()  # with the workers' copies closed too, new connections are refused
            self.bound.clear()
        for pid in self.started:
            _signal(pid, signal.SIGQUIT if force else signal.SIGTERM)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _make_root(config: Config) -> None:
    try:
        config.mirror.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(
            f"edgeproxy: mirror.root: cannot create {config.mirror.root}: {exc.strerror}"
        ) from exc


def _metrics_folder() -> tuple[str, int]:
    """A fresh folder for the workers' metric files, and the fd of its `lock`, held (inherited
    by every worker) for as long as a process of this master's lives."""
    _sweep_metrics_folders()
    folder = tempfile.mkdtemp(prefix=METRICS_PREFIX)
    fd, spare = tempfile.mkstemp(dir=folder)  # not *.db: prometheus-client reads only those
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(spare, os.path.join(folder, "lock"))  # in place only once locked: never swept
    return folder, fd


def _sweep_metrics_folders() -> None:
    """Remove the folders of masters killed with their workers (SIGKILL, the OOM killer: no
    `finally` ran), which no process locks any more. One without a lock is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(METRICS_PREFIX + "*"):
        try:
            fd = os.open(folder / "lock", os.O_RDONLY)
        except OSError:  # another user's, an older edgeproxy's, or not locked yet
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running edgeproxy's
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def _raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one, as Go's runtime does for registry:2:
    a cold blob holds about 5 descriptors (client, upstream, the spool written and read, its
    lock): a shell's 1024 was some 200 cold blobs a worker. Past it, libuv closes each new
    connection as it accepts it, without a word."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # refused (a sandbox): the soft one stays
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(path: Path, config: Config, work: Work) -> int:
    """`edgeproxy run`: the master's life; its exit code."""
    _raise_open_files_limit()  # before the workers fork: they inherit it
    _make_root(config)
    folder, lock = _metrics_folder()
    os.environ[metrics.MULTIPROC_ENV] = folder  # before any worker creates a metric
    try:
        return Master(path, config, work).run()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)
