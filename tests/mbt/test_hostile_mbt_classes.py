"""Class records from checkpoints and manifests are data shown to people (printed by tools/predict.py, written to
per_class_ap.csv and timelines): a name or id holding a control character, or pages long, is refused naming the
file."""

from __future__ import annotations

import pytest

from mbt.classes import ClassListError, checked_record, record_difference


def record(name: str, class_id: str = "/m/0") -> dict:
    return {"classes": [{"index": 0, "id": class_id, "name": name}], "multi_label": True}


@pytest.mark.parametrize(
    ("name", "class_id", "says"),
    [
        ("Dog\x1b[2J", "/m/0", r"class 0's name 'Dog\x1b[2J' holds the control character '\x1b'"),
        ("Dog", "/m/0\x9b31m", r"class 0's id '/m/0\x9b31m' holds the control character '\x9b'"),
        ("Dog\u202egod", "/m/0", r"holds the control character '\u202e'"),
        ("D" * 5000, "/m/0", "has 5000 characters, more than 1024"),
    ],
)
def test_a_checkpoint_class_record_with_text_a_terminal_would_run_is_refused(name: str, class_id: str, says: str):
    with pytest.raises(ClassListError) as raised:
        checked_record(record(name, class_id), "run/checkpoints/step-10.pt")
    message = str(raised.value)
    assert message.startswith("run/checkpoints/step-10.pt: ") and says in message and len(message) < 400
    assert not any(c in message for c in "\x1b\x9b\u202e")


def test_a_class_record_of_printable_names_is_kept() -> None:
    names = record("Male speech, man speaking", "/m/05zppz")
    assert checked_record(names, "x.pt") == names
    other = record("Female speech, woman speaking", "/m/02zsn")
    assert record_difference(names, other, "a", "b") == (
        "class 0 is 'Male speech, man speaking' (/m/05zppz) in a but 'Female speech, woman speaking' (/m/02zsn) in b"
    )
