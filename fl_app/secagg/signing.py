"""Long-term Ed25519 identities for secure aggregation against a malicious server.

Bonawitz et al. (CCS 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", §4, Fig. 4, the actively secure variant) give every client a long-term
signing key registered with a PKI the server cannot forge; Bell et al. (CCS 2020, §4)
keep the same mechanism for SecAgg+. Under ``secagg.server_model=malicious``:

* key advertisement: a client signs each per-round X25519 pair it advertises,
  bound to the run id, the round, its node id and its roster identity
  (:func:`key_advert_message`); every client verifies its neighbours' signatures
  against the **roster** before it encrypts a share to them, so the server cannot
  substitute its own keys (and read the shares) nor invent clients;
* consistency check (between masked input and unmask): each survivor signs the
  survivor set ``U3`` it was told, bound to the round context and to its own round
  keys (:func:`survivors_message`); a client reveals shares only after verifying more
  than ``(n + C) / 2`` (and at least ``t``) valid signatures on exactly its ``U3`` from
  distinct roster identities of cohort members: two quorums on different sets would
  share more than ``C`` signers, so some honest client would have signed both, which
  it never does.

Each roster identity counts once: a server (or colluder) cannot present one site as
two neighbours, or its signature as two.

The **roster** maps a site's identity (its ``site-name``) to its Ed25519 public key.
It is distributed out of band (``roster-path`` in the site's node config, a file the
consortium agrees on), never by the server. A site's private key is written by
``fl-app deploy node-key`` (``<name>.sign``, PEM PKCS#8) and named by the node config's
``signing-key-path``.

Simulation (no deployment): :class:`SimulationRoster` derives partition ``i``'s key
from a secret of the simulating process (``FL_APP_SIMULATION_ROSTER_SECRET``, drawn from
``os.urandom`` by the simulation entry point, :func:`start_simulation_roster`, and
inherited by Ray workers; a process without it is not a simulation and gets no
simulated identity). Every simulated client and the
simulated server live in that process tree, so this shows the mechanism, not a trust
boundary: a real deployment uses per-site keys and a roster file.

Trust assumptions: the roster is authentic and each site's signing key stays on its
machine; colluding clients (at most the assumed ``C``) sign whatever the server asks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PUBLIC_KEY_BYTES",
    "SIGNATURE_BYTES",
    "SIMULATION_SECRET_ENV",
    "FileRoster",
    "Roster",
    "RosterError",
    "Signer",
    "SimulationRoster",
    "in_simulation",
    "key_advert_message",
    "load_roster",
    "load_signing_key",
    "parse_context",
    "signing_key_pem",
    "start_simulation_roster",
    "survivors_message",
    "verify_raw",
]

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
SIMULATION_SECRET_ENV = "FL_APP_SIMULATION_ROSTER_SECRET"
_KEYS_LABEL = b"fl-app/secagg/key-advert/v1"
_SURVIVORS_LABEL = b"fl-app/secagg/survivors/v1"
_SIM_LABEL = b"fl-app/secagg/simulation-identity/v1"
_CONTEXT_LABEL = b"fl-app/secagg/round/v1"  # protocol.round_context's prefix
_IDENTITY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


class RosterError(ValueError):
    """A roster or signing key cannot be used (unreadable, malformed, unknown identity)."""


def _identity_bytes(identity: str) -> bytes:
    if not isinstance(identity, str) or not _IDENTITY.fullmatch(identity):
        raise RosterError(
            f"identity {identity!r} must be 1-64 letters, digits, '_', '-' or '.' "
            "(not starting with '.')"
        )
    raw = identity.encode()
    return struct.pack(">B", len(raw)) + raw


def key_advert_message(
    run_id: int, rnd: int, node: int, identity: str, c_pk: bytes, s_pk: bytes
) -> bytes:
    """What a client signs for the key pair it advertises for round ``rnd`` of ``run_id``."""
    return (
        _KEYS_LABEL
        + struct.pack(">QQQ", run_id, rnd, node)
        + _identity_bytes(identity)
        + bytes(c_pk)
        + bytes(s_pk)
    )


def survivors_message(
    context: bytes, node: int, identity: str, round_keys: bytes, survivors: Iterable[int]
) -> bytes:
    """What survivor ``node`` signs at the consistency check: the round and ``U3``.

    ``round_keys`` is the signer's own ``c_pk || s_pk`` advertised for this round: fresh
    key material of the signer, so a signature cannot be replayed into another run even
    where the server chose the round context (run id and nonce) to match an old one.
    """
    ids = sorted({int(v) for v in survivors})
    if len(round_keys) != 2 * PUBLIC_KEY_BYTES:
        raise RosterError(f"round_keys must be c_pk || s_pk ({2 * PUBLIC_KEY_BYTES} bytes)")
    return (
        _SURVIVORS_LABEL
        + struct.pack(">H", len(context))
        + bytes(context)
        + struct.pack(">Q", node)
        + _identity_bytes(identity)
        + bytes(round_keys)
        + struct.pack(">I", len(ids))
        + b"".join(struct.pack(">Q", v) for v in ids)
    )


def parse_context(context: bytes) -> tuple[int, int]:
    """``(run_id, round)`` of a :func:`fl_app.secagg.protocol.round_context`."""
    cut = len(_CONTEXT_LABEL)
    if len(context) < cut + 16 or context[:cut] != _CONTEXT_LABEL:
        raise RosterError("round context is not an fl-app secure-aggregation context")
    run_id, rnd = struct.unpack(">QQ", context[cut : cut + 16])
    return run_id, rnd


@dataclass(frozen=True)
class Signer:
    """This site's identity and private signing key."""

    identity: str
    key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        _identity_bytes(self.identity)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def public_bytes(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )


def verify_raw(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` verifies under the raw 32-byte Ed25519 ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Roster:
    """``identity -> Ed25519 public key``; :meth:`verify` is all a client asks of it."""

    def public_key(self, identity: str) -> Ed25519PublicKey | None:
        raise NotImplementedError

    def verify(self, identity: str, message: bytes, signature: object) -> bool:
        """True iff ``identity`` is on the roster and signed ``message``."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            key = self.public_key(identity)
        except RosterError:
            return False
        if key is None:
            return False
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class FileRoster(Roster):
    """A roster read from a file distributed out of band (:func:`load_roster`)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        seen: set[bytes] = set()
        for identity, raw in keys.items():
            _identity_bytes(identity)
            if raw in seen:
                raise RosterError(f"roster identity {identity!r} reuses another site's key")
            seen.add(raw)
            self._keys[identity] = Ed25519PublicKey.from_public_bytes(raw)

    def public_key(self, identity: str) -> Ed25519PublicKey | None:
        return self._keys.get(identity)

    def __len__(self) -> int:
        return len(self._keys)

    def digest(self) -> bytes:
        """SHA-256 over the sorted entries (length-prefixed identity, raw public key): what
        a client pins at share-keys so a roster swapped mid-round is refused."""
        h = hashlib.sha256(b"fl-app/secagg/roster/v1")
        for identity in sorted(self._keys):
            name = identity.encode("utf-8")
            h.update(len(name).to_bytes(4, "big") + name)
            h.update(self._keys[identity].public_bytes_raw())
        return h.digest()


def load_roster(path: str | os.PathLike[str]) -> FileRoster:
    """Read a roster: JSON ``{"<site name>": "<64 hex digits of the Ed25519 public key>"}``.

    Raises :class:`RosterError` naming the file and the entry at fault.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise RosterError(f"roster {path}: cannot read it as JSON ({err})") from None
    if os.name == "posix" and mode & 0o022:
        # The roster is the trust anchor: whoever may write it adds or swaps identities
        # and then signs key adverts and survivor sets for any site.
        raise RosterError(
            f"roster {path} is writable by group/others (mode {mode & 0o777:o}); only its "
            f"owner may write it: chmod 644 {path} (or 600)"
        )
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RosterError(f"roster {path}: cannot read it as JSON ({err})") from None
    if not isinstance(raw, dict) or not raw:
        raise RosterError(f"roster {path}: expected a non-empty object site name -> public key")
    keys: dict[str, bytes] = {}
    for identity, value in raw.items():
        try:
            key = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            key = b""
        if len(key) != PUBLIC_KEY_BYTES:
            raise RosterError(
                f"roster {path}: entry {identity!r} must be 64 hex digits (an Ed25519 public "
                "key, as `fl-app deploy node-key` prints)"
            )
        keys[str(identity)] = key
    try:
        return FileRoster(keys)
    except (RosterError, ValueError) as err:
        raise RosterError(f"roster {path}: {err}") from None


def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PEM PKCS#8 of a signing key (what ``fl-app deploy node-key`` writes)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a PEM PKCS#8 Ed25519 private key; :class:`RosterError` if it is not one.

    A key file that group or others may read is refused (as ssh refuses such a private
    key): whoever reads it can sign as this site, i.e. vouch for substituted keys and
    survivor sets in its name.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise RosterError(f"signing key {path}: cannot load it ({err})") from None
    if os.name == "posix" and mode & 0o077:
        raise RosterError(
            f"signing key {path} is readable or writable by group/others (mode "
            f"{mode & 0o777:o}); it must be private to this site's user: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise RosterError(f"signing key {path}: cannot load it ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RosterError(f"signing key {path}: not an Ed25519 key")
    return key


class SimulationRoster(Roster):
    """Keys of simulated partitions, derived from the simulating process's secret.

    Identity ``partition-<i>``. Not a trust boundary (module docstring): it lets a
    simulation run the malicious-server protocol end to end.
    """

    _NAME = re.compile(r"partition-(\d{1,12})")

    def __init__(self, secret: bytes | None = None) -> None:
        if secret is None:
            secret = simulation_secret()
        self.secret = secret
        self._cache: dict[str, Ed25519PrivateKey] = {}
        self._public: dict[str, Ed25519PublicKey] = {}

    def signer(self, identity: str) -> Signer:
        if not self._NAME.fullmatch(identity):
            raise RosterError(f"simulated identity {identity!r} is not partition-<id>")
        key = self._cache.get(identity)
        if key is None:
            seed = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=_SIM_LABEL, info=identity.encode()
            ).derive(self.secret)
            key = self._cache[identity] = Ed25519PrivateKey.from_private_bytes(seed)
        return Signer(identity, key)

    def public_key(self, identity: str) -> Ed25519PublicKey | None:
        if not self._NAME.fullmatch(identity):
            return None
        key = self._public.get(identity)
        if key is None:
            key = self._public[identity] = self.signer(identity).key.public_key()
        return key


def start_simulation_roster() -> bytes:
    """Mark this process tree as a simulation: draw its roster secret (once; children
    such as Ray workers inherit it through the environment).

    Called only by the simulation entry points
    (:func:`fl_app.runtime.simulation.run_simulation_experiment` for both backends,
    :class:`fl_app.runtime.inprocess.InProcessGrid`). A ClientApp uses the
    :class:`SimulationRoster` only where this mark exists; a deployed SuperNode never
    has it and refuses the malicious model without its own key and roster.
    """
    if os.environ.get(SIMULATION_SECRET_ENV) is None:
        os.environ[SIMULATION_SECRET_ENV] = os.urandom(32).hex()
    return simulation_secret()


def in_simulation() -> bool:
    """True iff a simulation entry point marked this process (:func:`start_simulation_roster`)."""
    return os.environ.get(SIMULATION_SECRET_ENV) is not None


def simulation_secret() -> bytes:
    """The process tree's simulation roster secret; :class:`RosterError` if no simulation
    entry point drew one (a secret drawn here, per process, would make each process's
    simulated sites unverifiable by the others, and silently)."""
    value = os.environ.get(SIMULATION_SECRET_ENV)
    if value is None:
        raise RosterError(
            f"no simulation roster secret ({SIMULATION_SECRET_ENV}): this process was not "
            "started by a simulation entry point"
        )
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise RosterError(f"{SIMULATION_SECRET_ENV} must be at least 32 hex digits")
    return secret
