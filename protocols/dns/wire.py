"""DNS wire format on the hot path, without dnspython.

Owns: parsing a guest query's header, question and OPT record straight from bytes (the cache key is
built from these), building error answers (FORMERR/REFUSED/SERVFAIL/NOTIMP with Extended DNS
Errors), truncated answers, DoT upstream queries (EDNS keepalive + padding), and walking a
message's records to find TTL offsets and OPT options.
Must not: decide policy, touch sockets, or parse full messages (FIELD-NOTES: a dnspython parse per
packet caps a Python front end near 11k qps; raw-byte handling reached ~67k).
"""

from __future__ import annotations

import struct

_HDR = struct.Struct("!HBBHHHH")
_U16 = struct.Struct("!H")
_RRFIX = struct.Struct("!HHIH")  # type, class, ttl, rdlength

QR = 0x80  # in flags byte 2
RD = 0x01  # in flags byte 2
TC = 0x02  # in flags byte 2
RA = 0x80  # in flags byte 3
AD = 0x20  # in flags byte 3
CD = 0x10  # in flags byte 3

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
OPT = 41
OPT_KEEPALIVE = 11
OPT_PADDING = 12
OPT_EDE = 15
PAD_BLOCK = 128  # RFC 8467 §4.1: clients pad queries to multiples of 128 octets

# Extended DNS Error info-codes (RFC 8914) this service emits.
EDE_OTHER = 0
EDE_STALE_ANSWER = 3
EDE_DNSSEC_BOGUS = 6
EDE_BLOCKED = 15
EDE_PROHIBITED = 18
EDE_NOT_SUPPORTED = 21
EDE_NO_REACHABLE_AUTHORITY = 22
EDE_NETWORK_ERROR = 23

# Flag bits kept in the cache key: answers for these variants must not mix.
KEY_EDNS = 1
KEY_DO = 2
KEY_CD = 4


class Malformed(Exception):
    """The packet cannot be answered at all (header unreadable): drop it."""


class FormErr(Exception):
    """The header parsed but the rest did not: answer FORMERR."""


class Query:
    """A guest query as read from the wire. A plain slots class, not a frozen dataclass: this is
    built once per packet on the hot path and frozen-dataclass construction costs measurably more."""

    __slots__ = (
        "id", "b2", "b3", "opcode", "qdcount", "qname", "qend", "qtype", "qclass",
        "edns", "udp_size", "do", "key", "badvers",
    )

    id: int  # of the first packet parsed; answers take the ID from each packet's own bytes
    b2: int
    b3: int
    opcode: int
    qdcount: int
    qname: bytes  # the guest's bytes, case preserved
    qend: int  # offset just past the question
    qtype: int
    qclass: int
    edns: bool
    udp_size: int
    do: bool
    key: bytes  # lower-cased question + variant flags
    badvers: bool  # EDNS version other than 0 (RFC 6891 §6.1.3: answer BADVERS)

    @property
    def rd(self) -> bool:
        return bool(self.b2 & RD)

    @property
    def cd(self) -> bool:
        return bool(self.b3 & CD)

    @property
    def ad(self) -> bool:
        return bool(self.b3 & AD)

    @property
    def question(self) -> bytes:
        """The lower-cased question (name + type + class) as sent upstream."""
        return self.key[:-1]

    @property
    def flags_key(self) -> int:
        return self.key[-1]


def read_header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    if len(data) < 12:
        raise Malformed("shorter than a DNS header")
    return _HDR.unpack_from(data, 0)


def _skip_name(data: bytes, i: int) -> int:
    """Offset just past a (possibly compressed) name starting at i."""
    n = len(data)
    hops = 0
    while True:
        if i >= n:
            raise FormErr("name runs past the end")
        ln = data[i]
        if ln == 0:
            return i + 1
        if ln & 0xC0 == 0xC0:
            if i + 2 > n:
                raise FormErr("truncated compression pointer")
            return i + 2
        if ln & 0xC0:
            raise FormErr("bad label type")
        i += ln + 1
        hops += 1
        if hops > 128:
            raise FormErr("too many labels")


_QTC = struct.Struct("!HH")
_BITS = tuple(bytes((i,)) for i in range(8))


def parse_query(data: bytes) -> Query:
    """Read a guest query. Raises Malformed (drop) or FormErr (answer FORMERR)."""
    if len(data) < 12:
        raise Malformed("shorter than a DNS header")
    qid, b2, b3, qd, an, ns, ar = _HDR.unpack_from(data, 0)
    q = Query()
    q.id, q.b2, q.b3, q.qdcount = qid, b2, b3, qd
    q.opcode = (b2 >> 3) & 0x0F
    if b2 & QR:
        raise Malformed("a response, not a query")  # never answer answers (reflection loops)
    if qd != 1:
        q.qname = b""
        q.qend = 12
        raise FormErr(f"QDCOUNT is {qd}")
    # question name: uncompressed labels, at most 255 octets
    i, n = 12, len(data)
    while True:
        if i >= n:
            raise FormErr("question runs past the end")
        ln = data[i]
        if ln == 0:
            i += 1
            break
        if ln > 63:
            raise FormErr("compressed or bad label in question")
        i += ln + 1
    if i - 12 > 255:
        raise FormErr("question name longer than 255 octets")
    if i + 4 > n:
        raise FormErr("question type/class missing")
    q.qname = data[12:i]
    q.qtype, q.qclass = _QTC.unpack_from(data, i)
    q.qend = i + 4
    q.edns, q.udp_size, q.do, q.badvers = False, 512, False, False
    j = q.qend
    if an or ns or ar:
        opts = 0
        for idx in range(an + ns + ar):
            j = _skip_name(data, j)
            if j + 10 > n:
                raise FormErr("record runs past the end")
            rtype, rclass, ttl, rdlen = _RRFIX.unpack_from(data, j)
            if rtype == OPT:
                if idx < an + ns or opts:
                    raise FormErr("misplaced or duplicate OPT")
                opts += 1
                q.edns = True
                q.udp_size = max(512, rclass)
                q.do = bool(ttl & 0x8000)
                if (ttl >> 16) & 0xFF:
                    q.badvers = True
            j += 10 + rdlen
            if j > n:
                raise FormErr("record data runs past the end")
    bits = (KEY_EDNS if q.edns else 0) | (KEY_DO if q.do else 0) | (KEY_CD if b3 & CD else 0)
    q.key = q.qname.lower() + data[i : i + 4] + _BITS[bits]
    return q


_PLAIN = bytes(range(0x30, 0x3A)) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B)) + b"-_"


def qname_text(wire_name: bytes) -> str:
    """Presentation text of an uncompressed wire name, lower-cased, without the final dot."""
    labels = []
    i = 0
    while True:
        ln = wire_name[i]
        if ln == 0:
            break
        raw = wire_name[i + 1 : i + 1 + ln].lower()
        labels.append(raw.decode("ascii") if not raw.translate(None, _PLAIN) else _escape(raw))
        i += ln + 1
    return ".".join(labels) if labels else "."


def _escape(raw: bytes) -> str:
    out = []
    for c in raw:
        ch = chr(c)
        if ch in '."();\\@$':
            out.append("\\" + ch)
        elif 0x21 <= c <= 0x7E:
            out.append(ch)
        else:
            out.append(f"\\{c:03d}")
    return "".join(out)


def ede_option(code: int, text: str = "") -> bytes:
    body = _U16.pack(code) + text.encode("utf-8")[:400]
    return _U16.pack(OPT_EDE) + _U16.pack(len(body)) + body


def opt_rr(udp_size: int, do: bool, options: bytes = b"", ext_rcode: int = 0) -> bytes:
    ttl = (ext_rcode << 24) | (0x8000 if do else 0)
    return b"\x00" + struct.pack("!HHIH", OPT, udp_size, ttl, len(options)) + options


def badvers_response(data: bytes, q: Query, udp_size: int) -> bytes:
    """RFC 6891 §6.1.3: BADVERS (16) for an EDNS version we do not speak, with our version 0."""
    out = data[:2] + struct.pack("!BBHHHH", QR | (q.b2 & 0x79), RA | (q.b3 & CD), 1, 0, 0, 1)
    return out + data[12 : q.qend] + opt_rr(udp_size, q.do, ext_rcode=16 >> 4)


def error_response(
    data: bytes, q: Query | None, rcode: int, ede: int | None = None, text: str = "", udp_size: int = 1232
) -> bytes:
    """An answer with no records: header (ID, opcode, RD, CD echoed), the question when it was
    readable, and an OPT with an Extended DNS Error when the guest spoke EDNS."""
    # The ID always comes from `data`: a parsed Query may be shared by packets that differ only in ID.
    qid = struct.unpack_from("!H", data, 0)[0]
    b2, b3 = (q.b2, q.b3) if q is not None else struct.unpack_from("!BB", data, 2)
    flags2 = QR | (b2 & 0x79)  # opcode + RD
    flags3 = RA | (b3 & CD) | (rcode & 0x0F)
    has_q = q is not None and bool(q.qname)
    edns = q is not None and q.edns
    out = struct.pack("!HBBHHHH", qid, flags2, flags3, 1 if has_q else 0, 0, 0, 1 if edns else 0)
    if has_q:
        assert q is not None
        out += data[12 : q.qend]
    if edns:
        assert q is not None
        out += opt_rr(udp_size, q.do, ede_option(ede, text) if ede is not None else b"")
    return out


def truncated(data: bytes, q: Query, udp_size: int) -> bytes:
    """TC=1 with the question only, so the guest retries over TCP (RFC 7766 §5)."""
    flags2 = QR | TC | (q.b2 & 0x79)
    flags3 = RA | (q.b3 & CD)
    out = data[:2] + struct.pack("!BBHHHH", flags2, flags3, 1, 0, 0, 1 if q.edns else 0) + data[12 : q.qend]
    if q.edns:
        out += opt_rr(udp_size, q.do)
    return out


def upstream_query(question: bytes, *, cd: bool, do: bool) -> bytearray:
    """A DoT query (ID 0, patched per connection): RD, optional CD, OPT with DO, an empty EDNS
    keepalive (RFC 7828) and padding to a 128-octet block (RFC 7830, RFC 8467)."""
    head = struct.pack("!HBBHHHH", 0, RD, CD if cd else 0, 1, 0, 0, 1)
    keepalive = _U16.pack(OPT_KEEPALIVE) + _U16.pack(0)
    base = len(head) + len(question) + 11 + len(keepalive) + 4
    pad = (-base) % PAD_BLOCK
    options = keepalive + _U16.pack(OPT_PADDING) + _U16.pack(pad) + bytes(pad)
    return bytearray(head + question + opt_rr(1232, do, options))


def scan(data: bytes) -> tuple[list[int], int]:
    """Walk every record: (offsets of the TTL fields of non-OPT records, offset of the OPT record's
    RDLENGTH or -1)."""
    _, _, _, qd, an, ns, ar = read_header(data)
    i = 12
    for _ in range(qd):
        i = _skip_name(data, i) + 4
    ttls: list[int] = []
    opt_at = -1
    for _ in range(an + ns + ar):
        i = _skip_name(data, i)
        if i + 10 > len(data):
            raise FormErr("record runs past the end")
        rtype, _, _, rdlen = _RRFIX.unpack_from(data, i)
        if rtype == OPT:
            opt_at = i + 8
        else:
            ttls.append(i + 4)
        i += 10 + rdlen
    if i > len(data):
        raise FormErr("record data runs past the end")
    return ttls, opt_at


def opt_options(data: bytes) -> dict[int, bytes]:
    """The EDNS options of a message's OPT record ({} when there is none)."""
    try:
        _, opt_at = scan(data)
    except (FormErr, Malformed):
        return {}
    if opt_at < 0:
        return {}
    (rdlen,) = _U16.unpack_from(data, opt_at)
    i, end, out = opt_at + 2, opt_at + 2 + rdlen, {}
    while i + 4 <= end:
        code, ln = struct.unpack_from("!HH", data, i)
        out[code] = bytes(data[i + 4 : i + 4 + ln])
        i += 4 + ln
    return out


def add_ede(wire: bytes, code: int, text: str = "") -> bytes:
    """Append an EDE option to the message's OPT record (which must be the last record, as
    dnspython and this module write it); a message without OPT is returned unchanged."""
    _, opt_at = scan(wire)
    if opt_at < 0:
        return wire
    (rdlen,) = _U16.unpack_from(wire, opt_at)
    if opt_at + 2 + rdlen != len(wire):
        return wire
    opt = ede_option(code, text)
    out = bytearray(wire + opt)
    _U16.pack_into(out, opt_at, rdlen + len(opt))
    return bytes(out)


class Record:
    """Where one resource record sits in a message (offsets into the bytes)."""

    __slots__ = ("section", "start", "rtype", "ttl_at", "rdata_at", "rdlen")

    def __init__(self, section: int, start: int, rtype: int, ttl_at: int, rdata_at: int, rdlen: int) -> None:
        self.section = section  # 1 answer, 2 authority, 3 additional
        self.start = start
        self.rtype = rtype
        self.ttl_at = ttl_at
        self.rdata_at = rdata_at
        self.rdlen = rdlen


def walk(data: bytes) -> list[Record]:
    """Every record of a message with exactly one question; FormErr if it does not add up."""
    _, _, _, qd, an, ns, ar = read_header(data)
    if qd != 1:
        raise FormErr("expected one question")
    i = _skip_name(data, 12) + 4
    out: list[Record] = []
    n = len(data)
    for idx in range(an + ns + ar):
        start = i
        i = _skip_name(data, i)
        if i + 10 > n:
            raise FormErr("record runs past the end")
        rtype, _, _, rdlen = _RRFIX.unpack_from(data, i)
        section = 1 if idx < an else (2 if idx < an + ns else 3)
        out.append(Record(section, start, rtype, i + 4, i + 10, rdlen))
        i += 10 + rdlen
    if i != n:
        raise FormErr("trailing bytes or record data past the end")
    return out


# RFC 3597 §4: only these RFC 1035 types may carry compressed names in their RDATA.
_RDATA_NAMES = {2: (0,), 3: (0,), 4: (0,), 5: (0,), 7: (0,), 8: (0,), 9: (0,), 12: (0,), 15: (2,)}


def _name_pointer(data: bytes, i: int) -> tuple[int, int] | None:
    """(position, target) of the compression pointer ending the name at `i`, or None."""
    while True:
        ln = data[i]
        if ln == 0:
            return None
        if ln & 0xC0 == 0xC0:
            return i, ((ln & 0x3F) << 8) | data[i + 1]
        if ln & 0xC0:
            raise FormErr("bad label type")
        i += ln + 1


def record_pointers(data: bytes, rec: Record) -> list[tuple[int, int]]:
    """Every compression pointer in a record's owner and RDATA names: [(position, target)]."""
    starts = [rec.start]
    if rec.rtype in (6, 14):  # SOA (MNAME, RNAME), MINFO (RMAILBX, EMAILBX)
        starts += [rec.rdata_at, _skip_name(data, rec.rdata_at)]
    else:
        starts += [rec.rdata_at + off for off in _RDATA_NAMES.get(rec.rtype, ())]
    out = []
    for i in starts:
        ptr = _name_pointer(data, i)
        if ptr is not None:
            out.append(ptr)
    return out
