"""Webhook notifications: a person hears about a stall, a restart, a give-up or the end.

A structlog processor picks the events worth a message out of the stream the loop already
writes, and only *enqueues* them; a background thread posts them with tenacity retries.
So a slow, failing or unreachable receiver can never delay or break a recovery: the worst
it can do is fill the bounded queue, and then messages are dropped with a log line.

The body carries ``text`` (shown as is by Slack's incoming webhooks and compatible
receivers such as Mattermost or Rocket.Chat) and ``content`` (Discord's field) with the same
short sentence, and the event's details for machines. With a secret, the body is signed
like GitHub signs its webhooks: ``X-Sidecar-Signature-256: sha256=<hex HMAC-SHA256>``, so
the secret itself never travels and a receiver can verify the sender.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
import tenacity

from sidecar import __version__, events

NOTIFIED_EVENTS = frozenset(
    {
        events.STALL_DETECTED,
        events.TRAINER_CRASHED,
        events.TRAINER_RESTARTED,
        events.GAVE_UP,
        events.TRAINING_COMPLETED,
        events.HANG_REPEATED,
    }
)
SIGNATURE_HEADER = "X-Sidecar-Signature-256"
# Discord refuses content over 2000 characters; a notification is a headline, not a log.
MAX_TEXT = 1900
# Event fields too bulky for a chat message body (the rewritten script's diff, every rejected
# checkpoint, the whole configuration); they stay in the log.
_BULKY = frozenset({"diff", "rejected", "settings", "processes"})
_STOP = object()


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    secret: str | None = None

    @property
    def shown(self) -> str:
        """The URL without its path: Slack's and Discord's carry the token there."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}/…"


class DeliveryError(Exception):
    """One attempt failed; ``retry`` says whether another attempt can help."""

    def __init__(self, message: str, *, retry: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retry = retry
        self.retry_after = retry_after


class WebhookNotifier:
    """The processor (``__call__``) and the background sender, in one small object."""

    def __init__(
        self,
        target: WebhookTarget,
        *,
        run_name: Callable[[], str | None] = lambda: None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        queue_size: int = 100,
        attempts: int = 5,
        retry_window: float = 120.0,
        timeout: float = 10.0,
        wait: tenacity.wait.wait_base | None = None,
        host: str | None = None,
        page: str | None = None,
    ):
        self.target = target
        self._run_name = run_name
        self._page = page  # where the status page is, told with each restart
        self._log = log or structlog.get_logger("sidecar")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._attempts = attempts
        self._retry_window = retry_window
        self._timeout = timeout
        self._wait = wait or tenacity.wait_exponential_jitter(initial=1, max=30)
        self._host = host or socket.gethostname()
        self._abandon = threading.Event()  # set on close: retries stop waiting
        self._thread: threading.Thread | None = None

    # -- the processor ---------------------------------------------------------------------

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        if event_dict.get("event") not in NOTIFIED_EVENTS or event_dict.get("launched") is False:
            return event_dict  # launched=False: the run was over before this sidecar started
        try:
            self._queue.put_nowait(self.payload(dict(event_dict)))
        except queue.Full:
            self._log.warning(
                events.NOTIFICATION_DROPPED,
                notified_event=event_dict.get("event"),
                reason=f"{self._queue.maxsize} notifications already waiting for the webhook",
            )
        except Exception as error:  # never let a notification break the event it rides on
            self._log.error(
                events.NOTIFICATION_FAILED,
                notified_event=event_dict.get("event"),
                error=repr(error),
            )
        return event_dict

    def payload(self, event: dict[str, Any]) -> dict[str, Any]:
        name = str(event.get("event"))
        run = self._run_name() or _run_from(event) or "training"
        headline = _headline(name, event)
        if name == events.TRAINER_RESTARTED and self._page:
            # FluxGym's UI said "Training Complete" and cannot see the relaunch: the page can.
            headline += f". Watch it on the status page: {self._page}"
        text = f"[training-sidecar] {run} on {self._host}: {headline}"[:MAX_TEXT]
        details = {
            key: value
            for key, value in event.items()
            if key not in _BULKY and key not in ("event", "level", "timestamp")
        }
        return {
            "text": text,
            "content": text,
            "event": name,
            "level": event.get("level"),
            "timestamp": event.get("timestamp"),
            "run": run,
            "host": self._host,
            "details": json.loads(json.dumps(details, default=str)),
        }

    # -- the sender ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._deliver_all, name="webhook", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Give queued messages up to ``timeout`` seconds (a completion must still be told),
        then abandon what is left: the sidecar's exit is not the receiver's to delay."""
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):  # full: the join below still bounds the wait
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon.set()
            self._log.warning(
                events.NOTIFICATIONS_ABANDONED,
                pending=self._queue.qsize(),
                reason=f"webhook {self.target.shown} still busy {timeout:g} s after shutdown",
            )

    def _deliver_all(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._deliver(item)

    def _deliver(self, payload: dict[str, Any]) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, DeliveryError) and e.retry),
            stop=(
                tenacity.stop_after_attempt(self._attempts)
                | tenacity.stop_after_delay(self._retry_window)
                | tenacity.stop_when_event_set(self._abandon)
            ),
            wait=_honour_retry_after(self._wait),
            sleep=self._abandon.wait,  # type: ignore[arg-type]  # returns bool, value unused
            before_sleep=lambda state: self._log.info(
                events.NOTIFICATION_RETRY,
                notified_event=payload["event"],
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else None,
                url=self.target.shown,
            ),
            reraise=True,
        )
        started = time.monotonic()
        try:
            status = retrying(self._post, payload)
        except DeliveryError as error:
            self._log.warning(
                events.NOTIFICATION_FAILED,
                notified_event=payload["event"],
                error=str(error),
                url=self.target.shown,
                seconds=round(time.monotonic() - started, 2),
            )
            return
        self._log.info(
            events.NOTIFICATION_SENT,
            notified_event=payload["event"],
            status=status,
            url=self.target.shown,
            seconds=round(time.monotonic() - started, 2),
        )

    def _post(self, payload: dict[str, Any]) -> int:
        body = json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"training-sidecar/{__version__}",
            "X-Sidecar-Event": payload["event"],
            **self.target.headers,
        }
        if self.target.secret:
            digest = hmac.new(self.target.secret.encode(), body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        request = urllib.request.Request(self.target.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            # 429 and 5xx are the receiver's passing trouble; any other 4xx will not improve.
            retry = error.code == 429 or error.code >= 500
            raise DeliveryError(
                f"HTTP {error.code} {error.reason}",
                retry=retry,
                retry_after=_seconds(error.headers.get("Retry-After")),
            ) from None
        except (urllib.error.URLError, OSError) as error:  # refused, DNS, TLS, timeout
            raise DeliveryError(str(getattr(error, "reason", error)), retry=True) from None


def _honour_retry_after(fallback: tenacity.wait.wait_base) -> Callable[..., float]:
    """Wait what a 429 asks for (Discord and Slack send Retry-After), capped at a minute."""

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, DeliveryError) and error.retry_after is not None:
            return min(error.retry_after, 60.0)
        return float(fallback(state))

    return wait


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _run_from(event: Mapping[str, Any]) -> str | None:
    script = event.get("script") or event.get("train_script")
    return Path(str(script)).parent.name if script else None


def _headline(name: str, event: Mapping[str, Any]) -> str:
    """One sentence a person reads on a phone at 3 a.m."""
    step = _step(event)
    reason = event.get("reason") or ""
    if name == events.STALL_DETECTED:
        hang = event.get("diagnosis")
        kind = f" [{hang}]" if hang else ""
        return f"stalled{step}{kind}: {reason}; stopping it to resume from the newest checkpoint"
    if name == events.HANG_REPEATED:
        return (
            f"the same hang ({event.get('diagnosis')}) came back {event.get('times')} times "
            f"from one checkpoint; known mitigation: {event.get('mitigation')}"
        )
    if name == events.TRAINER_CRASHED:
        return f"trainer crashed{step}: {reason}"
    if name == events.TRAINER_RESTARTED:
        checkpoint = event.get("checkpoint")
        source = f"resuming from {Path(str(checkpoint)).name}" if checkpoint else "from the start"
        count = event.get("restarts")
        budget = event.get("budget_left")
        of = f" (restart {count}, {budget} left)" if count is not None else ""
        why = f" after a {event['reason']}" if event.get("reason") else ""
        return f"restarted{why}, {source}{of}"
    if name == events.GAVE_UP:
        return f"GAVE UP: {reason}. train.sh and every checkpoint were left as they are."
    if name == events.TRAINING_COMPLETED:
        return f"training completed{step}: {reason}"
    return f"{name}: {reason}".rstrip(": ")


def _step(event: Mapping[str, Any]) -> str:
    step, total = event.get("last_step"), event.get("total_steps")
    if step is None:
        return ""
    return f" at step {step}/{total}" if total else f" at step {step}"
