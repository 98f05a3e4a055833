"""What the analyses show while they run at an epoch's end (through Lightning's progress bars),
what they log without a terminal, and the seconds the CLI's closing summary lists."""

from __future__ import annotations

import importlib
import io
import logging
import os
import platform
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from conftest import TinyData, TinyNet, fast_trainer
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

import lightning_neurons.callbacks._contribution_ablation as contribution_module
import lightning_neurons.callbacks._contribution_log as contribution_log
import lightning_neurons.plots.activation as activation_plots
from lightning_neurons import (
    ActivationTracker,
    CategoryClustering,
    FeatureVisualizer,
    NeuronClustering,
    NeuronContribution,
    RenderOptions,
    progress,
)
from lightning_neurons.cli import main
from lightning_neurons.clustering import CategoryClusterer, NeuronClusterer
from lightning_neurons.models import ImageClassifier

saliency_module = importlib.import_module("lightning_neurons.visualize.saliency")
CONFIG = Path(__file__).parents[1] / "configs" / "digits.yaml"
NAMES = [
    "ActivationTracker",
    "FeatureVisualizer",
    "CategoryClustering",
    "NeuronClustering",
    "NeuronContribution",
]
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Screen(io.StringIO):
    """A terminal that keeps everything written to it."""

    def isatty(self) -> bool:
        return True

    def lines(self) -> list[str]:
        """Every line drawn so far, without cursor movements."""
        return [ESCAPES.sub("", line) for line in re.split(r"[\r\n]", self.getvalue())]

    def showed(self, text: str) -> bool:
        return any(text in line for line in self.lines())


@pytest.fixture
def screen(monkeypatch) -> Screen:
    """``sys.stdout`` is a terminal (what TQDMProgressBar draws on) during the test; every
    change is drawn (set in the test's body: pytest sets its own ``sys.stdout`` after the
    fixtures)."""
    monkeypatch.setattr(progress, "REDRAW_SECONDS", 0.0)
    return Screen()


@contextmanager
def drawing_on(terminal: Screen) -> Iterator[None]:
    real = sys.stdout
    sys.stdout = terminal
    try:
        yield
    finally:
        sys.stdout = real


@pytest.fixture
def records():
    """The records of the progress logger."""
    found: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = found.append  # type: ignore[method-assign]
    progress.log.addHandler(handler)
    yield found
    progress.log.removeHandler(handler)


def _analyses() -> list[Callback]:
    return [
        ActivationTracker(on_error="raise"),
        FeatureVisualizer(render=RenderOptions(steps=3), smoothgrad_samples=2, on_error="raise"),
        CategoryClustering(on_error="raise"),
        NeuronClustering(on_error="raise"),
        NeuronContribution(on_error="raise"),
    ]


def _fit(tmp_path, callbacks: list[Callback], epochs: int = 1, **options) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(TinyNet(), num_classes=3, lr=1e-2)
    trainer = fast_trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, **options)
    trainer.fit(model, TinyData())
    return trainer


def _watch(monkeypatch, owner: object, name: str, screen: Screen) -> list[str]:
    """What the screen had shown each time ``owner.name`` was called (inside an analysis,
    before the call's work)."""
    original = getattr(owner, name)
    shown: list[str] = []

    def watched(*args, **kwargs):
        shown.append(screen.getvalue())
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, watched)
    return shown


def _lines(shown: str) -> list[str]:
    return [ESCAPES.sub("", line) for line in re.split(r"[\r\n]", shown)]


# ---- drawn on a terminal, while the analyses run -----------------------------------------------


def test_tqdm_bar_shows_what_each_analysis_does_while_it_runs(tmp_path, screen, monkeypatch):
    tracker = _watch(monkeypatch, activation_plots, "class_profile", screen)
    smoothgrad = _watch(monkeypatch, saliency_module, "smoothgrad", screen)
    categories = _watch(monkeypatch, CategoryClusterer, "fit", screen)
    neurons = _watch(monkeypatch, NeuronClusterer, "fit", screen)
    ablation = _watch(monkeypatch, contribution_module, "ablation_sums", screen)
    contribution_figures = _watch(monkeypatch, contribution_log, "_figures", screen)
    with drawing_on(screen):
        _fit(tmp_path, [*_analyses(), TQDMProgressBar()], enable_progress_bar=True)

    def shown(seen: list[str], text: str) -> bool:
        return bool(seen) and any(text in line for line in _lines(seen[0]))

    # each status is on the screen while the work it names runs
    assert shown(tracker, "ActivationTracker: figures and files, layer")
    assert shown(smoothgrad, "FeatureVisualizer: saliency (3 images)")
    assert shown(categories, "CategoryClustering: clustering view backbone.relu()")  # the deepest
    assert shown(neurons, "NeuronClustering: clustering the neurons of backbone.relu1")
    assert shown(ablation, "NeuronContribution: ablation of backbone.relu")
    # (a count at each layer also lends the threads to the workers drawing its figures)
    assert shown(contribution_figures, "NeuronContribution: figures and files, layer")
    # the render loop's and the contribution's counters, drawn as Lightning draws its bars
    assert any(
        re.search(
            r"FeatureVisualizer: rendering channels \(\d+ objectives of \d+ layers\) and "
            r"classes \(3 objectives\), step: .*\| 3/3 ",
            line,
        )
        for line in screen.lines()
    )
    assert any(
        re.search(r"NeuronContribution: contributions of the kept images, batch: .*\| 3/3 ", line)
        for line in screen.lines()
    )


def test_rich_bar_shows_what_each_analysis_does_and_removes_it(tmp_path, monkeypatch):
    pytest.importorskip("rich")
    import rich
    from lightning.pytorch.callbacks import RichProgressBar

    monkeypatch.setattr(progress, "REDRAW_SECONDS", 0.0)
    terminal = Screen()
    bar = RichProgressBar(console_kwargs={"force_terminal": True, "file": terminal, "width": 200})
    neurons = _watch(monkeypatch, NeuronClusterer, "fit", terminal)
    ablation = _watch(monkeypatch, contribution_module, "ablation_sums", terminal)
    try:
        _fit(tmp_path, [*_analyses(), bar], enable_progress_bar=True)
    finally:
        rich.reconfigure()  # the global console back on the real terminal
    assert "NeuronClustering: clustering the neurons of backbone.relu1" in neurons[0]
    assert "NeuronContribution: ablation of backbone.relu" in ablation[0]
    for name in NAMES:
        assert terminal.showed(f"{name}: "), name
    # the statuses leave with their analyses: only Lightning's own tasks are left
    assert bar.progress is not None
    assert not [t.description for t in bar.progress.tasks if t.description.startswith(tuple(NAMES))]


def test_phases_and_counters_read_as_they_are_drawn(screen):
    trainer = SimpleNamespace(
        is_global_zero=True,
        progress_bar_callback=TQDMProgressBar(),
        current_epoch=3,
        state=SimpleNamespace(fn="fit"),
    )
    with drawing_on(screen), progress.reporting(trainer, ActivationTracker(), "validation"):
        progress.phase("view", 2, 4)
        assert re.search(r"ActivationTracker: view: .*\| 2/4 ", screen.lines()[-1])
        progress.advance("batch")
        progress.advance("batch")
        assert screen.lines()[-1].startswith("ActivationTracker: view 2/4, batch 2 [")
        progress.update("step", 96, 128)
        assert re.search(r"ActivationTracker: view 2/4, step: .*\| 96/128 ", screen.lines()[-1])
        progress.phase("figures")  # a new phase clears the counter
        assert screen.lines()[-1].startswith("ActivationTracker: figures [")
    drawn = screen.getvalue()
    progress.phase("after the analysis")  # outside an analysis nothing happens
    progress.update("step", 1, 2)
    assert screen.getvalue() == drawn


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_each_phase_gives_the_memory_the_last_one_freed_back(monkeypatch):
    """A phase's intermediates, freed when the next phase begins, go back to the system then
    (glibc keeps them; the next phase may not fit its blocks in their holes): at each phase of
    an analysis, not at its counters, and not outside an analysis."""
    trainer = SimpleNamespace(
        is_global_zero=True, progress_bar_callback=None, current_epoch=0, state=None
    )
    trims = []
    monkeypatch.setattr(progress, "release_freed_memory", lambda: trims.append(1) or True)
    with progress.reporting(trainer, NeuronClustering(), "validation"):
        progress.phase("clustering", 1, 2)
        progress.update("step", 1, 3)
        progress.advance("batch")
        progress.phase("clustering", 2, 2)
    progress.phase("after the analysis")
    assert len(trims) == 2
    monkeypatch.undo()
    if not (sys.platform.startswith("linux") and "glibc" in platform.libc_ver()[0]):
        return  # no malloc_trim: the phases run all the same (above)
    # 160 MB of 64 kB blocks between small ones that stay: freed, they stay resident (glibc
    # returns only the heap's top by itself), until a phase gives them back
    blocks, kept = [], []
    for _ in range(2560):
        blocks.append(bytes(bytearray(65536)))
        kept.append(bytes(bytearray(1024)))
    blocks.clear()
    freed = _resident_bytes()
    with progress.reporting(trainer, NeuronClustering(), "validation"):
        progress.phase("the next phase")
        given_back = freed - _resident_bytes()
    assert given_back > 100 << 20, f"{given_back / 2**20:.1f} MB given back"
    assert len(kept) == 2560


def test_only_rank_zero_draws(screen, records):
    def trainer(rank: int) -> SimpleNamespace:
        return SimpleNamespace(
            is_global_zero=rank == 0,
            progress_bar_callback=TQDMProgressBar(),
            current_epoch=0,
            state=SimpleNamespace(fn="fit"),
        )

    with drawing_on(screen), progress.reporting(trainer(1), NeuronClustering(), "validation"):
        progress.phase("clustering", 1, 2)
    assert screen.getvalue() == "" and not records
    with drawing_on(screen), progress.reporting(trainer(0), NeuronClustering(), "validation"):
        progress.phase("clustering", 1, 2)
    assert screen.showed("NeuronClustering: clustering")


# ---- without a terminal, and without a progress bar --------------------------------------------


def test_without_a_terminal_one_line_per_analysis_and_epoch(tmp_path, records, capsys):
    _fit(tmp_path, _analyses(), epochs=2, enable_progress_bar=True)
    messages = [r.getMessage() for r in records]
    for name in NAMES:
        for epoch in (0, 1):
            found = [m for m in messages if m.startswith(f"{name}: epoch {epoch} analysis took ")]
            assert len(found) == 1, (name, epoch, messages)
    assert len(messages) == 2 * len(NAMES)
    assert all(re.fullmatch(r"\w+: epoch \d analysis took \d+\.\d s", m) for m in messages)
    out = capsys.readouterr().out
    assert "FeatureVisualizer: rendering" not in out  # no status drawn into the log


def test_no_progress_bar_no_output(tmp_path, records, capfd):
    _fit(tmp_path, _analyses(), enable_progress_bar=False)
    out, err = capfd.readouterr()
    assert not records
    for name in NAMES:
        assert f"{name}:" not in out + err, name
    assert "analysis took" not in out + err


# ---- the CLI's closing summary -----------------------------------------------------------------


def _summary(tmp_path, capsys, *args: str) -> list[str]:
    main(
        [
            "fit",
            *args,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    out = capsys.readouterr().out
    return out[out.index("lightning-neurons: fit done in") :].splitlines()


def test_summary_lists_the_seconds_of_each_analysis(tmp_path, capsys):
    lines = _summary(tmp_path, capsys, "--config", str(CONFIG))
    text = "\n".join(lines)
    found = re.search(r"  analyses: (\d+\.\d) s in all \((.*?)\)", text, re.S)
    assert found, text
    items = re.findall(r"(\w+) (\d+\.\d) s", found.group(2))
    assert [name for name, _ in items] == NAMES  # the config's callbacks, in order
    total = sum(float(s) for _, s in items)
    assert abs(total - float(found.group(1))) <= 0.05 * len(items)  # each rounded to 0.1 s
    assert all(len(line) <= 100 for line in found.group(0).splitlines())
    assert re.match(r"lightning-neurons: fit done in \d+\.\d s\.$", lines[0])
    files = tmp_path / "digits" / "version_0" / "neurons"
    assert files.is_dir()  # the tracker wrote its statistics
    assert f"  Analysis files:   {files.resolve()}" in lines


def test_summary_names_no_analysis_folder_that_does_not_exist(tmp_path, capsys):
    config = tmp_path / "plain.yaml"
    text = CONFIG.read_text()
    # the demo without its callbacks: nothing writes analysis files
    start, end = text.index("  callbacks:"), text.index("model:")
    config.write_text(text[:start] + text[end:])
    lines = _summary(tmp_path, capsys, "--config", str(config))
    assert any(line.startswith("  TensorBoard logs: ") for line in lines)
    assert not any("Analysis files" in line for line in lines)
    assert not any(line.startswith("  analyses:") for line in lines)
    assert not (tmp_path / "digits" / "version_0" / "neurons").exists()
