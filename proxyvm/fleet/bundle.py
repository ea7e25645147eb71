"""Signed policy bundles: the rules file and its list files, signed with Ed25519 over their exact
bytes (docs/deployment.md#fleet-policy).

Owns: the bundle format (a JSON object in the KV bucket), what the signature covers, making one
(`make_bundle`, for `proxyvm fleet push`), checking one (`check_bundle`, on every node) and
writing its files below a directory. Must not: load the policy into services (the supervisor's
reload does that), or trust anything in a bundle before its signature is checked.

Signed message: `proxyvm-policy-bundle/1 \\0 revision \\0 created \\0 rules-name \\0` followed by
the bytes `policy.digest` hashes (the rules file, then `\\0name\\0length\\0bytes` per list file),
so the bundle's `digest` is the `"policy": "sha256:..."` every decision under it carries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = "proxyvm-policy-bundle/1"
MAX_BUNDLE = 64 * 1024 * 1024


class BundleError(Exception):
    """`reason` is a short token (metric label, record field): not_a_bundle, unsigned,
    bad_signature, wrong_key, digest_mismatch, bad_files."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# -- keys -------------------------------------------------------------------------------------
def load_public_key(path: Path | str) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as e:
        raise BundleError("bad_key", f"not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("bad_key", f"a {type(key).__name__.removeprefix('_')}, not an Ed25519 public key")
    return key


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise BundleError("bad_key", f"{path}: not a PEM private key without a passphrase ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("bad_key", f"{path}: not an Ed25519 private key")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def keygen(private_out: Path, public_out: Path) -> str:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_out.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_id(key.public_key())


# -- what is signed ----------------------------------------------------------------------------
def _digest_layout(rules_name: str, files: dict[str, bytes], order: list[str]) -> bytes:
    out = bytearray(files[rules_name])
    for name in order:
        data = files[name]
        out += b"\0" + name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data
    return bytes(out)


def signed_message(revision: int, created: str, rules_name: str, files: dict[str, bytes], order: list[str]) -> bytes:
    head = f"{FORMAT}\0{revision}\0{created}\0{rules_name}\0".encode()
    return head + _digest_layout(rules_name, files, order)


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\0" not in name \
        and all(part not in ("", ".") for part in p.parts)


# -- making one (`proxyvm fleet push`) ------------------------------------------------------------
def collect(rules: Path, guests: set[str] | frozenset[str]) -> tuple[Any, dict[str, bytes], list[str]]:
    """Validate `rules` as `proxyvm check` does and gather its files: (engine, {name: bytes},
    list-file names in digest order). Raises the located ConfigError/SourceError of the policy,
    or BundleError for a list file outside the rules file's directory."""
    from policy import load_policy

    engine = load_policy(rules, guests=set(guests))
    rules = Path(rules)
    files = {rules.name: rules.read_bytes()}
    order: list[str] = []
    for rule in engine.policy.rules:
        for nf in rule.name_files:
            rel = os.path.relpath(nf.path, rules.parent)
            if rel in files:
                continue
            if not _safe_name(rel):
                raise BundleError("bad_files", f"list file {nf.path} is not below {rules.parent}: a bundle "
                                  "carries files relative to the rules file; move it there")
            files[rel] = Path(nf.path).read_bytes()
            order.append(rel)
    return engine, files, order


def make_bundle(rules: Path, revision: int, created: str, key: Ed25519PrivateKey,
                guests: set[str] | frozenset[str]) -> tuple[dict[str, Any], str]:
    engine, files, order = collect(rules, guests)
    name = Path(rules).name
    sig = key.sign(signed_message(revision, created, name, files, order))
    bundle = {
        "format": FORMAT, "revision": revision, "created": created, "rules": name,
        "files": [{"name": n, "data": base64.b64encode(files[n]).decode()} for n in [name, *order]],
        "digest": engine.digest, "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(sig).decode(),
    }
    return bundle, engine.digest


# -- checking one (every node) ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Bundle:
    revision: int
    created: str
    rules: str
    files: dict[str, bytes]
    order: list[str]
    digest: str
    key_id: str
    raw: bytes


def check_bundle(raw: bytes | None, key: Ed25519PublicKey | None) -> Bundle:
    """Parse and verify: the format, the Ed25519 signature under `key`, and that `digest` is the
    digest of the files signed. Raises BundleError naming what is wrong."""
    if raw is None or len(raw) > MAX_BUNDLE:
        raise BundleError("not_a_bundle", "the value is empty or larger than a bundle may be")
    try:
        b = json.loads(raw)
    except ValueError:
        raise BundleError("not_a_bundle", "the value is not JSON: not a policy bundle") from None
    if not isinstance(b, dict) or b.get("format") != FORMAT:
        raise BundleError("not_a_bundle", f"the value is not a {FORMAT} object")
    rev, created, rules, flist = b.get("revision"), b.get("created"), b.get("rules"), b.get("files")
    if not (isinstance(rev, int) and not isinstance(rev, bool) and rev > 0 and isinstance(created, str)
            and isinstance(rules, str) and isinstance(flist, list) and flist):
        raise BundleError("not_a_bundle", "revision, created, rules or files missing or of the wrong type")
    files: dict[str, bytes] = {}
    names: list[str] = []
    for f in flist:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("data"), str):
            raise BundleError("not_a_bundle", "a files entry is not {name, data}")
        name = f["name"]
        if not _safe_name(name) or name in files:
            raise BundleError("bad_files", f"bad or repeated file name {name!r} in the bundle")
        try:
            files[name] = base64.b64decode(f["data"], validate=True)
        except ValueError:
            raise BundleError("not_a_bundle", f"file {name!r}: data is not base64") from None
        names.append(name)
    if names[0] != rules:
        raise BundleError("not_a_bundle", "the first file is not the rules file")
    sig = b.get("signature")
    if not sig:
        raise BundleError("unsigned", "the bundle carries no signature: only signed bundles are applied")
    if key is None:
        raise BundleError("wrong_key", "this node has no fleet.policy_key: it applies no fleet policy")
    try:
        sig_bytes = base64.b64decode(sig, validate=True)
    except ValueError:
        raise BundleError("bad_signature", "the signature is not base64") from None
    order = names[1:]
    try:
        key.verify(sig_bytes, signed_message(rev, created, rules, files, order))
    except InvalidSignature:
        ours = key_id(key)
        theirs = b.get("key_id")
        why = (f"signed by {theirs}, this node trusts {ours}" if theirs and theirs != ours
               else "the signature does not match the files (altered, or signed by another key)")
        raise BundleError("bad_signature", f"bad signature: {why}") from None
    digest = "sha256:" + hashlib.sha256(_digest_layout(rules, files, order)).hexdigest()
    if b.get("digest") != digest:
        raise BundleError("digest_mismatch", f"the bundle says digest {b.get('digest')} but its files hash to {digest}")
    return Bundle(rev, created, rules, files, order, digest, str(b.get("key_id") or ""), bytes(raw))


def write_files(bundle: Bundle, directory: Path) -> Path:
    """Write the bundle (files + bundle.json) into `directory` (replaced whole: tmp + rename).
    Returns the rules file's path."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, mode=0o755)
    for name, data in bundle.files.items():
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o644)
    (tmp / "bundle.json").write_bytes(bundle.raw)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory / bundle.rules
