"""Image and DICOM file readers: the single door through which pixels enter pellucid.

Every file, whether an ordinary image (PNG, JPEG, TIFF, BMP) or a DICOM object, is read into an
:class:`Image`: a float32 array of shape ``(H, W, C)`` with ``C`` in ``{1, 3}``, values in
``[0, 1]``, RGB channel order, plus a ``meta`` dict saying where the pixels came from and what was
done to them (``meta['notes']``). DICOM handling follows PS3.3 C.11 through pydicom: the modality
LUT (rescale slope/intercept), then the VOI LUT or window (an explicit ``window=`` argument wins,
then the file's VOI LUT or Window Center/Width, else the frame's min-max), then MONOCHROME1
inversion; multi-frame files yield one frame (the middle one unless asked). Anything that cannot be
read is refused with an :class:`ImageReadError` whose one-line message names the file, says what is
wrong and what to do. :func:`dicom_identifying_tags` exposes the identifying header values so
reports can check redaction; they are never logged.

One concern per module, every public name re-exported here:
:mod:`~pellucid.datasets.readers.image` (the :class:`Image` type, :class:`ImageReadError`, the
suffixes), :mod:`~pellucid.datasets.readers.dispatch` (:func:`read_image`),
:mod:`~pellucid.datasets.readers.pil` (ordinary images through Pillow),
:mod:`~pellucid.datasets.readers.detect` (:func:`is_dicom`),
:mod:`~pellucid.datasets.readers.dicom` (:func:`read_dicom`: parsing, refusals, frames, decoding),
:mod:`~pellucid.datasets.readers.dicom_values` (modality LUT, VOI, colour to ``[0, 1]``),
:mod:`~pellucid.datasets.readers.identifiers` (identifying tags) and
:mod:`~pellucid.datasets.readers.common` (shared checks and warnings).
"""

from __future__ import annotations

from pellucid.datasets.readers.image import BURNED_IN_NOTE, DICOM_SUFFIXES, IMAGE_SUFFIXES, Image, ImageReadError
from pellucid.datasets.readers.common import check_file
from pellucid.datasets.readers.detect import is_dicom
from pellucid.datasets.readers.dicom import read_dicom
from pellucid.datasets.readers.identifiers import IDENTIFYING_TAGS, dicom_identifying_tags
from pellucid.datasets.readers.dispatch import read_image

__all__ = [
    "BURNED_IN_NOTE",
    "DICOM_SUFFIXES",
    "IDENTIFYING_TAGS",
    "IMAGE_SUFFIXES",
    "Image",
    "ImageReadError",
    "check_file",
    "dicom_identifying_tags",
    "is_dicom",
    "read_dicom",
    "read_image",
]
