"""A tiny but valid nnU-Net v2 model folder, written as nnU-Net's trainer would (plans and
dataset.json by hand, the network built by nnU-Net's own builder, a checkpoint with the keys
nnU-Net's predictor reads) and trained for a few steps so that it predicts two tissues: bright
voxels are "femur", middle ones "tibia" (a threshold a net learns in seconds). Also a two-stage
cascade (3d_lowres, then 3d_cascade_fullres taking the image and the first stage's labels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "femur": 1, "tibia": 2}
SPACING = [3.5, 1.0, 1.0]  # after transpose_forward; max/min 3.5 > 3: nnU-Net resamples z on its own


def _architecture():
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16],
                            "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                            "dropout_op": None, "dropout_op_kwargs": None,
                            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _configuration(name: str, spacing, **stages):
    def rs(seg, order):
        return {"is_seg": seg, "order": order, "order_z": 0, "force_separate_z": None}

    return {"data_identifier": f"nnUNetPlans_{name}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 32, 32], "median_image_size_in_voxels": [40, 128, 128], "spacing": spacing,
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": rs(False, 3),
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": rs(True, 1),
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": rs(False, 1), "architecture": _architecture(), "batch_dice": False,
            **stages}


LOWRES_SPACING = [3.5, 2.0, 2.0]
CASCADE = {  # nnU-Net's planner links the two stages so
    "3d_lowres": _configuration("3d_lowres", LOWRES_SPACING, next_stage="3d_cascade_fullres"),
    "3d_cascade_fullres": _configuration("3d_cascade_fullres", SPACING, previous_stage="3d_lowres"),
}


def _plans(configurations=None):
    return {"dataset_name": "Dataset990_KneeTiny", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": SPACING, "original_median_shape_after_transp": [40, 128, 128],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 2, 1], "transpose_backward": [0, 2, 1],  # not the identity, on purpose
            "configurations": configurations or {"3d_fullres": _configuration("3d_fullres", SPACING)},
            "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0, "percentile_00_5": 0.0,
                "percentile_99_5": 1.0, "std": 0.25}}}


def _train(net, steps: int, seed: int, previous_stage: bool = False):
    """Adam on random z-scored volumes: > 0.8 is femur, (-0.2, 0.8] tibia (smoothed noise, so
    the classes form regions a 3x3x3 net can see). ``previous_stage``: the net also takes a
    one-hot of a first stage's labels (the truth with a tenth of its voxels wrong), as a
    cascade's second stage does."""
    import torch
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        x = ndimage.gaussian_filter(rng.normal(size=(2, 16, 32, 32)), (0, 1, 2, 2))
        x = (x - x.mean()) / x.std()
        y = np.where(x > 0.8, 1, np.where(x > -0.2, 2, 0))
        inputs = x[:, None]
        if previous_stage:
            first = np.where(rng.random(y.shape) < 0.1, rng.integers(0, 3, y.shape), y)
            inputs = np.concatenate([inputs, (first[:, None] == 1), (first[:, None] == 2)], axis=1)
        out = net(torch.as_tensor(inputs, dtype=torch.float32))
        loss = torch.nn.functional.cross_entropy(out, torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def write_model(root: Path, folds=(0,), channel="T1", steps: int = 60, mirroring=(0, 1, 2),
                configuration: str = "3d_fullres", plans: dict | None = None, features=None) -> Path:
    """``root/Dataset990_KneeTiny/nnUNetTrainer__nnUNetPlans__<configuration>`` with ``folds``;
    ``features``: the three stages' widths (default 4, 8, 16)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    folder = Path(root) / "Dataset990_KneeTiny" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True)
    dataset = {"channel_names": {"0": channel}, "labels": LABELS, "numTraining": 4, "file_ending": ".nii.gz"}
    plans = plans or _plans()
    if features is not None:
        plans["configurations"][configuration]["architecture"]["arch_kwargs"]["features_per_stage"] = list(features)
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    config = plans["configurations"][configuration]
    arch = config["architecture"]
    cascaded = "previous_stage" in config
    for fold in folds:
        torch.manual_seed(fold)
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1 + (len(LABELS) - 1 if cascaded else 0), len(LABELS), allow_init=True,
                                     deep_supervision=False)
        loss = _train(net, steps, seed=fold, previous_stage=cascaded)
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": net.state_dict(),
                    "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                                  "dataset_json": dataset, "device": "cpu"},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": mirroring,
                    "current_epoch": steps, "logging": {"train_losses": [np.float64(loss)]}},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def write_cascade(root: Path, folds=(0,), steps: int = 60) -> Path:
    """Both stages of a cascade, side by side as nnU-Net's trainer leaves them; returns the second's."""
    plans = _plans(CASCADE)
    write_model(root, folds, steps=steps, configuration="3d_lowres", plans=plans)
    return write_model(root, folds, steps=steps, configuration="3d_cascade_fullres", plans=plans)
