"""The queue runner: schedules spooled messages, records each attempt, retries, bounces.

Owns: which entries are due (first attempt now, then exponential backoff), bounded concurrency,
per-recipient state updates written to the spool after every attempt, expiry after `retry.max_age`
with a DSN to the envelope sender (never for a bounce), the `flush` trigger, and the audit records
of delivery attempts and final outcomes.
Must not: remove an entry before its outcome (and any bounce) is durable; hold the event loop on
file I/O (spool calls run in threads); audit bodies or secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable

from protocols.base import ServiceContext
from protocols.smtp.delivery import DEFERRED, DELIVERED, FAILED, Attempt, Deliverer
from protocols.smtp.dsn import build_dsn
from protocols.smtp.settings import SMTPSettings
from protocols.smtp.spool import (
    PENDING,
    Envelope,
    RcptState,
    Spool,
    SpoolEntry,
    SpoolError,
    backoff,
    new_id,
    with_state,
)

FLUSH_POLL = 1.0
FRESH_CACHE_BYTES = 64 * 1024 * 1024  # new messages kept in memory for their first attempt



def tls_failure_kind(alarm: str) -> str:
    """The kind of a delivery's TLS alarm (protocols.smtp.client): `strip` (no STARTTLS offered,
    refused, or no TLS), `dane_mismatch` (the chain matched no secure TLSA record), `bad_cert`
    (handshake or certificate verification failed), `handshake` (the TLS connection broke)."""
    if alarm.startswith(("STARTTLS not offered", "STARTTLS refused", "no TLS")):
        return "strip"
    if alarm.startswith("certificate verification failed"):
        return "dane_mismatch"
    if alarm.startswith("TLS handshake or certificate verification failed"):
        return "bad_cert"
    return "handshake"

class QueueRunner:
    def __init__(self, spool: Spool, deliverer: Deliverer, settings: SMTPSettings, ctx: ServiceContext,
                 log: logging.Logger, clock: Callable[[], float]):
        self.spool = spool
        self.deliverer = deliverer
        self.settings = settings
        self.ctx = ctx  # audit through ctx.event (kind: delivery)
        self.log = log
        self.clock = clock
        self.entries: dict[str, SpoolEntry] = {}
        self._heap: list[tuple[float, str]] = []
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(settings.max_connections)
        self.busy_guests: Callable[[], int] = lambda: 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._remover: asyncio.Task[None] | None = None
        self._to_remove: list[str] = []
        self._removing = asyncio.Event()
        self._fresh: dict[str, bytes] = {}
        self._flush_after: set[str] = set()
        self._fresh_bytes = 0
        self.delivered = 0
        self.bounced = 0
        self.attempts: dict[str, int] = {}  # attempt outcome (delivered|deferred|failed) -> count
        self.finals: dict[str, int] = {}  # message outcome (delivered|partial|failed|expired) -> count
        self.tls_failures: dict[str, int] = {}  # strip | bad_cert | dane_mismatch | handshake -> count

    # -- control --------------------------------------------------------------------------
    def load(self, entries: list[SpoolEntry]) -> None:
        for e in entries:
            self.entries[e.id] = e
            heapq.heappush(self._heap, (e.state.next_attempt, e.id))

    def submit(self, entry: SpoolEntry, message: bytes | None = None) -> None:
        """A newly stored entry, due now. `message` (its bytes) saves re-reading it from disk."""
        if message is not None and self._fresh_bytes + len(message) <= FRESH_CACHE_BYTES:
            self._fresh[entry.id] = message
            self._fresh_bytes += len(message)
        self.entries[entry.id] = entry
        heapq.heappush(self._heap, (0.0, entry.id))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def flush(self) -> None:
        """Everything deferred becomes due now (attempts in flight are retried as they finish)."""
        self._heap = [(0.0, i) for i in self.entries if i not in self._inflight]
        heapq.heapify(self._heap)
        self._flush_after.update(self._inflight)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="smtp-queue")
        self._remover = asyncio.create_task(self._remove_finished(), name="smtp-queue-remover")

    async def drain(self, timeout: float) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight.values()), timeout=max(timeout, 0.1))
            for t in pending:  # unfinished attempts stay in the spool as pending: retried at next start
                t.cancel()
        if self._remover is not None:
            self._remover.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._remover
        if self._to_remove:
            batch, self._to_remove = self._to_remove, []
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.spool.remove_many, batch)
        await self.deliverer.close()

    def concurrency(self) -> int:
        """Deliveries in flight: `max_connections`, less one per guest session being served (never
        below a quarter of it). Taking mail in and making it durable comes first; the queue catches
        up as soon as guests go quiet, and a steady flood still leaves delivery a fair share."""
        m = self.settings.max_connections
        return max(max(1, m // 4), m - self.busy_guests())

    def stats(self) -> dict[str, int]:
        oldest = min((e.envelope.received for e in self.entries.values()), default=None)
        return {"queued": len(self.entries), "inflight": len(self._inflight),
                "delivered": self.delivered, "bounced": self.bounced,
                "oldest_age": round(self.clock() - oldest, 3) if oldest is not None else 0.0,
                "attempts": dict(self.attempts), "finals": dict(self.finals), "tls_failures": dict(self.tls_failures)}

    # -- loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        reap_at = flush_at = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if loop.time() >= flush_at:  # a stat once a second, not per wake-up
                flush_at = loop.time() + FLUSH_POLL
                if self.spool.flush_file.exists() and self.spool.take_flush_request():
                    self.log.info("smtp: flush requested; retrying %d queued messages", len(self.entries))
                    self.flush()
            now = self.clock()
            limit = self.concurrency()
            while self._heap and self._heap[0][0] <= now and len(self._inflight) < limit:
                due, ident = heapq.heappop(self._heap)
                entry = self.entries.get(ident)
                if entry is None or ident in self._inflight:
                    continue
                if entry.state.next_attempt > due and due != 0.0:
                    continue  # a stale heap item; a newer one exists
                task = asyncio.create_task(self._attempt(ident))
                self._inflight[ident] = task
                task.add_done_callback(lambda _t, i=ident: self._inflight.pop(i, None))
            wait = FLUSH_POLL
            if self._heap:
                wait = min(wait, max(0.0, self._heap[0][0] - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.01)):
                    await self._wake.wait()
            if reap_at <= now:
                self.deliverer.reap()
                reap_at = now + 5.0

    async def _attempt(self, ident: str) -> None:
        try:
            async with self._sem:
                await self._attempt_locked(ident)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not lose mail: the entry stays queued and is retried later.
            self.log.exception("smtp: delivery attempt for %s crashed", ident)
            entry = self.entries.get(ident)
            if entry is not None:
                heapq.heappush(self._heap, (self.clock() + self.settings.retry.first, ident))
        finally:
            self._wake.set()

    async def _attempt_locked(self, ident: str) -> None:
        entry = self.entries[ident]
        env = entry.envelope
        pending = entry.pending()
        message = self._fresh.pop(ident, None)
        if message is not None:
            self._fresh_bytes -= len(message)
        else:
            message = await asyncio.to_thread(self.spool.message, ident)
        result = await self.deliverer.deliver(env, message, pending)
        now = self.clock()
        for a in result.attempts:
            self._audit_attempt(entry, a)
        rcpts = dict(entry.state.rcpts)
        last_error = ""
        for r in pending:
            outcome, reply = result.rcpts.get(r, (DEFERRED, "no attempt"))
            prev = entry.rcpt_state(r)
            status = {DELIVERED: "delivered", FAILED: "failed"}.get(outcome, PENDING)
            rcpts[r] = RcptState(status=status, reply=reply, attempts=prev.attempts + 1)
            if outcome == DEFERRED:
                last_error = reply
        attempts = entry.state.attempts + 1
        expired = False
        if any(s.status == PENDING for s in rcpts.values() if s) or any(r not in rcpts for r in env.rcpts):
            if now - env.received >= self.settings.retry.max_age:
                expired = True
                for r in env.rcpts:
                    st = rcpts.get(r, RcptState())
                    if st.status == PENDING:
                        rcpts[r] = RcptState("failed", st.reply or last_error, st.attempts)
        entry = with_state(entry, attempts=attempts, last_attempt=now, last_error=last_error,
                           rcpts=rcpts, next_attempt=now + backoff(attempts, self.settings.retry))
        if entry.done():
            failed = entry.failed()
            if failed and env.mail_from and not env.dsn_of:
                await self._bounce(entry, message, failed, expired, now)
            elif failed:
                self.log.warning("smtp: %s undeliverable to %d recipients; null sender, no bounce", ident, len(failed))
            self.entries.pop(ident, None)
            self._flush_after.discard(ident)
            self._to_remove.append(ident)  # removed in batches (one directory fsync per batch)
            self._removing.set()
            delivered = [r for r in env.rcpts if entry.rcpt_state(r).status == "delivered"]
            self.delivered += bool(delivered)
            self._audit_final(entry, delivered, failed, expired)
            return
        try:
            await asyncio.to_thread(self.spool.save_state, entry)
        except SpoolError as e:
            # The old state stays on disk: recipients may be retried (never lost).
            self.log.error("smtp: cannot record delivery state of %s: %s", ident, e)
        self.entries[ident] = entry
        due = 0.0 if ident in self._flush_after else entry.state.next_attempt
        self._flush_after.discard(ident)
        heapq.heappush(self._heap, (due, ident))

    async def _bounce(self, entry: SpoolEntry, message: bytes, failed: list[str], expired: bool,
                      now: float) -> None:
        env = entry.envelope
        failures = [(r, entry.rcpt_state(r).reply, expired) for r in failed]
        body = build_dsn(hostname=self.settings.hostname, original_id=env.id, mail_from=env.mail_from,
                         failures=failures, arrival=env.received, now=now, original=message)
        dsn_env = Envelope(id=new_id(now), guest="proxyvm", src="", helo=self.settings.hostname, mail_from="",
                           rcpts=(env.mail_from,), received=now, size=len(body),
                           rules=(("dsn", ""),), dsn_of=env.id, smtputf8=env.smtputf8)
        # Stored before the original is removed: a crash in between means a duplicate bounce, not a lost one.
        while True:
            try:
                dsn_entry = await asyncio.to_thread(self.spool.store, dsn_env, body)
                break
            except SpoolError as e:
                self.log.error("smtp: cannot spool bounce for %s (%s); retrying", env.id, e)
                await asyncio.sleep(5)
        self.bounced += 1
        self.ctx.event(  # what became of accepted mail: not a decision
            "delivery", guest=env.guest, src=env.src, protocol="smtp", verdict="allow", rule="dsn", at="",
            reason=f"bounce for message {env.id}: {'expired after retry.max_age' if expired else 'rejected by peer'}",
            request={"message": env.id, "mail_from": env.mail_from, "rcpt_to": list(failed)},
            event="dsn", dsn_id=dsn_env.id,
        )
        self.submit(dsn_entry, body)

    async def _remove_finished(self) -> None:
        """A crash before a batch is removed means those messages are delivered again (duplicates
        are possible, losses are not): the same trade every MTA makes."""
        while True:
            await self._removing.wait()
            self._removing.clear()
            batch, self._to_remove = self._to_remove, []
            if batch:
                try:
                    await asyncio.to_thread(self.spool.remove_many, batch)
                except OSError as e:
                    self.log.error("smtp: cannot remove %d delivered entries: %s", len(batch), e)

    # -- audit ----------------------------------------------------------------------------
    def _rule(self, env: Envelope) -> tuple[str, str]:
        return env.rules[0] if env.rules else ("", "")

    def _audit_attempt(self, entry: SpoolEntry, a: Attempt) -> None:
        env = entry.envelope
        rule, at = self._rule(env)
        self.attempts[a.outcome] = self.attempts.get(a.outcome, 0) + 1
        if a.alarm:
            kind = tls_failure_kind(a.alarm)
            self.tls_failures[kind] = self.tls_failures.get(kind, 0) + 1
            self.log.warning("smtp: ALARM %s (message %s)", a.alarm, env.id)
        self.ctx.event(  # what became of accepted mail: not a decision
            "delivery", guest=env.guest, src=env.src, protocol="smtp", verdict="allow", rule=rule, at=at,
            reason=f"delivery attempt to {a.peer}: {a.outcome}",
            request={"message": env.id, "mail_from": env.mail_from, "rcpt_to": list(a.rcpts)},
            upstream={"peer": a.peer, "address": a.address, "tls": a.tls or None, "cipher": a.cipher or None,
                      "verified": bool(a.verified), "verified_by": a.verified or None, "reused": a.reused},
            event="attempt", reply=a.reply, outcome=a.outcome, **({"alarm": a.alarm} if a.alarm else {}),
        )

    def _audit_final(self, entry: SpoolEntry, delivered: list[str], failed: list[str], expired: bool) -> None:
        env = entry.envelope
        rule, at = self._rule(env)
        outcome = "delivered" if not failed else ("expired" if expired else ("failed" if not delivered else "partial"))
        self.finals[outcome] = self.finals.get(outcome, 0) + 1
        self.ctx.event(  # what became of accepted mail: not a decision
            "delivery", guest=env.guest, src=env.src, protocol="smtp", verdict="allow", rule=rule, at=at,
            reason=f"message {env.id} {outcome} after {entry.state.attempts} attempt(s)",
            request={"message": env.id, "mail_from": env.mail_from, "rcpt_to": list(env.rcpts),
                     "size": env.size, "message_id": env.message_id},
            event="final", outcome=outcome, delivered=delivered, failed=failed,
        )
