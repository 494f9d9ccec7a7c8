"""pynetdicom's association set-up: each UID of an A-ASSOCIATE validated once per process.

Every association a peer opens carries the same few hundred UIDs: `getscu` proposes 121
presentation contexts (an abstract syntax and up to three transfer syntaxes each) and
120 SCP/SCU role selections. pynetdicom turns each one into a `pydicom.uid.UID` through
`pynetdicom.utils.set_uid`, which checks it with up to four regular expressions
(pydicom's value validation, pynetdicom's UI validator, the conformance check, and once
more when the context is rebuilt from the PDU); decoding the request, turning it into a
primitive and encoding the answer cost ≈20 ms of Python per association, more than a
small C-GET's data.

`install()` puts `set_uid` behind a table of the values already known to be good: a
value comes back as the same (immutable) `UID` object the first call made, when that
call raised nothing and the value was conformant (so it passes with or without
`ENFORCE_UID_CONFORMANCE`). Anything else (a new value, an empty or non-conformant one,
bytes that are not ASCII, a UI validator replaced in `_config.VALIDATORS`) goes through
pynetdicom's own `set_uid`, which logs, warns and raises exactly as before. The table
holds at most `MAX_KNOWN` values and is emptied when full. `add_transfer_syntax` is
answered the same way for syntaxes pydicom knows.

Like `throughput`, this applies only to the pynetdicom series it was written against
and only where the function it replaces is still upstream's own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import ModuleType

import pynetdicom
import pynetdicom.ae
import pynetdicom.pdu
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.presentation import PresentationContext

from dicom_node.throughput import PYNETDICOM_SERIES

log = logging.getLogger(__name__)

MAX_KNOWN = 4096
"""Values remembered (the association set-up of the node's peers needs a few hundred)."""

_upstream_set_uid: Callable[..., UID | None] = pynetdicom.utils.set_uid
_upstream_ui_validator = _config.VALIDATORS["UI"]
_upstream_add_transfer_syntax: Callable[..., None] = PresentationContext.add_transfer_syntax
_MODULES: tuple[ModuleType, ...] = (
    pynetdicom.utils,
    pynetdicom.ae,
    pynetdicom.pdu,
    pynetdicom.pdu_items,
    pynetdicom.pdu_primitives,
    pynetdicom.presentation,
)
"""The modules of association set-up that call `set_uid` by the name they imported (not
`dimse_primitives`: each DIMSE message carries a new SOP Instance UID, which would only
churn the table)."""

_lock = threading.Lock()
_installed = False
_known: dict[tuple[type, str | bytes | None, bool | None], UID] = {}
"""(type, value, `validate`) -> the UID made of it; `validate` None for transfer syntaxes."""


def install() -> bool:
    """Remember the UIDs pynetdicom validated. Idempotent; returns whether in use."""
    global _installed
    with _lock:
        if _installed:
            return True
        version = str(getattr(pynetdicom, "__version__", ""))
        if not version.startswith(PYNETDICOM_SERIES):
            log.warning("pynetdicom %s: validating every UID its own way", version)
            return False
        modules = [m for m in _MODULES if hasattr(m, "set_uid")]
        upstream = (
            all(m.set_uid is _upstream_set_uid for m in modules),
            PresentationContext.add_transfer_syntax is _upstream_add_transfer_syntax,
            isinstance(vars(PresentationContext()).get("_transfer_syntax"), list),
        )
        if not all(upstream):
            log.warning("pynetdicom's UID handling is not upstream's (%s); leaving it", upstream)
            return False
        for module in modules:
            module.set_uid = set_uid  # type: ignore[attr-defined]
        PresentationContext.add_transfer_syntax = add_transfer_syntax  # type: ignore[method-assign]
        _installed = True
        return True


def set_uid(
    value: str | bytes | UID | None,
    name: str,
    allow_empty: bool = True,
    allow_none: bool = True,
    validate: bool = True,
) -> UID | None:
    """`pynetdicom.utils.set_uid`, answered from the table for a value seen before."""
    if not _plain(value):
        return _upstream_set_uid(value, name, allow_empty, allow_none, validate)
    key = (type(value), value, validate)
    known = _known.get(key)
    if known is not None and _config.VALIDATORS["UI"] is _upstream_ui_validator:
        return known
    uid = _upstream_set_uid(value, name, allow_empty, allow_none, validate)
    if type(uid) is UID and uid.is_valid and _config.VALIDATORS["UI"] is _upstream_ui_validator:
        _remember(key, uid)
    return uid


def add_transfer_syntax(self: PresentationContext, syntax: str | bytes | UID | None) -> None:
    """`PresentationContext.add_transfer_syntax`, without re-validating a known syntax."""
    key = (type(syntax), syntax, None)
    known = _known.get(key) if _plain(syntax) else None
    if known is None or _config.VALIDATORS["UI"] is not _upstream_ui_validator:
        _upstream_add_transfer_syntax(self, syntax)
        added = self._transfer_syntax[-1] if self._transfer_syntax else None
        # Remembered only when upstream took it without a word: conformant, and a
        # transfer syntax pydicom knows (a private one is always checked again).
        if (
            type(added) is UID
            and added == syntax
            and _plain(syntax)
            and added.is_valid
            and added.is_transfer_syntax
            and not added.is_private
        ):
            _remember(key, added)
        return
    if known not in self._transfer_syntax:
        self._transfer_syntax.append(known)


def _plain(value: object) -> bool:
    """A non-empty str, ASCII bytes or UID with nothing attached (no private encoding)."""
    return (
        bool(value)
        and type(value) in (str, bytes, UID)
        and not (isinstance(value, bytes) and not value.isascii())
        and not hasattr(value, "_PRIVATE_TS_ENCODING")
    )


def _remember(key: tuple[type, str | bytes | None, bool | None], uid: UID) -> None:
    if len(_known) >= MAX_KNOWN:
        _known.clear()
    _known[key] = uid


__all__ = ["add_transfer_syntax", "install", "set_uid"]
