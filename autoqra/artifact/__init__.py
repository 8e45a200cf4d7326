r"""Deployable artifacts: export a trained model (quantized base + LoRA adapter) and load it anywhere.

* :mod:`~autoqra.artifact.export` — :func:`export_model` writes the folder; :func:`merge_adapter`.
* :mod:`~autoqra.artifact.format` — the folder's layout (``autoqra.json``, safetensors files), its
  validation (:class:`ArtifactError`) and checksums.
* :mod:`~autoqra.artifact.loader` — :func:`load_artifact` rebuilds the model without re-quantizing
  (its measured bytes equal the memory model's prediction).

Only safetensors and JSON are read: nothing is unpickled or executed.
"""

from autoqra.artifact.export import export_model, merge_adapter
from autoqra.artifact.format import Artifact, ArtifactError, read_info
from autoqra.artifact.loader import load_artifact

__all__ = ["Artifact", "ArtifactError", "export_model", "load_artifact", "merge_adapter", "read_info"]
