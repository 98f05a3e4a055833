"""``analyze`` on a Hugging Face Trainer's output: ``checkpoint-<step>/`` folders with the model's
weights (``model.safetensors``, its shards and ``*.index.json``, or an older Trainer's
``pytorch_model.bin``), ``trainer_state.json`` (the epoch as a fraction, the global step) and
the optimizer's and RNG's files beside them; the model built from the folder's ``config.json``
by ``lightning_neurons.models.hf_model``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ResNetConfig, ResNetForImageClassification

from lightning_neurons import NeuronsError, load_run
from lightning_neurons.analyze import checkpoint_infos, find_checkpoints
from lightning_neurons.cli import main
from lightning_neurons.models import hf_model

LAYER = "backbone.resnet.encoder.stages.1"
#: The Trainer's saves: step, epochs done, how the weights are written.
SAVES = [(5, 0.5, "shards"), (10, 1.0, "bin"), (20, 2.0, "safetensors")]


def _trainer_output(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """A Trainer's ``output_dir`` as it writes it; each checkpoint's weights by step."""
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10
    )
    model = ResNetForImageClassification(config)
    saved = {}
    for step, epoch, how in SAVES:
        torch.nn.init.normal_(model.classifier[-1].weight)  # each checkpoint's own head
        out = folder / f"checkpoint-{step}"
        if how == "bin":  # transformers 4's safe_serialization=False
            out.mkdir(parents=True)
            model.config.save_pretrained(out)
            torch.save(model.state_dict(), out / "pytorch_model.bin")
        else:
            model.save_pretrained(out, max_shard_size="3KB" if how == "shards" else "50GB")
        (out / "trainer_state.json").write_text(json.dumps({"epoch": epoch, "global_step": step}))
        torch.save({"state": {}, "param_groups": []}, out / "optimizer.pt")
        torch.save({"python": 0}, out / "rng_state.pth")
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(list((folder / "checkpoint-5").glob("model-*.safetensors"))) > 1  # sharded
    return saved


def _config(tmp_path: Path, backbone: str) -> Path:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "limit_val_batches": 1,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "hf"},
            },
            "callbacks": [
                {
                    "class_path": "lightning_neurons.ActivationTracker",
                    "init_args": {"layers": [LAYER], "on_error": "raise"},
                }
            ],
        },
        "model": {
            "class_path": "lightning_neurons.models.ImageClassifier",
            "init_args": {
                "backbone": {
                    "class_path": "lightning_neurons.models.hf_model",
                    "init_args": {"name": backbone},
                },
                "num_classes": 10,
            },
        },
        "data": {
            "class_path": "lightning_neurons.data.DigitsDataModule",
            "init_args": {"image_size": 16, "batch_size": 32},
        },
    }
    path = tmp_path / "hf.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_trainers_output_dir_is_analysed_checkpoint_by_checkpoint(tmp_path):
    output = tmp_path / "output"
    saved = _trainer_output(output)
    main(["analyze", "--config", str(_config(tmp_path, str(output))), "--ckpt_path", str(output)])
    infos = checkpoint_infos(find_checkpoints(output))
    # epochs counted from 0 as Lightning counts them: 0.5 and 1.0 epochs done are both epoch 0
    assert [(i.epoch, i.global_step, i.within_epoch) for i in infos] == [
        (0, 5, True),
        (0, 10, False),
        (1, 20, False),
    ]
    assert [i.path.name for i in infos] == [
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "model.safetensors",
    ]
    log_dir = tmp_path / "runs/hf/version_0"
    folders = sorted(p.name for p in (log_dir / "neurons/validate/activations").iterdir())
    assert folders == ["epoch=000", "epoch=000-step=0000005", "epoch=001"]
    run = load_run(log_dir, stage="validate")
    assert run.steps_of("ActivationTracker") == [5, 10, 20]
    means = {s: run.results("ActivationTracker", step=s)[LAYER].class_means for s in (5, 10, 20)}
    assert means[5].shape == (10, 16)
    # the stage before the head is the same in every checkpoint (only the head was changed)
    torch.testing.assert_close(means[5], means[20], rtol=1e-5, atol=1e-6)
    assert saved[5]["classifier.1.weight"].ne(saved[20]["classifier.1.weight"]).any()


def test_each_checkpoint_loads_exactly_and_a_checkpoint_folder_is_its_weights(tmp_path):
    from lightning_neurons.analyze import load_checkpoint
    from lightning_neurons.weights import read_weights

    output = tmp_path / "output"
    saved = _trainer_output(output)
    for step, _, _ in SAVES:
        folder = output / f"checkpoint-{step}"
        (found,) = find_checkpoints(folder)  # not optimizer.pt nor rng_state.pth
        weights = read_weights(load_checkpoint(found), found)
        assert (weights.epoch, weights.global_step) == ({5: 0, 10: 0, 20: 1}[step], step)
        assert weights.state.keys() == saved[step].keys()
        assert all(torch.equal(weights.state[k], v) for k, v in saved[step].items())
    # a glob of the checkpoint folders, as the shell would not expand it
    assert len(find_checkpoints(f"{output}/checkpoint-*")) == 3
    # the final model that `trainer.save_model()` writes into the output_dir: left out (with a
    # warning) while no trainer_state.json (`trainer.save_state()`) says its step; then one of
    # it and the last checkpoint, of the same epoch and step, is analysed
    for name in ("model.safetensors", "config.json"):
        shutil.copy(output / "checkpoint-20" / name, output / name)
    with pytest.warns(UserWarning, match="is not analysed with the checkpoints of its folders"):
        assert len(find_checkpoints(output)) == 3
    shutil.copy(output / "checkpoint-20" / "trainer_state.json", output / "trainer_state.json")
    assert find_checkpoints(output)[-1] == output / "model.safetensors"
    with pytest.warns(UserWarning, match="only the latter is analysed"):
        infos = checkpoint_infos(find_checkpoints(output))
    assert [i.global_step for i in infos] == [5, 10, 20]
    # hf_model builds the latest checkpoint's architecture from a Trainer's output_dir
    net = hf_model(str(output))
    assert net(torch.rand(2, 1, 16, 16)).logits.shape == (2, 10)
    assert hf_model(str(output / "checkpoint-5"), num_classes=3).config.num_labels == 3


def test_errors_say_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuronsError, match="no model config for .*config.json"):
        hf_model(str(tmp_path / "empty"))
    with pytest.raises(NeuronsError, match="no Hugging Face weights .*model.safetensors"):
        find_checkpoints(tmp_path / "empty")
    output = tmp_path / "output"
    _trainer_output(output)
    sorted((output / "checkpoint-5").glob("model-*.safetensors"))[0].unlink()
    config = _config(tmp_path, str(output))
    with pytest.raises(NeuronsError, match="lists the shard .*which is missing"):
        main(["analyze", "--config", str(config), "--ckpt_path", str(output / "checkpoint-5")])
    (output / "checkpoint-10" / "trainer_state.json").write_text("{}")
    with pytest.raises(NeuronsError, match="not a Hugging Face Trainer's state"):
        main(["analyze", "--config", str(config), "--ckpt_path", str(output / "checkpoint-10")])


def test_an_older_trainers_sharded_bin_checkpoint_loads_exactly(tmp_path):
    """transformers 4's ``save_pretrained(safe_serialization=False)`` of a large model:
    ``pytorch_model-0000i-of-0000n.bin`` shards and ``pytorch_model.bin.index.json`` (written
    here as it wrote them; transformers 5 writes no ``.bin``)."""
    from lightning_neurons.analyze import load_checkpoint
    from lightning_neurons.weights import read_weights

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10
    )
    state = ResNetForImageClassification(config).state_dict()
    folder = tmp_path / "checkpoint-30"
    folder.mkdir()
    config.save_pretrained(folder)
    names = list(state)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        shard = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": 3.0, "global_step": 30}))
    (found,) = find_checkpoints(folder)
    assert found.name == "pytorch_model.bin.index.json"
    weights = read_weights(load_checkpoint(found), found)
    assert (weights.epoch, weights.global_step) == (2, 30)
    assert weights.state.keys() == state.keys()
    assert all(torch.equal(weights.state[k], v) for k, v in state.items())
    (folder / weight_map[parts[1][0]]).unlink()  # a shard lost
    with pytest.raises(NeuronsError, match="lists the shard 'pytorch_model-00002-of-00002.bin'"):
        load_checkpoint(found)
