"""Model selection and augmentation: a validation split held out of train, the best weights
kept, the overfitting warning, exact resumption, and mirrored training images."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imagetransformer import TrainConfig, UserError
from imagetransformer.data import ImageDataset, load_dataset
from imagetransformer.data.validation import VALIDATION_MAX, split_validation, validation_size
from imagetransformer.run import DataOptions, Run, RunInfo, load_run_split
from imagetransformer.training import Trainer, batch_indices, flip_mask, micro_batches

from .helpers import tiny_config


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("mnist5k", "train", image_size=8)


def test_validation_is_a_fixed_disjoint_part_of_train(digits8):
    train, held = split_validation(digits8, 0.1)
    assert len(held) == 400 and len(train) == 3600
    whole = set(range(len(digits8)))
    assert set(held.indices.tolist()) | set(train.indices.tolist()) == whole
    assert not set(held.indices.tolist()) & set(train.indices.tolist())
    again = split_validation(digits8, 0.1)[1]  # seeded: the same images every time
    assert torch.equal(held.indices, again.indices)
    images, labels = held.batch(torch.tensor([0, 5]))
    assert torch.equal(images, digits8.images[held.indices[[0, 5]]])
    assert torch.equal(labels, digits8.labels[held.indices[[0, 5]]])
    assert split_validation(digits8, 0.0) == (digits8, None)
    assert validation_size(10**7, 0.1) == VALIDATION_MAX and validation_size(2, 0.5) == 0


def test_a_folder_holds_out_validation_from_its_train_part(tmp_path):
    from PIL import Image

    for i in range(30):
        Image.new("RGB", (32, 32), (i * 8, 0, 0)).save(tmp_path / f"{i:02d}.png")
    options = RunInfo(train=TrainConfig()).data_options()
    test = load_run_split(options, str(tmp_path), "test", 0.1)
    train = load_run_split(options, str(tmp_path), "train", 0.1)
    held = load_run_split(options, str(tmp_path), "validation", 0.1)
    ids = [set(d.ids) for d in (train, held, test)]
    assert [len(s) for s in ids] == [25, 2, 3]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    with pytest.raises(UserError, match="holds out none"):
        load_run_split(options, str(tmp_path), "validation", 0.0)


def _digits_trainer(tmp_path, name, train, validation=None, config=None, **settings) -> Trainer:
    """A trainer of a tiny 8x8 model on `train` (and `validation`), with `settings` of
    TrainConfig (no sample grids)."""
    info = RunInfo(train=TrainConfig(sample_count=0, **settings), data="mnist5k", image_size=8)
    config = config or tiny_config("local_1d", image_shape=(1, 8, 8))
    run = Run(tmp_path / name, config, info)
    return Trainer(run, train, None, progress=False, validation_set=validation)


def _overfitting_trainer(tmp_path, name, max_steps, digits8):
    """16 training digits, 32 validation digits: validation bits/dim rises within 80 steps."""
    return _digits_trainer(
        tmp_path,
        name,
        ImageDataset(digits8.images[:16], None, None, "digits16"),
        ImageDataset(digits8.images[100:132], None, None, "digits32"),
        config=tiny_config("local_1d", image_shape=(1, 8, 8), d_model=32),
        batch_size=8,
        max_steps=max_steps,
        learning_rate=0.5,
        warmup_steps=10,
        eval_every=20,
        checkpoint_every=10,
        seed=3,
    )


def test_best_validation_weights_are_kept_the_warning_said_once_and_resume_is_exact(
    tmp_path, digits8, capsys
):
    straight = _overfitting_trainer(tmp_path, "straight", 80, digits8)
    snapshots = {}
    validate = straight.validate

    def recording_validate(*args, **kwargs):
        snapshots[straight.step] = {k: v.clone() for k, v in straight.model.state_dict().items()}
        return validate(*args, **kwargs)

    straight.validate = recording_validate
    straight.start_new()
    result = straight.fit(log=False)
    said = capsys.readouterr().out + capsys.readouterr().err

    evaluations = [h for h in straight.history if h.get("split") == "validation"]
    assert [h["step"] for h in evaluations] == [20, 40, 60, 80]
    best = min(evaluations, key=lambda h: h["bits_per_dim"])
    assert best["step"] < 80, "this set-up should overfit: the last weights are not the best"
    saved = load_file(tmp_path / "straight" / "model.safetensors")
    for key, value in snapshots[best["step"]].items():
        assert torch.equal(saved[key], value), key
    recorded = json.loads((tmp_path / "straight" / "run.json").read_text())["selected"]
    assert recorded["step"] == best["step"] == result["selected_step"]
    assert recorded["bits_per_dim"] == pytest.approx(best["bits_per_dim"])
    checkpoint = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 80  # the latest state, for resuming
    for key, value in snapshots[80].items():
        assert torch.equal(checkpoint["model"][key], value), key

    val = [h["bits_per_dim"] for h in evaluations]
    train = [h["train_bits_per_dim"] for h in evaluations]
    rose_while_falling = [
        val[i - 2] < val[i - 1] < val[i] and train[i - 2] > train[i - 1] > train[i]
        for i in range(2, len(val))
    ]
    assert said.count("overfitting") == (1 if any(rose_while_falling) else 0)
    if any(rose_while_falling):
        assert f"keeps step {best['step']}" in said or "keeps step" in said

    broken = _overfitting_trainer(tmp_path, "broken", 50, digits8)
    broken.start_new()
    broken.fit(log=False)
    resumed = _overfitting_trainer(tmp_path, "broken", 80, digits8)
    resumed.resume()
    assert resumed.step == 50
    resumed.fit(log=False)
    again = load_file(tmp_path / "broken" / "model.safetensors")
    for key, value in saved.items():
        assert torch.allclose(again[key], value, atol=1e-6), key
    assert [h["step"] for h in resumed.history if h.get("split") == "validation"] == [
        20,
        40,
        50,  # the end of the first part is a final evaluation of its own
        60,
        80,
    ]
    assert resumed.best["step"] == best["step"]


def test_a_run_without_validation_keeps_its_last_weights(tmp_path, digits8):
    trainer = _digits_trainer(tmp_path, "r", digits8, max_steps=6, eval_every=3, checkpoint_every=3)
    trainer.start_new()
    trainer.fit(log=False)
    saved = load_file(tmp_path / "r" / "model.safetensors")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(saved[key], value), key
    assert json.loads((tmp_path / "r" / "run.json").read_text())["selected"] is None


def test_old_run_records_keep_training_on_the_whole_train_split():
    assert TrainConfig.from_dict({"max_steps": 5}).validation_fraction == 0.0
    assert TrainConfig().validation_fraction == 0.1
    with pytest.raises(UserError, match="validation_fraction"):
        TrainConfig(validation_fraction=1.0)


def test_flips_are_a_function_of_seed_and_step_whatever_the_processes(digits8):
    mask = flip_mask(7, 64, seed=1)
    assert torch.equal(mask, flip_mask(7, 64, seed=1))
    assert not torch.equal(mask, flip_mask(8, 64, seed=1))
    assert 16 < int(mask.sum()) < 48  # about half

    def shares(world: int) -> list:  # a global batch of 16 images either way
        cfg = TrainConfig(batch_size=4, grad_accum=4 // world, hflip=True, seed=1)
        return [micro_batches(7, len(digits8), cfg, rank, world) for rank in range(world)]

    def by_image(parts) -> dict:
        return {
            int(i): bool(f)
            for rank in parts
            for idx, flips in rank
            for i, f in zip(idx, flips, strict=True)
        }

    one, two = shares(1), shares(2)
    assert by_image(one) == by_image(two)  # the same images, mirrored the same way
    assert len(by_image(one)) == 16


def test_mirrored_images_are_trained_on_and_resume_stays_exact(tmp_path, digits8):
    def trainer(name: str, steps: int) -> Trainer:
        return _digits_trainer(
            tmp_path,
            name,
            digits8,
            batch_size=8,
            max_steps=steps,
            learning_rate=0.5,
            warmup_steps=5,
            eval_every=0,
            checkpoint_every=4,
            validation_fraction=0.0,
            hflip=True,
        )

    seen = []
    straight = trainer("straight", 10)
    forward = straight.forward
    straight.forward = lambda images, labels: forward(seen.append(images.clone()) or images, labels)
    straight.start_new()
    straight.fit(log=False)
    assert len(seen) == 10
    for step in (0, 9):
        originals = digits8.images[batch_indices(step, len(digits8), 8, seed=0)]
        flips = flip_mask(step, 8, seed=0)
        assert 0 < int(flips.sum()) < 8 or step == 9
        for image, original, flip in zip(seen[step], originals, flips, strict=True):
            assert torch.equal(image, original.flip(-1) if flip else original)
    broken = trainer("broken", 4)
    broken.start_new()
    broken.fit(log=False)
    resumed = trainer("broken", 10)
    resumed.resume()
    resumed.fit(log=False)
    for (name, a), (_, b) in zip(
        straight.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def _photos(folder, count: int, size=(120, 90)) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(count)
    for i in range(count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / f"photo{i:02d}.png")


def test_random_crops_of_a_folder_are_seeded_per_image_and_at_several_scales(tmp_path):
    from PIL import Image

    from imagetransformer.data.folder import random_crops

    _photos(tmp_path / "train", 4)
    _photos(tmp_path / "test", 2)
    train = load_dataset(str(tmp_path), "train", image_size=16, crops=25)
    assert len(train) == 100 and train.shape == (3, 16, 16)
    assert train.groups.tolist() == [i for i in range(4) for _ in range(25)]
    again = load_dataset(str(tmp_path), "train", image_size=16, crops=25)
    assert torch.equal(train.images, again.images)  # seeded
    # an image's crops do not depend on the other files of the folder
    (tmp_path / "train" / "photo00.png").unlink()
    fewer = load_dataset(str(tmp_path), "train", image_size=16, crops=25)
    assert torch.equal(fewer.images, train.images[25:])
    # the crops are of several sizes: some close-ups, some near the whole picture
    with Image.open(tmp_path / "train" / "photo01.png") as photo:
        photo = photo.convert("RGB")
        crops = random_crops(photo, 16, 200, "train/photo01.png")
        whole = np.asarray(photo.resize((16, 16), Image.BOX)).astype(float)
    distances = [np.abs(c.astype(float) - whole).mean() for c in crops]
    assert len({c.tobytes() for c in crops}) == 200
    assert min(distances) < 0.5 * max(distances)
    # validation holds out whole photos, never crops of training photos
    kept, held = split_validation(train, 0.25)
    assert set(held.groups.tolist()).isdisjoint(kept.groups.tolist())
    assert len(held) == 25
    with pytest.raises(UserError, match="not one: drop --crops"):
        load_dataset("mnist5k", "train", crops=3)


def test_training_on_crops_is_recorded_and_reused_by_the_verbs(tmp_path, capsys):
    from imagetransformer.cli import main

    _photos(tmp_path / "photos" / "train", 3)
    _photos(tmp_path / "photos" / "test", 1)
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(tmp_path / "photos"), "--crops", "10"]
    args += ["--image-size", "8", "--channels", "1", "--out", str(out), "--quiet"]
    args += ["--set", "max_steps=2", "--set", "sample_count=0"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "27 train / 3 validation / 10 test images" in said  # 1 crop of each photo's strip
    assert "validation: crops of the last 10% of each photo's long side" in said
    record = json.loads((out / "run.json").read_text())
    assert record["crops"] == 10 and record["validation_strips"] is True
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 10
    assert main(["eval", str(out), "--split", "validation", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 3
    code = main(["train", "--out", str(out), "--resume", "--crops", "5", "--quiet"])
    assert code == 2 and "trained with --crops 10" in capsys.readouterr().err


def test_train_cuts_crops_by_itself_from_photos_much_larger_than_the_model(tmp_path, capsys):
    """Photos at least 4x the model's side: `train` cuts random crops of each (as many as the
    budget gives, at most 200), says so once and records it; `--crops 0` keeps one resized copy
    of each; a test image no larger than the model is itself once, not many identical crops."""
    from imagetransformer.cli import main
    from imagetransformer.data.folder import automatic_crops

    _photos(tmp_path / "photos" / "train", 3)  # 120x90: short side 90 >= 4 x 8
    _photos(tmp_path / "photos" / "test", 2, size=(8, 8))
    assert automatic_crops(tmp_path / "photos", 8) == (200, 90)
    assert automatic_crops(tmp_path / "photos", 32) == (0, 90)  # 90 < 4 x 32: resized copies
    base = ["train", "--preset", "tiny", "--data", str(tmp_path / "photos"), "--quiet"]
    base += ["--image-size", "8", "--channels", "1"]
    base += ["--set", "max_steps=1", "--set", "sample_count=0"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    said = capsys.readouterr().out
    assert said.count("training on 200 random crops of each") == 1 and "--crops 0" in said
    assert "540 train / 60 validation / 2 test images" in said  # a strip of each of 3 photos
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["crops"] == 200
    assert main([*base, "--crops", "0", "--out", str(tmp_path / "copies")]) == 0
    said = capsys.readouterr().out
    assert "random crops" not in said and "2 train / 1 validation / 2 test images" in said


def test_a_folder_of_few_photos_validates_on_a_strip_of_each_that_training_never_touches(
    tmp_path, monkeypatch
):
    """Too few photos to hold out whole ones: each photo's validation crops come from the last
    tenth of its long side, its training crops from the rest; runs recorded before strips
    existed keep holding out whole photos."""
    from PIL import Image

    from imagetransformer.data import folder

    root = tmp_path / "photos"
    for part, count in (("train", 3), ("test", 1)):
        (root / part).mkdir(parents=True)
        for i in range(count):
            pixels = np.random.default_rng(i).integers(0, 128, (90, 120, 3), dtype=np.uint8)
            pixels[:, 108:] = 255  # the strip: the last 12 of 120 columns, pure white
            Image.fromarray(pixels).save(root / part / f"p{i}.png")
    assert folder.strip_boxes(120, 90, 0.1, 8) == ((0, 0, 108, 90), (108, 0, 120, 90))
    assert folder.strip_boxes(90, 120, 0.1, 8) == ((0, 0, 90, 108), (0, 108, 90, 120))
    assert folder.strip_boxes(12, 10, 0.1, 8) is None  # 4 columns would be left to train on
    assert folder.validation_strips(root, 20, 0.1)  # 3 photos x 0.1 < 5 whole ones
    assert not folder.validation_strips(root, 0, 0.1) and not folder.validation_strips(root, 20, 0)
    monkeypatch.setattr(folder, "WHOLE_PHOTOS", 1)
    assert not folder.validation_strips(root, 20, 0.5)  # 1.5 photos: whole ones then
    monkeypatch.undo()

    train = load_dataset(str(root), "train", image_size=8, crops=20, strip=0.1)
    assert len(train) == 60 and int(train.held.sum()) == 6  # 2 of each photo's 20
    assert train.held.view(3, 20)[:, -2:].all()
    assert torch.equal(
        train.images, load_dataset(str(root), "train", image_size=8, crops=20, strip=0.1).images
    )  # seeded
    kept, held = split_validation(train, 0.1)
    assert len(kept) == 54 and len(held) == 6 and held.name.endswith("(validation)")
    assert bool((held.images == 255).all())  # every validation crop lies inside the strip
    assert int(kept.images.max()) < 128  # no training crop touches it
    assert all(i.split("#")[1].startswith("held") for i in held.ids)
    assert load_dataset(str(root), "test", image_size=8, crops=20).held is None

    # the run records the choice; an old record without it holds out whole photos
    run = Run.new(
        tmp_path / "run",
        "tiny",
        ["validation_fraction=0.1"],
        str(root),
        DataOptions(image_size=8, crops=20),
    )
    assert run.info.validation_strips and run.info.data_options().strip == 0.1
    info = json.loads(run.info.to_json())
    del info["validation_strips"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps(info))
    old = RunInfo.read(tmp_path / "old")
    assert not old.validation_strips and old.data_options().strip == 0.0
    whole = load_run_split(old.data_options(), str(root), "validation", 0.1)
    assert len(whole) == 20 and whole.groups.unique().numel() == 1  # one whole photo
