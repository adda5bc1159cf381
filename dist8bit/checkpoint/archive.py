"""Where each tensor's bytes sit inside a torch.save (zip) file.

torch.save stores every storage uncompressed as a zip record `<archive>/data/<key>`.
Knowing each record's byte range lets the writer fill reserved records in place and
the reader fetch chunks with plain file reads.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
LOCAL_SIGNATURE = 0x04034B50
CENTRAL_SIGNATURE = 0x02014B50
DESCRIPTOR_SIGNATURE = 0x08074B50
DATA_DESCRIPTOR_FLAG = 0x8


@dataclass
class Record:
    offset: int  # of the data in the file
    size: int
    crc_positions: tuple[int, ...]  # where the record's CRC-32 is stored
    crc: int = 0
    written: int = 0


def data_records(path: Path) -> list[Record]:
    """Offset, size and CRC field positions of every tensor record (`<archive>/data/<key>`)."""
    result = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        central = _central_crc_positions(file, archive)
        for info in archive.infolist():
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[1] != "data":
                continue
            file.seek(info.header_offset)
            signature, _, flags, method, _, _, _, _, _, name_len, extra_len = LOCAL_HEADER.unpack(file.read(LOCAL_HEADER.size))
            if signature != LOCAL_SIGNATURE or method != zipfile.ZIP_STORED:
                raise RuntimeError(f"unexpected zip record {info.filename} in {path}")
            offset = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
            positions = [central[info.filename]]
            if flags & DATA_DESCRIPTOR_FLAG:
                file.seek(offset + info.file_size)
                (first,) = struct.unpack("<I", file.read(4))
                positions.append(offset + info.file_size + (4 if first == DESCRIPTOR_SIGNATURE else 0))
            else:
                positions.append(info.header_offset + 14)
            result.append(Record(offset, info.file_size, tuple(positions)))
    return result


def _central_crc_positions(file: Any, archive: zipfile.ZipFile) -> dict[str, int]:
    positions = {}
    position = archive.start_dir
    for _ in archive.infolist():
        file.seek(position)
        header = file.read(46)
        (signature,) = struct.unpack_from("<I", header)
        if signature != CENTRAL_SIGNATURE:
            raise RuntimeError("unexpected zip central directory layout")
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", header, 28)
        name = file.read(name_len).decode("utf-8")
        positions[name] = position + 16
        position += 46 + name_len + extra_len + comment_len
    return positions
