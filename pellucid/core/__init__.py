"""The transfer-learning core: backbones and weight sources, task specs, fine-tune strategies,
Lightning training, metrics and calibration, model folders, prediction, ensembles and few-shot.

Import the submodules directly (``pellucid.core.training``, ``pellucid.core.predict``...); this
package stays free of heavy imports. It registers nothing either: ``pellucid.core.modelfolder``
finds the loaders of ensemble, prototype and segmentation folders through its own table of module
paths, imported on first use, so importing any one core module never pulls in the others.
"""
__all__: list[str] = []
