"""Delivery Status Notifications (RFC 3464) for mail we could not deliver.

Owns: building the multipart/report bounce (human text, message/delivery-status with per-recipient
fields, and the original's headers only — never its body) sent from the null sender.
Must not: spool or send anything, or include anything the guest did not write besides our own
diagnostics (no peer addresses beyond what the reply said, no secrets).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence

MAX_HEADER_BYTES = 64 * 1024
_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(reply: str, default: str) -> str:
    m = _STATUS.search(reply)
    return m.group(1) if m else default


def _clean(text: str) -> str:
    return re.sub(r"[\r\n]+", " ", text)[:500]


def build_dsn(
    *,
    hostname: str,
    original_id: str,
    mail_from: str,
    failures: Sequence[tuple[str, str, bool]],  # (recipient, last reply or error, expired)
    arrival: float,
    now: float,
    original: bytes,
) -> bytes:
    """The bounce message (CRLF line ends) addressed to `mail_from`."""
    boundary = f"=_proxyvm_{secrets.token_hex(8)}"
    date = email.utils.formatdate(now)
    head_end = original.find(b"\r\n\r\n")
    headers = original[: head_end + 2] if head_end >= 0 else original[:MAX_HEADER_BYTES]
    headers = headers[:MAX_HEADER_BYTES]
    human = [
        "This is the mail system at host " + hostname + ".",
        "",
        "Your message could not be delivered to the following recipients.",
        "",
    ]
    per_rcpt = []
    for rcpt, reply, expired in failures:
        human.append(f"<{rcpt}>: " + (f"gave up after retrying: {_clean(reply)}" if expired else _clean(reply)))
        # RFC 3463: 4.4.7 = delivery time expired (the last reply was temporary by definition)
        status = "4.4.7" if expired else status_of(reply, "5.0.0")
        diag = reply if re.match(r"^\d{3}\b", reply) else ""
        fields = [
            f"Final-Recipient: rfc822; {rcpt}",
            "Action: failed",
            f"Status: {status}",
        ]
        if diag:
            fields.append(f"Diagnostic-Code: smtp; {_clean(diag)}")
        fields.append(f"Last-Attempt-Date: {date}")
        per_rcpt.append("\r\n".join(fields))
    report = "\r\n".join([
        f"Reporting-MTA: dns; {hostname}",
        f"X-Proxyvm-Queue-ID: {original_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival)}",
    ]) + "\r\n\r\n" + "\r\n\r\n".join(per_rcpt) + "\r\n"
    msg_id = f"<{secrets.token_hex(8)}.{original_id}@{hostname}>"
    parts = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{mail_from}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: {msg_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        report,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(parts).encode("utf-8") + b"\r\n" + headers + f"\r\n--{boundary}--\r\n".encode()
    return text
