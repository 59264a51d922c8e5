"""What a workspace's files may hold: the one place where workspace.json, review.json and case ids are checked.

A hand-edited or damaged file is refused with one UserError line that names the file and what is wrong in it, so
that every command and the Slicer module say so instead of failing somewhere later.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sslmedsam2.errors import UserError
from sslmedsam2.study.review import SliceState
from sslmedsam2.volume import SliceAxis, slice_axis
from sslmedsam2.volume.io import MAX_LABEL, read_header

SCHEMA_VERSION = 1
AXES = tuple(a.value for a in SliceAxis)
CHANNELS = ("MRI", "CT")  # nnU-Net's normalisation: CT windows the intensities, anything else is z-scored
CASE_FLAGS = ("label", "pseudo", "eval")  # per case in workspace.json: which optional files it has
DIGEST_KEY = "image_digest"  # per case, optional: the image's voxels and grid (study.workspace.image_digest)
_DIGEST = re.compile(r"[0-9a-f]{64}")
RESERVED_LABELS = ("background", "ignore")  # nnU-Net's own names in dataset.json
TOP_LABEL = MAX_LABEL - 1  # the ignore label (highest value + 1) must fit into a label map too
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_STATES = frozenset(s.value for s in SliceState)
_FIX = "restore the file or correct it by hand"


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _show(value: object, limit: int = 40) -> str:
    """A value as one short line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_case_id(case_id: object, where: str = "") -> str:
    """Return `case_id` if it is a folder name inside WS/cases: letters, digits, '.', '_', '-', starting with a
    letter or digit (so never empty, hidden, '..', a path or absolute); else raise UserError, prefixed by `where`."""
    if not isinstance(case_id, str) or not _ID.fullmatch(case_id):
        raise UserError(f"{where}case id {_show(case_id)}: use letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    return case_id


def check_settings(axis: object, labels: object, channel: object, where: str) -> tuple[str, dict[str, int], str]:
    """The workspace's axis, labels ({name: value}, distinct values 1..TOP_LABEL) and channel (MRI or CT, any case)
    as given to `init` or read from workspace.json; raises UserError prefixed by `where` otherwise."""
    if not isinstance(axis, str) or axis not in AXES:
        raise UserError(f"{where}axis {_show(axis)}: one of {', '.join(AXES)}")
    if not isinstance(channel, str) or channel.upper() not in CHANNELS:
        raise UserError(f"{where}channel {_show(channel)}: one of {', '.join(CHANNELS)}")
    if not isinstance(labels, dict):
        raise UserError(f"{where}labels: {{name: value}} expected, e.g. {{\"liver\": 1}}, not {_kind(labels)}")
    for name, value in labels.items():
        if not isinstance(name, str) or not name or name in RESERVED_LABELS:
            raise UserError(f"{where}label name {_show(name)}: not empty, nor {' or '.join(RESERVED_LABELS)} "
                            "(nnU-Net's own)")
        if type(value) is not int or not 1 <= value <= TOP_LABEL:
            raise UserError(f"{where}label {_show(name)}: value {_show(value)} is not a whole number in 1..{TOP_LABEL} "
                            "(0 is background)")
    if len(set(labels.values())) != len(labels):
        raise UserError(f"{where}labels {_show(labels, 80)}: two names share a value; values must be distinct")
    return axis, dict(labels), channel


def _load(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path}: not a readable {what} (not JSON); {_FIX}") from None


def read_index(index: Path) -> tuple[str, dict[str, int], str, dict[str, dict[str, bool | str | None]]]:
    """(axis, labels, channel, {case id: {"label"|"pseudo"|"eval": bool, "image_digest": str or None}}) of a
    workspace.json; raises one-line UserErrors for anything else: not JSON, a newer schema, missing keys, wrong
    types, unknown axis or channel, bad labels, case ids that would leave WS/cases, a digest that is not one."""
    data = _load(index, "workspace index")
    if not isinstance(data, dict):
        raise UserError(f"{index}: a JSON object is expected, not {_kind(data)}; {_FIX}")
    version = data.get("schema_version")
    if type(version) is not int or version < 1:
        raise UserError(f"{index}: schema_version {_show(version)} is not a version number; {_FIX}")
    if version > SCHEMA_VERSION:
        raise UserError(f"{index.parent}: workspace schema version {version} is newer than this sslmedsam2 "
                        f"understands ({SCHEMA_VERSION}); update sslmedsam2")
    missing = [key for key in ("axis", "labels", "channel", "cases") if key not in data]
    if missing:
        raise UserError(f"{index}: {', '.join(missing)} missing; {_FIX}")
    where = f"{index}: "
    axis, labels, channel = check_settings(data["axis"], data["labels"], data["channel"], where)
    cases = data["cases"]
    if not isinstance(cases, dict):
        raise UserError(f"{where}cases: {{case id: {{\"label\": true|false, \"pseudo\": ..., \"eval\": ...}}}} "
                        f"expected, not {_kind(cases)}")
    for case_id, info in cases.items():
        check_case_id(case_id, where)
        if not isinstance(info, dict) or any(type(info.get(flag)) is not bool for flag in CASE_FLAGS):
            raise UserError(f"{where}case {case_id}: {{\"label\": true|false, \"pseudo\": ..., \"eval\": ...}} "
                            f"expected, not {_show(info)}")
        digest = info.get(DIGEST_KEY)
        if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
            raise UserError(f"{where}case {case_id}: {DIGEST_KEY} {_show(digest)} is not a SHA-256 digest; {_FIX} "
                            "(or remove the key: it is computed again)")
    return axis, labels, channel, {case_id: {**{flag: info[flag] for flag in CASE_FLAGS},
                                             DIGEST_KEY: info.get(DIGEST_KEY)} for case_id, info in cases.items()}


def read_states(path: Path, axis: str) -> list[SliceState]:
    """The states of a review.json ({"axis": the workspace's, "states": [one per slice]}); UserError otherwise."""
    data = _load(path, "review file")
    if not isinstance(data, dict) or not isinstance(data.get("states"), list):
        raise UserError(f"{path}: {{\"axis\": ..., \"states\": [...]}} expected, not {_show(data)}; {_FIX}")
    if "axis" in data and data["axis"] != axis:
        raise UserError(f"{path}: states along {_show(data['axis'])}, the workspace's axis is {axis}; {_FIX}")
    bad = [s for s in data["states"] if not isinstance(s, str) or s not in _STATES]
    if bad:
        raise UserError(f"{path}: unknown review state {_show(bad[0])}: one of {', '.join(sorted(_STATES))}; {_FIX}")
    return [SliceState(s) for s in data["states"]]


def count_slices(image: Path, axis: str) -> int:
    """The number of `axis` slices of an image file, from its header only."""
    reader = read_header(image, fix="restore the file")
    return int(reader.GetSize()[2 - slice_axis(reader, axis)])  # numpy axis a is SimpleITK index 2 - a


def check_review_length(path: Path, states: list[SliceState], image: Path, axis: str) -> None:
    """One state per slice of the case's image along the workspace axis."""
    n = count_slices(image, axis)
    if len(states) != n:
        raise UserError(f"{path}: {len(states)} review states, the image has {n} {axis} slices; {_FIX}")
