"""What keeps `ddpo serve-reward` bounded under load and abuse (the HTTP protocol itself is in rewards/server.py).

- Connections: a fixed pool of `workers` threads reads and answers requests; up to `queue` accepted connections wait
  for one. Beyond that a connection gets an immediate 503 with Retry-After from one reject thread, which then
  reads and discards what the client still sends, so the client reads the 503 instead of a connection reset.
- Time: a request (line, headers and body) must arrive within `read_timeout` seconds of being accepted, or its
  socket is shut down; every later socket operation has the same timeout.
- Memory: images are counted from their headers before decoding; a request may hold `max_request_pixels` and all
  requests together `max_total_pixels` (3 bytes each as RGB). A request the process budget cannot take now is
  answered 503 with Retry-After.
- The reward: one call at a time (models are not thread-safe). A call that runs past `reward_timeout` answers 504;
  it keeps its turn until it returns (Python cannot stop a thread), and meanwhile /health and /score answer 503.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import selectors
import socket
import threading
import time
from dataclasses import asdict, dataclass
from http.server import HTTPServer
from typing import Any, Callable

logger = logging.getLogger(__name__)

MPX = 2**20  # "megapixel" in limits: one 1024 x 1024 image
REJECT_LINGER_S = 2.0  # how long a rejected connection is drained before it is closed
MAX_LINGERING = 1024   # rejected connections drained at once; more wait in the reject queue
WATCH_INTERVAL_S = 0.1
GRACE_FRACTION = 0.1  # of read_timeout, for a connection that waited in the queue past its deadline


@dataclass(frozen=True)
class Limits:
    """The server's resource limits; the CLI flag of each is named in its error message."""

    max_batch: int = 64                      # images per request                       (--max-batch)
    max_request_bytes: int = 64 * 2**20      # request body                             (--max-request-mb)
    max_image_pixels: int = 16 * MPX         # one image: 4096 x 4096                    (--max-image-mpix)
    max_request_pixels: int = 64 * MPX       # all images of one request                (--max-request-mpix)
    max_total_pixels: int = 128 * MPX        # all requests being decoded or scored      (--max-total-mpix)
    workers: int = 4                         # requests read and answered at once       (--workers)
    queue: int = 32                          # accepted connections waiting for a worker (--queue)
    backlog: int = 128                       # the listen() backlog of the kernel
    read_timeout: float = 30.0               # seconds for a request to arrive          (--read-timeout)
    reward_timeout: float = 240.0            # seconds for one reward call              (--reward-timeout)
    retry_after: int = 2                     # seconds a 503 asks the client to wait

    def __post_init__(self) -> None:
        flags = {"max_batch": "--max-batch", "max_request_bytes": "--max-request-mb", "workers": "--workers",
                 "queue": "--queue",
                 "max_image_pixels": "--max-image-mpix", "max_request_pixels": "--max-request-mpix",
                 "max_total_pixels": "--max-total-mpix", "read_timeout": "--read-timeout",
                 "reward_timeout": "--reward-timeout", "backlog": "backlog", "retry_after": "retry_after"}
        for field, flag in flags.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{flag} must be a finite number above 0, got {value!r}")
        if self.max_request_pixels > self.max_total_pixels:
            raise ValueError(f"--max-request-mpix ({self.max_request_pixels / MPX:g}) is above --max-total-mpix "
                             f"({self.max_total_pixels / MPX:g}): no request that large could ever be served")

    def memory_budget(self) -> int:
        """Bytes of request data the server may hold at once, on top of the process and the model: each worker's
        body, its text and its parsed JSON (3 x max_request_bytes while json.loads runs), all decoded images
        (3 bytes per pixel as RGB), and one image being converted per worker (up to 8 bytes per pixel)."""
        return (self.workers * 3 * self.max_request_bytes + 3 * self.max_total_pixels
                + self.workers * 8 * self.max_image_pixels)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PixelBudget:
    """Pixels all requests together may hold decoded; a request reserves its share before decoding."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> Callable[[], None] | None:
        """A release function (idempotent) if `pixels` fit now, else None."""
        with self._lock:
            if self.used + pixels > self.total:
                return None
            self.used += pixels
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.used -= pixels
        return release


class RewardStuck(RuntimeError):
    """A reward call has run past the timeout and not returned: nothing else can be scored."""


class RewardTimeout(RuntimeError):
    """This request's reward call ran past the timeout (it keeps running; the server is stuck until it returns)."""


class RewardRunner:
    """Runs the reward one call at a time, each call in its own thread so that the caller can stop waiting."""

    def __init__(self, reward: Callable, name: str, timeout: float):
        self.reward, self.name, self.timeout = reward, name, timeout
        self._turn = threading.Lock()
        self._started: float | None = None  # when the running call started; None when idle

    def stuck_for(self) -> float | None:
        """Seconds the running call has run, if that is beyond the timeout; None when healthy."""
        started = self._started
        running = None if started is None else time.monotonic() - started
        return running if running is not None and running > self.timeout else None

    def stuck_message(self, running: float) -> str:
        return (f"reward {self.name!r} has not returned for {running:.1f} s (--reward-timeout {self.timeout:g} s); "
                "no request can be scored until it does: restart the server if it stays stuck")

    def __call__(self, images: list, prompts: list[str], metadata: list[dict], release: Callable[[], None]) -> Any:
        """The reward's (scores, info). `release` is called once the reward no longer holds the images.

        Raises RewardStuck while an earlier call is stuck, RewardTimeout after `timeout` s, or the reward's error.
        """
        while not self._turn.acquire(timeout=WATCH_INTERVAL_S):  # an earlier call is running: wait, unless stuck
            running = self.stuck_for()
            if running is not None:
                release()
                raise RewardStuck(self.stuck_message(running))
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                outcome["value"] = self.reward(images, prompts, metadata)
            except BaseException as err:  # handed to the waiting request (or logged, if it stopped waiting)
                outcome["error"] = err
            finally:
                if "late" in outcome:
                    logger.warning("reward %r returned after %.1f s, past --reward-timeout %g s; serving again",
                                   self.name, time.monotonic() - start, self.timeout)
                self._started = None
                release()
                self._turn.release()
                done.set()

        start = self._started = time.monotonic()
        threading.Thread(target=call, name="reward-call", daemon=True).start()
        if not done.wait(self.timeout):
            outcome["late"] = True
            raise RewardTimeout(f"reward {self.name!r} did not return within --reward-timeout {self.timeout:g} s "
                                f"(prompts {prompts[:3]}{'...' if len(prompts) > 3 else ''}); /health answers 503 "
                                "until it does")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def busy_response(retry_after: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: {retry_after}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class BoundedHTTPServer(HTTPServer):
    """An HTTPServer with a fixed worker pool, a bounded queue, 503 beyond it, and a read deadline per request."""

    def __init__(self, address: tuple[str, int], handler: type, limits: Limits):
        self.request_queue_size = limits.backlog  # read by server_activate's listen()
        self.limits = limits
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        super().__init__(address, handler)  # binds: an OSError here leaves no thread behind
        self._pending: queue.Queue = queue.Queue(maxsize=limits.queue)
        self._rejects: queue.Queue = queue.Queue(maxsize=MAX_LINGERING)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadline_lock = threading.Lock()
        self._busy = busy_response(limits.retry_after, f"server busy: {limits.workers} requests in progress and "
                                   f"{limits.queue} waiting; retry after {limits.retry_after} s")
        targets = [self._work] * limits.workers + [self._reject, self._watch]
        self._threads = [threading.Thread(target=t, name=f"reward-server-{i}", daemon=True)
                         for i, t in enumerate(targets)]
        for thread in self._threads:
            thread.start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Called by serve_forever for each accepted connection: queue it, or have it refused with 503."""
        try:
            self._pending.put_nowait((request, client_address, time.monotonic()))
        except queue.Full:
            try:
                self._rejects.put_nowait(request)
            except queue.Full:  # thousands at once: nothing left but to drop it
                self.shutdown_request(request)

    def _work(self) -> None:
        while not self._stopping.is_set():
            item = self._pending.get()
            if item is None:
                return
            request, client_address, accepted = item
            # The read deadline starts at accept, so connections that idled in the queue cannot hold a worker
            # long; a tenth of it as grace still lets a queued client whose request has arrived be read.
            now, timeout = time.monotonic(), self.limits.read_timeout
            self.set_deadline(request, max(accepted + timeout, now + GRACE_FRACTION * timeout))
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.clear_deadline(request)
                self.shutdown_request(request)

    def _reject(self) -> None:
        """Answer each refused connection 503 at once, then drain what its client still sends (up to
        REJECT_LINGER_S) before closing, so the client reads the 503 rather than a reset. One thread serves
        all of them through a selector: a slow client costs a socket, not a thread."""
        selector = selectors.DefaultSelector()
        lingering: dict[socket.socket, float] = {}
        while not self._stopping.is_set():
            while len(lingering) < MAX_LINGERING:
                try:
                    request = self._rejects.get_nowait()
                except queue.Empty:
                    break
                try:
                    request.setblocking(False)
                    request.send(self._busy)  # a few hundred bytes: fits an empty send buffer
                    request.shutdown(socket.SHUT_WR)
                    selector.register(request, selectors.EVENT_READ)
                    lingering[request] = time.monotonic() + REJECT_LINGER_S
                except OSError:
                    request.close()
            for key, _ in selector.select(timeout=WATCH_INTERVAL_S / 2) if lingering else ():
                try:
                    finished = not key.fileobj.recv(65536)
                except BlockingIOError:
                    finished = False
                except OSError:
                    finished = True
                if finished:
                    self._unlinger(selector, lingering, key.fileobj)
            now = time.monotonic()
            for request in [r for r, deadline in lingering.items() if deadline < now]:
                self._unlinger(selector, lingering, request)
            if not lingering:
                time.sleep(WATCH_INTERVAL_S / 2)
        for request in list(lingering):
            self._unlinger(selector, lingering, request)

    @staticmethod
    def _unlinger(selector: selectors.BaseSelector, lingering: dict, request: socket.socket) -> None:
        selector.unregister(request)
        del lingering[request]
        request.close()

    def set_deadline(self, request: socket.socket, deadline: float) -> None:
        with self._deadline_lock:
            self._deadlines[request] = deadline

    def clear_deadline(self, request: socket.socket) -> None:
        """The request has been read: from here on only the per-operation socket timeout applies."""
        with self._deadline_lock:
            self._deadlines.pop(request, None)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            now = time.monotonic()
            with self._deadline_lock:
                expired = [r for r, deadline in self._deadlines.items() if deadline < now]
                for request in expired:
                    del self._deadlines[request]
            for request in expired:  # the worker's blocked read returns end-of-file
                logger.warning("dropping a request not received within --read-timeout %g s",
                               self.limits.read_timeout)
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.warning("connection from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        super().server_close()
        self._stopping.set()
        if not self._threads:
            return
        for _ in range(self.limits.workers):
            self._put_stop(self._pending)

    @staticmethod
    def _put_stop(q: queue.Queue) -> None:
        try:
            q.put_nowait(None)
        except queue.Full:  # the thread is a daemon; it stops with the process
            pass
