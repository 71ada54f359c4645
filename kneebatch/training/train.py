"""``kneebatch train``: the paper's coarse-to-fine sequential training.

1. coarse net on whole volumes resized to ``coarse_shape``;
2. the trained coarse net predicts every training volume; its foreground box (plus the
   crop margin and a random jitter of up to ``jitter_mm`` per side, so the fine net
   learns to tolerate coarse errors) is cropped and resized to the fine working grid;
3. fine net on random patches of those crops (half centred on thin tissues and the fibula).

Subject-level split 8:1:1 (train/val/test). Validation Dice per label drives
best-checkpoint selection (EMA weights). Everything is written under ``OUT``:
``coarse.safetensors``, ``fine.safetensors`` (best, fp16), ``model_config.json``,
``metrics.json``, ``train_log.csv``, ``train_curves.png``, and ``checkpoints/`` with
the last full state of each stage, from which an interrupted run resumes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from kneebatch import labels as L
from kneebatch.errors import StudyError
from kneebatch.measure import dice, dice_per_label
from kneebatch.models.checkpoints import load_weights, save_weights
from kneebatch.models.config import ModelConfig, build_network
from kneebatch.models.preprocess import box_from_mask, fine_crop, normalize, pad_to_multiple, resize
from kneebatch.progress import budget_bar

# Half the fine patches are centred on these: the thin tissues, and the fibula, a few
# sagittal slices wide, whose edge slices are mostly partial volume.
CENTRED_TISSUES = [lab.id for lab in L.LABELS
                   if lab.group in ("cartilage", "meniscus", "ligament", "tendon", "fluid") or lab.name == "fibula"]


@dataclass
class Case:
    key: str
    coarse_x: torch.Tensor  # [2, *coarse_shape] float16
    coarse_y: torch.Tensor  # [*coarse_shape] uint8
    fine_x: torch.Tensor | None = None  # [2, *working] float16
    fine_y: torch.Tensor | None = None  # [*working] uint8
    native: tuple | None = None  # for test-time evaluation: (image uint16, labels uint8, grid)
    full: tuple | None = None  # (x, y, grid) at full resolution, until the fine crop is cut from it
    contrast: str = ""  # synthetic images: the appearance they were rendered with


CHECKPOINT_EVERY_S = 180.0  # wall-clock seconds between checkpoints of the full training state


def split_keys(keys, seed: int = 0, subject_of=None) -> dict[str, list[str]]:
    """Deterministic 8:1:1 split by subject: every study of a subject (``subject_of(key)``; a study
    whose subject is unknown is its own) lands in the same part, so no visit of a validation or
    test subject is trained on. Subjects are ordered by a hash of their first study key (with one
    study per subject, the order of the studies themselves); validation and test take whole
    subjects until they hold a tenth of the studies each (at least one)."""
    groups: dict = {}
    for k in sorted(keys):
        subject = subject_of(k) if subject_of is not None else None
        groups.setdefault(subject if subject is not None else ("study", k), []).append(k)
    if len(groups) < 3:
        raise ValueError(f"{len(keys)} studies of {len(groups)} subjects: a split into training, validation and test "
                         "needs studies of at least 3 subjects")
    ordered = sorted(groups.values(), key=lambda g: hashlib.sha256(f"{seed}:{g[0]}".encode()).hexdigest())
    n = len(keys)
    out = {"val": [], "test": [], "train": []}
    wanted = {"val": max(1, round(n * 0.1)), "test": max(1, round(n * 0.1))}
    for i, group in enumerate(ordered):
        last = i == len(ordered) - 1
        part = next((p for p in ("val", "test") if len(out[p]) < wanted[p] and not (last and not out["train"])),
                    "train")
        out[part].extend(group)
    return out


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class Trainer:
    """The coarse-to-fine training loop (checkpoints, EMA, validation, test) over the cases a
    subclass loads: :class:`StoreTrainer` from a cohort store's label maps,
    :class:`~kneebatch.training.domain.DomainTrainer` from synthetic label volumes. The nets train
    on ``device`` (on a GPU in bfloat16 autocast); cases and batches are made on the CPU and go
    there one batch at a time."""

    def __init__(self, out, cfg: ModelConfig | None = None, label_name: str = "truth", seed: int = 0,
                 jitter_mm: float = 10.0, batch_size: int = 2, lr: float = 2e-3, init_from=None, label_set=None,
                 device: str = "cpu"):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.out / "checkpoints"
        self.cfg = cfg or ModelConfig()
        self.label_name = label_name
        self.seed, self.jitter_mm, self.batch_size, self.lr = seed, jitter_mm, batch_size, lr
        self.init_from = init_folder(init_from)
        self.label_set = label_set  # kneebatch.label_sets.LabelSet: partial labels (marginal loss)
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.log_rows: list[dict] = []
        self.checkpoint_every_s = CHECKPOINT_EVERY_S
        self.show_progress = None  # a bar on a terminal (step, loss, time left of the budget)
        self.device = torch.device(device)
        # bfloat16 where the GPU computes it natively (Ampere and later); float32 elsewhere
        self.autocast = self.device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)

    def load(self) -> None:
        """Fill ``self.cases`` (``train``, ``val``, ``test``) from ``self.split``."""
        raise NotImplementedError

    def extra_metrics(self) -> dict:
        """What a subclass adds to ``metrics.json``."""
        return {}

    def _on_host(self, model):
        """``model`` (on the training device) as a function of CPU tensors: validation works on the
        CPU-held cases with the same code on every device."""
        if self.device.type == "cpu":
            return model
        return lambda v: model(v.to(self.device)).float().cpu()

    def _use_keys(self, keys, subject_of=None) -> None:
        self.split = split_keys(keys, self.seed, subject_of)
        (self.out / "model_config.json").write_text(self.cfg.to_json())

    def make_fine_crops(self, coarse_model) -> None:
        """Cut each case's fine crop (where a subclass does not cut them as it loads)."""

    # ------------------------------------------------------------------ batches
    def _augment(self, x: torch.Tensor, y: torch.Tensor):
        if self.cfg.per_series and x.shape[0] > 1:  # one-channel nets learn from each series alone
            c = int(self.rng.integers(0, x.shape[0]))
            x = x[c:c + 1]
        if self.rng.random() < 0.5:  # mirror left-right: a left knee is a mirrored right knee
            x, y = x.flip(-3), y.flip(-3)
        scale = torch.from_numpy(self.rng.uniform(0.85, 1.15, (x.shape[0], 1, 1, 1)).astype(np.float32))
        shift = torch.from_numpy(self.rng.uniform(-0.15, 0.15, (x.shape[0], 1, 1, 1)).astype(np.float32))
        return x * scale + shift, y

    def coarse_batch(self):
        cases = [self.cases["train"][i] for i in self.rng.integers(0, len(self.cases["train"]), 4)]
        xs, ys = zip(*(self._augment(c.coarse_x.float(), c.coarse_y) for c in cases))
        return torch.stack(xs), torch.stack(ys).long()[:, None]

    def fine_batch(self):
        xs, ys = [], []
        patch = self.cfg.fine_patch
        for _ in range(self.batch_size):
            case = self.cases["train"][int(self.rng.integers(0, len(self.cases["train"])))]
            x, y = case.fine_x, case.fine_y
            x, _ = pad_to_multiple(x, patch) if any(s < p for s, p in zip(x.shape[1:], patch)) else (x, None)
            y = y if tuple(y.shape) == tuple(x.shape[1:]) else _pad_labels(y, x.shape[1:])
            if self.rng.random() < 0.5:
                small = torch.nonzero(torch.isin(y, self._centred))
                centre = small[int(self.rng.integers(0, len(small)))].tolist() if len(small) else None
            else:
                centre = None
            if centre is None:
                centre = [int(self.rng.integers(0, s)) for s in y.shape]
            start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, y.shape)]
            sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
            px, py = self._augment(x[(slice(None), *sl)].float(), y[sl])
            xs.append(px)
            ys.append(py)
        return torch.stack(xs), torch.stack(ys).long()[:, None]

    @property
    def _centred(self) -> torch.Tensor:
        """Label values half the fine patches are centred on: the thin tissues (partial labels: any)."""
        if self.label_set is not None:
            return torch.arange(1, len(self.label_set.classes) + 1, dtype=torch.uint8)
        return torch.tensor(CENTRED_TISSUES, dtype=torch.uint8)

    def loss_function(self):
        if self.label_set is not None:
            from kneebatch.training.losses import MarginalDiceCE

            return MarginalDiceCE(self.label_set.membership())
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def score(self, pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
        """Dice per label; with partial labels, per class of the set (predictions merged into them)."""
        if self.label_set is None:
            return dice_per_label(pred, truth)
        lut = torch.from_numpy(self.label_set.schema_to_class()).to(pred.device)
        merged, truth = lut[pred.long()], truth.long()
        out = {}
        for c, name in enumerate(self.label_set.class_names()[1:], start=1):
            if bool((truth == c).any()):
                out[name] = dice(merged == c, truth == c)
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def validate_fine(self, model) -> dict[str, float]:
        from kneebatch.inference.segment import fine_logits, series_mean

        model.eval()
        net = self._on_host(model)
        scores = []
        for case in self.cases["val"]:
            pred = series_mean(lambda v: fine_logits(net, v, self.cfg), case.fine_x.float(), self.cfg).argmax(0)
            scores.append(self.score(pred, case.fine_y))
        model.train()
        return _mean_scores(scores)

    @torch.inference_mode()
    def validate_coarse(self, model) -> float:
        from kneebatch.inference.segment import series_mean

        model.eval()
        net = self._on_host(model)
        scores = []
        for case in self.cases["val"]:
            x, _ = pad_to_multiple(case.coarse_x.float(), self.cfg.coarse.divisor())
            fg_pred = series_mean(lambda v: net(v[None])[0], x, self.cfg).argmax(0) > 0
            fg = case.coarse_y > 0
            scores.append(dice(fg_pred, fg))
        model.train()
        return float(np.mean(scores))

    # ------------------------------------------------------------------ loops
    def run_stage(self, stage: str, minutes: float, eval_every: int) -> torch.nn.Module:
        net_cfg = self.cfg.coarse if stage == "coarse" else self.cfg.fine
        model = build_network(net_cfg, self.cfg.in_channels, self.cfg.n_classes).to(self.device)
        # the weights validated and kept: an exponential average whose decay grows to 0.99 over the
        # first steps (buffers averaged too, use_buffers: instance norm keeps none, but a net may)
        ema = AveragedModel(model, avg_fn=_ema_step, use_buffers=True)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=1e-4)
        loss_fn = self.loss_function().to(self.device)  # the marginal loss holds its class map as a buffer
        step, elapsed, best = 0, 0.0, -1.0
        last = self.ckpt / f"{stage}_last.safetensors"
        final = self.out / f"{stage}.safetensors"
        if last.exists():  # resume
            state, meta = load_weights(last)
            model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
            ema.module.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
            ema.n_averaged.fill_(meta["step"] + 1)
            _load_optimizer(opt, state)
            step, elapsed, best = meta["step"], meta["elapsed_s"], meta["best"]
            self.log_rows = meta.get("log", [])
            _log(f"{stage}: resumed at step {step}, {elapsed / 60:.1f} of {minutes} min")
        else:
            if self.init_from is not None:
                self._initialise(model, self.init_from / f"{stage}.safetensors")
        if minutes <= 0:  # this stage is not trained: the initial weights are its result
            _log(f"{stage}: not trained (0 minutes), weights as initialised")
            save_weights(final, model.state_dict(), {"stage": stage, "step": 0, "val_score": float("nan"),
                                                     "config": json.loads(self.cfg.to_json())}, dtype=torch.float16)
            return model.eval()
        if meta_done(last, minutes):
            _log(f"{stage}: already finished")
            best_state, _ = load_weights(final)
            model.load_state_dict(best_state)
            return model.eval()
        teacher, keep = None, None
        if self.label_set is not None and self.init_from is not None:
            # partial labels: the initial net, frozen, keeps the unannotated tissues as they were
            from kneebatch.training.losses import KeepUnannotated

            teacher = build_network(net_cfg, self.cfg.in_channels, self.cfg.n_classes).to(self.device)
            self._initialise(teacher, self.init_from / f"{stage}.safetensors")
            teacher.eval().requires_grad_(False)
            keep = KeepUnannotated(self.label_set.membership()).to(self.device)
        model.train()
        budget = minutes * 60.0
        t_start = time.perf_counter() - elapsed
        saved_at = time.perf_counter()
        with budget_bar(budget, f"training the {stage} net", self.show_progress, done=elapsed) as show:
            while True:  # until the step after which the budget is spent (that step is validated)
                elapsed = time.perf_counter() - t_start
                frac = min(elapsed / budget, 1.0)
                lr = self.lr * min(1.0, (step + 1) / 30) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
                for g in opt.param_groups:
                    g["lr"] = lr
                x, y = self.coarse_batch() if stage == "coarse" else self.fine_batch()
                x, y = x.to(self.device), y.to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    out = model(x)
                    if teacher is not None:
                        with torch.no_grad():
                            initial = teacher(x)
                # the losses in float32, outside autocast (which would run the marginal loss's einsum in bfloat16)
                loss = loss_fn(out.float(), y)
                if teacher is not None:
                    loss = loss + keep(out.float(), initial.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
                opt.step()
                step += 1
                ema.update_parameters(model)
                # one reading of the clock decides both: the budget's last step is always validated
                done = time.perf_counter() - t_start >= budget
                evaluated = step % eval_every == 0 or done
                if evaluated:
                    row = {"stage": stage, "step": step, "minutes": round((time.perf_counter() - t_start) / 60, 2),
                           "loss": round(float(loss.detach()), 4), "lr": lr}
                    if stage == "coarse":
                        score = self.validate_coarse(ema.module)
                        row["val_foreground_dice"] = round(score, 4)
                    else:
                        per_label = self.validate_fine(ema.module)
                        score = float(np.mean(list(per_label.values())))
                        row.update({f"val_{k}": round(v, 4) for k, v in per_label.items()})
                    row["val_score"] = round(score, 4)
                    self.log_rows.append(row)
                    if score > best:
                        best = score
                        save_weights(final, ema.module.state_dict(), {"stage": stage, "step": step, "val_score": score,
                                                               "config": json.loads(self.cfg.to_json())},
                                     dtype=torch.float16)
                    _log(f"{stage} step {step} loss {float(loss.detach()):.3f} val {score:.4f} best {best:.4f} lr {lr:.2e}")
                # the full state, at every validation and every few minutes between: an interrupt loses at most that
                if evaluated or time.perf_counter() - saved_at >= self.checkpoint_every_s:
                    state = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                             **{f"ema.{k}": v for k, v in ema.module.state_dict().items()}, **_optimizer_tensors(opt)}
                    save_weights(last, state, {"step": step, "elapsed_s": time.perf_counter() - t_start, "best": best,
                                               "minutes": minutes, "log": self.log_rows})
                    saved_at = time.perf_counter()
                show(time.perf_counter() - t_start, f"{stage} net: step {step}, loss {float(loss.detach()):.3f}, "
                                                    f"best val {max(best, 0.0):.3f}")
                if done:
                    break
        best_state, _ = load_weights(final)
        model.load_state_dict(best_state)
        return model.eval()

    @staticmethod
    def _initialise(model: torch.nn.Module, path: Path) -> None:
        """Start from another run's weights (fine-tuning): every tensor whose name and shape match."""
        if not path.exists():
            raise FileNotFoundError(f"--init: no {path.name} in {path.parent}")
        state, _ = load_weights(path)
        own = model.state_dict()
        match = {}
        for k, v in state.items():
            if k not in own:
                continue
            if own[k].shape == v.shape:
                match[k] = v
            elif v.dim() == 5 and own[k].shape[0] == v.shape[0] and own[k].shape[2:] == v.shape[2:] \
                    and own[k].shape[1] == 1:
                # a first convolution from a net with more input channels (T1 + T2 -> any one
                # series): summed over them, it answers one image as the old net answered it in both
                match[k] = v.sum(1, keepdim=True)
        model.load_state_dict(match, strict=False)
        _log(f"initialised {len(match)} of {len(own)} tensors from {path}")

    def test_scores(self, coarse, fine) -> list[dict]:
        """Full pipeline (coarse -> crop -> fine -> native grid) on each test case."""
        from kneebatch.inference.engines import TorchEngine
        from kneebatch.inference.segment import segment

        # on the CPU whatever the training device: the whole-study pipeline, as the shipped engines run it
        ce, fe = (TorchEngine.from_module(self._on_cpu(m, net)) for m, net in ((coarse, self.cfg.coarse),
                                                                             (fine, self.cfg.fine)))
        scores = []
        for case in self.cases["test"]:
            image, labels, grid = case.native
            pred, _ = segment(torch.from_numpy(image.astype(np.float32)), grid, ce, fe, self.cfg)
            scores.append(self.score(pred, torch.from_numpy(labels)))
        return scores

    def _on_cpu(self, model, net_cfg):
        """``model`` itself on the CPU, else a CPU copy of it (no second copy on the GPU)."""
        if self.device.type == "cpu":
            return model
        twin = build_network(net_cfg, self.cfg.in_channels, self.cfg.n_classes)
        twin.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        return twin.eval()

    def evaluate_test(self, coarse, fine) -> dict:
        return _mean_scores(self.test_scores(coarse, fine))


class StoreTrainer(Trainer):
    """Training on a cohort store's studies with label maps (``label_name``), split 8:1:1 by study."""

    def __init__(self, store_path, out, cfg: ModelConfig | None = None, label_name: str = "truth", **kwargs):
        from kneebatch.ingest.store import CohortStore

        super().__init__(out, cfg, label_name, **kwargs)
        self.store = CohortStore(store_path, create=False)
        labelled = [k for k in self.store.study_keys() if label_name in self.store.label_names(k)]
        keys = [k for k in labelled if self._has_inputs(k)]
        if len(keys) < 3:
            need = "any sagittal series" if self.cfg.per_series else \
                " + ".join("|".join(a) for a in self.cfg.input_roles)
            found = sorted({"+".join(self.store.channels(k)) for k in labelled}) or ["no labelled studies"]
            raise ValueError(f"need at least 3 studies with '{label_name}' label maps and the nets' inputs ({need}); "
                             f"found {len(keys)} (labelled studies have: {', '.join(found)})")
        from kneebatch.ingest.visits import visit_of

        self._use_keys(keys, lambda k: visit_of(self.store.path, k)["subject_key"])

    def _has_inputs(self, key: str) -> bool:
        try:
            self.cfg.input_channels(self.store.channels(key))
            return True
        except StudyError:
            return False

    def _load(self, key: str, keep_native: bool) -> Case:
        image, grid = self.store.read_image(key, self.cfg.input_channels(self.store.channels(key)))
        labels = self.store.read_labels(key, self.label_name)
        if self.label_set is not None:  # file ids -> the set's classes (0 = every unannotated label)
            labels = self.label_set.file_to_class()[labels].astype(np.uint8)
        x = normalize(torch.from_numpy(image.astype(np.float32)))
        y = torch.from_numpy(labels)
        case = Case(key, resize(x, self.cfg.coarse_shape).half(), resize(y, self.cfg.coarse_shape, labels=True))
        case.native = (image, labels, grid) if keep_native else None
        case.full = (x, y, grid)  # dropped once the fine crop is cut
        return case

    def load(self) -> None:
        t = time.perf_counter()
        self.cases = {part: [self._load(k, part == "test") for k in keys] for part, keys in self.split.items()}
        _log(f"loaded {sum(map(len, self.cases.values()))} studies "
             f"({', '.join(f'{p} {len(c)}' for p, c in self.cases.items())}) in {time.perf_counter() - t:.0f} s")

    def make_fine_crops(self, coarse_model) -> None:
        """Cut each case's fine crop around the trained coarse net's box, as inference will."""
        from kneebatch.inference.segment import series_mean

        coarse_model.eval()
        net = self._on_host(coarse_model)
        for part, cases in self.cases.items():
            for case in cases:
                with torch.inference_mode():
                    xc, _ = pad_to_multiple(case.coarse_x.float(), self.cfg.coarse.divisor())
                    pred = series_mean(lambda v: net(v[None])[0], xc, self.cfg).argmax(0)
                x, y, grid = case.full
                native = tuple(x.shape[1:])
                jitter = self.jitter_mm if part == "train" else 0.0
                margin = self.cfg.crop_margin_mm + float(self.rng.uniform(-jitter, jitter))
                box = box_from_mask(pred > 0, native, grid.spacing, max(margin, 2.0))
                crop_x, case.fine_y = fine_crop(x, box, grid.spacing, self.cfg, y)
                case.fine_x = crop_x.half()
                case.full = None


def _ema_step(averaged: torch.Tensor, current: torch.Tensor, n_averaged: torch.Tensor) -> torch.Tensor:
    """One EMA step (``AveragedModel``'s ``avg_fn``; its first update copies the net): decay
    (2 + n) / (11 + n) after n updates, at most 0.99, so the early average follows the net."""
    decay = torch.clamp((2 + n_averaged) / (11 + n_averaged), max=0.99).to(averaged.dtype)
    return averaged * decay + current * (1 - decay)


def init_folder(path) -> Path | None:
    """``--init``: an engines folder, a training run's folder, or a folder of engine sets (then its
    first set, for the shipped engines t1-t2)."""
    if not path:
        return None
    from kneebatch.inference.engine_dir import SETS_INDEX, engines_dir

    path = Path(path)
    if (path / SETS_INDEX).exists():
        return engines_dir(path)
    return path


def _pad_labels(y, shape):
    out = torch.zeros(tuple(shape), dtype=y.dtype)
    out[: y.shape[0], : y.shape[1], : y.shape[2]] = y
    return out


def _mean_scores(scores: list[dict]) -> dict[str, float]:
    names = sorted({k for s in scores for k in s})
    return {n: float(np.mean([s[n] for s in scores if n in s])) for n in names}


def _optimizer_tensors(opt) -> dict:
    out = {}
    # keyed by the parameter's index in the optimizer, not by the state's order (a resumed
    # optimizer holds its state in the order it was loaded)
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"opt.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optimizer(opt, state: dict) -> None:
    sd = opt.state_dict()
    per = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            per.setdefault(int(i), {})[name] = v
    params = [p for g in opt.param_groups for p in g["params"]]
    wrong = [i for i, st in per.items() if i >= len(params) or st["exp_avg"].shape != params[i].shape]
    if wrong:
        raise ValueError(f"the checkpoint's optimizer state does not fit the network ({len(wrong)} tensors)")
    sd["state"] = per
    opt.load_state_dict(sd)


def meta_done(last: Path, minutes: float) -> bool:
    if not last.exists():
        return False
    _, meta = load_weights(last)
    return meta["elapsed_s"] >= minutes * 60.0 - 1e-6


def write_curves(rows: list[dict], path: Path) -> None:
    try:
        from matplotlib.figure import Figure  # no pyplot: no backend chosen for the process
    except ImportError:
        return
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for stage, ax in zip(("coarse", "fine"), axes):
        r = [x for x in rows if x["stage"] == stage]
        if not r:
            continue
        ax.plot([x["minutes"] for x in r], [x["loss"] for x in r], label="train loss (Dice+CE)")
        ax.plot([x["minutes"] for x in r], [x["val_score"] for x in r], label="validation Dice")
        ax.set_title(f"{stage} network")
        ax.set_xlabel("minutes")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def training_labels(store_path, label_map: str | None = None, labels_from=None,
                    label_name: str | None = None) -> tuple:
    """``kneebatch train``'s labels: the partial label set ``label_map`` describes (None: full
    labels), the store's label map name to train on, and what was imported from ``labels_from``
    (``(n, keys without)``; None when nothing was asked). A partial set's maps keep the data
    set's ids, so they are stored under the set's name, never as ``truth``."""
    from kneebatch.label_sets import label_set_from_map, parse_label_map

    # a map that leaves schema labels out (or merges some) is a partial label set: marginal loss
    label_set = label_set_from_map(label_map) if label_map else None
    label_name = label_name or (label_set.name if label_set is not None else "truth")
    imported = None
    if labels_from is not None:
        if label_set is not None:
            from kneebatch.ingest.datasets import import_dataset_labels

            imported = import_dataset_labels(store_path, labels_from, label_set, label_name)
        else:
            from kneebatch.ingest.label_import import import_labels

            imported = import_labels(store_path, labels_from, name=label_name,
                                     label_map=parse_label_map(label_map) if label_map else None)
    return label_set, label_name, imported


def train(store_path, out, minutes_coarse: float = 4.0, minutes_fine: float = 40.0, threads: int | None = None,
          seed: int = 0, label_name: str = "truth", eval_every_fine: int = 150, cfg: ModelConfig | None = None,
          init_from=None, lr: float = 2e-3, label_set=None, device: str = "cpu", batch_size: int = 2) -> dict:
    """``label_set`` (:class:`kneebatch.label_sets.LabelSet`): the label maps annotate only its
    classes (marginal loss); the nets' configuration then comes from ``init_from``."""
    if threads:
        torch.set_num_threads(threads)
    init_from = init_folder(init_from)
    if cfg is None and init_from is not None and (init_from / "model_config.json").exists():
        cfg = ModelConfig.load(init_from / "model_config.json")  # fine-tuning keeps the nets' design
    check_training_device(device)
    tr = StoreTrainer(store_path, out, cfg=cfg, label_name=label_name, seed=seed, init_from=init_from, lr=lr,
                      label_set=label_set, device=device, batch_size=batch_size)
    tr.load()
    coarse = tr.run_stage("coarse", minutes_coarse, eval_every=100)
    tr.make_fine_crops(coarse)
    fine = tr.run_stage("fine", minutes_fine, eval_every=eval_every_fine)
    return finish(tr, coarse, fine, seed, minutes_coarse, minutes_fine)


def check_training_device(device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; train with --device cpu")


def finish(tr: Trainer, coarse, fine, seed: int, minutes_coarse: float, minutes_fine: float) -> dict:
    """Test-split Dice, the training log, curves and ``metrics.json`` of a finished run."""
    test = tr.evaluate_test(coarse, fine)
    out = tr.out
    with open(out / "train_log.csv", "w", newline="") as f:
        first = ["stage", "step", "minutes", "loss", "lr", "val_score"]
        cols = first + sorted({k for r in tr.log_rows for k in r} - set(first))
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(tr.log_rows)
    write_curves(tr.log_rows, out / "train_curves.png")
    metrics = {"split": {k: len(v) for k, v in tr.split.items()}, "split_by": "subject",
               # which studies were held out: a model is judged on studies (and subjects) it never saw
               "held_out": {part: tr.split[part] for part in ("val", "test")}, "test_dice": test,
               "test_mean_dice": float(np.mean(list(test.values()))), "seed": seed,
               "minutes": {"coarse": minutes_coarse, "fine": minutes_fine}, **tr.extra_metrics()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    _log(f"test mean Dice {metrics['test_mean_dice']:.4f}")
    return metrics
