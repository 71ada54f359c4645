"""Pseudonymous study keys: a keyed hash (HMAC-SHA256) of the StudyInstanceUID.

The secret key lives outside every output (default ``~/.config/kneebatch/study.key``,
or ``$KNEEBATCH_KEY_FILE``), so a table of keys cannot be linked back to studies
without it; ``keymap.parquet`` in the store is the one deliberate link.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "KNEEBATCH_KEY_FILE"


def default_key_file() -> Path:
    env = os.environ.get(KEY_ENV)
    return Path(env) if env else Path.home() / ".config" / "kneebatch" / "study.key"


def load_or_create_key(path: str | os.PathLike | None = None) -> bytes:
    """Read the secret key; create one (random, mode 0600) if the file does not exist."""
    path = Path(path) if path else default_key_file()
    if path.is_dir():
        raise ValueError(f"study key file {path} is a folder: give the path of a file (an existing key, or where "
                         f"a new one is to be made)")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"study key file {path} holds fewer than 32 characters")
    return key.encode()


def study_key(study_uid: str, key: bytes) -> str:
    """Stable, non-reversible study name: ``k`` + 20 hex digits (80 bits)."""
    return "k" + hmac.new(key, os.fsencode(study_uid), hashlib.sha256).hexdigest()[:20]  # any file name too


def subject_key(patient_id: str, key: bytes) -> str:
    """The subject's name across visits: ``s`` + 20 hex digits of a keyed hash of the PatientID
    (its own domain in the hash, so a subject key never equals a study key)."""
    return "s" + hmac.new(key, b"subject\0" + os.fsencode(patient_id), hashlib.sha256).hexdigest()[:20]


def key_fingerprint(key: bytes) -> str:
    """Names a secret without revealing it (recorded in a store so another key is refused)."""
    return hmac.new(key, b"kneebatch key fingerprint", hashlib.sha256).hexdigest()[:16]
