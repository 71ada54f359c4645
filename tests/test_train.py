"""Coarse-to-fine training mechanics on a few small studies with tiny networks (seconds)."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from kneebatch.ingest.label_import import import_labels
from kneebatch.ingest.store import CohortStore
from kneebatch.measure import dice_per_label
from kneebatch.training.train import split_keys, train
from tests.conftest import TINY

# where the nets train: the CPU here; a CUDA GPU (bfloat16 autocast) where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")])]


def test_split_is_8_1_1_by_subject_and_stable():
    keys = [f"k{i:020x}" for i in range(50)]
    split = split_keys(keys, seed=0)
    assert [len(split[p]) for p in ("train", "val", "test")] == [40, 5, 5]
    assert set().union(*split.values()) == set(keys)
    assert split == split_keys(list(reversed(keys)), seed=0)


def test_split_keeps_every_visit_of_a_subject_in_one_part():
    """4 subjects x 3 visits: no validation or test subject has a visit in training."""
    keys = [f"k{s}{v:019x}" for s in "abcd" for v in range(3)]
    subject = {k: f"s{k[1]}" for k in keys}
    split = split_keys(keys, seed=0, subject_of=subject.get)
    subjects = {part: {subject[k] for k in split[part]} for part in split}
    assert [len(subjects[p]) for p in ("train", "val", "test")] == [2, 1, 1]
    assert [len(split[p]) for p in ("train", "val", "test")] == [6, 3, 3]
    assert not subjects["train"] & (subjects["val"] | subjects["test"]) and not subjects["val"] & subjects["test"]
    assert set().union(*split.values()) == set(keys)
    # the old study-level split would have put visits of held-out subjects in training
    by_study = split_keys(keys, seed=0)
    assert {subject[k] for k in by_study["train"]} & {subject[k] for k in by_study["val"] + by_study["test"]}
    with pytest.raises(ValueError, match="at least 3 subjects"):
        split_keys(keys[:6], seed=0, subject_of=subject.get)  # 2 subjects


def test_dice_per_label_exact():
    import torch

    a = torch.zeros(4, 4, 4, dtype=torch.uint8)
    b = torch.zeros(4, 4, 4, dtype=torch.uint8)
    a[0:2] = 1  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    assert dice_per_label(a, b) == {"femur": pytest.approx(0.5)}


def test_train_writes_safetensors_log_metrics_and_resumes(cohort, store, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    assert import_labels(work, cohort / "truth", name="truth") == (6, [])
    out = tmp_path / "run"
    m1 = train(work, out, minutes_coarse=0.05, minutes_fine=0.05, cfg=TINY, eval_every_fine=5)
    assert m1["split"] == {"val": 1, "test": 1, "train": 4}
    # the held-out studies are named (by key), and none of them is trained on
    held = m1["held_out"]
    assert m1["split_by"] == "subject" and len(held["val"]) == len(held["test"]) == 1
    assert set(held["val"] + held["test"]) < set(CohortStore(work).study_keys())
    assert json.loads((out / "metrics.json").read_text())["held_out"] == held
    assert len(m1["test_dice"]) >= 15 and all(0.0 <= d <= 1.0 for d in m1["test_dice"].values())
    assert m1["test_mean_dice"] == pytest.approx(float(np.mean(list(m1["test_dice"].values()))))
    for name in ("coarse.safetensors", "fine.safetensors", "model_config.json", "metrics.json", "train_log.csv",
                 "train_curves.png", "checkpoints/fine_last.safetensors"):
        assert (out / name).exists(), name
    with safe_open(str(out / "checkpoints" / "fine_last.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["kneebatch"])
        assert any(k.startswith("opt.") for k in f.keys())  # optimizer state resumes too
    step = meta["step"]
    # a longer budget resumes from the checkpoint instead of starting again
    train(work, out, minutes_coarse=0.05, minutes_fine=meta["elapsed_s"] / 60 + 0.1, cfg=TINY, eval_every_fine=5)
    with safe_open(str(out / "checkpoints" / "fine_last.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["kneebatch"])["step"] > step
    header = (out / "train_log.csv").read_text().splitlines()[0]
    assert header.startswith("stage,step,minutes") and "val_femur" in header


def test_init_copies_every_tensor_whose_name_and_shape_match(tmp_path):
    """Fine-tuning from an instance-norm net into a batch-norm one: convolutions carry over, norms start fresh."""
    from dataclasses import replace

    import torch

    from kneebatch.models.checkpoints import save_weights
    from kneebatch.models.config import build_network
    from kneebatch.training.train import Trainer

    torch.manual_seed(0)
    source = build_network(replace(TINY.fine, norm="INSTANCE"), 2, TINY.n_classes)
    save_weights(tmp_path / "fine.safetensors", source.state_dict(), dtype=torch.float16)
    target = build_network(TINY.fine, 2, TINY.n_classes)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    Trainer._initialise(target, tmp_path / "fine.safetensors")
    after = target.state_dict()
    copied = [k for k in source.state_dict() if k in after]
    assert copied and len(copied) < len(after)  # batch-norm tensors have no source
    for k in copied:
        assert torch.equal(after[k], source.state_dict()[k].half().float())
    for k in set(after) - set(copied):
        assert torch.equal(after[k], before[k])
    with pytest.raises(FileNotFoundError, match="--init"):
        Trainer._initialise(target, tmp_path / "coarse.safetensors")


def test_half_precision_weights_keep_out_of_range_tensors_exact(tmp_path):
    """A batch norm's running variance can exceed float16's range (65504): it must not become inf."""
    import torch

    from kneebatch.models.checkpoints import load_weights, save_weights

    state = {"conv.weight": torch.randn(4, 4) * 0.1, "bn.running_var": torch.tensor([0.5, 1.2e5, 3.0e6]),
             "bn.num_batches_tracked": torch.tensor(7)}
    save_weights(tmp_path / "w.safetensors", state, {"step": 1}, dtype=torch.float16)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.get_tensor("conv.weight").dtype == torch.float16
        assert f.get_tensor("bn.running_var").dtype == torch.float32
    loaded, meta = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(loaded["bn.running_var"], state["bn.running_var"]) and meta == {"step": 1}
    assert torch.allclose(loaded["conv.weight"], state["conv.weight"], atol=1e-3)
    assert int(loaded["bn.num_batches_tracked"]) == 7


@pytest.mark.parametrize("device", DEVICES)
def test_domain_randomised_training_runs_resumes_and_scores_each_contrast(tmp_path, device):
    """Images made from label volumes during training; one-channel nets; per-contrast test Dice."""
    from dataclasses import replace

    from kneebatch.synth.cohort import PRESETS
    from kneebatch.training.domain import VALIDATION_CONTRASTS, train_domain
    from kneebatch.training.synthesis import HELD_OUT_FAMILIES, cached_volumes

    volumes = cached_volumes(tmp_path / "volumes", 5, 10, PRESETS["small"])
    assert len(list((tmp_path / "volumes").glob("*.npz"))) == 10
    cfg = replace(TINY, in_channels=1, input_roles=[], per_series=True)
    m = train_domain(volumes, tmp_path / "run", 0.05, 0.05, cfg=cfg, eval_every_fine=3, device=device)
    assert m["split"] == {"val": 1, "test": 1, "train": 8}
    assert set(m["test_dice_by_contrast"]) == {*VALIDATION_CONTRASTS, *HELD_OUT_FAMILIES}
    assert m["held_out_contrasts"] == list(HELD_OUT_FAMILIES)
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert saved["in_channels"] == 1 and saved["per_series"] is True
    with safe_open(str(tmp_path / "run" / "checkpoints" / "fine_last.safetensors"), "pt") as f:
        step = json.loads(f.metadata()["kneebatch"])["step"]
    train_domain(volumes, tmp_path / "run", 0.05, 0.2, cfg=cfg, eval_every_fine=3, device=device)  # resumes
    with safe_open(str(tmp_path / "run" / "checkpoints" / "fine_last.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["kneebatch"])["step"] > step
    if device == "cuda":
        import torch

        assert torch.cuda.max_memory_allocated() > 0  # the nets did train on the GPU


@pytest.mark.parametrize("device", DEVICES)
def test_partial_labels_train_with_the_marginal_loss_and_score_the_set(cohort, store, tmp_path, device):
    """An OAI-ZIB-like store (four classes) trains tiny engines with the marginal loss, then fine-tunes them
    (--init: the frozen teacher keeps what the set does not annotate); validation scores the set's classes."""
    import numpy as np

    from kneebatch.ingest.store import CohortStore
    from kneebatch.label_sets import LABEL_SETS
    from kneebatch.training.train import StoreTrainer

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    import_labels(work, cohort / "truth", name="truth")
    s = CohortStore(work)
    zib = LABEL_SETS["oai-zib"]
    lut = np.zeros(32, np.uint8)
    for i, ids in zib.ids.items():
        lut[list(ids)] = i
    for key in s.study_keys():
        s.write_labels(key, lut[s.read_labels(key, "truth")], name="zib")
    m = train(work, tmp_path / "run", minutes_coarse=0.05, minutes_fine=0.05, cfg=TINY, eval_every_fine=5,
              label_name="zib", label_set=zib, device=device)
    assert set(m["test_dice"]) <= set(zib.class_names()[1:]) and "femur" in m["test_dice"]
    tuned = train(work, tmp_path / "tuned", minutes_coarse=0.02, minutes_fine=0.05, cfg=TINY, eval_every_fine=5,
                  label_name="zib", label_set=zib, init_from=tmp_path / "run", device=device, lr=1e-4)
    assert set(tuned["test_dice"]) <= set(zib.class_names()[1:]) and "femur" in tuned["test_dice"]
    tr = StoreTrainer(work, tmp_path / "run2", cfg=TINY, label_name="zib", label_set=zib)
    case = tr._load(tr.split["train"][0], keep_native=False)
    assert set(case.coarse_y.unique().tolist()) <= {0, 1, 2, 3, 4}
    assert type(tr.loss_function()).__name__ == "MarginalDiceCE"


def test_optimizer_state_survives_two_resumes(tmp_path):
    """Each parameter gets its own Adam moments back, also when saved by a run that was itself resumed."""
    import torch

    from kneebatch.models.checkpoints import load_weights, save_weights
    from kneebatch.training.train import _load_optimizer, _optimizer_tensors

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(3 + i, 4 + i) for i in range(12)])  # > 10 tensors: "10" < "2"

    def fresh():
        return torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step(opt):
        net(torch.randn(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()

    opt = fresh()
    step(opt)
    for round_ in range(2):
        save_weights(tmp_path / "last.safetensors", _optimizer_tensors(opt))
        before = {id(p): opt.state[p]["exp_avg"].clone() for p in net.parameters()}
        opt = fresh()
        _load_optimizer(opt, load_weights(tmp_path / "last.safetensors")[0])
        for p in net.parameters():
            assert torch.equal(opt.state[p]["exp_avg"], before[id(p)]), round_
        step(opt)


def test_training_on_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    import torch

    from kneebatch.training.domain import train_domain

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="sees no CUDA device here; train with --device cpu"):
        train_domain([], tmp_path / "run", 0.05, 0.05, device="cuda")
    from kneebatch.cli import main

    assert main(["train-synthetic", str(tmp_path / "run"), "--device", "cuda", "--batch-size", "8"]) == 2
    assert not (tmp_path / "run").exists()


def test_checkpoints_follow_the_wall_clock_between_validations(cohort, store, tmp_path, monkeypatch):
    """Between validations the full state is saved every CHECKPOINT_EVERY_S seconds of wall clock:
    with 0 s every step is saved (an interrupt loses nothing), with the default only the end is."""
    import kneebatch.training.train as train_module

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    import_labels(work, cohort / "truth", name="truth")
    saved = []
    real = train_module.save_weights

    def spy(path, state, metadata=None, dtype=None):
        if path.name == "fine_last.safetensors":
            saved.append(metadata["step"])
        return real(path, state, metadata, dtype)

    monkeypatch.setattr(train_module, "save_weights", spy)
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY_S", 0.0)
    train(work, tmp_path / "every", minutes_coarse=0.02, minutes_fine=0.05, cfg=TINY, eval_every_fine=10**6)
    assert len(saved) >= 3 and saved == list(range(1, len(saved) + 1))  # every step
    saved.clear()
    monkeypatch.setattr(train_module, "CHECKPOINT_EVERY_S", 3600.0)
    train(work, tmp_path / "end", minutes_coarse=0.02, minutes_fine=0.05, cfg=TINY, eval_every_fine=10**6)
    assert len(saved) == 1  # the validation at the end of the budget


def test_the_training_bar_shows_step_loss_and_time_left(capsys):
    from kneebatch.progress import budget_bar

    with budget_bar(600.0, "training the fine net", show=True, done=60.0) as update:
        update(150.0, "fine net: step 40, loss 0.512, best val 0.801")
    out = capsys.readouterr().out
    assert "fine net: step 40, loss 0.512, best val 0.801" in out and "left 7:30" in " ".join(out.split())


def test_progress_rates_are_averages_since_the_bar_began(capsys, monkeypatch):
    """Results arrive in batches: the rate is what was done over the time since the start, never
    the burst between two arrivals; nothing is shown before the first result."""
    from kneebatch import progress

    assert progress.rate_text(0, 10.0, "studies") == ""
    assert progress.rate_text(4, 10.0, "studies") == "0.40 studies/s"
    assert progress.rate_text(2, 190.0, "studies") == "95 s each"
    clock = iter([100.0, 110.0, 110.001])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.progress_bar(8, "segmenting studies", show=True) as advance:
        advance(4)  # 10 s after the start
        advance(4)  # a millisecond later: 8 in 10 s, not 4,000/s
    out = " ".join(capsys.readouterr().out.split())
    assert "0.80 studies/s" in out and not re.search(r"\d{2,}\.\d\d studies/s", out)
