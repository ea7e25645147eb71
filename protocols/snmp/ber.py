"""A lean, strict BER codec for SNMP messages (v1, v2c and the v3 USM wire format).

Owns: decoding guest and agent datagrams into small value objects and encoding them back, with
hard limits (no indefinite lengths, no multi-byte tags, bounded nesting, bounded varbind counts).
Values inside varbinds are kept as raw (tag, content) pairs and passed through untouched: the proxy
only needs OIDs (for policy) and value *types* (exceptions, Counter64) on the hot path.
Must not: do crypto, policy or I/O. Every malformed input raises `BERError`, never anything else.

Why not pyasn1 here: decoding + re-encoding one GET through pyasn1 costs ~1 ms of CPU, which caps
the proxy far below net-snmp's own proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# -- tags ------------------------------------------------------------------------------------
INTEGER = 0x02
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
SEQUENCE = 0x30
IPADDRESS = 0x40
COUNTER32 = 0x41
GAUGE32 = 0x42
TIMETICKS = 0x43
OPAQUE = 0x44
COUNTER64 = 0x46
NO_SUCH_OBJECT = 0x80
NO_SUCH_INSTANCE = 0x81
END_OF_MIB_VIEW = 0x82
EXCEPTIONS = frozenset({NO_SUCH_OBJECT, NO_SUCH_INSTANCE, END_OF_MIB_VIEW})
VALUE_TAGS = frozenset(
    {INTEGER, OCTET_STRING, NULL, OID, IPADDRESS, COUNTER32, GAUGE32, TIMETICKS, OPAQUE, COUNTER64}
) | EXCEPTIONS

GET = 0xA0
GETNEXT = 0xA1
RESPONSE = 0xA2
SET = 0xA3
TRAP_V1 = 0xA4
GETBULK = 0xA5
INFORM = 0xA6
TRAP_V2 = 0xA7
REPORT = 0xA8
PDU_TAGS = frozenset({GET, GETNEXT, RESPONSE, SET, TRAP_V1, GETBULK, INFORM, TRAP_V2, REPORT})
OP_NAMES = {GET: "get", GETNEXT: "getnext", SET: "set", GETBULK: "getbulk", INFORM: "inform",
            TRAP_V1: "trap", TRAP_V2: "trap", RESPONSE: "response", REPORT: "report"}

V1, V2C, V3 = 0, 1, 3

# error-status values (RFC 3416)
NO_ERROR, TOO_BIG, NO_SUCH_NAME, BAD_VALUE, READ_ONLY, GEN_ERR = 0, 1, 2, 3, 4, 5
NO_ACCESS, WRONG_TYPE, WRONG_LENGTH, WRONG_ENCODING, WRONG_VALUE = 6, 7, 8, 9, 10
NO_CREATION, INCONSISTENT_VALUE, RESOURCE_UNAVAILABLE, COMMIT_FAILED = 11, 12, 13, 14
UNDO_FAILED, AUTHORIZATION_ERROR, NOT_WRITABLE, INCONSISTENT_NAME = 15, 16, 17, 18
ERROR_NAMES = (
    "noError tooBig noSuchName badValue readOnly genErr noAccess wrongType wrongLength wrongEncoding "
    "wrongValue noCreation inconsistentValue resourceUnavailable commitFailed undoFailed "
    "authorizationError notWritable inconsistentName"
).split()

MAX_OID_ARCS = 128  # RFC 2578 §3.5
MAX_VARBINDS_DECODE = 2048  # a hard ceiling; the configurable limit is lower


class BERError(ValueError):
    """Malformed or unsupported encoding; the message says what and where."""


def error_name(status: int) -> str:
    return ERROR_NAMES[status] if 0 <= status < len(ERROR_NAMES) else f"error{status}"


# -- values ----------------------------------------------------------------------------------
@dataclass(slots=True)
class VarBind:
    oid: tuple[int, ...]
    oid_raw: bytes  # BER content octets of the OID, kept to re-encode without work
    tag: int  # value tag
    value: bytes  # value content octets
    raw: bytes = field(default=b"", compare=False)  # the whole TLV as decoded (validated): re-sent as is

    def encode(self) -> bytes:
        return self.raw or tlv(SEQUENCE, tlv(OID, self.oid_raw) + tlv(self.tag, self.value))


@dataclass(slots=True)
class PDU:
    tag: int
    request_id: int
    error_status: int  # non-repeaters for GETBULK
    error_index: int  # max-repetitions for GETBULK
    varbinds: list[VarBind] = field(default_factory=list)

    def encode(self) -> bytes:
        return tlv(
            self.tag,
            enc_int(self.request_id) + enc_int(self.error_status) + enc_int(self.error_index)
            + tlv(SEQUENCE, b"".join([vb.raw or vb.encode() for vb in self.varbinds])),
        )


@dataclass(slots=True)
class TrapV1:
    enterprise: tuple[int, ...]
    agent_addr: bytes  # 4 octets
    generic: int
    specific: int
    timestamp: int
    varbinds: list[VarBind] = field(default_factory=list)
    tag: int = TRAP_V1
    request_id: int = 0


@dataclass(slots=True)
class CommunityMessage:
    version: int  # V1 or V2C
    community: bytes
    pdu: PDU | TrapV1

    def encode(self) -> bytes:
        assert isinstance(self.pdu, PDU)
        return tlv(SEQUENCE, enc_int(self.version) + tlv(OCTET_STRING, self.community) + self.pdu.encode())


@dataclass(slots=True)
class V3Message:
    msg_id: int
    max_size: int
    flags: int
    security_model: int
    engine_id: bytes
    boots: int
    time: int
    user: bytes
    auth_params: bytes
    auth_offset: int  # where auth_params' content starts in the whole message
    priv_params: bytes
    data: bytes  # the encrypted PDU octets (priv flag) or the plaintext ScopedPDU TLV


# -- primitive encoders ---------------------------------------------------------------------
def enc_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(b),)) + b


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    return bytes((tag,)) + enc_len(n) + content


def int_content(v: int) -> bytes:
    return v.to_bytes(v.bit_length() // 8 + 1, "big", signed=True)


def uint_content(v: int) -> bytes:
    """Unsigned (Counter32, Gauge32, TimeTicks, Counter64) content: a leading 0 when the high bit is set."""
    return v.to_bytes(v.bit_length() // 8 + 1, "big")


def enc_int(v: int) -> bytes:
    if 0 <= v < 256:
        return _SMALL_INTS[v]
    return tlv(INTEGER, int_content(v))


_SMALL_INTS = [bytes((INTEGER, len(c))) + c for c in (i.to_bytes(i.bit_length() // 8 + 1, "big") for i in range(256))]


def oid_content(oid: tuple[int, ...]) -> bytes:
    if len(oid) < 2 or oid[0] > 2 or (oid[0] < 2 and oid[1] > 39):
        raise BERError(f"bad OID {oid}")
    out = bytearray()
    for i, arc in enumerate((oid[0] * 40 + oid[1], *oid[2:])):
        if arc < 0:
            raise BERError(f"negative arc in OID at {i}")
        if arc < 0x80:
            out.append(arc)
            continue
        chunk = []
        while arc:
            chunk.append(arc & 0x7F)
            arc >>= 7
        chunk.reverse()
        out.extend([c | 0x80 for c in chunk[:-1]])
        out.append(chunk[-1])
    return bytes(out)


def oid_parse(text: str) -> tuple[int, ...]:
    try:
        oid = tuple(int(p) for p in text.strip().strip(".").split("."))
    except ValueError:
        raise BERError(f"bad OID text {text!r}") from None
    oid_content(oid)
    return oid


def oid_str(oid: tuple[int, ...]) -> str:
    text = _OID_STR.get(oid)
    if text is None:
        text = ".".join(map(str, oid))
        if len(_OID_STR) >= _CACHE_MAX:
            _OID_STR.clear()
        _OID_STR[oid] = text
    return text


def varbind(oid: tuple[int, ...], tag: int = NULL, value: bytes = b"") -> VarBind:
    return VarBind(oid, oid_content(oid), tag, value)


# -- primitive decoders ---------------------------------------------------------------------
def read_tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content_start, content_end) of the TLV at `pos`, which must lie within `end`."""
    if pos + 2 > end:
        raise BERError(f"truncated TLV at offset {pos}")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise BERError(f"multi-byte tag at offset {pos}")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0:
            raise BERError(f"indefinite length at offset {pos - 2}")
        if k > 4 or pos + k > end:
            raise BERError(f"bad length at offset {pos - 2}")
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > end:
        raise BERError(f"length {n} at offset {pos} runs past the end")
    return tag, pos, pos + n


def expect(buf: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    # read_tlv inlined: this is the decoder's innermost call
    if pos + 2 > end:
        raise BERError(f"truncated {what} at offset {pos}")
    if buf[pos] != tag:
        raise BERError(f"expected {what} (tag 0x{tag:02x}) at offset {pos}, found tag 0x{buf[pos]:02x}")
    n = buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if k == 0 or k > 4 or pos + k > end:
            raise BERError(f"bad length at offset {pos - 2}")
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > end:
        raise BERError(f"length {n} at offset {pos} runs past the end")
    return pos, pos + n


def dec_int(buf: bytes, s: int, e: int, what: str = "integer") -> int:
    if s == e or e - s > 9:
        raise BERError(f"bad {what} length {e - s} at offset {s}")
    return int.from_bytes(buf[s:e], "big", signed=True)


def read_int(buf: bytes, pos: int, end: int, what: str = "integer") -> tuple[int, int]:
    if pos + 3 <= end and buf[pos] == INTEGER and 0 < buf[pos + 1] < 10:  # the common short form
        e = pos + 2 + buf[pos + 1]
        if e <= end:
            return int.from_bytes(buf[pos + 2 : e], "big", signed=True), e
    s, e = expect(buf, pos, end, INTEGER, what)
    return dec_int(buf, s, e, what), e


def read_octets(buf: bytes, pos: int, end: int, what: str = "octet string") -> tuple[bytes, int]:
    s, e = expect(buf, pos, end, OCTET_STRING, what)
    return buf[s:e], e


_OID_CACHE: dict[bytes, tuple[int, ...]] = {}
_OID_STR: dict[tuple[int, ...], str] = {}
_CACHE_MAX = 65536


def dec_oid(raw: bytes) -> tuple[int, ...]:
    """Decode OID content octets (cached: pollers ask for the same OIDs over and over)."""
    oid = _OID_CACHE.get(raw)
    if oid is None:
        oid = _dec_oid(raw)
        if len(_OID_CACHE) >= _CACHE_MAX:
            _OID_CACHE.clear()
        _OID_CACHE[raw] = oid
    return oid


def _dec_oid(raw: bytes) -> tuple[int, ...]:
    if not raw:
        raise BERError("empty OID")
    if raw[-1] & 0x80:
        raise BERError("OID ends inside an arc")
    arcs: list[int] = []
    v = 0
    first = True
    for b in raw:
        if v == 0 and b == 0x80:
            raise BERError("non-minimal OID arc")
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            if first:
                if v < 80:
                    arcs.extend(divmod(v, 40))
                else:
                    arcs.extend((2, v - 80))
                first = False
            else:
                arcs.append(v)
            v = 0
            if len(arcs) > MAX_OID_ARCS:
                raise BERError("OID has too many arcs")
        elif v >= 1 << 32:
            raise BERError("OID arc too large")
    return tuple(arcs)


def dec_uint(raw: bytes) -> int:
    return int.from_bytes(raw, "big") if raw else 0


# -- structures -----------------------------------------------------------------------------
def decode_varbinds(buf: bytes, pos: int, end: int, limit: int = MAX_VARBINDS_DECODE) -> list[VarBind]:
    s, e = expect(buf, pos, end, SEQUENCE, "varbind list")
    if e != end:
        raise BERError(f"trailing bytes after the varbind list at offset {e}")
    out: list[VarBind] = []
    p = s
    while p < e:
        if len(out) >= limit:
            raise BERError(f"more than {limit} varbinds")
        vs, ve = expect(buf, p, e, SEQUENCE, "varbind")
        os_, oe = expect(buf, vs, ve, OID, "varbind name")
        oid_raw = buf[os_:oe]
        tag, cs, ce = read_tlv(buf, oe, ve)
        if ce != ve:
            raise BERError(f"trailing bytes in varbind at offset {ce}")
        if tag not in VALUE_TAGS:
            raise BERError(f"unknown value tag 0x{tag:02x} at offset {oe}")
        if tag in EXCEPTIONS or tag == NULL:
            if cs != ce:
                raise BERError(f"non-empty NULL/exception at offset {oe}")
        elif tag == IPADDRESS and ce - cs != 4:
            raise BERError(f"IpAddress of {ce - cs} octets at offset {oe}")
        elif tag == INTEGER and not 0 < ce - cs <= 5:
            raise BERError(f"Integer32 of {ce - cs} octets at offset {oe}")
        elif tag in (COUNTER32, GAUGE32, TIMETICKS) and not 0 < ce - cs <= 5:
            raise BERError(f"32-bit unsigned of {ce - cs} octets at offset {oe}")
        elif tag == COUNTER64 and not 0 < ce - cs <= 9:
            raise BERError(f"Counter64 of {ce - cs} octets at offset {oe}")
        out.append(VarBind(dec_oid(oid_raw), oid_raw, tag, buf[cs:ce], buf[p:ve]))
        p = ve
    return out


def decode_pdu(buf: bytes, pos: int, end: int, limit: int = MAX_VARBINDS_DECODE) -> PDU | TrapV1:
    tag, s, e = read_tlv(buf, pos, end)
    if tag not in PDU_TAGS:
        raise BERError(f"unknown PDU type 0x{tag:02x}")
    if e != end:
        raise BERError(f"trailing bytes after the PDU at offset {e}")
    if tag == TRAP_V1:
        os_, oe = expect(buf, s, e, OID, "enterprise")
        enterprise = dec_oid(buf[os_:oe])
        as_, ae = expect(buf, oe, e, IPADDRESS, "agent-addr")
        if ae - as_ != 4:
            raise BERError("agent-addr is not 4 octets")
        generic, p = read_int(buf, ae, e, "generic-trap")
        specific, p = read_int(buf, p, e, "specific-trap")
        ts, te = expect(buf, p, e, TIMETICKS, "time-stamp")
        return TrapV1(enterprise, buf[as_:ae], generic, specific, dec_uint(buf[ts:te]),
                      decode_varbinds(buf, te, e, limit))
    rid, p = read_int(buf, s, e, "request-id")
    st, p = read_int(buf, p, e, "error-status")
    ix, p = read_int(buf, p, e, "error-index")
    return PDU(tag, rid, st, ix, decode_varbinds(buf, p, e, limit))


def decode_version(buf: bytes) -> int:
    """The message version (0, 1, 3, or anything else) — cheap peek for dispatch."""
    s, e = expect(buf, 0, len(buf), SEQUENCE, "message")
    if e != len(buf):
        raise BERError("trailing bytes after the message")
    v, _ = read_int(buf, s, e, "version")
    return v


def decode_community(buf: bytes, limit: int = MAX_VARBINDS_DECODE) -> CommunityMessage:
    s, e = expect(buf, 0, len(buf), SEQUENCE, "message")
    if e != len(buf):
        raise BERError("trailing bytes after the message")
    version, p = read_int(buf, s, e, "version")
    if version not in (V1, V2C):
        raise BERError(f"unsupported version {version}")
    community, p = read_octets(buf, p, e, "community")
    pdu = decode_pdu(buf, p, e, limit)
    if version == V1 and pdu.tag in (GETBULK, INFORM, TRAP_V2, REPORT):
        raise BERError(f"{OP_NAMES[pdu.tag]} PDU in an SNMPv1 message")
    if version == V2C and pdu.tag == TRAP_V1:
        raise BERError("SNMPv1 trap PDU in an SNMPv2c message")
    return CommunityMessage(version, community, pdu)


def decode_v3(buf: bytes) -> V3Message:
    s, e = expect(buf, 0, len(buf), SEQUENCE, "message")
    if e != len(buf):
        raise BERError("trailing bytes after the message")
    version, p = read_int(buf, s, e, "version")
    if version != V3:
        raise BERError(f"not an SNMPv3 message (version {version})")
    hs, he = expect(buf, p, e, SEQUENCE, "msgGlobalData")
    msg_id, q = read_int(buf, hs, he, "msgID")
    max_size, q = read_int(buf, q, he, "msgMaxSize")
    flags, q = read_octets(buf, q, he, "msgFlags")
    model, q = read_int(buf, q, he, "msgSecurityModel")
    if q != he or len(flags) != 1:
        raise BERError("bad msgGlobalData")
    ss, se = expect(buf, he, e, OCTET_STRING, "msgSecurityParameters")
    us, ue = expect(buf, ss, se, SEQUENCE, "UsmSecurityParameters")
    engine_id, q = read_octets(buf, us, ue, "msgAuthoritativeEngineID")
    boots, q = read_int(buf, q, ue, "msgAuthoritativeEngineBoots")
    etime, q = read_int(buf, q, ue, "msgAuthoritativeEngineTime")
    user, q = read_octets(buf, q, ue, "msgUserName")
    as_, ae = expect(buf, q, ue, OCTET_STRING, "msgAuthenticationParameters")
    priv, q = read_octets(buf, ae, ue, "msgPrivacyParameters")
    if q != ue or ue != se:
        raise BERError("bad UsmSecurityParameters")
    tag, ds, de = read_tlv(buf, se, e)
    if de != e:
        raise BERError("trailing bytes after msgData")
    if tag == OCTET_STRING:
        data = buf[ds:de]
    elif tag == SEQUENCE:
        data = buf[se:de]
    else:
        raise BERError("bad msgData")
    return V3Message(msg_id, max_size, flags[0], model, engine_id, boots, etime, user,
                     buf[as_:ae], as_, priv, data)


def decode_scoped(buf: bytes) -> tuple[bytes, bytes, PDU]:
    """ScopedPDU -> (contextEngineID, contextName, PDU). Decrypted data may carry CFB padding
    garbage after the SEQUENCE only if the sender padded; we accept and ignore trailing bytes."""
    s, e = expect(buf, 0, len(buf), SEQUENCE, "ScopedPDU")
    ceid, p = read_octets(buf, s, e, "contextEngineID")
    cname, p = read_octets(buf, p, e, "contextName")
    pdu = decode_pdu(buf, p, e)
    if isinstance(pdu, TrapV1):
        raise BERError("SNMPv1 trap PDU in a ScopedPDU")
    return ceid, cname, pdu


def encode_scoped(context_engine_id: bytes, context_name: bytes, pdu_bytes: bytes) -> bytes:
    return tlv(SEQUENCE, tlv(OCTET_STRING, context_engine_id) + tlv(OCTET_STRING, context_name) + pdu_bytes)


def encode_v3(
    *,
    msg_id: int,
    max_size: int,
    flags: int,
    engine_id: bytes,
    boots: int,
    etime: int,
    user: bytes,
    auth_len: int,
    priv_params: bytes,
    data: bytes,
    encrypted: bool,
) -> tuple[bytes, int]:
    """Encode an SNMPv3/USM message with `auth_len` zero octets as authentication parameters.
    Returns (message, offset of those octets) so the caller can splice the HMAC in."""
    head = enc_int(msg_id) + enc_int(max_size) + tlv(OCTET_STRING, bytes((flags,))) + enc_int(3)
    header = tlv(SEQUENCE, head)
    pre_auth = (
        tlv(OCTET_STRING, engine_id) + enc_int(boots) + enc_int(etime) + tlv(OCTET_STRING, user)
    )
    auth_tlv = tlv(OCTET_STRING, bytes(auth_len))
    usm_body = pre_auth + auth_tlv + tlv(OCTET_STRING, priv_params)
    usm = tlv(SEQUENCE, usm_body)
    sec = tlv(OCTET_STRING, usm)
    msg_data = tlv(OCTET_STRING, data) if encrypted else data
    ver = enc_int(3)
    body = ver + header + sec + msg_data
    whole = tlv(SEQUENCE, body)
    outer_hdr = len(whole) - len(body)
    usm_hdr = len(usm) - len(usm_body)
    sec_hdr = len(sec) - len(usm)
    auth_hdr = len(auth_tlv) - auth_len
    off = outer_hdr + len(ver) + len(header) + sec_hdr + usm_hdr + len(pre_auth) + auth_hdr
    return whole, off
