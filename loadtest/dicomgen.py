# Synthetic but valid DICOM files (pydicom): correct file meta, fresh UIDs per study/series/
# instance, 16-bit monochrome pixel data sized to the wanted bytes per image. Must never embed
# real patient data; every name and ID is made up.
from __future__ import annotations

import io
import math
import random

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def study_uids(rng: random.Random) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) made from the seeded generator."""
    return (generate_uid(entropy_srcs=[str(rng.random())]), generate_uid(entropy_srcs=[str(rng.random())]))


def dicom_image(
    rng: random.Random, modality: str, study_uid: str, series_uid: str, instance: int, nbytes: int, patient: str
) -> bytes:
    """One DICOM Part 10 file with about `nbytes` of pixel data."""
    side = max(8, int(math.sqrt(max(nbytes, 128) / 2)))
    rows, cols = side, max(8, (max(nbytes, 128) // 2) // side)
    meta = FileMetaDataset()
    sop_class = UID(SOP_CLASSES.get(modality.upper(), SECONDARY_CAPTURE))
    sop_uid = generate_uid(entropy_srcs=[study_uid, str(instance), str(rng.random())])
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = modality.upper()
    ds.PatientName = f"LOADTEST^{patient}"
    ds.PatientID = patient
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.ContentTime = "120000"
    ds.AccessionNumber = patient[:16]
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, instance
    ds.Manufacturer = "mailhub-loadtest"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    # A gradient plus noise: looks like an image, compresses like one (a little).
    gen = np.random.default_rng(rng.getrandbits(32))
    y, x = np.mgrid[0:rows, 0:cols]
    pixels = ((x * 7 + y * 3 + instance * 11) % 3000 + gen.integers(0, 1000, (rows, cols))).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
