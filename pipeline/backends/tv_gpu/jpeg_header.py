"""What a JPEG's header says before decoding: can nvJPEG / libjpeg-turbo decode it to RGB, and
which EXIF orientation does it carry.

The torchvision GPU loader reads this from the first bytes of every file on the host (a few
microseconds, no decode) to route the file: baseline, extended or progressive Huffman JPEGs with
1 or 3 components at 8 bits go to ``torchvision.io.decode_jpeg`` on the training device; anything
else (PNG, GIF, BMP, WebP, CMYK/YCCK JPEGs, 12-bit, lossless or arithmetic-coded JPEGs) goes to
PIL on the CPU. ``decode_jpeg`` applies EXIF orientation only on the CPU (torchvision 0.29 docs:
"Only implemented for JPEG format on CPU"), so the loader reads the tag here and applies it
itself on every device.

Sources: ITU-T T.81 (JPEG) Annex B (marker segments; SOF0-SOF2 are baseline, extended and
progressive Huffman); EXIF 2.32 §4.6.4 (APP1 "Exif\\0\\0" + a TIFF header; IFD0 tag 0x0112
Orientation, SHORT, values 1-8).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# Start-of-frame markers whose data nvJPEG and libjpeg-turbo decode: baseline, extended, progressive
# (all Huffman). SOF3/5-7/9-11/13-15 (lossless, hierarchical, arithmetic) go to PIL.
FAST_SOF = (0xC0, 0xC1, 0xC2)
ALL_SOF = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))  # C4 DHT, C8 JPG, CC DAC
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class JpegHeader:
    """The fields of a JPEG header the loader routes on.

    Attributes:
        sof: the start-of-frame marker (``0xC0`` baseline ... ``0xCF``).
        precision: bits per sample (8 for ordinary JPEGs, 12 for some medical/raw files).
        height, width: stored pixel size (before EXIF orientation).
        components: 1 (grey), 3 (YCbCr/RGB) or 4 (CMYK/YCCK).
        orientation: EXIF orientation 1-8 (1 when absent or invalid).
    """

    sof: int
    precision: int
    height: int
    width: int
    components: int
    orientation: int = 1

    @property
    def fast(self) -> bool:
        """True when ``torchvision.io.decode_jpeg`` decodes it to RGB on every device."""
        return self.sof in FAST_SOF and self.precision == 8 and self.components in (1, 3)


def _exif_orientation(payload: bytes) -> int:
    """Orientation from an APP1 payload that starts with ``Exif\\0\\0``; 1 when absent or malformed."""
    tiff = payload[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    ifd = struct.unpack_from(e + "I", tiff, 4)[0]
    if ifd + 2 > len(tiff):
        return 1
    count = struct.unpack_from(e + "H", tiff, ifd)[0]
    for k in range(count):
        at = ifd + 2 + 12 * k
        if at + 12 > len(tiff):
            break
        tag, kind = struct.unpack_from(e + "HH", tiff, at)
        if tag == ORIENTATION_TAG and kind == 3:  # SHORT: the value sits in the first 2 bytes of the field
            value = struct.unpack_from(e + "H", tiff, at + 8)[0]
            return value if 1 <= value <= 8 else 1
    return 1


def read_jpeg_header(data: bytes | memoryview) -> JpegHeader | None:
    """Parse the marker segments up to the first start-of-frame.

    Args:
        data: the file's bytes (the whole file, or at least everything up to its SOF segment).

    Returns:
        :class:`JpegHeader`, or ``None`` when ``data`` is not a JPEG (no SOI marker) or its
        markers end before a start-of-frame (a damaged file; the caller decodes it with PIL).
    """
    b = bytes(data[:2])
    if b != b"\xff\xd8":
        return None
    orientation, pos, n = 1, 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return None
        seg = pos + 4
        if marker == 0xE1 and bytes(data[seg:seg + 6]) == b"Exif\x00\x00":
            orientation = _exif_orientation(bytes(data[seg:pos + 2 + length]))
        elif marker in ALL_SOF:
            if length < 8:
                return None
            precision = data[seg]
            height = (data[seg + 1] << 8) | data[seg + 2]
            width = (data[seg + 3] << 8) | data[seg + 4]
            return JpegHeader(marker, precision, height, width, data[seg + 5], orientation)
        pos += 2 + length
    return None
