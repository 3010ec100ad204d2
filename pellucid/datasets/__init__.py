"""Readers (image files, DICOM), labelled samples (class folders, CSV manifests), grouped stratified
splits and k-fold, augmentation presets, and the decode-once image cache used for training.
"""
__all__: list[str] = []
