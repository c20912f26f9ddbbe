"""API keys, their roles, and who owns which adapter.

Two roles:
  operator  (also spelt `admin`) manages the server-wide adapters (registers, deletes any), sees every
            key's usage, reads /metrics.
  user      sees its own usage and the models it may use; registers adapters in its own namespace
            only (never a fine-tuned model's name `ft:...`, never under another key's name
            `<name>:...`), and deletes only the adapters it registered.
Without any key the server is open on loopback and its one caller is an operator.

Keys come from `--api-key` / QFORGE_API_KEY (users), `--operator-key` / QFORGE_OPERATOR_KEY
(operators) or `--api-keys-file FILE`: one `KEY ROLE NAME` per line, `#` comments and blank lines
ignored; a UTF-8 byte-order mark at the start of the file is skipped. A key is printable ASCII
(an HTTP header carries nothing else reliably: a non-ASCII key could never authenticate), so
any other key is refused at start, naming its line. A caller is known by `key_id`, a fingerprint of its key (what the job service stores as an
owner), never by the key itself.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

ROLES = {"operator": "operator", "admin": "operator", "user": "user"}
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
RESERVED_PREFIX = "ft:"  # fine-tuned models: named by the job service only


def fingerprint(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ApiKey:
    key: str
    role: str = "user"   # "operator" | "user"
    name: str = ""       # a display name and the key's adapter namespace ("<name>:...")

    def __post_init__(self):
        if self.role not in ("operator", "user"):
            raise ValueError(f"unknown role {self.role!r}: use operator (admin) or user")
        problem = key_problem(self.key)
        if problem:
            raise ValueError(f"API key of '{self.name or self.role}': {problem}")

    @property
    def id(self) -> str:
        return fingerprint(self.key)

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class Caller:
    """Who is calling: `id` (the owner recorded for what it makes), role, name."""
    id: str
    role: str = "operator"
    name: str = ""

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


ANONYMOUS = Caller("anonymous", "operator", "anonymous")


def key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key (None: it can): it must be printable ASCII without spaces."""
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        return "the key must be printable ASCII without spaces (an HTTP header carries no other text)"
    return None


def read_keys_file(path: str | Path) -> list[ApiKey]:
    """The keys of an --api-keys-file; ValueError naming the file and line for a malformed one."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is skipped
    except FileNotFoundError:
        raise FileNotFoundError(f"--api-keys-file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-keys-file '{path}' cannot be read: {exc}") from None
    keys, names = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{path}:{number}"
        if len(parts) != 3:
            raise ValueError(f"{where}: expected 'KEY ROLE NAME' (three words), found {len(parts)}")
        key, role, name = parts
        if role.lower() not in ROLES:
            raise ValueError(f"{where}: role must be operator, admin or user, got {role!r}")
        if not KEY_NAME.match(name):
            raise ValueError(f"{where}: name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if key_problem(key):
            raise ValueError(f"{where}: {key_problem(key)}")
        if len(key) < 8:
            raise ValueError(f"{where}: the key is shorter than 8 characters")
        if name in names:
            raise ValueError(f"{where}: name '{name}' is used by another key")
        names.add(name)
        keys.append(ApiKey(key, ROLES[role.lower()], name))
    if not keys:
        raise ValueError(f"--api-keys-file '{path}' holds no keys")
    return keys


def as_keys(keys) -> list[ApiKey]:
    """ApiKey objects from what create_app was given: ApiKey objects, or plain strings (users)."""
    out = []
    for i, k in enumerate(k for k in keys if k):
        out.append(k if isinstance(k, ApiKey) else ApiKey(str(k), "user", f"key{i + 1}"))
    return out


class KeyRing:
    """The accepted keys; `caller(header)` is the Caller of an Authorization header, or None."""

    def __init__(self, keys):
        self.keys = as_keys(keys)
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError("two API keys have the same name")

    def __bool__(self) -> bool:
        return bool(self.keys)

    def caller(self, authorization: str) -> Caller | None:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for k in self.keys:  # compare with every key: the time taken does not say which one matched
            if hmac.compare_digest(token.encode(), k.key.encode()):
                found = k
        return None if found is None else Caller(found.id, found.role, found.name)

    def names(self) -> set[str]:
        return {k.name for k in self.keys}


class AdapterOwners:
    """Who registered which run-time adapter (absent: the operator's, server-wide)."""

    def __init__(self):
        self._owner: dict[str, str] = {}

    def owner(self, name: str) -> str | None:
        return self._owner.get(name)

    def set(self, name: str, owner: str | None) -> None:
        if owner is None:
            self._owner.pop(name, None)
        else:
            self._owner[name] = owner

    def forget(self, name: str) -> None:
        self._owner.pop(name, None)

    def may_use(self, name: str, caller: Caller) -> bool:
        """A user's adapter is its own; operators' adapters are everyone's."""
        owner = self._owner.get(name)
        return owner is None or caller.is_operator or owner == caller.id

    def may_delete(self, name: str, caller: Caller) -> bool:
        return caller.is_operator or self._owner.get(name) == caller.id


def check_adapter_name(name: str, caller: Caller, ring: KeyRing) -> str | None:
    """Why `caller` may not register an adapter named `name` (None: it may)."""
    if not isinstance(name, str):
        return None  # the registry's own check answers
    if name.startswith(RESERVED_PREFIX):
        return f"names starting with '{RESERVED_PREFIX}' are reserved for fine-tuned models"
    if caller.is_operator:
        return None
    prefix = name.split(":", 1)[0] if ":" in name else None
    if prefix is not None and prefix != caller.name and prefix in ring.names():
        return f"the namespace '{prefix}:' belongs to another key; use '{caller.name}:...' or a plain name"
    if name in ring.names() and name != caller.name:
        return f"'{name}' is another key's name"
    return None
