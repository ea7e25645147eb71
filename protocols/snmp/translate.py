"""Version translation between guests' SNMPv1/v2c and the agents' SNMPv2 PDUs (RFC 3584 §4),
and the VACM-like view filter applied to GETNEXT/GETBULK results.

Owns: error-status mapping v2 -> v1, exception/Counter64 handling for v1 guests, error responses,
the per-column "past the allowed view" cut of GETNEXT/GETBULK results, and response size bounds.
Must not: do I/O or call the policy engine itself (callers pass an `allowed(oid)` predicate).
"""

from __future__ import annotations

from collections.abc import Callable

from protocols.snmp import ber

# RFC 3584 §4.4
_V2_TO_V1 = {
    ber.NO_ERROR: ber.NO_ERROR, ber.TOO_BIG: ber.TOO_BIG, ber.NO_SUCH_NAME: ber.NO_SUCH_NAME,
    ber.BAD_VALUE: ber.BAD_VALUE, ber.READ_ONLY: ber.READ_ONLY, ber.GEN_ERR: ber.GEN_ERR,
    ber.WRONG_VALUE: ber.BAD_VALUE, ber.WRONG_ENCODING: ber.BAD_VALUE, ber.WRONG_TYPE: ber.BAD_VALUE,
    ber.WRONG_LENGTH: ber.BAD_VALUE, ber.INCONSISTENT_VALUE: ber.BAD_VALUE,
    ber.NO_ACCESS: ber.NO_SUCH_NAME, ber.NOT_WRITABLE: ber.NO_SUCH_NAME, ber.NO_CREATION: ber.NO_SUCH_NAME,
    ber.INCONSISTENT_NAME: ber.NO_SUCH_NAME, ber.AUTHORIZATION_ERROR: ber.NO_SUCH_NAME,
    ber.RESOURCE_UNAVAILABLE: ber.GEN_ERR, ber.COMMIT_FAILED: ber.GEN_ERR, ber.UNDO_FAILED: ber.GEN_ERR,
}


def v1_status(status: int) -> int:
    return _V2_TO_V1.get(status, ber.GEN_ERR)


def error_response(version: int, request: ber.PDU, status: int, index: int) -> ber.PDU:
    """A Response carrying an error. v1 echoes the request's varbinds (RFC 1157 §4.1.2); v2c
    tooBig has an empty list (RFC 3416 §4.2.1), other v2c errors echo the request."""
    if version == ber.V1:
        status = v1_status(status)
    vbs = [] if (version == ber.V2C and status == ber.TOO_BIG) else request.varbinds
    return ber.PDU(ber.RESPONSE, request.request_id, status, index if status else 0, vbs)


def to_v1(request: ber.PDU, resp: ber.PDU) -> ber.PDU:
    """A v2 Response for a v1 guest: map the error, turn exceptions and Counter64 into noSuchName
    (RFC 3584 §4.2.2.1). GETNEXT's Counter64 skipping happens before this (the service re-asks)."""
    if resp.error_status:
        return ber.PDU(ber.RESPONSE, request.request_id, v1_status(resp.error_status),
                       resp.error_index, request.varbinds)
    for i, vb in enumerate(resp.varbinds):
        if vb.tag in ber.EXCEPTIONS or vb.tag == ber.COUNTER64:
            return ber.PDU(ber.RESPONSE, request.request_id, ber.NO_SUCH_NAME, i + 1, request.varbinds)
    if len(resp.varbinds) != len(request.varbinds):
        return ber.PDU(ber.RESPONSE, request.request_id, ber.GEN_ERR, 0, request.varbinds)
    return ber.PDU(ber.RESPONSE, request.request_id, ber.NO_ERROR, 0, resp.varbinds)


def filter_view(
    request: ber.PDU,
    resp: ber.PDU,
    non_repeaters: int,
    allowed: Callable[[tuple[int, ...]], bool],
) -> tuple[list[ber.VarBind], int]:
    """Cut GETNEXT/GETBULK results at the allowed view: a returned OID the policy does not allow
    becomes endOfMibView (named by the column's last allowed OID), and so does everything after it
    in that column, like a VACM view would end the walk. Returns (varbinds, how many were cut).
    Trailing rows in which every column has ended are dropped (RFC 3416 §4.2.3 permits that)."""
    vbs = resp.varbinds
    req = request.varbinds
    n = len(req)
    nr = min(max(non_repeaters, 0), n) if request.tag == ber.GETBULK else n
    out: list[ber.VarBind] = []
    cut = 0
    for i in range(min(nr, len(vbs))):
        vb = vbs[i]
        if vb.tag in ber.EXCEPTIONS or allowed(vb.oid):
            out.append(vb)
        else:
            cut += 1
            out.append(ber.VarBind(req[i].oid, req[i].oid_raw, ber.END_OF_MIB_VIEW, b""))
    if request.tag != ber.GETBULK:
        return out, cut
    reps = n - nr
    if reps <= 0:
        return out, cut
    rest = vbs[nr:]
    ended = [False] * reps
    last = [req[nr + c] for c in range(reps)]
    rows: list[list[ber.VarBind]] = []
    for r in range(0, len(rest), reps):
        row = []
        for c, vb in enumerate(rest[r : r + reps]):
            if ended[c]:
                row.append(ber.VarBind(last[c].oid, last[c].oid_raw, ber.END_OF_MIB_VIEW, b""))
                cut += vb.tag not in ber.EXCEPTIONS
                continue
            if vb.tag in ber.EXCEPTIONS:
                ended[c] = vb.tag == ber.END_OF_MIB_VIEW
                row.append(vb)
                continue
            if allowed(vb.oid):
                last[c] = vb
                row.append(vb)
            else:
                ended[c] = True
                cut += 1
                row.append(ber.VarBind(last[c].oid, last[c].oid_raw, ber.END_OF_MIB_VIEW, b""))
        rows.append(row)
        if all(ended):
            break
    for row in rows:
        out.extend(row)
    return out, cut


def encode_bounded(version: int, community: bytes, pdu: ber.PDU, max_size: int, request: ber.PDU) -> bytes:
    """Encode a Response for a guest within `max_size` octets: GETBULK answers lose trailing
    repetitions until they fit; anything else becomes tooBig (RFC 3416 §4.2.1/§4.2.3)."""
    data = ber.CommunityMessage(version, community, pdu).encode()
    if len(data) <= max_size:
        return data
    if request.tag == ber.GETBULK and pdu.error_status == ber.NO_ERROR:
        nr = min(max(request.error_status, 0), len(request.varbinds))
        reps = max(len(request.varbinds) - nr, 1)
        overhead = len(data) - sum(len(vb.encode()) for vb in pdu.varbinds)
        budget = max_size - overhead
        keep: list[ber.VarBind] = []
        used = 0
        for vb in pdu.varbinds:
            size = len(vb.encode())
            if used + size > budget:
                break
            keep.append(vb)
            used += size
        if len(keep) > nr:
            keep = keep[: nr + ((len(keep) - nr) // reps) * reps] if len(keep) - nr >= reps else keep
        if keep and len(keep) >= nr and (len(keep) > nr or nr == len(request.varbinds)):
            return ber.CommunityMessage(version, community, ber.PDU(ber.RESPONSE, pdu.request_id, 0, 0, keep)).encode()
    return ber.CommunityMessage(version, community, error_response(version, request, ber.TOO_BIG, 0)).encode()
