"""The transfer-learning core: backbones and weight sources, task specs, fine-tune strategies,
Lightning training, metrics and calibration, model folders, prediction, ensembles and few-shot.

Import the submodules directly (``pellucid.core.training``, ``pellucid.core.predict``...); this
package stays free of heavy imports.
"""
__all__: list[str] = []
