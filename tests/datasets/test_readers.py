"""Tests for pellucid.datasets.readers: real DICOM samples, synthetic DICOMs, ordinary images."""

from __future__ import annotations

import importlib.util
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from bench.bench_fuzz import SRGB_PRIMARIES, cmyk_icc_profile, rgb_icc_profile
from pellucid.datasets.readers import dicom as readers_dicom  # where _decode_frame looks up its helpers
from pellucid.datasets.readers import (
    DICOM_SUFFIXES,
    IDENTIFYING_TAGS,
    IMAGE_SUFFIXES,
    Image,
    ImageReadError,
    dicom_identifying_tags,
    is_dicom,
    read_dicom,
    read_image,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DICOM_DIR = SHARED / "dicom"
CXR_DIR = SHARED / "tb_cxr" / "normal"
DICOM_FILES = sorted(DICOM_DIR.glob("*.dcm")) if DICOM_DIR.is_dir() else []

JPEG_LOSSLESS_DECODABLE = (
    importlib.util.find_spec("pylibjpeg") is not None
    and importlib.util.find_spec("libjpeg") is not None
) or importlib.util.find_spec("gdcm") is not None

# What each shared sample must give: None = refused, else (channels, window, bits_stored).
EXPECTED = {
    "rtstruct.dcm": None,  # no pixel data
    "MR_UnspecifiedLength.dcm": None,  # a SEG: pixel data, but a mask, not an image
    "US_Explicit_Big_RGB.dcm": (3, None, 8),
    "CT_Explicit_Little.dcm": (1, (50.0, 75.0), 16),
    "CT_Implicit_Little_Headless_Retired.dcm": (1, (50.0, 300.0), 12),
    "CT_JPEG70.dcm": (1, (40.0, 400.0), 16) if JPEG_LOSSLESS_DECODABLE else None,
    "MG_Explicit_Little.dcm": (1, (127.5, 256.0), 8),
    "MR_Explicit_Little_MultiFrame.dcm": (1, None, 8),
    "MR_Implicit_Little.dcm": (1, None, 16),
    "OT_Implicit_Little_Headless.dcm": (1, None, 8),
    "sample.dcm": (1, None, 8),
}

needs_samples = pytest.mark.skipif(
    not DICOM_FILES, reason=f"shared DICOM samples not found at {DICOM_DIR}"
)


def _assert_valid(image: Image, channels: int | None = None) -> None:
    arr = image.array
    assert arr.dtype == np.float32
    assert arr.ndim == 3 and arr.shape[2] in (1, 3)
    if channels is not None:
        assert arr.shape[2] == channels
    assert np.all(np.isfinite(arr))
    assert float(arr.min()) >= 0.0 and float(arr.max()) <= 1.0
    assert float(arr.std()) > 0.0, "image is constant"


def _assert_refusal(err: pytest.ExceptionInfo[ImageReadError], path: Path) -> str:
    message = str(err.value)
    assert path.name in message
    assert "\n" not in message
    return message


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window, as a [0, 1] reference."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


# ------------------------------------------------------------------------------------------
# constants


def test_suffix_sets() -> None:
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".tif", ".tiff", ".bmp"}
    assert DICOM_SUFFIXES == {".dcm", ".dicom"}
    assert not IMAGE_SUFFIXES & DICOM_SUFFIXES


@pytest.mark.parametrize("keyword", IDENTIFYING_TAGS)
def test_identifying_tags_are_dicom_keywords(keyword: str) -> None:
    pydicom = pytest.importorskip("pydicom")
    assert pydicom.datadict.tag_for_keyword(keyword) is not None


def test_identifying_tags_cover_the_basics() -> None:
    required = {
        "PatientName", "PatientID", "PatientBirthDate", "PatientAddress",
        "ReferringPhysicianName", "PerformingPhysicianName", "InstitutionName",
        "InstitutionAddress", "OperatorsName", "OtherPatientIDs", "AccessionNumber",
    }
    assert required <= set(IDENTIFYING_TAGS)
    assert len(set(IDENTIFYING_TAGS)) == len(IDENTIFYING_TAGS)


# ------------------------------------------------------------------------------------------
# real DICOM samples


@needs_samples
@pytest.mark.filterwarnings("ignore:.*missing DICOM attributes assumed")
@pytest.mark.parametrize("path", DICOM_FILES, ids=lambda p: p.name)
def test_real_dicom_read_or_refused(path: Path) -> None:
    pytest.importorskip("pydicom")
    assert is_dicom(path)
    try:
        image = read_image(path)
    except ImageReadError as err:
        assert path.name in str(err)
        assert "\n" not in str(err)
        if path.name in EXPECTED:
            assert EXPECTED[path.name] is None, f"{path.name} should read but: {err}"
        return
    _assert_valid(image)
    assert image.meta["format"] == "dicom"
    assert image.meta["path"] == str(path)
    assert image.meta["original_size"] == image.array.shape[:2]
    if path.name in EXPECTED:
        expected = EXPECTED[path.name]
        assert expected is not None, f"{path.name} should be refused"
        channels, window, bits = expected
        assert image.array.shape[2] == channels
        assert image.meta["window"] == window
        assert image.meta["bits_stored"] == bits


@pytest.mark.filterwarnings("ignore")
def test_pydicoms_own_test_files_are_read_in_their_colour_model_or_refused_in_one_line() -> None:
    """pydicom ships 176 hard files with its package (palette colour, YBR, big endian, JPEG-LS, RLE,
    JPEG 2000, deflated, no preamble, SR, RT, ECG): each is an image whose channels follow its photometric
    interpretation (colour for RGB, YBR and palette colour), or one line that names the file."""
    pydicom = pytest.importorskip("pydicom")
    import pydicom.data

    root = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(f for f in root.rglob("*") if f.is_file())
    if len(files) < 50:
        pytest.skip(f"pydicom {pydicom.__version__} ships no test files here ({root})")
    read = 0
    for path in files:
        try:
            image = read_image(path)
        except ImageReadError as err:
            assert path.name in str(err) and "\n" not in str(err), str(err)
            continue
        read += 1
        arr = image.array  # some of the files are blank pictures, so no contrast is asked for
        assert arr.dtype == np.float32 and np.all(np.isfinite(arr)) and 0.0 <= arr.min() <= arr.max() <= 1.0
        photometric = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).PhotometricInterpretation)
        assert image.array.shape[2] == (1 if photometric.startswith("MONOCHROME") else 3), (path.name, photometric)
    assert read >= 40, f"only {read} of pydicom's {len(files)} test files were read"


@pytest.mark.filterwarnings("ignore")
def test_a_damaged_rle_frame_that_panics_the_compiled_decoder_is_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """pylibjpeg-rle (the ``dicom`` extra's RLE decoder, written in Rust) panics on some damaged frames; the panic
    is a ``BaseException`` that ``except Exception`` let through, so one such file stopped every door with a
    traceback and Rust's own report on stderr. It is the readers' one line now, and nothing else is printed."""
    from tests.conftest import rle_dicom_that_panics

    source, damaged = rle_dicom_that_panics(tmp_path)
    capfd.readouterr()
    with pytest.raises(ImageReadError) as err:
        read_image(damaged)
    assert "could not be decoded (PanicException)" in _assert_refusal(err, damaged)
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""
    assert read_image(source).array.shape == (64, 64, 1)  # the file it came from still reads


def test_stderr_comes_back_after_decoders_ran_quietly_in_many_threads(capfd: pytest.CaptureFixture[str]) -> None:
    """The quiet window around compiled decoders is shared: however reads interleave across threads (the web app
    serves sessions in threads), file descriptor 2 points back where it did once the last one leaves."""
    import os
    import threading

    from pellucid.datasets.readers.common import _native_stderr_quiet

    before = os.fstat(2)

    def enter_and_leave() -> None:
        for _ in range(200):
            with _native_stderr_quiet():
                with _native_stderr_quiet():
                    pass

    threads = [threading.Thread(target=enter_and_leave) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    os.write(2, b"still here\n")
    assert capfd.readouterr().err == "still here\n"


@needs_samples
def test_rtstruct_refused_for_no_pixel_data() -> None:
    pytest.importorskip("pydicom")
    path = DICOM_DIR / "rtstruct.dcm"
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = _assert_refusal(err, path)
    assert "no pixel data" in message and "RTSTRUCT" in message
    assert "export the image series" in message


@needs_samples
def test_segmentation_refused() -> None:
    pytest.importorskip("pydicom")
    path = DICOM_DIR / "MR_UnspecifiedLength.dcm"
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "segmentation" in _assert_refusal(err, path)


@needs_samples
def test_multiframe_mr_frames() -> None:
    pydicom = pytest.importorskip("pydicom")
    path = DICOM_DIR / "MR_Explicit_Little_MultiFrame.dcm"
    default = read_image(path)
    assert default.meta["n_frames"] == 16
    assert default.meta["frame"] == 8
    chosen = read_image(path, frame=3)
    assert chosen.meta["frame"] == 3
    _assert_valid(chosen, 1)
    # Golden: the frame from pydicom directly, min-max normalised (the file has no VOI).
    raw = pydicom.dcmread(path).pixel_array[3].astype(np.float64)
    reference = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(chosen.array[:, :, 0], reference, atol=1e-6)
    with pytest.raises(ImageReadError) as err:
        read_image(path, frame=16)
    message = _assert_refusal(err, path)
    assert "16 frame" in message and "0..15" in message
    with pytest.raises(ImageReadError):
        read_image(path, frame=-1)


@needs_samples
def test_us_big_endian_rgb() -> None:
    pydicom = pytest.importorskip("pydicom")
    path = DICOM_DIR / "US_Explicit_Big_RGB.dcm"
    image = read_image(path)
    _assert_valid(image, 3)
    assert image.meta["transfer_syntax"] == "1.2.840.10008.1.2.2"
    assert image.meta["photometric"] == "RGB"
    raw = pydicom.dcmread(path).pixel_array
    np.testing.assert_allclose(image.array, raw / 255.0, atol=1e-6)
    assert read_image(path, channels=1).array.shape == (480, 640, 1)


@needs_samples
def test_ct_jpeg_lossless_read_or_install_hint() -> None:
    pytest.importorskip("pydicom")
    path = DICOM_DIR / "CT_JPEG70.dcm"
    if JPEG_LOSSLESS_DECODABLE:
        image = read_image(path)
        _assert_valid(image, 1)
        assert image.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.70"
        assert image.meta["window"] == (40.0, 400.0)
    else:
        with pytest.raises(ImageReadError) as err:
            read_image(path)
        message = _assert_refusal(err, path)
        assert "1.2.840.10008.1.2.4.70" in message and 'pip install "pellucid[dicom]"' in message


@needs_samples
def test_missing_decoder_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydicom")
    path = DICOM_DIR / "CT_JPEG70.dcm"
    monkeypatch.setattr(
        readers_dicom, "_missing_decoder_packages", lambda uid: ["pylibjpeg - requires pylibjpeg>=2.0"]
    )
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = _assert_refusal(err, path)
    assert "1.2.840.10008.1.2.4.70" in message
    assert "JPEG Lossless" in message
    assert 'pip install "pellucid[dicom]"' in message


@needs_samples
def test_unknown_transfer_syntax_says_convert(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydicom")
    path = DICOM_DIR / "CT_JPEG70.dcm"
    monkeypatch.setattr(readers_dicom, "_missing_decoder_packages", lambda uid: [])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = _assert_refusal(err, path)
    assert "1.2.840.10008.1.2.4.70" in message and "uncompressed transfer syntax" in message


@needs_samples
def test_headless_sample_found_without_suffix(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    original = DICOM_DIR / "OT_Implicit_Little_Headless.dcm"
    renamed = tmp_path / "ot_scan"
    renamed.write_bytes(original.read_bytes())
    assert renamed.read_bytes()[128:132] != b"DICM"
    assert is_dicom(renamed)
    np.testing.assert_array_equal(read_image(renamed).array, read_image(original).array)


@needs_samples
def test_headless_retired_ct_golden() -> None:
    pydicom = pytest.importorskip("pydicom")
    path = DICOM_DIR / "CT_Implicit_Little_Headless_Retired.dcm"
    with pytest.warns(UserWarning, match="missing DICOM attributes"):
        image = read_image(path)
    assert image.meta["rescale"] == (1.0, -1024.0)
    assert image.meta["window"] == (50.0, 300.0)  # the first of two windows
    assert any("inferred" in note for note in image.meta["notes"])
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    np.testing.assert_allclose(image.array[:, :, 0], _linear_window(hu, 50, 300), atol=1e-5)


@needs_samples
def test_identifying_tags_of_real_sample_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    pydicom = pytest.importorskip("pydicom")
    path = DICOM_DIR / "CT_Explicit_Little.dcm"
    with caplog.at_level(logging.DEBUG, logger="pellucid"):
        tags = dicom_identifying_tags(path)
        read_image(path)
    ds = pydicom.dcmread(path)
    assert tags["PatientName"] == str(ds.PatientName)
    assert tags["InstitutionName"] == str(ds.InstitutionName)
    assert str(ds.PatientName) not in caplog.text


# ------------------------------------------------------------------------------------------
# synthetic DICOMs


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    signed: bool = False,
    preamble: bool = True,
    rgb: bool = False,
    **attributes: object,
) -> Path:
    """Write uint16 (or int16) ``pixels`` of shape (H, W) or (frames, H, W) as DICOM; with ``rgb``, uint8 pixels
    of shape (H, W, 3) as 8-bit RGB."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    if pixels.ndim == 3 and not rgb:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[:2] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    ds.BitsAllocated = 8 if rgb else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).astype("u1" if rgb else "<u2" if not signed else "<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    if not preamble:
        data = path.read_bytes()
        assert data[128:132] == b"DICM"
        path.write_bytes(data[132:])
    return path


RAMP = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0..4095: fits 12 bits


def test_synthetic_monochrome1_inverted(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12)
    image = read_dicom(path)
    assert image.meta["monochrome1_inverted"] is True
    assert image.meta["photometric"] == "MONOCHROME1"
    flat = image.array[:, :, 0].ravel()
    assert flat[4095] == pytest.approx(0.0, abs=1e-6)  # the max stored value becomes black
    assert flat[0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(flat, 1.0 - RAMP.ravel() / 4095.0, atol=1e-6)


def test_synthetic_monochrome1_inverted_after_window(tmp_path: Path) -> None:
    path = _write_dicom(
        tmp_path / "m1w.dcm", RAMP, photometric="MONOCHROME1", bits_stored=12,
        WindowCenter=2048, WindowWidth=1024,
    )
    image = read_dicom(path)
    expected = 1.0 - _linear_window(RAMP.astype(np.float64), 2048, 1024)
    np.testing.assert_allclose(image.array[:, :, 0], expected, atol=1e-5)


def test_synthetic_rescale_before_window(tmp_path: Path) -> None:
    path = _write_dicom(
        tmp_path / "rescale.dcm", RAMP, bits_stored=12,
        RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1000,
    )
    image = read_dicom(path)
    assert image.meta["rescale"] == (2.0, -1024.0)
    assert image.meta["window"] == (0.0, 1000.0)
    flat = image.array[:, :, 0].ravel()
    # stored 512 -> modality value 0 -> window centre
    assert flat[512] == pytest.approx(0.5 + 0.5 / 999, abs=1e-5)
    assert flat[612] == pytest.approx(0.5 + 200.5 / 999, abs=1e-5)  # modality 200
    assert flat[0] == 0.0 and flat[1000] == 1.0
    expected = _linear_window(RAMP.astype(np.float64) * 2 - 1024, 0, 1000)
    np.testing.assert_allclose(flat, expected.ravel(), atol=1e-5)


def test_synthetic_file_window_and_override(tmp_path: Path) -> None:
    path = _write_dicom(
        tmp_path / "win.dcm", RAMP, bits_stored=12,
        WindowCenter=[2048, 1000], WindowWidth=[1024, 500],  # multi-valued: the first is used
    )
    from_file = read_dicom(path)
    assert from_file.meta["window"] == (2048.0, 1024.0)
    ramp = RAMP.astype(np.float64)
    reference = _linear_window(ramp, 2048, 1024)
    np.testing.assert_allclose(from_file.array[:, :, 0], reference, atol=1e-5)
    assert from_file.array[32, 0, 0] == pytest.approx(0.5 + 0.5 / 1023, abs=1e-5)  # value 2048

    override = read_image(path, window=(1000, 500))
    assert override.meta["window"] == (1000.0, 500.0)
    np.testing.assert_allclose(override.array[:, :, 0], _linear_window(ramp, 1000, 500), atol=1e-5)
    assert not np.allclose(override.array, from_file.array)


def test_synthetic_no_voi_is_min_max(tmp_path: Path) -> None:
    pixels = (RAMP // 2 + 100).astype(np.uint16)  # 100..2147
    image = read_dicom(_write_dicom(tmp_path / "mm.dcm", pixels, bits_stored=12))
    assert image.meta["window"] is None and image.meta["voi_lut_applied"] is False
    np.testing.assert_allclose(image.array[:, :, 0], (pixels - 100.0) / 2047.0, atol=1e-6)


def test_synthetic_voi_lut_sequence(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    lut = np.round(np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    path = _write_dicom(tmp_path / "voilut.dcm", RAMP, bits_stored=12, VOILUTSequence=[item])
    image = read_dicom(path)
    assert image.meta["voi_lut_applied"] is True
    np.testing.assert_allclose(image.array[:, :, 0].ravel(), lut / 65535.0, atol=1e-6)


def test_synthetic_bits_stored_12_unsigned_and_signed(tmp_path: Path) -> None:
    image = read_dicom(_write_dicom(tmp_path / "u12.dcm", RAMP, bits_stored=12))
    assert image.meta["bits_stored"] == 12
    np.testing.assert_allclose(image.array[:, :, 0], RAMP / 4095.0, atol=1e-6)

    values = RAMP.astype(np.int32) - 2048  # -2048..2047, stored as 12-bit two's complement
    stored = (values & 0x0FFF).astype(np.uint16)
    signed = read_dicom(_write_dicom(tmp_path / "s12.dcm", stored, bits_stored=12, signed=True))
    assert signed.meta["bits_stored"] == 12
    np.testing.assert_allclose(signed.array[:, :, 0], (values + 2048) / 4095.0, atol=1e-6)


def test_a_palette_colour_dicom_is_read_in_its_colours_not_as_gray_indices(tmp_path: Path) -> None:
    """PALETTE COLOR pixels are indices into the file's colour tables (ultrasound, secondary captures): the
    image is the tables' colours. They had been windowed as if they were gray levels."""
    indices = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) // 16)  # 0..255, a ramp of indices
    lut = np.arange(256, dtype=np.uint16)
    red, green, blue = lut * 257, (255 - lut) * 257, np.full(256, 128 * 257, dtype=np.uint16)
    attributes = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    attributes.update(RedPaletteColorLookupTableData=red.astype("<u2").tobytes(),
                      GreenPaletteColorLookupTableData=green.astype("<u2").tobytes(),
                      BluePaletteColorLookupTableData=blue.astype("<u2").tobytes())
    path = _write_dicom(tmp_path / "palette.dcm", indices, photometric="PALETTE COLOR", bits_stored=8, **attributes)
    for image in (read_dicom(path), read_image(path)):
        _assert_valid(image, channels=3)
        expected = np.stack([red, green, blue], axis=1)[indices].astype(np.float64) / 65535
        np.testing.assert_allclose(image.array, expected, atol=1e-6)
        assert "applied the palette colour LUT" in image.meta["notes"]
    with pytest.warns(UserWarning, match="colour"):  # a window does not apply to colours
        read_image(path, window=(100.0, 50.0))


def test_a_dicom_that_says_text_is_burned_into_its_pixels_carries_a_note(tmp_path: Path) -> None:
    from pellucid.datasets.readers import BURNED_IN_NOTE

    for value, noted in (("YES", True), ("yes ", True), ("NO", False), (None, False)):
        attributes = {} if value is None else {"BurnedInAnnotation": value}
        path = _write_dicom(tmp_path / f"b{value}.dcm", RAMP, bits_stored=12, **attributes)
        assert (BURNED_IN_NOTE in read_image(path).meta["notes"]) is noted, value


def test_synthetic_multiframe_default_middle(tmp_path: Path) -> None:
    frames = np.zeros((5, 8, 8), dtype=np.uint16)
    for k in range(5):
        frames[k, 0, k] = 1000  # frame k has its bright pixel in column k
    path = _write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12)
    image = read_dicom(path)
    assert image.meta["frame"] == 2 and image.meta["n_frames"] == 5
    assert np.unravel_index(np.argmax(image.array[:, :, 0]), (8, 8)) == (0, 2)
    assert any("middle frame" in note for note in image.meta["notes"])
    last = read_dicom(path, frame=4)
    assert np.unravel_index(np.argmax(last.array[:, :, 0]), (8, 8)) == (0, 4)
    with pytest.raises(ImageReadError, match=r"0\.\.4"):
        read_dicom(path, frame=5)


@pytest.mark.filterwarnings("ignore:.*missing DICOM attributes assumed")
def test_a_large_dicom_is_read_one_frame_at_a_time_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom reads a file's whole pixel data into memory, so a DICOM took as much memory as its size (a 629 MB
    file of 1,200 frames: 679 MB; a 20 GB one would not fit). Past ``_WHOLE_FILE_BYTES`` the header is parsed
    up to the pixel data and only the frame to read is taken from the file: the same image, every sample file
    (native, big-endian, JPEG, multi-frame), and memory that follows the frame, not the file."""
    import tracemalloc

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4096, size=(60, 128, 128), dtype=np.uint16)  # 1.9 MB of pixel data
    multi = _write_dicom(tmp_path / "series.dcm", frames, bits_stored=12)
    files = [multi, *[f for f in DICOM_FILES if "rtstruct" not in f.name]]

    def read_all(whole: bool) -> tuple[list[object], int]:
        monkeypatch.setattr(readers_dicom, "_WHOLE_FILE_BYTES", 256 << 20 if whole else 0, raising=False)
        out: list[object] = []
        for path in files:
            try:
                out.append(read_image(path, frame=7 if path == multi else None).array)
            except ImageReadError as err:  # a sample no installed decoder handles: the same line both ways
                out.append(str(err))
        tracemalloc.start()
        read_image(multi)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out, peak

    (whole, whole_peak), (framed, frame_peak) = read_all(True), read_all(False)
    for a, b in zip(whole, framed):
        assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)
    assert np.array_equal(framed[0], read_image(multi, frame=7).array)
    assert whole_peak > frames.nbytes  # the whole pixel data was in memory
    assert frame_peak < frames.nbytes / 4, (whole_peak, frame_peak)  # one frame of 32 kB, and its float copies
    cut = tmp_path / "cut.dcm"  # the middle frame cut off: one line, as a truncated file is
    cut.write_bytes(multi.read_bytes()[: -frames[0].nbytes * 31])
    with pytest.raises(ImageReadError, match="corrupt or truncated") as err:
        read_image(cut)
    _assert_refusal(err, cut)


def test_a_large_compressed_dicom_with_a_fragment_past_the_budget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read one frame at a time, a compressed file's fragment is read in one piece of the length its item
    declares: a fragment declaring 4 GB is refused in one line instead of being read (up to the file's end)."""
    import struct

    sample = DICOM_DIR / "CT_JPEG70.dcm"
    if not sample.is_file():
        pytest.skip(f"{sample} is absent (../shared/data is not beside the project)")
    if not JPEG_LOSSLESS_DECODABLE:
        pytest.skip("no JPEG Lossless decoder installed: the file is refused before its pixel data is read")
    monkeypatch.setattr(readers_dicom, "_WHOLE_FILE_BYTES", 0, raising=False)
    raw = sample.read_bytes()
    start = raw.find(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12  # the encapsulated pixel data
    assert raw[start:start + 4] == b"\xfe\xff\x00\xe0"  # its offset table item
    fragment = start + 8 + struct.unpack("<I", raw[start + 4:start + 8])[0]
    hostile = tmp_path / "fragment.dcm"
    hostile.write_bytes(raw[:fragment + 4] + struct.pack("<I", 0xF0000000) + raw[fragment + 8:])
    with pytest.raises(ImageReadError, match="a fragment of its compressed pixel data is larger than") as err:
        read_image(hostile)
    _assert_refusal(err, hostile)


def test_synthetic_per_frame_voi(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    per_frame = []
    for center in (1000.0, 3000.0):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 1000.0
        group = Dataset()
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    frames = np.stack([RAMP, RAMP])
    path = _write_dicom(
        tmp_path / "enh.dcm", frames, bits_stored=12, PerFrameFunctionalGroupsSequence=per_frame
    )
    ramp = RAMP.astype(np.float64)
    for index, center in enumerate((1000.0, 3000.0)):
        image = read_dicom(path, frame=index)
        assert image.meta["window"] == (center, 1000.0)
        np.testing.assert_allclose(
            image.array[:, :, 0], _linear_window(ramp, center, 1000), atol=1e-5
        )


def test_synthetic_without_preamble(tmp_path: Path) -> None:
    with_suffix = _write_dicom(tmp_path / "nopre.dcm", RAMP, bits_stored=12, preamble=False)
    assert with_suffix.read_bytes()[:2] == b"\x02\x00"  # starts straight with the meta group
    image = read_image(with_suffix)
    np.testing.assert_allclose(image.array[:, :, 0], RAMP / 4095.0, atol=1e-6)
    no_suffix = tmp_path / "scan_without_suffix"
    no_suffix.write_bytes(with_suffix.read_bytes())
    assert is_dicom(no_suffix)
    np.testing.assert_allclose(read_image(no_suffix).array, image.array)


def test_synthetic_truncated_dicom_refused(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "cut.dcm", RAMP, bits_stored=12)
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(ImageReadError) as err:
        read_dicom(path)
    _assert_refusal(err, path)


def test_synthetic_identifying_tags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    request = Dataset()
    request.RequestingPhysician = "House^Gregory"
    path = _write_dicom(
        tmp_path / "phi.dcm", RAMP, bits_stored=12,
        PatientName="Doe^Jane", PatientID="MRN-0042", PatientBirthDate="19700101",
        InstitutionName="", RequestAttributesSequence=[request],
    )
    with caplog.at_level(logging.DEBUG, logger="pellucid"):
        tags = dicom_identifying_tags(path)
        read_image(path)
    assert tags["PatientName"] == "Doe^Jane"
    assert tags["PatientID"] == "MRN-0042"
    assert tags["PatientBirthDate"] == "19700101"
    assert tags["RequestingPhysician"] == "House^Gregory"  # found inside a sequence
    assert "InstitutionName" not in tags  # empty values are left out
    assert "Doe" not in caplog.text and "MRN-0042" not in caplog.text


def test_identifying_tags_refuses_non_dicom(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(ImageReadError, match="photo.png"):
        dicom_identifying_tags(path)


def test_window_argument_validated(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "w.dcm", RAMP, bits_stored=12)
    with pytest.raises(ValueError, match="width > 0"):
        read_image(path, window=(100, 0))
    with pytest.raises(ValueError, match="center, width"):
        read_image(path, window=(100,))  # type: ignore[arg-type]


def test_text_file_named_dcm_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    _assert_refusal(err, path)


# ------------------------------------------------------------------------------------------
# ordinary images


def _gradient(h: int = 12, w: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w), dtype=np.uint8)


def test_png_gray(tmp_path: Path) -> None:
    pixels = _gradient()
    path = tmp_path / "gray.png"
    PILImage.fromarray(pixels).save(path)
    image = read_image(path)
    _assert_valid(image, 1)
    assert image.meta["format"] == "png" and image.meta["mode"] == "L"
    assert image.meta["original_size"] == (12, 16)
    np.testing.assert_allclose(image.array[:, :, 0], pixels / 255.0, atol=1e-7)
    assert not is_dicom(path)


def test_jpeg_rgb_channel_order(tmp_path: Path) -> None:
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255  # red | green | blue bands
    pixels[:, 8:16, 1] = 255
    pixels[:, 16:, 2] = 255
    path = tmp_path / "bands.jpg"
    PILImage.fromarray(pixels).save(path, quality=95)
    image = read_image(path)
    _assert_valid(image, 3)
    assert image.meta["format"] == "jpeg"
    red, green, blue = (image.array[8, c] for c in (3, 12, 20))
    assert red[0] > 0.9 and red[1] < 0.15 and red[2] < 0.15  # RGB order, not BGR
    assert green[1] > 0.9 and green[0] < 0.15
    assert blue[2] > 0.9 and blue[0] < 0.15


def test_png_16bit_scaled_by_65535(tmp_path: Path) -> None:
    pixels = np.array([[0, 255, 4096], [32768, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    PILImage.fromarray(pixels).save(path)
    image = read_image(path)
    assert image.array.shape == (2, 3, 1)
    np.testing.assert_allclose(image.array[:, :, 0], pixels / 65535.0, atol=1e-7)
    assert image.array.max() == 1.0


def test_png_rgba_composited(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[..., :3] = [200, 100, 50]
    pixels[..., 3] = [[255, 255], [0, 51]]
    path = tmp_path / "rgba.png"
    PILImage.fromarray(pixels, mode="RGBA").save(path)
    image = read_image(path)
    assert image.array.shape == (2, 2, 3)
    colour = np.array([200, 100, 50]) / 255.0
    np.testing.assert_allclose(image.array[0, 0], colour, atol=1e-6)  # opaque: unchanged
    np.testing.assert_allclose(image.array[1, 0], 0.0, atol=1e-6)  # transparent: black
    np.testing.assert_allclose(image.array[1, 1], colour * 0.2, atol=1e-6)
    opaque = tmp_path / "opaque.png"
    pixels[..., 3] = 255
    PILImage.fromarray(pixels, mode="RGBA").save(opaque)
    expected = np.broadcast_to(colour, (2, 2, 3))
    np.testing.assert_allclose(read_image(opaque).array, expected, atol=1e-6)


def test_palette_png(tmp_path: Path) -> None:
    gray = PILImage.fromarray(_gradient()).convert("P")
    gray.putpalette([v for i in range(256) for v in (i, i, i)])
    gray_path = tmp_path / "pal_gray.png"
    gray.save(gray_path)
    assert read_image(gray_path).array.shape == (12, 16, 1)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = [255, 0, 0]
    colour_path = tmp_path / "pal_colour.png"
    palette = PILImage.fromarray(rgb).convert("P", palette=PILImage.Palette.ADAPTIVE, colors=4)
    palette.save(colour_path)
    image = read_image(colour_path)
    assert image.array.shape == (4, 4, 3)
    np.testing.assert_allclose(image.array[0, 0], [1.0, 0.0, 0.0], atol=1e-6)


def test_bmp(tmp_path: Path) -> None:
    pixels = np.stack([_gradient(), _gradient()[::-1], 255 - _gradient()], axis=2)
    path = tmp_path / "img.bmp"
    PILImage.fromarray(pixels).save(path)
    image = read_image(path)
    assert image.meta["format"] == "bmp"
    np.testing.assert_allclose(image.array, pixels / 255.0, atol=1e-7)


def test_tiff_16bit_and_pages(tmp_path: Path) -> None:
    pixels = (np.arange(12 * 16, dtype=np.uint16) * 300).reshape(12, 16)
    path = tmp_path / "deep.tif"
    PILImage.fromarray(pixels).save(path)
    image = read_image(path)
    assert image.meta["format"] == "tiff"
    np.testing.assert_allclose(image.array[:, :, 0], pixels / 65535.0, atol=1e-7)

    pages = [PILImage.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 20, 30)]
    multi = tmp_path / "pages.tiff"
    pages[0].save(multi, save_all=True, append_images=pages[1:])
    first = read_image(multi)
    assert first.meta["n_frames"] == 3 and first.meta["frame"] == 0
    assert first.array[0, 0, 0] == pytest.approx(10 / 255)
    assert read_image(multi, frame=2).array[0, 0, 0] == pytest.approx(30 / 255)
    with pytest.raises(ImageReadError, match=r"0\.\.2"):
        read_image(multi, frame=3)


def _tiff_as_stored(path: Path, pixels: np.ndarray, photometric: int, *, compression: int = 1,
                    samples: int = 1) -> Path:
    """One little-endian gray page holding ``pixels`` exactly as given (Pillow's own writer inverts 8-bit
    WhiteIsZero pages on the way out); ``compression`` and ``samples`` only label the page."""
    import struct

    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    height, width = pixels.shape
    fmt = {"f": 3, "i": 2}.get(pixels.dtype.kind, 1)  # SampleFormat: float, signed, unsigned
    entries = [(256, 4, width), (257, 4, height), (258, 3, pixels.dtype.itemsize * 8), (259, 3, compression),
               (262, 3, photometric), (273, 4, 8 + 2 + 12 * 10 + 4), (277, 3, samples), (278, 4, height),
               (279, 4, len(data)), (339, 3, fmt)]
    ifd = b"".join(struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                   else struct.pack("<I", value)) for tag, kind, value in entries)
    path.write_bytes(b"II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + b"\0\0\0\0" + data)
    return path


def test_a_white_is_zero_tiff_is_bright_where_it_means_bright_at_every_depth(tmp_path: Path) -> None:
    """A TIFF of photometric interpretation 0 (WhiteIsZero, as some X-ray and scanner exports write) stores 0
    as white. Pillow inverts 8-bit pages itself but hands 16-bit and float pages over as stored, so they had
    come out as negatives of the picture."""
    ramp8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1))
    ramp16 = ramp8.astype(np.uint16) * 257
    pictures = {"8bit": ramp8, "16bit": ramp16, "float": ramp8.astype(np.float32) / 255,
                "large16": np.tile(ramp16, (1, 41))}  # 2624 px wide: reduced on read
    for name, pixels in pictures.items():
        white_is_zero = read_image(_tiff_as_stored(tmp_path / f"wiz_{name}.tif", pixels, 0))
        black_is_zero = read_image(_tiff_as_stored(tmp_path / f"biz_{name}.tif", pixels, 1))
        assert white_is_zero.array.shape == black_is_zero.array.shape
        np.testing.assert_allclose(white_is_zero.array, 1.0 - black_is_zero.array, atol=1e-6, err_msg=name)
        assert white_is_zero.array[0, 0, 0] == pytest.approx(1.0, abs=0.01), name  # a stored 0 is white
        assert black_is_zero.array[0, 0, 0] == pytest.approx(0.0, abs=0.01), name


def test_an_unsigned_32_bit_tiff_keeps_the_order_of_its_values(tmp_path: Path) -> None:
    """Pillow reads unsigned 32-bit TIFF pages as signed, so values from 2**31 up came out negative and the
    min-max range scrambled the picture. They are scaled by 2**32 - 1 now, in the file's own order."""
    ramp = np.tile(np.linspace(0, 4e9, 16).astype(np.uint32), (4, 1))
    for name, pixels in {"small": ramp, "large": np.tile(ramp, (1, 170))}.items():  # 2720 px: reduced on read
        image = read_image(_tiff_as_stored(tmp_path / f"u32_{name}.tif", pixels, 1))
        row = image.array[0, : 16 * image.array.shape[1] // pixels.shape[1], 0]  # one period of the ramp
        assert len(row) >= 8 and np.all(np.diff(row) > 0), name
        if name == "small":
            np.testing.assert_allclose(row, ramp[0] / 4294967295.0, atol=1e-6)
    signed = np.tile(np.linspace(-1024, 3000, 16).astype(np.int16), (4, 1))  # a CT's range
    with pytest.warns(UserWarning, match="16-bit signed integer pixels have no fixed range"):
        signed = read_image(_tiff_as_stored(tmp_path / "s16.tif", signed, 1)).meta["notes"]
    assert "16-bit signed values min-max normalised" in signed


def test_a_tiff_of_a_codec_libtiff_lacks_is_one_line_that_names_it_and_nothing_else_is_printed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A TIFF compressed with WebP (libtiff in Pillow's wheels is built without it) had been called corrupt, and
    libtiff printed three lines of its own to the process's stderr, as it did for any damaged compressed page; a
    page Pillow cannot unpack had Pillow log an ERROR line beside the refusal. Each is the readers' one line alone
    now."""
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (4, 1))
    webp = _tiff_as_stored(tmp_path / "scan.tif", ramp, 1, compression=50001)
    samples = _tiff_as_stored(tmp_path / "samples.tif", ramp, 1, samples=65535)
    # raw bytes labelled LZW, Deflate, CCITT G4 and JPEG: libtiff printed a line for each ("Using code not yet in
    # table", "ZIPDecode: Decoding error ...")
    damaged = [_tiff_as_stored(tmp_path / f"damaged{c}.tif", ramp, 1, compression=c) for c in (5, 8, 4, 7)]
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ImageReadError) as err:
            read_image(webp)
        assert "compressed with WebP (compression 50001)" in _assert_refusal(err, webp)
        for path in (samples, *damaged):
            with pytest.raises(ImageReadError) as err:
                read_image(path)
            _assert_refusal(err, path)
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""
    assert not [r for r in caplog.records if r.name.startswith("PIL")]


def test_jpeg_exif_orientation_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # left half white
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    PILImage.fromarray(pixels).save(path, exif=exif, quality=95)
    image = read_image(path)
    assert image.array.shape == (20, 10, 3)
    assert image.meta["original_size"] == (20, 10)
    assert image.array[2, 5].mean() > 0.9 and image.array[17, 5].mean() < 0.1  # white on top
    assert any("EXIF" in note for note in image.meta["notes"])


def test_channels_argument(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    path = tmp_path / "rgb.png"
    PILImage.fromarray(rgb).save(path)
    gray = read_image(path, channels=1)
    assert gray.array.shape == (2, 2, 1)
    assert gray.array[0, 0, 0] == pytest.approx(0.299 + 0.587 * 128 / 255, abs=1e-6)
    gray_path = tmp_path / "g.png"
    PILImage.fromarray(_gradient()).save(gray_path)
    three = read_image(gray_path, channels=3)
    assert three.array.shape == (12, 16, 3)
    np.testing.assert_array_equal(three.array[..., 0], three.array[..., 2])
    with pytest.raises(ValueError, match="channels"):
        read_image(path, channels=2)


def test_window_on_png_warns(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    PILImage.fromarray(_gradient()).save(path)
    with pytest.warns(UserWarning, match="DICOM only") as record:
        read_image(path, window=(40, 400))
    assert record[0].filename == __file__  # attributed to the caller


def test_image_properties() -> None:
    image = Image(np.array([[[1.0, 0.0, 0.0]]], dtype=np.float32), {})
    assert image.rgb.shape == (1, 1, 3)
    assert image.gray.shape == (1, 1, 1) and image.gray.dtype == np.float32
    assert image.gray[0, 0, 0] == pytest.approx(0.299)
    gray = Image(np.full((3, 4), 0.5))
    assert gray.array.shape == (3, 4, 1) and gray.array.dtype == np.float32
    assert gray.rgb.shape == (3, 4, 3) and float(gray.rgb.min()) == 0.5
    with pytest.raises(ValueError, match="shape"):
        Image(np.zeros((3, 4, 4), np.float32))


# ------------------------------------------------------------------------------------------
# refusals


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageReadError, match="not found — check the path") as err:
        read_image(path)
    _assert_refusal(err, path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty") as err:
        read_image(path)
    _assert_refusal(err, path)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    _assert_refusal(err, path)
    assert err.value.__cause__ is not None


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    PILImage.fromarray(np.stack([_gradient(64, 64)] * 3, axis=2)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    _assert_refusal(err, path)
    assert err.value.__cause__ is not None


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    PILImage.fromarray(_gradient()).save(path)
    with pytest.raises(ImageReadError, match="unsupported file type") as err:
        read_image(path)
    _assert_refusal(err, path)


@pytest.mark.parametrize("fmt", ["GIF", "TGA", "PCX", "WEBP", "EPS"])
def test_another_format_under_an_image_name_is_refused_and_not_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Pillow picks its decoder from the content: a GIF, TGA or PostScript file named ``.png`` had been decoded
    as that (PostScript through Ghostscript, where installed). Only PNG, JPEG, TIFF and BMP decoders run now;
    the refusal names what the file holds."""
    from PIL import EpsImagePlugin, ImageFile, features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support to write the file with")
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):  # type: ignore[no-untyped-def]
        loaded.append(str(self.format))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", spy)  # Ghostscript would run here
    path = tmp_path / "scan.png"
    PILImage.fromarray(np.stack([_gradient(40, 40)] * 3, axis=2)).save(path, format=fmt)
    loaded.clear()
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    message = _assert_refusal(err, path)
    assert f"its content is {fmt}, not PNG" in message and "convert it" in message
    assert loaded == []  # no decoder ran on it


def test_a_png_or_jpeg_named_dcm_is_read_by_its_content(tmp_path: Path) -> None:
    """``scan.dcm`` that is really a PNG (or JPEG) image: read as what it holds, as a JPEG named ``.tif`` already was,
    instead of "is not a DICOM file"; a file named .dcm that is neither stays refused."""
    pixels = np.stack([_gradient(24, 32)] * 3, axis=2)
    for fmt, right in (("PNG", "right.png"), ("JPEG", "right.jpg")):
        PILImage.fromarray(pixels).save(tmp_path / right, format=fmt)
        renamed = tmp_path / f"scan_{fmt}.dcm"
        renamed.write_bytes((tmp_path / right).read_bytes())
        image, reference = read_image(renamed), read_image(tmp_path / right)
        _assert_valid(image, channels=3)
        assert np.array_equal(image.array, reference.array)
        assert f"a {fmt} image named .dcm: read as {fmt}" in image.meta["notes"]
    gif = tmp_path / "anim.dcm"
    PILImage.fromarray(_gradient()).save(gif, format="GIF")
    with pytest.raises(ImageReadError, match="is not a DICOM file") as err:
        read_image(gif)
    _assert_refusal(err, gif)


def test_a_flood_of_metadata_chunks_is_refused_before_pillow_parses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow parses every PNG chunk and JPEG segment before the image data at open, and walks every TIFF page
    to count them: a million 4-byte comments took 2-5 s per 4-15 MB. Past ``MAX_HEADER_SEGMENTS`` the file is
    one line; real files (a few dozen) read as before, and a TIFF's pages are counted up to ``MAX_COUNTED_PAGES``."""
    import struct
    import zlib

    from pellucid.datasets.readers import pil as readers_pil

    assert getattr(readers_pil, "MAX_HEADER_SEGMENTS", 10_000) == 10_000
    pixels = np.stack([_gradient(16, 16)] * 3, axis=2)
    PILImage.fromarray(pixels).save(tmp_path / "a.png")
    PILImage.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    png, jpg = (tmp_path / "a.png").read_bytes(), (tmp_path / "a.jpg").read_bytes()
    text = b"tEXt" + b"k\0v"
    chunk = struct.pack(">I", 3) + text + struct.pack(">I", zlib.crc32(text))
    comment = b"\xff\xfe\x00\x02"
    for n, refused in ((50, False), (10_001, True)):
        flooded = {"png": png[:33] + chunk * n + png[33:], "jpg": jpg[:2] + comment * n + jpg[2:]}
        for suffix, data in flooded.items():
            path = tmp_path / f"flood{n}.{suffix}"
            path.write_bytes(data)
            if refused:
                with pytest.raises(ImageReadError, match="more than 10,000 metadata chunks") as err:
                    read_image(path)
                _assert_refusal(err, path)
            else:
                assert np.array_equal(read_image(path).array, read_image(tmp_path / f"a.{suffix}").array)
    pages = [PILImage.fromarray(_gradient(8, 8) // (k + 1)) for k in range(12)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert read_image(tmp_path / "stack.tif").meta["n_frames"] == 12
    monkeypatch.setattr(readers_pil, "MAX_COUNTED_PAGES", 5, raising=False)
    capped = read_image(tmp_path / "stack.tif")
    assert capped.meta["n_frames"] == 5 and "frame 0 of at least 5 (first frame by default)" in capped.meta["notes"]
    assert np.array_equal(capped.array, read_image(tmp_path / "stack.tif", frame=0).array)


def test_a_png_flooded_after_its_pixels_or_in_its_image_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow also reads a PNG's chunks after the image data, at the end of a load (a million text chunks there,
    15 MB: 9.4 s), and each image data chunk in Python (a million 1-byte ones, 13 MB: 2.8 s). Both are counted
    from the chunk headers and refused in one line; a real file reads as before, however its data is split."""
    from pellucid.datasets.readers import pil as readers_pil

    chunk = _png_chunk
    PILImage.fromarray(_gradient(32, 32)).save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    iend = png.rindex(b"IEND") - 4
    text = chunk(b"tEXt", b"k\0v")
    for n, refused in ((50, False), (10_001, True)):
        path = tmp_path / f"after{n}.png"
        path.write_bytes(png[:iend] + text * n + png[iend:])
        if refused:
            with pytest.raises(ImageReadError, match="more than 10,000 metadata chunks") as err:
                read_image(path)
            _assert_refusal(err, path)
        else:
            assert np.array_equal(read_image(path).array, read_image(tmp_path / "a.png").array)
    idat = png.index(b"IDAT") - 4
    data = png[idat + 8:idat + 8 + int.from_bytes(png[idat:idat + 4], "big")]
    head, tail = png[:idat], png[idat + 12 + len(data):]
    monkeypatch.setattr(readers_pil, "MAX_PNG_DATA_CHUNKS", 100, raising=False)
    for size, refused in ((max(1, len(data) // 50), False), (1, True)):
        path = tmp_path / f"split{size}.png"
        path.write_bytes(head + b"".join(chunk(b"IDAT", data[k:k + size]) for k in range(0, len(data), size)) + tail)
        assert len(data) // size > 40
        if refused:
            with pytest.raises(ImageReadError, match="image data in more than 100 chunks") as err:
                read_image(path)
            _assert_refusal(err, path)
        else:
            assert np.array_equal(read_image(path).array, read_image(tmp_path / "a.png").array)


def test_a_tiff_of_more_strips_than_a_real_one_is_refused_before_pillow_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow makes a Python object of every strip or tile when it opens a TIFF page and decodes each in Python:
    a 40 MB file of 5,000,000 one-byte strips took 21 s and 1.7 GB to open, 80 s to read. The strips are counted
    from the directory entries first (``MAX_TIFF_PIECES``, lowered here); a real TIFF, BigTIFF or stack reads."""
    import struct

    from pellucid.datasets.readers import pil as readers_pil

    def strips(n: int) -> bytes:  # a 1 x n picture, one 1-byte strip a row, every strip the same byte
        offsets = 8 + 2 + 12 * 9 + 4  # after the header, the directory of 9 entries and its next-directory link
        entries = [(256, 4, 1, 1), (257, 4, 1, n), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
                   (273, 4, n, offsets), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, n, offsets + 4 * n)]
        out = b"II*\0" + struct.pack("<IH", 8, len(entries))
        out += b"".join(struct.pack("<HHI", t, k, c) + (struct.pack("<HH", v, 0) if k == 3 else struct.pack("<I", v))
                        for t, k, c, v in entries)
        pixel = offsets + 8 * n
        return out + struct.pack("<I", 0) + struct.pack("<I", pixel) * n + struct.pack("<I", 1) * n + b"\x80"

    monkeypatch.setattr(readers_pil, "MAX_TIFF_PIECES", 1_000, raising=False)
    small, flood = tmp_path / "strips.tif", tmp_path / "flood.tif"
    small.write_bytes(strips(500))
    flood.write_bytes(strips(1_001))
    image = read_image(small)
    assert image.array.shape == (500, 1, 1) and np.allclose(image.array, 128 / 255)
    with pytest.raises(ImageReadError, match="more than 1,000 TIFF strips or tiles") as err:
        read_image(flood)
    _assert_refusal(err, flood)
    pages = [PILImage.fromarray(_gradient(64, 64) // (k + 1)) for k in range(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:], tiffinfo={278: 1})  # 64 strips a page
    assert read_image(tmp_path / "stack.tif", frame=2).array.shape == (64, 64, 1)
    monkeypatch.setattr(readers_pil, "MAX_TIFF_PIECES", 100, raising=False)  # a stack is counted over its pages
    tall = [PILImage.fromarray(_gradient(80, 8) // (k + 1)) for k in range(14)]  # 80 one-row strips a page
    tall[0].save(tmp_path / "tall.tif", save_all=True, append_images=tall[1:12], tiffinfo={278: 1})
    assert read_image(tmp_path / "tall.tif", frame=11).array.shape == (80, 8, 1)  # 960 strips in all: read
    tall[0].save(tmp_path / "taller.tif", save_all=True, append_images=tall[1:], tiffinfo={278: 1})
    with pytest.raises(ImageReadError, match="more than 1,000 TIFF strips or tiles over its first 13 pages"):
        read_image(tmp_path / "taller.tif")  # 1,120 in all
    monkeypatch.setattr(readers_pil, "MAX_TIFF_PIECES", 1_000, raising=False)
    pages[0].save(tmp_path / "big.tif", big_tiff=True)
    assert np.array_equal(read_image(tmp_path / "big.tif").array, read_image(tmp_path / "stack.tif").array)


def test_a_jpeg_of_more_scans_than_any_camera_writes_is_refused_before_decoding(tmp_path: Path) -> None:
    """libjpeg decodes each scan of a progressive JPEG over the whole image, so one scan repeated makes a file
    that costs seconds per few thousand scans (20,000 scans of a 2000-px picture: 8.9 s). Past ``MAX_JPEG_SCANS``
    the file is one line; a progressive file of the usual ten scans, or a few dozen, reads as before."""
    from pellucid.datasets.readers import pil as readers_pil

    rng = np.random.default_rng(0)
    PILImage.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "p.jpg", progressive=True)
    data = (tmp_path / "p.jpg").read_bytes()
    scans = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"]
    assert 5 <= len(scans) <= 12
    last = data[scans[-1]:-2]  # the last scan, up to the end-of-image marker
    limit = getattr(readers_pil, "MAX_JPEG_SCANS", 200)
    for extra, refused in ((40, False), (limit + 1 - len(scans), True)):
        path = tmp_path / f"scans{extra}.jpg"
        path.write_bytes(data[:-2] + last * extra + data[-2:])
        if refused:
            with pytest.raises(ImageReadError, match=f"JPEG of more than {limit:,} scans") as err:
                read_image(path)
            _assert_refusal(err, path)
        else:
            _assert_valid(read_image(path))
    # The same in a DICOM frame, where pydicom's pylibjpeg takes about 70 ms a scan of a 2000-px frame.
    pytest.importorskip("pydicom")
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from pellucid.datasets.readers import limits

    frame_limit = getattr(limits, "MAX_FRAME_SCANS", 32)
    ds = dcmread(_write_dicom(tmp_path / "plain.dcm", RAMP[:32, :32], bits_stored=12))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    for extra, refused in ((0, False), (frame_limit + 1 - len(scans), True)):
        ds.PixelData = encapsulate([data[:-2] + last * extra + data[-2:]])
        ds["PixelData"].VR = "OB"
        path = tmp_path / f"scans{extra}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if refused:
            with pytest.raises(ImageReadError, match=f"more than {frame_limit} JPEG scans") as err:
                read_image(path)
            _assert_refusal(err, path)
        else:
            _assert_valid(read_image(path))


def test_a_large_run_length_bmp_is_refused_before_pillow_decodes_it_in_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow decodes BMP runs in Python: one-pixel runs cost 0.7 s a megabyte (8 MB, 2000 x 2000: 5.4 s; an
    80 MB file at the pixel limit about a minute). Past ``MAX_RLE_BYTES`` of coded data the file is one line;
    a smaller one reads, to the pixels its runs say."""
    import struct

    from pellucid.datasets.readers import pil as readers_pil

    def rle8(side: int) -> bytes:  # every pixel its own run of one, grey level = column
        row = b"".join(bytes((1, x % 256)) for x in range(side)) + b"\0\0"
        body = row * side + b"\0\1"
        palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
        offset = 14 + 40 + len(palette)
        dib = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(body), 2835, 2835, 256, 0)
        return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + dib + palette + body

    path = tmp_path / "runs.bmp"
    path.write_bytes(rle8(48))
    image = read_image(path)
    assert np.allclose(image.array[0, :, 0] * 255, np.arange(48))
    monkeypatch.setattr(readers_pil, "MAX_RLE_BYTES", 1 << 10, raising=False)
    with pytest.raises(ImageReadError, match="run-length coded BMP of more than") as err:
        read_image(path)
    _assert_refusal(err, path)
    PILImage.fromarray(_gradient(48, 48)).save(tmp_path / "plain.bmp")  # an uncompressed BMP: no limit
    _assert_valid(read_image(tmp_path / "plain.bmp"))


@pytest.mark.parametrize("name", ["scans.zip", "Study.TAR.GZ", "cases.7z"])
def test_an_archive_is_refused_with_what_to_do(tmp_path: Path, name: str) -> None:
    """A zip (or tar, 7z) given in place of its images: one line that says to unpack it, not "convert it to .png"."""
    import zipfile

    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:  # the bytes do not matter: the name says archive
        zf.writestr("a.png", b"1")
    with pytest.raises(ImageReadError, match="is an archive") as err:
        read_image(path)
    _assert_refusal(err, path)
    assert "unpack it and give the folder" in str(err.value) and "convert it" not in str(err.value)


def test_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)


def test_is_dicom_negatives(tmp_path: Path) -> None:
    text = tmp_path / "readme"
    text.write_text("plain text, no DICOM here\n")
    assert not is_dicom(text)
    assert not is_dicom(tmp_path / "missing")
    assert is_dicom(tmp_path / "anything.DCM")  # by suffix alone


# ------------------------------------------------------------------------------------------
# real chest X-ray sample


@pytest.mark.skipif(not CXR_DIR.is_dir(), reason=f"sample chest X-rays not found at {CXR_DIR}")
def test_real_cxr_png() -> None:
    path = sorted(CXR_DIR.iterdir())[0]
    image = read_image(path)
    _assert_valid(image)
    assert image.meta["format"] == "png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = read_image(path, channels=1)
    assert gray.array.shape == image.array.shape[:2] + (1,)
    assert 0.05 < float(gray.array.mean()) < 0.95


def test_jfif_photo_is_read() -> None:
    """JFIF-suffixed JPEGs (most of the mpox sample photos) are images, not unknown files."""
    folder = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mpox" / "normal"
    files = sorted(folder.glob("*.jfif")) if folder.exists() else []
    if not files:
        pytest.skip(f"no .jfif sample photos at {folder}")
    image = read_image(files[0])
    assert image.array.ndim == 3 and image.array.shape[2] == 3 and image.array.dtype == np.float32


# ------------------------------------------------------------------------------------------
# pixel budget: refused from the header, large legal images reduced on read

def _png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb."""
    import struct
    import zlib

    buf = __import__("io").BytesIO()
    PILImage.new("L", (8, 8)).save(buf, format="PNG")
    data = buf.getvalue()
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    path.write_bytes(data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:])
    return path


@pytest.mark.parametrize("size", [(13000, 13000), (100000, 1000), (10000, 10000)])
def test_png_over_pixel_limit_refused_from_header(tmp_path: Path, size: tuple[int, int]) -> None:
    path = _png_with_size(tmp_path / "bomb.png", *size)
    with pytest.raises(ImageReadError, match="too large to decode") as err:
        read_image(path)
    _assert_refusal(err, path)
    assert "PELLUCID_MAX_PIXELS" in str(err.value)


def test_jpeg_over_pixel_limit_refused_from_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.jpg"
    PILImage.new("L", (16, 16)).save(path, quality=50)
    data = bytearray(path.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (12000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="too large to decode") as err:
        read_image(path)
    _assert_refusal(err, path)


def test_pixel_limit_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image as PILModule

    path = tmp_path / "small.png"
    PILImage.fromarray(_gradient(40, 40)).save(path)
    monkeypatch.setenv("PELLUCID_MAX_PIXELS", "1000")
    with pytest.raises(ImageReadError, match="pixel limit of 1000") as err:
        read_image(path)
    _assert_refusal(err, path)
    assert PILModule.MAX_IMAGE_PIXELS == 1000  # Pillow's own check kept in step
    dcm = _write_dicom(tmp_path / "small.dcm", RAMP)
    with pytest.raises(ImageReadError, match="too large to decode"):
        read_image(dcm)
    monkeypatch.setenv("PELLUCID_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="PELLUCID_MAX_PIXELS"):
        read_image(path)
    monkeypatch.delenv("PELLUCID_MAX_PIXELS")
    assert read_image(path).array.shape == (40, 40, 1)


def test_large_legal_images_downscaled_on_read(tmp_path: Path) -> None:
    from pellucid.datasets.readers.limits import MAX_SIDE

    gray = np.tile(np.arange(256, dtype=np.uint8), (3000, 20))[:, :5000]  # 5000 x 3000
    png = tmp_path / "wide.png"
    PILImage.fromarray(gray).save(png)
    image = read_image(png)
    assert max(image.array.shape[:2]) <= MAX_SIDE and image.array.shape[2] == 1
    assert image.meta["original_size"] == (3000, 5000)
    assert "downscaled from 5000×3000 to 1667×1000 on read" in image.meta["notes"]
    jpg = tmp_path / "wide.jpg"
    PILImage.fromarray(np.stack([gray] * 3, axis=2)).save(jpg, quality=80)
    image = read_image(jpg)
    assert max(image.array.shape[:2]) <= MAX_SIDE and image.array.shape[2] == 3
    assert any(n.startswith("downscaled from 5000×3000 to ") for n in image.meta["notes"])
    tif = tmp_path / "wide16.tif"
    PILImage.fromarray(gray.astype(np.uint16) * 257).save(tif)
    image = read_image(tif)
    assert image.array.shape == (1000, 1667, 1)
    np.testing.assert_allclose(image.array[:, :85, 0].mean(axis=0), gray[:, :255].reshape(-1)[: 85 * 3].reshape(85, 3).mean(axis=1)[:85] / 255, atol=0.01)
    big = np.tile(RAMP, (40, 50))  # 2560 x 3200
    dcm = _write_dicom(tmp_path / "big.dcm", big, bits_stored=12)
    image = read_image(dcm)
    assert image.array.shape == (1280, 1600, 1) and image.meta["original_size"] == (2560, 3200)
    assert "downscaled from 3200×2560 to 1600×1280 on read" in image.meta["notes"]
    _assert_valid(image)


def test_deflated_dicom_bomb_refused_before_inflating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pydicom")
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pellucid.datasets.readers.limits import max_inflated_bytes

    plain = _write_dicom(tmp_path / "plain.dcm", RAMP, bits_stored=12)
    small = tmp_path / "deflated.dcm"
    from pydicom import dcmread

    ds = dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(small, enforce_file_format=True)
    np.testing.assert_allclose(read_image(small).array, read_image(plain).array)
    # A header inflating past the budget: the meta and dataset of ``small``, then one element of zeros past it.
    monkeypatch.setenv("PELLUCID_MAX_PIXELS", "1000")
    budget = max_inflated_bytes()
    raw = small.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    large = budget + (8 << 20)
    element = b"\x11\x00\x10\x10OB\0\0" + large.to_bytes(4, "little")  # a private OB value of zeros
    body = (comp.compress(zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)) + comp.compress(element)
            + comp.compress(bytes(large)) + comp.flush())
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(raw[:meta_end] + body)
    assert bomb.stat().st_size < budget // 100
    for reader in (read_image, dicom_identifying_tags):
        with pytest.raises(ImageReadError, match="inflates to more than") as err:
            reader(bomb)
        _assert_refusal(err, bomb)
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(raw[:meta_end] + b"\xff" * 64)
    with pytest.raises(ImageReadError, match="deflated dataset is corrupt"):
        read_image(corrupt)


def test_a_dicom_named_file_of_zeros_is_refused_without_parsing_it_element_by_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of zeros (``truncate -s 1G scan.dcm``; a copy that never finished) parsed as one empty element per
    8 bytes: 14-35 s for 20 MB, half an hour for 1 GB. A dataset that starts with zeros is refused at once, and
    pydicom's reads of any one file are bounded (``MAX_HEADER_READS``), here lowered to keep the test quick."""
    pytest.importorskip("pydicom")
    from pellucid.datasets.readers import detect

    zeros = 2 << 20
    sparse = tmp_path / "scan.dcm"
    with sparse.open("wb") as fh:
        fh.truncate(zeros)
    with pytest.raises(ImageReadError, match="no header where its tags should be"):
        read_image(sparse)
    reads: list[int] = []
    real_read = detect._CountedReads.read

    def counting(self, size=-1):  # type: ignore[no-untyped-def]
        reads.append(1)
        return real_read(self, size)

    monkeypatch.setattr(detect._CountedReads, "read", counting)
    monkeypatch.setattr(detect, "MAX_HEADER_READS", 20_000)
    preamble = tmp_path / "preamble.dcm"
    preamble.write_bytes(bytes(128) + b"DICM" + bytes(zeros))
    tagged = tmp_path / "tagged.dcm"  # a first tag, then zeros: parsed until the bound
    tagged.write_bytes(b"\x08\x00\x16\x00" + bytes(zeros))
    for path in (sparse, preamble, tagged):
        for reader in (read_image, dicom_identifying_tags):
            reads.clear()
            with pytest.raises(ImageReadError, match="no header where its tags should be") as err:
                reader(path)
            _assert_refusal(err, path)
            assert len(reads) <= 20_000 + 10_000  # the dataset's bound and the meta group's
    headless = tmp_path / "IM000001"  # the same, without a suffix: sniffed as not DICOM
    headless.write_bytes(tagged.read_bytes())
    reads.clear()
    assert not is_dicom(headless) and len(reads) <= 20_000 + 10_000
    real = _write_dicom(tmp_path / "real.dcm", RAMP, bits_stored=12)  # a real header is far below the bound
    reads.clear()
    _assert_valid(read_image(real), channels=1)
    assert 0 < len(reads) < 200
    monkeypatch.setattr(detect, "MAX_HEADER_READS", 1_000_000)  # zeros after a real tag: stopped by their run
    reads.clear()
    with pytest.raises(ImageReadError, match="no header where its tags should be"):
        read_image(tagged)
    assert len(reads) <= 2 * (10_000 + 1) + 100  # the meta check's and the dataset's runs of zeros


def _deflated(tmp_path: Path, name: str, body: bytes, tail: bytes = b"") -> Path:
    """A Deflated Explicit VR Little Endian file: the file meta of a real one, then ``body`` deflated (and ``tail``)."""
    import zlib

    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(_write_dicom(tmp_path / f"{name}-plain.dcm", RAMP, bits_stored=12))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / f"{name}-meta.dcm", enforce_file_format=True)
    raw = (tmp_path / f"{name}-meta.dcm").read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path = tmp_path / name
    path.write_bytes(raw[:meta_end] + comp.compress(body) + comp.flush() + tail)
    return path


def test_a_deflated_dicom_with_a_byte_after_its_stream_is_read_not_looped_over(tmp_path: Path) -> None:
    """The inflation guard looped for good on a deflated dataset of more than 1 MiB with any byte after the end
    of its deflate stream (pydicom pads an odd length so: a multi-frame MR re-saved deflated hung every door)."""
    pytest.importorskip("pydicom")
    import signal

    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    frames = np.stack([np.roll(np.tile(RAMP, (4, 4)), k, axis=1) for k in range(20)])  # 20 x 256 x 256, 2.6 MB
    plain = _write_dicom(tmp_path / "plain.dcm", frames[0], bits_stored=12)
    ds = dcmread(plain)
    ds.NumberOfFrames, ds.PixelData = len(frames), frames.astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    padded = tmp_path / "padded.dcm"
    padded.write_bytes((tmp_path / "deflated.dcm").read_bytes() + b"\0")

    def stuck(*_):  # type: ignore[no-untyped-def]
        raise TimeoutError("the inflation guard did not end")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)
    try:
        for path in (tmp_path / "deflated.dcm", padded):
            image = read_image(path)
            _assert_valid(image, channels=1)
            assert image.meta["n_frames"] == 20
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_deflated_dataset_of_zeros_or_a_flood_of_elements_is_refused_before_pydicom_parses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydicom parses a deflated dataset from its own inflated buffer, out of reach of the read bound: one tag and
    150 MB of zeros (a 150 KB file) had taken a minute to refuse. The guard that inflates it first walks its
    elements: a run of empty elements, or more elements than a header has, is refused before pydicom runs."""
    pytest.importorskip("pydicom")
    import pydicom

    from pellucid.datasets.readers import detect

    tag = b"\x08\x00\x16\x00UI\x04\x001.2\0"  # SOP Class UID, then nothing but zeros
    zeros = _deflated(tmp_path, "zeros.dcm", tag + bytes(8 << 20))
    assert zeros.stat().st_size < 20_000
    flood = _deflated(tmp_path, "flood.dcm", tag + b"\x08\x00\x00\x00UL\x00\x00" * 30_000)
    parsed: list[str] = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parsed.append("dcmread") or real(*a, **k))
    monkeypatch.setattr(detect, "MAX_HEADER_READS", 20_000)
    for path in (zeros, flood):
        for reader in (read_image, dicom_identifying_tags):
            with pytest.raises(ImageReadError, match="no header where its tags should be") as err:
                reader(path)
            _assert_refusal(err, path)
    assert parsed == []  # refused by the guard, before any parse
    # A real deflated image walks to its end, whatever the chunks it is inflated in, and reads as before.
    body = _inflated(_deflated_from(tmp_path))
    whole, pieces = detect._ElementWalk(), detect._ElementWalk()
    whole.feed(body)
    for i in range(0, len(body), 7):
        pieces.feed(body[i:i + 7])
    assert whole.elements == pieces.elements > 10 and not whole.lost and not pieces.lost and not whole.too_long


def _inflated(path: Path) -> bytes:
    import zlib

    raw = path.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)


def _deflated_from(tmp_path: Path) -> Path:
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(_write_dicom(tmp_path / "walk-plain.dcm", RAMP, bits_stored=12))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "walk.dcm", enforce_file_format=True)
    np.testing.assert_allclose(read_image(tmp_path / "walk.dcm").array, read_image(tmp_path / "walk-plain.dcm").array)
    return tmp_path / "walk.dcm"


def test_rle_dicom_frames_are_decoded_in_compiled_code_to_the_same_pixels(tmp_path: Path) -> None:
    """pydicom decodes RLE Lossless in Python when nothing else is installed: a hand-made 4-megapixel frame of
    one-byte runs took 3.2 s, about two minutes at the pixel limit. The ``dicom`` extra installs pylibjpeg-rle,
    which pydicom prefers (0.07 s for that frame); every sample image re-saved as RLE reads to its own pixels."""
    pytest.importorskip("pydicom")
    import warnings

    from pydicom import dcmread
    from pydicom.pixels import get_decoder
    from pydicom.uid import RLELossless

    plugins = get_decoder(RLELossless).available_plugins
    assert "pylibjpeg" in plugins, f"pylibjpeg-rle is not installed (RLE plugins: {plugins}): pip install -e '.[dicom]'"
    n = 0
    if not DICOM_DIR.is_dir():
        pytest.skip(f"{DICOM_DIR} is absent (../shared/data is not beside the project)")
    for source in sorted(DICOM_DIR.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = dcmread(source)
                if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
                    continue
                ds.compress(RLELossless)
                path = tmp_path / source.name
                ds.save_as(path)
            except Exception:  # noqa: BLE001 - a sample pydicom cannot re-encode (no image, big endian)
                continue
        try:
            expected = read_image(source)
        except ImageReadError:
            continue
        got = read_image(path)
        assert "decoded RLE Lossless" in got.meta["notes"]
        np.testing.assert_array_equal(got.array, expected.array)
        n += 1
    assert n >= 3


def test_compressed_frame_larger_than_header_refused(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    import io

    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    plain = _write_dicom(tmp_path / "plain.dcm", RAMP[:16, :16], bits_stored=12)
    ds = dcmread(plain)
    buf = io.BytesIO()
    PILImage.new("L", (64, 64)).save(buf, format="JPEG")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path = tmp_path / "lying.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="compressed frame is 64×64×1") as err:
        read_image(path)
    _assert_refusal(err, path)


def _splice_value(raw: bytes, keyword: str, value: bytes) -> bytes:
    """Replace one element's value in an Explicit VR Little Endian file, bytes as given."""
    import struct

    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    pos = raw.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 0 if tag >> 16 == 2 else 132)
    assert pos > 0, keyword
    value += b" " * (len(value) % 2)
    if raw[pos + 4 : pos + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL"):
        (old,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
        return raw[: pos + 8] + struct.pack("<I", len(value)) + value + raw[pos + 12 + old :]
    (old,) = struct.unpack("<H", raw[pos + 6 : pos + 8])
    return raw[: pos + 6] + struct.pack("<H", len(value)) + value + raw[pos + 8 + old :]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("RescaleSlope", "nan"), ("RescaleSlope", "inf"), ("RescaleSlope", "1\\2"),
     ("RescaleIntercept", "-inf"), ("RescaleSlope", "abc"), ("RescaleSlope", "1e300")],
)
def test_bad_rescale_refused_not_nan(tmp_path: Path, keyword: str, value: str) -> None:
    path = _write_dicom(tmp_path / "r.dcm", RAMP, bits_stored=12, RescaleSlope="1", RescaleIntercept="0")
    path.write_bytes(_splice_value(path.read_bytes(), keyword, value.encode()))
    with pytest.raises(ImageReadError, match=keyword) as err:
        read_image(path)
    assert value not in str(err.value).split("±")[0].replace(path.name, "")
    _assert_refusal(err, path)


# ------------------------------------------------------------------------------------------
# no patient data in messages

PLANTED = ("DOE^JANE", "SECRET123", "ST ELSEWHERE HOSPITAL")


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [v for v in PLANTED if v.lower() in low or v.replace("^", " ").lower() in low]


def _phi_variants(tmp_path: Path) -> list[Path]:
    """DICOMs with planted identifiers, corrupted in many ways (each named without them)."""
    base = _write_dicom(
        tmp_path / "base.dcm", RAMP, bits_stored=12, PatientName="DOE^JANE", PatientID="SECRET123",
        InstitutionName="ST ELSEWHERE HOSPITAL", RescaleSlope="1", RescaleIntercept="0",
        WindowCenter="2000", WindowWidth="4000", BodyPartExamined="CHEST", NumberOfFrames="1",
        SpecificCharacterSet="ISO_IR 100", VOILUTFunction="LINEAR", LossyImageCompression="00",
    )
    raw = base.read_bytes()
    out: list[Path] = []

    def variant(data: bytes) -> None:
        path = tmp_path / f"v{len(out):03d}.dcm"
        path.write_bytes(data)
        out.append(path)

    no_pixels = raw[: raw.find(b"\xe0\x7f\x10\x00", 132)]
    names = [b"DOE^JANE", b"SECRET123", b"ST ELSEWHERE HOSPITAL", b"DOE JANE"]
    for name in names:
        for keyword in ("Modality", "SOPClassUID", "PhotometricInterpretation"):
            variant(_splice_value(no_pixels, keyword, name))
        for keyword in ("Modality", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                        "PhotometricInterpretation", "SOPClassUID", "BodyPartExamined", "Rows",
                        "BitsStored", "NumberOfFrames", "SpecificCharacterSet", "VOILUTFunction",
                        "LossyImageCompression", "SamplesPerPixel", "PixelRepresentation",
                        "TransferSyntaxUID", "MediaStorageSOPClassUID"):
            variant(_splice_value(raw, keyword, name))
    variant(no_pixels)
    for value in (b"1\\2", b"nan", b"inf", b"abc", b""):
        variant(_splice_value(raw, "RescaleSlope", value))
    # byte-level: truncations, a wrong VR on the identifying elements, name bytes spliced in
    for i, cut in enumerate((200, 300, 400, 600, len(raw) // 2, len(raw) - 10)):
        path = tmp_path / f"cut{i}.dcm"
        path.write_bytes(raw[:cut])
        out.append(path)
    for target in (b"DOE^JANE", b"SECRET123", b"ST ELSEWHERE HOSPITAL"):
        at = raw.find(target)
        assert at > 0
        for vr in (b"ZZ", b"US", b"SQ", b"\x00\x00", b"OB"):
            path = tmp_path / f"vr{len(out):03d}.dcm"
            path.write_bytes(raw[: at - 4] + vr + raw[at - 2 :])
            out.append(path)
    for offset in range(140, len(raw) - 8192, 97):
        path = tmp_path / f"splice{offset}.dcm"
        path.write_bytes(raw[:offset] + b"DOE^JANE" + raw[offset + 8 :])
        out.append(path)
        if len(out) > 400:
            break
    return out


def test_no_planted_identifier_in_any_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pellucid.core.privacy import SAFE_META

    variants = _phi_variants(tmp_path)
    refused = 0
    for path in variants:
        texts: list[str] = []
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
            warnings.simplefilter("always")
            for reader in (read_image, dicom_identifying_tags):
                try:
                    result = reader(path)
                except ImageReadError as err:
                    texts.append(str(err))
                    refused += reader is read_image
                else:
                    if reader is read_image:
                        texts.append(repr({k: result.meta.get(k) for k in SAFE_META}))
        texts += [str(w.message) for w in caught] + [caplog.text]
        caplog.clear()
        for text in texts:
            assert not _leaks(text), (path.name, text)
    assert len(variants) > 100 and refused > 50


@pytest.mark.timeout(30)
def test_pipes_and_devices_are_refused_without_being_opened(tmp_path: Path) -> None:
    """A named pipe blocks whoever opens it and /dev/zero never ends: both are refused from their stat,
    by every reader and by the DICOM sniffer, in one line."""
    import os

    if not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"):
        pytest.skip("needs named pipes and /dev/zero")
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "headless")  # no suffix: the sniffer would open it to look for a DICOM header
    (tmp_path / "zero.dcm").symlink_to("/dev/zero")
    assert not is_dicom(tmp_path / "headless")
    for name in ("pipe.png", "headless", "zero.dcm"):
        with pytest.raises(ImageReadError, match="is not a regular file") as err:
            read_image(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(ImageReadError, match="is not a regular file"):
        read_dicom(tmp_path / "zero.dcm")
    with pytest.raises(ImageReadError, match="is not a regular file"):
        dicom_identifying_tags(tmp_path / "zero.dcm")


_SRGB_RED, _SRGB_GREEN, _SRGB_BLUE = SRGB_PRIMARIES

@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_an_image_with_an_icc_profile_is_read_in_the_colours_the_profile_gives_it(tmp_path: Path, suffix: str) -> None:
    """A wide-gamut photo (a phone's Display P3, a camera's Adobe RGB) stores numbers that mean other colours than
    sRGB's: read as sRGB they came out dull and tinted. Here a profile whose red primary is sRGB's green makes the
    stored (200, 40, 40) a green: the reader must say green."""
    from pellucid.datasets.readers.colour import CONVERTED_NOTE

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[...] = (200, 40, 40)
    path = tmp_path / f"wide{suffix}"
    PILImage.fromarray(pixels).save(path, icc_profile=rgb_icc_profile(_SRGB_GREEN, _SRGB_RED, _SRGB_BLUE))
    image = read_image(path)
    _assert_valid(image, channels=3)
    red, green, _ = image.array[8, 8]
    assert green > red + 0.3, image.array[8, 8]
    assert CONVERTED_NOTE in image.meta["notes"]

    plain = tmp_path / f"plain{suffix}"  # the same profile with sRGB's own primaries changes (almost) nothing
    PILImage.fromarray(pixels).save(plain, icc_profile=rgb_icc_profile(_SRGB_RED, _SRGB_GREEN, _SRGB_BLUE))
    untagged = tmp_path / f"untagged{suffix}"
    PILImage.fromarray(pixels).save(untagged)
    np.testing.assert_allclose(read_image(plain).array, read_image(untagged).array, atol=0.06)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_a_cmyk_image_is_read_through_its_press_profile(tmp_path: Path, suffix: str) -> None:
    """A CMYK JPEG or TIFF from a print workflow carries its press profile; Pillow's plain formula ignores it. In
    the profile built here cyan ink alone prints red: the reader must say red, where the formula says cyan. An RGB
    profile on a CMYK image is passed over with a note, and the formula is used as before."""
    from pellucid.datasets.readers.colour import CONVERTED_NOTE

    ink = PILImage.new("CMYK", (8, 8), (255, 0, 0, 0))
    path = tmp_path / f"press{suffix}"
    ink.save(path, icc_profile=cmyk_icc_profile())
    image = read_image(path)
    red, green, blue = image.array[4, 4]
    assert red > 0.9 and green < 0.1 and blue < 0.1, image.array[4, 4]
    assert CONVERTED_NOTE in image.meta["notes"]

    wrong = tmp_path / f"wrong{suffix}"
    ink.save(wrong, icc_profile=rgb_icc_profile(_SRGB_GREEN, _SRGB_RED, _SRGB_BLUE))
    image = read_image(wrong)
    np.testing.assert_allclose(image.array[4, 4], (0.0, 1.0, 1.0), atol=0.02)  # the plain formula: cyan
    assert "ignored an embedded ICC profile for RGB colours on a CMYK image" in image.meta["notes"]


def test_an_icc_profile_that_cannot_be_used_keeps_the_stored_colours_with_a_note(tmp_path: Path) -> None:
    from PIL import ImageCms

    from pellucid.datasets.readers.colour import UNREADABLE_NOTE

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[...] = (200, 40, 40)
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    broken = rgb_icc_profile(_SRGB_GREEN, _SRGB_RED, _SRGB_BLUE)[:200]  # cut inside its tag table
    cases = (("garbage", b"Jane Doe 1970-01-01 " * 40, UNREADABLE_NOTE), ("cut", broken, UNREADABLE_NOTE),
             ("lab", lab, "ignored an embedded ICC profile for Lab colours on an RGB image"), ("srgb", srgb, None))
    for name, icc, note in cases:
        path = tmp_path / f"{name}.png"
        PILImage.fromarray(pixels).save(path, icc_profile=icc)
        image = read_image(path)
        np.testing.assert_allclose(image.array[0, 0], np.array([200, 40, 40]) / 255.0, atol=1e-6)
        icc_notes = [n for n in image.meta["notes"] if "ICC" in n]
        assert icc_notes == ([note] if note else []), name
        assert "Jane" not in " ".join(image.meta["notes"])


def test_an_rgba_image_keeps_its_alpha_through_the_profile(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[...] = (200, 40, 40, 255)
    pixels[0, 0, 3] = 0  # one transparent pixel: composited over black
    path = tmp_path / "rgba.png"
    PILImage.fromarray(pixels, mode="RGBA").save(path, icc_profile=rgb_icc_profile(_SRGB_GREEN, _SRGB_RED, _SRGB_BLUE))
    image = read_image(path)
    assert image.array[1, 1, 1] > image.array[1, 1, 0] + 0.3
    np.testing.assert_allclose(image.array[0, 0], 0.0, atol=1e-6)


def test_a_colour_dicom_with_an_icc_profile_is_read_in_its_colours(tmp_path: Path) -> None:
    """Colour DICOM (dermoscopy, endoscopy, slide microscopy) carries its camera's profile in ICC Profile
    (0028,2000), or in the Optical Path Sequence: the same conversion as for a photo."""
    Dataset = pytest.importorskip("pydicom.dataset").Dataset

    from pellucid.datasets.readers.colour import CONVERTED_NOTE

    icc = rgb_icc_profile(_SRGB_GREEN, _SRGB_RED, _SRGB_BLUE)
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[...] = (200, 40, 40)
    item = Dataset()
    item.ICCProfile = icc
    for where, attributes in (("top", {"ICCProfile": icc}), ("optical path", {"OpticalPathSequence": [item]}),
                              ("none", {})):
        path = _write_dicom(tmp_path / f"{where}.dcm", pixels, bits_stored=8, rgb=True, **attributes)
        image = read_image(path)
        red, green, _ = image.array[4, 4]
        if where == "none":
            assert red > green and CONVERTED_NOTE not in image.meta["notes"]
        else:
            assert green > red + 0.3, (where, image.array[4, 4])
            assert CONVERTED_NOTE in image.meta["notes"]


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_a_jpeg_frame_that_does_not_state_its_height_is_refused_before_it_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A JPEG or JPEG-LS frame may leave its height (0 in its start-of-frame header) to a DNL marker later on. Found
    by mutating pydicom's compressed test files: with one byte so changed, pylibjpeg-libjpeg grew to 21 GB in 95 s
    on a 2.9 KB frame, until the system killed the process, whatever door it came in by. Such a frame is refused
    from its header; the decoder is never reached (here it would fail the test instead of taking the memory)."""
    pydicom = pytest.importorskip("pydicom")
    import pydicom.data
    from pydicom.encaps import encapsulate, generate_frames

    source = pydicom.data.get_testdata_file(name)
    if source is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    ds = pydicom.dcmread(source)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = max(frame.find(b"\xff\xc1"), frame.find(b"\xff\xf7"))
    assert sof > 0
    frame[sof + 5 : sof + 7] = b"\x00\x00"  # the frame's height: 0, "given later"
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(tmp_path / "deferred_height.dcm")
    _refused_before_decoding(monkeypatch, tmp_path / "deferred_height.dcm",
                             r"deferred_height\.dcm: its compressed frame does not state its size")


def _refused_before_decoding(monkeypatch: pytest.MonkeyPatch, path: Path, match: str) -> None:
    """``read_image(path)`` refuses in one line matching ``match`` without reaching a pixel decoder (replaced by
    one that fails the test: on these files the real ones take all memory or never return)."""
    import pydicom.pixels.decoders.base

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decoder was reached")

    monkeypatch.setattr(pydicom.pixels.decoders.base.Decoder, "as_array", no_decoding)
    with pytest.raises(ImageReadError, match=match):
        read_image(path)


@pytest.mark.parametrize("box", [b"\x00\x00\x00\x00ftyp", b"\x00\x00\x00\x01ftyp", b"\x00\x00"])
def test_a_jp2_wrapped_frame_whose_boxes_do_not_advance_is_refused_before_pydicom_walks_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, box: bytes
) -> None:
    """A JPEG 2000 frame may come wrapped as a JP2 file. pydicom finds the codestream by walking the boxes by their
    lengths, and a box of length 0 before it (found by mutating its own test files) kept it walking on the spot: a
    30 KB frame held `pellucid predict` or a web app page at full CPU for good. Such frames are refused from their
    boxes; the decoder is replaced by one that fails the test, so a regression cannot hang it."""
    pydicom = pytest.importorskip("pydicom")
    import pydicom.data
    from pydicom.encaps import encapsulate

    source = pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm")
    if source is None:
        pytest.skip("pydicom's test file MR_small_jp2klossless.dcm is not installed")
    ds = pydicom.dcmread(source)
    gray = (np.add.outer(np.arange(32), np.arange(48)) * 3).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(gray).save(buffer, format="JPEG2000", irreversible=False, no_jp2=False)  # lossless, as JP2
    jp2 = buffer.getvalue()
    assert jp2.startswith(b"\x00\x00\x00\x0cjP  ")
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    good = tmp_path / "good.dcm"  # a well-formed JP2 wrapper is read
    ds.PixelData = encapsulate([jp2])
    ds.save_as(good)
    np.testing.assert_allclose(read_image(good).array[:, :, 0], (gray - gray.min()) / np.ptp(gray), atol=1e-6)

    ds.PixelData = encapsulate([jp2[:12] + box + jp2[12:]])
    ds.save_as(tmp_path / "stuck.dcm")
    _refused_before_decoding(monkeypatch, tmp_path / "stuck.dcm",
                             r"stuck\.dcm: its JPEG 2000 frame's boxes do not hold together")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body and CRC."""
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _gray_png(path: Path, pixels: np.ndarray, depth: int, key: int) -> Path:
    """A gray PNG of ``depth`` bits per pixel (1, 2, 4 or 8) with a colour key (``tRNS``), written by hand: Pillow
    writes low-bit gray only through a palette."""
    import struct
    import zlib

    chunk = _png_chunk
    height, width = pixels.shape
    per_byte = 8 // depth
    rows = b""
    for row in pixels.astype(int):
        packed = bytearray(-(-width // per_byte))
        for x, value in enumerate(row):
            packed[x // per_byte] |= value << (8 - depth * (x % per_byte + 1))
        rows += b"\x00" + bytes(packed)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tRNS", struct.pack(">H", key))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("kind", ["gray 4-bit", "gray 8-bit", "rgb 8-bit"])
def test_a_pngs_transparent_colour_is_composited_over_black_like_its_alpha(tmp_path: Path, kind: str) -> None:
    """A gray or RGB PNG may name one colour that stands for transparent (a ``tRNS`` colour key). Alpha channels and
    palette transparency were composited over black, but the colour key was shown as stored (Pillow keeps it beside
    the pixels unapplied, and a low-bit gray key in the file's own scale)."""
    if kind == "gray 4-bit":
        stored = np.arange(64).reshape(8, 8) % 16
        path = _gray_png(tmp_path / "g4.png", stored, 4, key=7)
        keyed, expected = stored == 7, stored * 17 / 255.0
    elif kind == "gray 8-bit":
        stored = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
        path = tmp_path / "g8.png"
        PILImage.fromarray(stored).save(path, transparency=40)
        keyed, expected = stored == 40, stored / 255.0
    else:
        stored = np.zeros((8, 8, 3), dtype=np.uint8)
        stored[...] = (200, 100, 50)
        stored[2:4, 2:6] = (10, 20, 30)
        path = tmp_path / "rgb.png"
        PILImage.fromarray(stored).save(path, transparency=(10, 20, 30))
        keyed, expected = np.all(stored == (10, 20, 30), axis=-1), stored / 255.0
    image = read_image(path)
    array = image.array if image.array.shape[2] == 3 else image.array[:, :, 0]
    assert keyed.any() and (~keyed).any()
    np.testing.assert_allclose(array[keyed], 0.0, atol=1e-6)
    np.testing.assert_allclose(array[~keyed], expected[~keyed], atol=1e-6)
    assert "composited the PNG's transparent colour over black" in image.meta["notes"]
