"""Snapshots of rendered text, with syrupy: one readable file per snapshot.

A snapshot lives in tests/__snapshots__/<test module>/ as the text itself, named after the test
and the rendered file, with that file's extension (so an editor and a reviewer read it as what
it is): ``test_snapshots[single][etc__systemd__system__vllm].service`` holds the node's
etc/systemd/system/vllm.service. ``pytest --snapshot-update`` rewrites them, and deletes those no
test asks for any more; review the diff before committing it.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from syrupy.assertion import SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode

if TYPE_CHECKING:
    from syrupy.location import PyTestLocation
    from syrupy.types import SnapshotIndex


class TextSnapshotExtension(SingleFileSnapshotExtension):
    """One UTF-8 text file per snapshot. This class stores files without an extension; the
    subclasses in TEXT_EXTENSIONS store the others."""

    _write_mode = WriteMode.TEXT
    file_extension = ""

    @classmethod
    def get_snapshot_name(cls, *, test_location: PyTestLocation, index: SnapshotIndex = 0) -> str:
        if isinstance(index, str):  # a rendered file's path: its folders stay readable in one name
            index = index.replace("/", "__")
        return super().get_snapshot_name(test_location=test_location, index=index)


# Every extension a snapshot uses, declared up front: the extension-less class claims only the
# files that end in none of the extensions syrupy knows of, so each must exist before a run
# discovers the snapshots on disk.
TEXT_EXTENSIONS: dict[str, type[TextSnapshotExtension]] = {"": TextSnapshotExtension} | {
    extension: type(f"{extension.capitalize()}TextSnapshotExtension", (TextSnapshotExtension,), {"file_extension": extension})
    for extension in ("cfg", "conf", "json", "service", "sh", "target", "timer", "txt", "yaml", "yml")
}


def text_extension(extension: str) -> type[TextSnapshotExtension]:
    """The text extension storing files that end in ``.extension`` (``""``: no extension)."""
    try:
        return TEXT_EXTENSIONS[extension]
    except KeyError:
        raise KeyError(f"no text snapshot extension {extension!r}; add it to TEXT_EXTENSIONS") from None


def text_file(snapshot: SnapshotAssertion, path: str) -> SnapshotAssertion:
    """``snapshot`` for the text of the rendered file ``path`` (e.g. etc/systemd/system/vllm.service):
    stored as ``<test>[<path without its extension>].<its extension>``."""
    pure = PurePosixPath(path)
    return snapshot(name=str(pure.with_suffix("")), extension_class=text_extension(pure.suffix.removeprefix(".")))

