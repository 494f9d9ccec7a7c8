"""dicom_node.association_setup: pynetdicom's UIDs validated once per value, with the same
results, logs and errors as upstream's for everything else."""

from __future__ import annotations

import logging

import pynetdicom.pdu
import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
import pytest
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_role
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from dicom_node import association_setup

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(autouse=True)
def installed() -> None:
    assert association_setup.install()


def test_a_known_uid_comes_back_as_the_same_object_upstream_made() -> None:
    first = pynetdicom.utils.set_uid(CT, "abstract_syntax")
    again = pynetdicom.pdu_items.set_uid(CT, "abstract_syntax")  # type: ignore[attr-defined]
    assert type(first) is UID and first == CT
    assert again is first
    assert association_setup._upstream_set_uid(CT, "abstract_syntax") == first
    from_bytes = pynetdicom.utils.set_uid(CT.encode(), "abstract_syntax")
    assert from_bytes == CT and pynetdicom.utils.set_uid(CT.encode(), "x") is from_bytes


def test_odd_values_go_through_upstream_every_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    for _ in range(2):
        assert pynetdicom.utils.set_uid("1.02.3", "uid") == "1.02.3"  # non-conformant
    assert sum("Non-conformant 'uid' value" in r.getMessage() for r in caplog.records) == 2
    for _ in range(2):
        with pytest.raises(ValueError, match="must not be an empty"):
            pynetdicom.utils.set_uid("", "uid", allow_empty=False)
        with pytest.raises(ValueError, match="Invalid 'uid' value"):
            pynetdicom.utils.set_uid("1" * 65, "uid")
        with pytest.raises(TypeError):
            pynetdicom.utils.set_uid(12, "uid")  # type: ignore[arg-type]
    assert pynetdicom.utils.set_uid(None, "uid") is None
    for _ in range(2):  # bytes that are not ASCII: upstream's decoding refuses them each time
        with pytest.raises(ValueError, match="Unable to decode"):
            pynetdicom.utils.set_uid(b"1.2.3\xe9", "uid")


def test_a_value_known_to_be_good_is_checked_again_under_a_replaced_validator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pynetdicom.utils.set_uid(CT, "uid") == CT  # now known
    monkeypatch.setitem(pynetdicom._config.VALIDATORS, "UI", lambda value: (False, "refused"))
    with pytest.raises(ValueError, match="refused"):
        pynetdicom.utils.set_uid(CT, "uid")


def test_a_private_encoding_is_kept() -> None:
    private = UID("1.2.3.4.5")
    private.set_private_encoding(False, True)
    got = pynetdicom.utils.set_uid(private, "transfer_syntax")
    assert got is not None and got.is_little_endian and not got.is_implicit_VR


def test_transfer_syntaxes_are_added_once_and_odd_ones_warn_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")
    for _ in range(2):
        context = PresentationContext()
        for syntax in [*ALL_TRANSFER_SYNTAXES, ALL_TRANSFER_SYNTAXES[0], CT]:
            context.add_transfer_syntax(syntax)
        assert context.transfer_syntax == [*ALL_TRANSFER_SYNTAXES, CT]
        assert all(type(uid) is UID for uid in context.transfer_syntax)
    warned = [r for r in caplog.records if "that is not a transfer syntax" in r.getMessage()]
    assert len(warned) == 2  # CT's SOP class UID is no transfer syntax: said both times
    with pytest.raises(ValueError):
        PresentationContext().add_transfer_syntax("1" * 65)


def _request() -> bytes:
    """An A-ASSOCIATE-RQ like getscu's: every storage context with three syntaxes and an
    SCP/SCU role selection item each."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "GETSCU"
    primitive.called_ae_title = "SAF"
    contexts = []
    for index, cx in enumerate(AllStoragePresentationContexts[:120]):
        context = PresentationContext()
        context.context_id = 2 * index + 1
        context.abstract_syntax = cx.abstract_syntax
        context.transfer_syntax = ALL_TRANSFER_SYNTAXES[:3]
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    roles = [build_role(cx.abstract_syntax, scp_role=True) for cx in contexts]
    primitive.user_information = [length, *roles]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _decoded(raw: bytes) -> A_ASSOCIATE:
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    return pdu.to_primitive()


def _summary(primitive: A_ASSOCIATE) -> list[object]:
    contexts = [
        (cx.context_id, cx.abstract_syntax, tuple(cx.transfer_syntax))
        for cx in primitive.presentation_context_definition_list
    ]
    items = [
        (type(item).__name__, *sorted((k, str(v)) for k, v in vars(item).items()))
        for item in primitive.user_information
    ]
    return [contexts, items]


def test_a_request_decodes_as_upstream_decodes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _request()
    fast = [_decoded(raw), _decoded(raw)]
    for module in (
        pynetdicom.utils,
        pynetdicom.pdu,
        pynetdicom.pdu_items,
        pynetdicom.pdu_primitives,
        pynetdicom.presentation,
    ):
        if hasattr(module, "set_uid"):
            monkeypatch.setattr(module, "set_uid", association_setup._upstream_set_uid)
    monkeypatch.setattr(
        PresentationContext, "add_transfer_syntax", association_setup._upstream_add_transfer_syntax
    )
    upstream = _decoded(raw)
    assert _summary(fast[0]) == _summary(upstream) == _summary(fast[1])
    assert len(upstream.presentation_context_definition_list) == 120
