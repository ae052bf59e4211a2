"""Checkpoint directories in one process: layout and manifest, the K newest kept, damaged
files refused by name with a fallback, export to one safetensors file, and resumed data
positions that see every sample of an epoch once, whatever the new number of workers."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import disttrain as dt
from disttrain import checkpoint_dist
from disttrain.data import DataLoader, TensorDataset
from disttrain.parallel import DataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))
import harness  # noqa: E402


def train(directory, steps, every=2, keep=2, seed=0):
    """A tiny model trained `steps` steps of a job (resuming from `directory` if it holds a
    checkpoint); returns the model and the first step it ran."""
    dt.manual_seed(seed)
    model = dt.nn.Sequential(dt.nn.Linear(4, 3), dt.nn.BatchNorm1d(3), dt.nn.Linear(3, 1))
    optimizer = dt.optim.Adam(model.parameters(), lr=0.01)
    data = np.random.default_rng(0).standard_normal((64, 5)).astype(np.float32)
    loader = DataLoader(TensorDataset(data[:, :4], data[:, 4:]), batch_size=8, shuffle=True,
                        drop_last=True, seed=1, prefetch=0)
    saved = checkpoint_dist.Checkpoints(directory, every, keep)
    trainer = DataParallel(model, optimizer, checkpoints=saved)
    position = saved.resume(trainer, model, optimizer)
    first = position["step"] if position else 0
    batches = harness.Batches(loader, first, steps, position)
    for step, (x, y) in batches:
        loss = dt.nn.functional.mse_loss(model(dt.tensor(x)), dt.tensor(y))
        trainer.zero_grad()
        loss.backward()
        trainer.step()
        saved.after_step(step + 1, batches.position, model, optimizer, last=step + 1 == steps)
    return model, first


def test_the_newest_k_complete_checkpoints_are_kept_each_with_a_full_manifest(tmp_path):
    train(tmp_path, 7)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000006", "step-000007"]
    assert (tmp_path / "latest").read_text().strip() == "step-000007"
    manifest = json.loads((tmp_path / "step-000007" / "manifest.json").read_text())
    assert (manifest["step"], manifest["workers"], manifest["servers"], manifest["mode"]) == \
        (7, 1, 0, "local")
    for entry in manifest["files"]:
        data = (tmp_path / "step-000007" / entry["file"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == checkpoint_dist.hashlib.sha256(data).hexdigest()


def test_a_resumed_run_ends_with_the_weights_of_an_unbroken_one(tmp_path):
    unbroken, _ = train(tmp_path / "a", 12)
    train(tmp_path / "b", 5)
    resumed, first = train(tmp_path / "b", 12)
    assert first == 5
    for name, value in unbroken.state_dict().items():   # weights and BatchNorm statistics
        np.testing.assert_array_equal(value, resumed.state_dict()[name], err_msg=name)


def test_a_damaged_file_is_refused_by_name_and_the_previous_checkpoint_used(tmp_path, capsys):
    unbroken, _ = train(tmp_path / "a", 10)
    train(tmp_path / "b", 7)
    damaged = tmp_path / "b" / "step-000007" / "worker-0.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    resumed, first = train(tmp_path / "b", 10)
    err = capsys.readouterr().err
    assert f"refusing checkpoint step-000007: {damaged} is" in err and "truncated" in err
    assert "resuming from step-000006" in err and first == 6
    for name, value in unbroken.state_dict().items():
        np.testing.assert_array_equal(value, resumed.state_dict()[name], err_msg=name)


def test_an_interrupted_write_leaves_the_previous_checkpoint_latest(tmp_path):
    train(tmp_path, 4)
    (tmp_path / "step-000005").mkdir()           # a crash before its manifest was written
    (tmp_path / "step-000005" / "worker-0.safetensors").write_bytes(b"half")
    assert checkpoint_dist.complete_checkpoints(tmp_path)[0].name == "step-000004"
    _, first = train(tmp_path, 6)
    assert first == 4


def test_export_writes_full_weights_that_the_safetensors_package_loads(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model, _ = train(tmp_path / "ckpt", 3)
    out = tmp_path / "model.safetensors"
    exported = subprocess.run([sys.executable, "-m", "disttrain.checkpoint", "export",
                               str(tmp_path / "ckpt"), str(out)], capture_output=True, text=True,
                              timeout=120)
    assert exported.returncode == 0 and not exported.stderr, exported.stderr
    loaded = safetensors_numpy.load_file(str(out))
    assert sorted(loaded) == sorted(model.state_dict())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded[name], value)


def samples_seen(num_samples, steps, workers, batch_size, position=None, first=0, last=None):
    """The sample indices all workers' shards yield from `first` to `last`, and the position
    a checkpoint after them records."""
    seen = []
    dataset = np.arange(num_samples)
    end = None
    for rank in range(workers):
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                            seed=7, num_shards=workers, shard_index=rank, prefetch=0)
        batches = harness.Batches(loader, first, last if last is not None else steps, position)
        for _, batch in batches:
            seen += list(np.asarray(batch).reshape(-1))
        end = batches.position
    return seen, end


@pytest.mark.parametrize("workers,batch_size", [(4, 4), (3, 5), (1, 16)])
def test_resuming_on_another_worker_count_sees_each_sample_of_the_epoch_once(workers, batch_size):
    """2 workers x 8 for 5 steps (80 of 240 samples), then the rest of the epoch elsewhere."""
    before, position = samples_seen(240, 5, 2, 8)
    assert position == {"epoch": 0, "start": 80, "epoch_end": False}
    after, _ = samples_seen(240, None, workers, batch_size, position, first=5,
                            last=5 + (240 - 80) // (workers * batch_size))
    counts = np.bincount(before + after, minlength=240)
    assert counts.max() == 1                                  # none twice
    left_out = 240 - counts.sum()
    assert left_out == (240 - 80) % (workers * batch_size)    # only the last partial batch
