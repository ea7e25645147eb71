"""Our variants of mitmproxy 11.0's sans-I/O HTTP and WebSocket layers.

Owns: the guest-facing HTTP/1 server (request-head size limit -> 431, head deadline -> 408,
text/plain error bodies instead of mitmproxy's HTML page), request body limits (413, buffered or
streamed), answering locally while a request body is still arriving, WebSocket relaying with no
message history and a per-message size limit (close 1009), and the tiny layer that closes a
connection we refuse.
Must not: decide policy or touch sockets (the addon decides, mitmproxy's server loop does I/O).

These classes subclass mitmproxy internals (`Http1Server`, `HttpLayer`, `HttpStream`,
`WebsocketLayer`) that are not a public API; pyproject pins mitmproxy to 11.0.x for that reason.
Methods copied from mitmproxy say so; when upgrading mitmproxy, diff them against the new release.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import wsproto.events
from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.connection import ConnectionState, Server
from mitmproxy.net.http import http1, status_codes
from mitmproxy.proxy import commands, events, layer, tunnel
from mitmproxy.proxy.layers import TCPLayer, quic, tls, websocket
from mitmproxy.proxy.layers.http import (
    DropStream,
    GetHttpConnection,
    GetHttpConnectionCompleted,
    HttpClient,
    HttpErrorHook,
    HttpLayer,
    HTTPMode,
    HttpStream,
    RegisterHttpConnection,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseEndOfMessage,
    ResponseProtocolError,
    SendHttp,
    _upstream_proxy,
)
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._http1 import Http1Client, Http1Server
from mitmproxy.proxy.utils import expect
from mitmproxy.websocket import WebSocketData
from wsproto import ConnectionState as WSState
from wsproto.frame_protocol import CloseReason

from protocols.http import core

# Keys in flow.metadata shared with the addon.
MD_BODY_LIMIT = "proxyvm.body_limit"  # int bytes, 0 = none
MD_STATUS = "proxyvm.status"  # status we answered with when there is no flow.response
MD_BYTES_IN = "proxyvm.bytes_in"  # guest -> upstream
MD_BYTES_OUT = "proxyvm.bytes_out"  # upstream -> guest
MD_WS_LIMIT = "proxyvm.ws_limit"
RESPONSE_HEAD_FACTOR = 4  # an upstream response head may be this many times the guest's limit
MD_INVALID = "proxyvm.invalid"  # set while mitmproxy validates a message: an error now is a 400/502 of ours
_CTL = re.compile(rb"[\x00-\x20\x7f]")

# Set by the addon: called as ON_REFUSED(client, status, detail) when a guest connection is refused
# before a request parsed (mitmproxy has no hook there). One mitmproxy master per process, so a
# module-level slot is enough.
ON_REFUSED: Callable[[Any, int, str], None] | None = None


def _opt(ctx_options: Any, name: str, default: Any) -> Any:
    return getattr(ctx_options, name, default) if name in ctx_options else default


def text_response(status: int, detail: str = "", *, close: bool = True) -> bytes:
    """An HTTP/1.1 response with a short text/plain body (our own answers only)."""
    reason = status_codes.RESPONSES.get(status, "Error")
    body = core.text_body(status, reason, detail)
    headers = http.Headers(
        content_type="text/plain; charset=utf-8",
        content_length=str(len(body)),
    )
    if close:
        headers["connection"] = "close"
    resp = http.Response.make(status, body, headers)
    return http1.assemble_response(resp)


def _malformed_kind(message: str) -> str:
    """A category for the audit: mitmproxy's parse errors quote the raw request line."""
    low = message.lower()
    if "control character" in low:
        return "malformed request: control character in the request target"
    if "request line" in low:
        return "malformed request: bad request line"
    if "header" in low:
        return "malformed request: bad header field"
    if "content-length" in low or "transfer-encoding" in low or "chunk" in low:
        return "malformed request: bad body framing"
    return "malformed request"


class Reject(layer.Layer):
    """Close the guest connection at once, optionally after sending `payload`."""

    def __init__(self, context: Any, payload: bytes = b"") -> None:
        super().__init__(context)
        self.payload = payload

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.payload:
                yield commands.SendData(self.context.client, self.payload)
            yield commands.CloseConnection(self.context.client)
        # every later event (data still in flight, the close) is ignored


class SplicedTunnel(TCPLayer):
    """Guest TLS spliced to the upstream, never decrypted (mitmproxy's TCPLayer with no flow and
    no message history), counting bytes each way for the audit record written when it ends."""

    def __init__(self, context: Any, on_end: Callable[[int, int, str], None]) -> None:
        super().__init__(context, ignore=True)
        self.on_end = on_end
        self.bytes_in = 0  # guest -> upstream
        self.bytes_out = 0
        self.reported = False

    def _report(self, error: str = "") -> None:
        if not self.reported:
            self.reported = True
            self.on_end(self.bytes_in, self.bytes_out, error)

    @expect(events.Start)
    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)
        if self._handle_event == self.done:  # the upstream connection failed
            self._report(self.context.server.error or "cannot connect to upstream")

    _handle_event = start

    @expect(events.DataReceived, events.ConnectionClosed, websocket.WebSocketMessageInjected)
    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection == self.context.client:
                self.bytes_in += len(event.data)
            else:
                self.bytes_out += len(event.data)
        yield from super().relay_messages(event)
        if self._handle_event == self.done:
            self._report()


class GuestHttp1Server(Http1Server):
    """HTTP/1 toward the guest: bounded request heads, a deadline for them, text error bodies."""

    _deadline: commands.RequestWakeup | None = None
    _head_started: float = 0.0

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        # read once per connection: mitmproxy options deep-copy their value on every access
        self._max_head = int(_opt(context.options, "proxyvm_header_size", 64 * 1024))
        self._head_timeout = float(_opt(context.options, "proxyvm_header_timeout", 10.0))

    # One pending timer per connection at most (mitmproxy runs each RequestWakeup as a task): it
    # fires, looks at how long the current head has been arriving, and re-arms for the rest.
    def _arm(self, delay: float) -> layer.CommandGenerator[None]:
        self._deadline = commands.RequestWakeup(max(0.01, delay))
        yield self._deadline

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            if event.command is not self._deadline:
                return
            self._deadline = None
            if self.state != self.read_headers:
                return  # mark_done re-arms when the next head is due
            if not len(self.buf):
                yield from self._arm(self._head_timeout)  # idle keep-alive: the idle timeout owns it
                return
            left = self._head_timeout - (time.monotonic() - self._head_started)
            if left <= 0:
                yield from self._refuse(408, "request headers not received in time")
            else:
                yield from self._arm(left)
            return
        if isinstance(event, events.DataReceived) and self.state == self.read_headers and not len(self.buf):
            self._head_started = time.monotonic()  # the first byte of a head starts its clock
        yield from super()._handle_event(event)

    @expect(events.Start)
    def start(self, _: events.Event) -> layer.CommandGenerator[None]:
        self.state = self.read_headers
        yield from self._arm(self._head_timeout)

    state = start

    def mark_done(self, *, request: bool = False, response: bool = False) -> layer.CommandGenerator[None]:
        yield from super().mark_done(request=request, response=response)
        if self.state == self.read_headers and self.request is None:
            self._head_started = time.monotonic()  # pipelined bytes already buffered count from now
            if self._deadline is None:
                yield from self._arm(self._head_timeout)

    def _refuse(self, status: int, detail: str, audit_detail: str | None = None) -> layer.CommandGenerator[None]:
        """Answer `status` with `detail` (the guest may see its own bytes quoted back) and close;
        the audit gets `audit_detail`, which must never quote the request (query strings)."""
        detail_for_audit = audit_detail if audit_detail is not None else detail
        yield commands.Log(f"{self.conn.peername}: {status} {detail_for_audit}")
        yield commands.SendData(self.conn, text_response(status, detail))
        yield commands.CloseConnection(self.conn)
        self.state = self.done
        self.buf = type(self.buf)()
        if self.request is None:
            # tell the addon (it audits); mitmproxy has no hook for a request that never parsed
            if ON_REFUSED is not None:
                ON_REFUSED(self.context.client, status, detail_for_audit)

    # Copied from mitmproxy 11.0.2 Http1Server.read_headers, with the size limit and text bodies.
    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            request_head = self.buf.maybe_extract_lines()
            if request_head is None:
                if len(self.buf) > self._max_head:
                    yield from self._refuse(431, "request header fields too large")
                return
            if sum(len(x) for x in request_head) > self._max_head:
                yield from self._refuse(431, "request header fields too large")
                return
            try:
                self.request = http1.read_request_head([bytes(x) for x in request_head])
                expected_body_size = http1.expected_http_body_size(self.request)
                if _CTL.search(self.request.data.path):
                    raise ValueError("control character in the request target")
            except ValueError as e:
                self.request = None
                yield from self._refuse(400, f"malformed request: {e}", _malformed_kind(str(e)))
                return
            yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, expected_body_size == 0))
            from mitmproxy.proxy.layers.http._http1 import make_body_reader

            self.body_reader = make_body_reader(expected_body_size)
            self.state = self.read_body
            yield from self.state(event)
        elif isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(self.conn)
        else:
            raise AssertionError(f"Unexpected event: {event}")

    def send(self, event: Any) -> layer.CommandGenerator[None]:
        if isinstance(event, ResponseProtocolError):
            if not (self.conn.state & ConnectionState.CAN_WRITE):
                return
            if not self.response and event.code != status_codes.NO_RESPONSE:
                detail = event.message
                if event.code == 400 and detail.startswith("HTTP request has no host header") and ON_REFUSED:
                    ON_REFUSED(self.context.client, 400, detail)  # mitmproxy runs no hook for this one
                if event.code == 502:
                    detail = f"{core.cause_text(core.classify_upstream_error(detail))} ({detail})"
                yield commands.SendData(self.conn, text_response(event.code, detail))
            yield commands.CloseConnection(self.conn)
            return
        yield from super().send(event)


class GuestHttpLayer(HttpLayer):
    """HttpLayer whose guest side is `GuestHttp1Server` and whose streams are `GuardedHttpStream`."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start) and self.context.client not in self.connections:
            self.connections[self.context.client] = GuestHttp1Server(self.context.fork())
        yield from super()._handle_event(event)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        ctx = self.context.fork()
        self.streams[stream_id] = GuardedHttpStream(ctx, stream_id)
        yield from self.event_to_child(self.streams[stream_id], events.Start())

    # Copied from mitmproxy 11.0.2 HttpLayer.get_connection; only the HttpClient class differs.
    def get_connection(
        self, event: GetHttpConnection, *, reuse: bool = True
    ) -> layer.CommandGenerator[None]:
        # Do we already have a connection we can re-use?
        if reuse:
            for connection in self.connections:
                connection_suitable = event.connection_spec_matches(connection)
                if connection_suitable:
                    if connection in self.waiting_for_establishment:
                        self.waiting_for_establishment[connection].append(event)
                        return
                    elif connection.error:
                        stream = self.command_sources.pop(event)
                        yield from self.event_to_child(
                            stream,
                            GetHttpConnectionCompleted(event, (None, connection.error)),
                        )
                        return
                    elif connection.connected:
                        # see "tricky multiplexing edge case" in make_http_connection for an explanation
                        h2_to_h1 = (
                            self.context.client.alpn == b"h2"
                            and connection.alpn != b"h2"
                        )
                        if not h2_to_h1:
                            stream = self.command_sources.pop(event)
                            yield from self.event_to_child(
                                stream,
                                GetHttpConnectionCompleted(event, (connection, None)),
                            )
                            return
                    else:
                        pass  # the connection is at least half-closed already, we want a new one.

        context_connection_matches = (
            self.context.server not in self.connections
            and event.connection_spec_matches(self.context.server)
        )
        can_use_context_connection = (
            context_connection_matches and self.context.server.connected
        )
        if context_connection_matches and self.context.server.error:
            stream = self.command_sources.pop(event)
            yield from self.event_to_child(
                stream,
                GetHttpConnectionCompleted(event, (None, self.context.server.error)),
            )
            return

        context = self.context.fork()

        stack = tunnel.LayerStack()

        if not can_use_context_connection:
            context.server = Server(
                address=event.address, transport_protocol=event.transport_protocol
            )

            if event.via:
                context.server.via = event.via
                # We always send a CONNECT request, *except* for plaintext absolute-form HTTP requests in upstream mode.
                send_connect = event.tls or self.mode != HTTPMode.upstream
                stack /= _upstream_proxy.HttpUpstreamProxy.make(context, send_connect)
            if event.tls:
                # Assume that we are in transparent mode and lazily did not open a connection yet.
                # We don't want the IP (which is the address) as the upstream SNI, but the client's SNI instead.
                if (
                    self.mode == HTTPMode.transparent
                    and event.address == self.context.server.address
                ):
                    # reverse proxy mode may set self.context.server.sni, which takes precedence.
                    context.server.sni = (
                        self.context.server.sni
                        or self.context.client.sni
                        or event.address[0]
                    )
                else:
                    context.server.sni = event.address[0]
                if context.server.transport_protocol == "tcp":
                    stack /= tls.ServerTLSLayer(context)
                elif context.server.transport_protocol == "udp":
                    stack /= quic.ServerQuicLayer(context)
                else:
                    raise AssertionError(
                        context.server.transport_protocol
                    )  # pragma: no cover

        stack /= UpstreamHttpClient(context)  # the one line that differs

        self.connections[context.server] = stack[0]
        self.waiting_for_establishment[context.server].append(event)

        yield from self.event_to_child(stack[0], events.Start())


class UpstreamHttpClient(HttpClient):
    """HttpClient whose HTTP/1 side bounds the upstream's response head. We only ever offer
    ALPN http/1.1 upstream, so there is no HTTP/2 or HTTP/3 branch."""

    @expect(events.Start)
    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        err: str | None
        if self.context.server.connected:
            err = None
        else:
            err = yield commands.OpenConnection(self.context.server)
        if not err:
            self.child_layer = BoundedHttp1Client(self.context)
            self._handle_event = self.child_layer.handle_event
            yield from self._handle_event(event)
        yield RegisterHttpConnection(self.context.server, err)


class BoundedHttp1Client(Http1Client):
    """mitmproxy buffers a response head without limit ("FIXME: protect against header size
    DoS"); an upstream that never ends its head must not grow the proxy: 502 past the limit."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._max_head = RESPONSE_HEAD_FACTOR * int(_opt(context.options, "proxyvm_header_size", 64 * 1024))

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        yield from super().read_headers(event)
        if self.state == self.read_headers and len(self.buf) > self._max_head and self.stream_id is not None:
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(
                ResponseProtocolError(self.stream_id, f"upstream response head over {self._max_head} bytes")
            )
            self.state = self.done
            self.buf = type(self.buf)()


class GuardedHttpStream(HttpStream):
    """Body limits (413) and local answers while a body still arrives; bounded WebSocket child."""

    _body_seen: int = 0

    def _limit(self) -> int:
        return int(self.flow.metadata.get(MD_BODY_LIMIT, 0) or 0)

    def _count(self, n: int) -> bool:
        """Add n request-body bytes; True when that passes the limit."""
        self._body_seen += n
        self.flow.metadata[MD_BYTES_IN] = self._body_seen
        limit = self._limit()
        return bool(limit) and self._body_seen > limit

    def _too_large(self, upstream_started: bool) -> layer.CommandGenerator[None]:
        msg = f"request body over the {self._limit()} byte limit"
        self.flow.error = mflow.Error(msg)
        self.flow.metadata[MD_STATUS] = 413
        yield HttpErrorHook(self.flow)
        if upstream_started:
            yield SendHttp(RequestProtocolError(self.stream_id, msg), self.context.server)
        yield SendHttp(ResponseProtocolError(self.stream_id, msg, 413), self.context.client)
        self.flow.live = False
        self.client_state = self.server_state = self.state_errored

    def check_invalid(self, request: bool) -> layer.CommandGenerator[bool]:
        # mitmproxy emits the error hook before it answers; tell the addon which status that is
        self.flow.metadata[MD_INVALID] = 400 if request else 502
        bad = yield from super().check_invalid(request)
        if not bad:
            self.flow.metadata.pop(MD_INVALID, None)
        return bad

    def start_request_stream(self) -> layer.CommandGenerator[None]:
        if self.flow.response is not None:
            # The addon answered (deny, 413) but mitmproxy had already chosen to stream the body:
            # swallow the body instead and answer once it ends.
            self.flow.request.stream = False
            self.client_state = self.state_consume_request_body
            return
        yield from super().start_request_stream()

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData):
            if self.flow.response is not None:
                self._body_seen += len(event.data)  # answered locally: discard, never buffer
                return
            if self._count(len(event.data)):
                yield from self._too_large(upstream_started=False)
                return
        yield from super().state_consume_request_body(event)

    @expect(RequestData, RequestTrailers, RequestEndOfMessage)
    def state_stream_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData) and self._count(len(event.data)):
            yield from self._too_large(upstream_started=True)
            return
        yield from super().state_stream_request_body(event)

    # Copied from mitmproxy 11.0.2 HttpStream.flow_done; only the WebSocket layer class differs.
    def flow_done(self) -> layer.CommandGenerator[None]:
        if not self.flow.websocket:
            self.flow.live = False
        assert self.flow.response
        if self.flow.response.status_code == 101:
            if self.flow.websocket:
                self.child_layer = BoundedWebsocketLayer(self.context, self.flow)
            else:
                yield commands.Log("Sent HTTP 101 response, but no protocol is enabled to upgrade to.")
                yield commands.CloseConnection(self.context.client)
                self.client_state = self.server_state = self.state_errored
                return
            self._handle_event = self.passthrough
            yield from self.child_layer.handle_event(events.Start())
        else:
            yield DropStream(self.stream_id)
        yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)


class BoundedWebsocketLayer(websocket.WebsocketLayer):
    """Relays WebSocket messages without keeping them (flow.websocket.messages stays empty) and
    closes both sides with 1009 when one message passes the configured size."""

    @expect(events.DataReceived, events.ConnectionClosed, websocket.WebSocketMessageInjected)
    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        ws: WebSocketData | None = self.flow.websocket
        assert ws is not None
        if not isinstance(event, events.ConnectionEvent):
            return  # injection is an interactive-mitmproxy feature we do not offer
        from_client = event.connection == self.context.client
        src_ws, dst_ws = (self.client_ws, self.server_ws) if from_client else (self.server_ws, self.client_ws)
        if isinstance(event, events.DataReceived):
            key = MD_BYTES_IN if from_client else MD_BYTES_OUT
            self.flow.metadata[key] = self.flow.metadata.get(key, 0) + len(event.data)
            src_ws.receive_data(event.data)
        else:
            src_ws.receive_data(None)
        limit = int(self.flow.metadata.get(MD_WS_LIMIT, 0) or 0)
        for ws_event in src_ws.events():
            if isinstance(ws_event, wsproto.events.Message):
                # Forward each piece as it arrives: no reassembly, so memory is one frame, not one message.
                data = ws_event.data
                raw = data.encode() if isinstance(data, str) else data
                size = getattr(src_ws, "_pvm_msg_size", 0) + len(raw)
                src_ws._pvm_msg_size = 0 if ws_event.message_finished else size  # type: ignore[attr-defined]
                if limit and size > limit:
                    yield from self._close_too_big(size, limit, from_client)
                    return
                if isinstance(data, str):
                    out: wsproto.events.Event = wsproto.events.TextMessage(
                        data, frame_finished=ws_event.frame_finished, message_finished=ws_event.message_finished
                    )
                else:
                    out = wsproto.events.BytesMessage(
                        data, frame_finished=ws_event.frame_finished, message_finished=ws_event.message_finished
                    )
                yield dst_ws.send2(out)
            elif isinstance(ws_event, (wsproto.events.Ping, wsproto.events.Pong)):
                yield dst_ws.send2(ws_event)
            elif isinstance(ws_event, wsproto.events.CloseConnection):
                ws.timestamp_end = time.time()
                ws.closed_by_client = from_client
                ws.close_code = ws_event.code
                ws.close_reason = ws_event.reason
                for w in (self.server_ws, self.client_ws):
                    if w.state in {WSState.OPEN, WSState.REMOTE_CLOSING}:
                        yield w.send2(ws_event)
                    yield commands.CloseConnection(w.conn)
                yield websocket.WebsocketEndHook(self.flow)
                self.flow.live = False
                self._handle_event = self.done
        ws.messages.clear()

    def _close_too_big(self, size: int, limit: int, from_client: bool) -> layer.CommandGenerator[None]:
        ws = self.flow.websocket
        assert ws is not None
        reason = f"message over the {limit} byte limit"
        ws.timestamp_end = time.time()
        ws.closed_by_client = from_client
        ws.close_code = CloseReason.MESSAGE_TOO_BIG
        ws.close_reason = reason
        for w in (self.server_ws, self.client_ws):
            if w.state in {WSState.OPEN, WSState.REMOTE_CLOSING}:
                yield w.send2(wsproto.events.CloseConnection(code=CloseReason.MESSAGE_TOO_BIG, reason=reason))
            yield commands.CloseConnection(w.conn)
        self.flow.metadata[MD_STATUS] = 1009
        yield websocket.WebsocketEndHook(self.flow)
        self.flow.live = False
        self._handle_event = self.done


__all__ = [
    "BoundedWebsocketLayer",
    "GuardedHttpStream",
    "GuestHttp1Server",
    "GuestHttpLayer",
    "UpstreamHttpClient",
    "Reject",
    "SplicedTunnel",
    "text_response",
]
