"""Fine-tuning strategies: which parameters train, at which learning rate, and when they thaw.

* ``linear-probe`` — the backbone stays frozen; its features are computed once and cached, and only
  the head is fitted (a convex problem, solved on the cached tensor).
* ``full`` — every parameter trains; the backbone at ``lr`` and the head at ``head_lr``.
* ``lp-ft`` — LP-FT (Kumar et al., 2022): the head is first fitted as a linear probe, then every
  parameter trains at a small learning rate, so a random head does not distort the pretrained
  features early in fine-tuning (and the fine-tune starts from, rather than below, its probe).
* ``progressive`` — the head is first fitted as a linear probe, then backbone stages thaw one by one
  from the top, each deeper stage at a smaller learning rate (``lr * lr_decay**depth``):
  discriminative learning rates with gradual unfreezing, the BPD paper's recipe.

Each strategy is a small class in a registry; :func:`get_strategy` resolves names with
did-you-mean. Frozen batch-norm layers are kept in eval mode so their statistics stay as loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pellucid.core.model import Classifier
from pellucid.registry import Registry

__all__ = ["Strategy", "LinearProbe", "Full", "LPFT", "Progressive", "get_strategy", "list_strategies",
           "freeze_bn_of_frozen"]

_STRATEGIES: Registry[type[Strategy]] = Registry("fine-tune strategy")
_register = _STRATEGIES.register  # class decorator: registers under the class's ``name``


def list_strategies() -> list[str]:
    return _STRATEGIES.names()


def get_strategy(name: str, **options) -> Strategy:
    return _STRATEGIES.get(name)(**options)


def _set_trainable(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def freeze_bn_of_frozen(model: nn.Module, all_bn: bool = False) -> None:
    """Put every batch-norm layer whose parameters are all frozen (or every one, with ``all_bn``)
    into eval mode, so its running statistics stay as loaded."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if all_bn or (params and not any(p.requires_grad for p in params)):
                m.eval()


@dataclass
class Strategy:
    """Base class: decides trainable parameters, optimiser groups and the thaw schedule."""

    lr: float = 1e-3
    head_lr: float = 3e-3
    weight_decay: float = 1e-4
    bn_eval: bool = False
    name = "base"
    probe_first = False
    needs_images = True

    def setup(self, model: Classifier) -> None:
        """Set ``requires_grad`` before training starts."""
        raise NotImplementedError

    def param_groups(self, model: Classifier) -> list[dict]:
        """Optimiser parameter groups (all groups exist from the start; frozen ones get no grads)."""
        return [{"params": list(model.head.parameters()), "lr": self.head_lr, "name": "head"}]

    def on_epoch_start(self, model: Classifier, epoch: int) -> list[str]:
        """Thaw what should train from ``epoch`` on; returns names of stages thawed now."""
        return []


@_register
@dataclass
class LinearProbe(Strategy):
    name = "linear-probe"
    probe_first = True
    needs_images = False

    def setup(self, model: Classifier) -> None:
        _set_trainable(model.backbone, False)
        _set_trainable(model.head, True)


@_register
@dataclass
class Full(Strategy):
    name = "full"

    def setup(self, model: Classifier) -> None:
        _set_trainable(model, True)

    def param_groups(self, model: Classifier) -> list[dict]:
        return super().param_groups(model) + [
            {"params": list(model.backbone.parameters()), "lr": self.lr, "name": "backbone"}]


@_register
@dataclass
class LPFT(Full):
    """Linear probe, then full fine-tuning (Kumar et al., 2022). Give it small ``lr``/``head_lr``
    (about 1e-4): the head already fits, only the features should move. Batch-norm statistics stay
    as loaded (``bn_eval``) so the probe's features are the ones fine-tuning starts from."""

    bn_eval: bool = True
    name = "lp-ft"
    probe_first = True


@_register
@dataclass
class Progressive(Strategy):
    """Gradual unfreezing from the top with discriminative learning rates.

    Args:
        stages_per_epoch: how many more stages thaw at the start of each epoch.
        max_stages: the deepest number of stages ever thawed (the rest stays frozen).
        lr_decay: learning-rate factor per stage of depth below the top.
        bn_eval: keep every batch-norm layer on its loaded statistics (affine parameters still
            train). Batch statistics of a small, far-from-ImageNet set (grayscale X-rays) shift the
            features the probe-fitted head was trained on; freezing them keeps the two consistent.
    """

    bn_eval: bool = True
    stages_per_epoch: int = 1
    max_stages: int = 3
    lr_decay: float = 0.5
    name = "progressive"
    probe_first = True

    def _top_down(self, model: Classifier) -> list[tuple[str, nn.Module]]:
        names = list(reversed(model.spec.stages))[: self.max_stages]
        return [(n, model.backbone.module_at(n)) for n in names]

    def setup(self, model: Classifier) -> None:
        _set_trainable(model.backbone, False)
        _set_trainable(model.head, True)

    def param_groups(self, model: Classifier) -> list[dict]:
        groups = super().param_groups(model)
        for depth, (name, module) in enumerate(self._top_down(model)):
            groups.append({"params": list(module.parameters()), "lr": self.lr * self.lr_decay ** depth,
                           "name": name})
        return groups

    def on_epoch_start(self, model: Classifier, epoch: int) -> list[str]:
        n = min(self.max_stages, (epoch + 1) * self.stages_per_epoch)
        thawed = []
        for name, module in self._top_down(model)[:n]:
            if not any(p.requires_grad for p in module.parameters()):
                _set_trainable(module, True)
                thawed.append(name)
        return thawed
