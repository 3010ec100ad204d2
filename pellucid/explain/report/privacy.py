"""Privacy of report outputs: the one set of rules of :mod:`pellucid.core.privacy` (inputs named by
hash, DICOM names hidden unless identifiers were asked for, messages scrubbed of paths, only
non-identifying metadata kept, reader warnings silenced), under the names the report modules use.
"""
from __future__ import annotations

from pellucid.core.privacy import display_name, read_quietly, safe_meta, scrub_path, sha256_bytes, sha256_file

__all__ = ["display_name", "scrub_path", "sha256_bytes"]

_read = read_quietly
_safe_meta = safe_meta
_sha256_file = sha256_file
