"""The class images the demo shows, round after round: FeatureVisualizer's schedule replayed.

FeatureVisualizer renders ``class_restarts`` candidates of each class image from noise in its
first round (``steps``) and shows the best of each class on that epoch's model; the later rounds
(``continue_steps``, on the model of their epoch) continue that candidate alone with every view
(``class_continue="best"``, the default) or every candidate with ``class_views //
class_restarts`` views each, showing the best of each round (``class_continue="all"``).
This script trains the demo model by the demo recipe once (``configs/digits.yaml``, seed 0),
keeping its weights at the epochs the demo analyses (1, 3, 5, 7, 9; cached in
``$LIGHTNING_NEURONS_CACHE``), replays the schedule with the callback's render settings, and
prints per round how many of the 10 class images the judges of
``benchmarks/visualization.py --quality`` recognise (a twin trained with seed 1, a LeNet, a
logistic regression on the raw pixels; goals there: 10 (0.95), 9 and 8 of 10) and the seconds.

Each ``--variants`` entry is a name and the first round's render settings, as JSON; the later
rounds are the callback's. ``--options`` changes :class:`~lightning_neurons.RenderOptions` for
every round (for example ``'{"continue_steps": 24}'``, or ``'{"class_continue": "all"}'``).
Default: the demo's first round (32 steps) and the 128 steps it used before.

Run:  python benchmarks/class_image_schedule.py [--seeds 0,1,2] [--threads 2]
          [--variants '{"steps 32": {"steps": 32}, "steps 128": {"steps": 128}}']
          [--options '{"continue_steps": 24}'] [--candidates] [--grid images.png]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from visualization import CACHE, GOALS, trained

from lightning_neurons import RenderOptions
from lightning_neurons.models import SmallCNN
from lightning_neurons.visualize import ClassLogit, DataPrior, Objective, render
from lightning_neurons.visualize.anchors import ClassAnchors

#: The epochs the demo analyses (every_n_epochs: 2 of 10).
EPOCHS = (1, 3, 5, 7, 9)


def demo_weights() -> dict[int, dict]:
    """The demo model's weights at the end of each analysed epoch (trained once, cached)."""
    path = CACHE / "smallcnn_seed0_demo_recipe_epochs.pt"
    if path.exists():
        return torch.load(path)
    import lightning.pytorch as pl

    from lightning_neurons.data import DigitsDataModule
    from lightning_neurons.models import ImageClassifier

    pl.seed_everything(0, verbose=False)
    net = SmallCNN(widths=(32, 64, 128), batch_norm=True)
    kept: dict[int, dict] = {}

    class Keep(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and trainer.current_epoch in EPOCHS:
                kept[trainer.current_epoch] = {k: v.clone() for k, v in net.state_dict().items()}

    module = ImageClassifier(net, num_classes=10, lr=0.01, weight_decay=5e-4, schedule="onecycle")
    data = DigitsDataModule(batch_size=64, image_size=32, val_fraction=0.2, seed=0, augment=True)
    trainer = pl.Trainer(
        max_epochs=10, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[Keep()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(kept, path)
    return kept


def class_settings(options: RenderOptions, prior: DataPrior) -> dict:
    """``render()`` arguments of FeatureVisualizer's class images (as its Renderer passes them)."""
    return dict(
        image_shape=(1, 32, 32), lr=options.lr, param=options.param, prior=prior,
        transforms=options.transforms, contrast=options.class_contrast, views=options.class_views,
        converge_tol=options.converge_tol or 0.0, converge_window=options.converge_window,
        select_by=options.class_select_by, seed=options.seed,
    )  # fmt: skip


def one_round(
    model: torch.nn.Module,
    options: RenderOptions,
    settings: dict,
    params: torch.Tensor | None,
    first: dict,
    alive: bool,
    objective: Callable[[int], Objective] = ClassLogit,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round's 10 class images, the parameters the next round continues and every candidate
    (class after class): with ``alive`` (``class_continue="all"``) every candidate continued
    and the best shown, else the first round's best continued alone (the only candidate).
    ``objective(c)``: what class ``c``'s image maximises; the candidates are compared by
    ``ClassLogit(c)`` whatever it is."""
    classes = [objective(c) for c in range(10)]
    if not alive:
        if params is None:  # the first round: from noise, the best of the candidates
            kw = {**settings, "steps": options.steps, "restarts": options.class_restarts, **first}
        else:  # the kept candidate, continued alone
            kw = dict(settings, steps=options.continue_steps, init=params, restarts=1)
        result = render(model, classes, **kw)
        return result.images, result.params, result.images
    from lightning_neurons.visualize.continuation import choose_candidates
    from lightning_neurons.visualize.render import view_transforms

    restarts = options.class_restarts
    rows = [c for c in classes for _ in range(restarts)]
    if params is None:
        kw = {**settings, "steps": options.steps, "restarts": 1, **first}
    else:
        views = max(1, options.class_views // restarts)
        kw = dict(settings, steps=options.continue_steps, init=params, restarts=1, views=views)
    result = render(model, rows, **kw)
    transforms = view_transforms(options.transforms, (1, 32, 32), settings["prior"])
    logits = [ClassLogit(c) for c in range(10) for _ in range(restarts)]  # chosen as by default
    best = choose_candidates(
        model, logits, result.images, restarts, transforms=transforms, seed=options.seed,
        size=len(rows), select_by=options.class_select_by,
    )  # fmt: skip
    return result.images[best], result.params, result.images


#: What each class's image maximises on a round's model: ``objectives(model)(c)``.
Objectives = Callable[[torch.nn.Module], Callable[[int], Objective]]


class Judged:
    """The judges (a twin, a LeNet, a logistic regression on the raw pixels): called on the 10
    class images, how many of them each recognises; :meth:`verdicts` on any images."""

    def __init__(self, nets: dict[str, torch.nn.Module], linear) -> None:
        self.nets, self.linear = nets, linear

    def verdicts(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[3, N]``: whether each judge names each image's class ``target``."""
        with torch.no_grad():
            named = [net(images).argmax(1) for net in self.nets.values()]
        named.append(torch.as_tensor(self.linear.predict(images.flatten(1).numpy())))
        return torch.stack([guess == target for guess in named])

    def __call__(self, images: torch.Tensor) -> list[int]:
        return self.verdicts(images, torch.arange(len(images))).sum(dim=1).tolist()


def digits_setup() -> tuple[DataPrior, Judged, torch.Tensor, torch.Tensor]:
    """The prior the callback would estimate, the judges, the validation images and labels."""
    from sklearn.linear_model import LogisticRegression

    from lightning_neurons.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64, image_size=32, val_fraction=0.2, seed=0)
    data.setup()
    train_x, train_y = data.train_set.tensors
    val, val_labels = (t[:512] for t in data.val_set.tensors)
    prior = DataPrior.from_images(val)  # as the callback estimates it
    nets = {"twin": trained("smallcnn", 1)[0], "LeNet": trained("lenet", 0)[0]}
    linear = LogisticRegression(max_iter=2000).fit(train_x.flatten(1).numpy(), train_y.numpy())
    return prior, Judged(nets, linear), val, val_labels


def candidates_line(candidates: torch.Tensor, judged: Judged) -> str:
    """What the judges make of every candidate of the last round: the share each recognises,
    and the counts of the best choice a selection could make (the candidate of each class most
    judges recognise; the judges' own view, so a bound on any selection rule, not one)."""
    per_class = len(candidates) // 10
    target = torch.arange(10).repeat_interleave(per_class)
    verdicts = judged.verdicts(candidates, target).view(3, 10, per_class)
    share = "/".join(f"{v:.2f}" for v in verdicts.float().mean(dim=(1, 2)).tolist())
    best = verdicts.sum(dim=0).argmax(dim=1)  # [10]: the candidate most judges recognise
    bound = verdicts[:, torch.arange(10), best].sum(dim=1).tolist()
    counts = "/".join(map(str, bound))
    return f"its {len(candidates)} candidates: recognised {share}, the best choice {counts}"


def anchored(options: RenderOptions, images: torch.Tensor, labels: torch.Tensor) -> Objectives:
    """The callback's class objectives: each class's logit minus ``class_anchor`` times its
    anchor at ``features.relu3`` (the deepest visualized layer), taken on the round's model from
    the first ``class_anchor_images`` validation images of each class."""
    keep = torch.cat([(labels == c).nonzero()[: options.class_anchor_images, 0] for c in range(10)])
    keep = keep.sort().values
    layer = options.class_anchor_layer or "features.relu3"

    def objectives(model: torch.nn.Module) -> Callable[[int], Objective]:
        anchors = ClassAnchors.from_images(model, layer, images[keep], labels[keep])
        return lambda c: anchors.objective(c, options.class_anchor)

    return objectives


def replay(
    name: str,
    options: RenderOptions,
    prior: DataPrior,
    judged: Judged,
    first: dict,
    alive: bool = True,
    objectives: Objectives | None = None,
    candidates: bool = False,
) -> torch.Tensor:
    """Replay the schedule over the demo's analysed epochs, print each round's counts (with
    ``candidates``, the last round's candidates judged too: :func:`candidates_line`) and return
    the last round's images.
    ``objectives``: default :func:`anchored` (the callback's), or the logit alone with
    ``class_anchor=0``."""
    weights = demo_weights()
    settings = class_settings(options, prior)
    goals = [GOALS[judge] * 10 for judge in ("twin", "LeNet", "linear")]  # of 10 images
    params, cells, total, last = None, [], 0.0, []
    for epoch in EPOCHS:
        model = SmallCNN(widths=(32, 64, 128), batch_norm=True).eval()
        model.load_state_dict(weights[epoch])
        model.requires_grad_(False)
        objective = objectives(model) if objectives is not None else ClassLogit
        start = time.perf_counter()
        images, params, every = one_round(model, options, settings, params, first, alive, objective)
        seconds = time.perf_counter() - start
        total += seconds
        last = judged(images)
        cells.append(f"e{epoch} {'/'.join(map(str, last))} {seconds:.1f} s")
    met = all(c >= g for c, g in zip(last, goals, strict=True))
    print(
        f"{name}, seed {options.seed}: {', '.join(cells)}; {total:.1f} s in all; last round vs "
        f"the goals ({'/'.join(f'{g:g}' for g in goals)}): {'met' if met else 'NOT met'}"
        + (f"; {candidates_line(every, judged)}" if candidates else ""),
        flush=True,
    )
    return images


def save_grid(rows: dict[str, torch.Tensor], path: str) -> None:
    """The last round's 10 class images of each replay, one row each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.15 * len(rows)), squeeze=False)
    for row, (name, images) in zip(axes, rows.items(), strict=True):
        for c, ax in enumerate(row):
            ax.imshow(images[c, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"the last round's images: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="render seeds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--variants", default='{"steps 32": {"steps": 32}, "steps 128": {"steps": 128}}'
    )
    parser.add_argument("--options", default="{}", help="RenderOptions of every round, as JSON")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="judge every candidate of the last round too: the share each judge recognises, and "
        "what the best selection among them would give (a bound on any selection rule)",
    )
    parser.add_argument("--grid", help="save the last round's images of every replay to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior, judged, images, labels = digits_setup()
    shown: dict[str, torch.Tensor] = {}
    print("class images recognised (twin/LeNet/linear of 10) and seconds, per analysed epoch")
    for name, first in json.loads(args.variants).items():
        for seed in (int(s) for s in args.seeds.split(",")):
            options = RenderOptions(**{**json.loads(args.options), "seed": seed})
            objectives = anchored(options, images, labels) if options.class_anchor > 0 else None
            alive = options.class_continue == "all"
            last = replay(name, options, prior, judged, first, alive, objectives, args.candidates)
            shown[f"{name}, seed {seed}"] = last
    if args.grid:
        save_grid(shown, args.grid)


if __name__ == "__main__":
    main()
