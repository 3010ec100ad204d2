"""``pellucid fit-explainer ttame --model DIR [--data DIR] [--epochs N]`` (:func:`run_cli`): fit
T-TAME on a model folder's training images, save it into the folder and print where and how long
it took."""
from __future__ import annotations

import time
from pathlib import Path

from pellucid.explain.ttame.data import folder_images
from pellucid.explain.ttame.explainer import TTAME

__all__ = [
    "run_cli",
]


def run_cli(args) -> int:
    """``pellucid fit-explainer ttame --model DIR [--data DIR] [--epochs N]``: fit T-TAME on the
    model folder's training images (or ``--data``), save it into the folder, print where and how
    long it took."""
    from pellucid.core.modelfolder import ModelFolderError, load_model

    folder = Path(args.model)
    epochs = getattr(args, "epochs", None)
    if epochs is not None and epochs < 1:
        raise ModelFolderError(f"--epochs must be >= 1; got {epochs}")
    model, card = load_model(folder)
    if card.kind != "classifier":
        raise ModelFolderError(f"{folder} is {'an' if card.kind[:1] in 'aeiou' else 'a'} {card.kind} folder; "
                               "T-TAME is fitted to one classifier "
                               "(fit it to each member's folder)")
    explainer = TTAME(progress=True, **({"epochs": epochs} if epochs else {}))
    t0 = time.perf_counter()
    data = getattr(args, "data", None)
    train, val, source = folder_images(folder, data=data, max_images=explainer.max_images,
                                       max_val=explainer.max_val, seed=explainer.seed, progress=True)
    explainer._fit_tensors(model, train, val, source)
    seconds = time.perf_counter() - t0
    explainer.fit_info["fit_seconds"] = round(seconds, 1)
    path = explainer.save(folder)
    info = explainer.fit_info
    print(f"T-TAME attention saved to {path} ({path.stat().st_size / 1e6:.1f} MB), recorded in {folder / 'card.json'}")
    print(f"fitted in {seconds:.0f} s on {info['train_images']} training / {info['val_images']} validation images "
          f"from {source}: {info['epochs_run']} epoch(s), best validation loss {info['best_val_loss']:.4f} "
          f"(epoch {info['best_epoch'] + 1})")
    print(f"explain with: pellucid explain --model {folder} --method ttame IMAGES...")
    return 0
