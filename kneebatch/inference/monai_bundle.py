"""MONAI bundles as kneebatch engines.

A bundle folder (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``; MONAI's
bundle specification) segments studies through its own configuration, parsed by MONAI's
``ConfigParser`` and run by its own evaluator, in this process: the bundle's preprocessing
(``LoadImaged``, ``Orientationd``, ``Spacingd``, its intensity transforms), its inferer, its
postprocessing (``Invertd`` back to the image's grid, ``AsDiscreted``). Its labels are therefore
the ones ``python -m monai.bundle run`` gives on the NIfTI ``kneebatch export --images`` writes of
the study (tested with ``np.array_equal``). What changes, on purpose:

- ``LoadImaged`` reads the study from memory: a NIfTI made in memory exactly as ``export`` writes
  it (the bytes of the file, so the same rounding of its affine), through MONAI's own nibabel
  reader (:class:`StudyReader`), so nothing is written to disk;
- ``SaveImaged`` is left out of the postprocessing (the labels go to the store);
- the data loader has no worker processes (a Dask worker may not start them);
- ``models/model.pt`` is read with ``torch.load(weights_only=True)`` and loaded into the bundle's
  network, not by its ``CheckpointLoader``.

Bundles orient images themselves (``Orientationd``): the axis order needs no option. Labels come
from ``network_data_format.outputs.pred.channel_def`` in ``metadata.json``, inputs from
``...inputs.image.channel_def`` (or ``--channels``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kneebatch.inference.external import ExternalModel, label_lut
from kneebatch.outputs import sha256_file

TOKEN = "kneebatch-study.nii"  # the "file name" LoadImaged is given: StudyReader hands it the study
LEFT_OUT = ("SaveImage", "SaveImaged")  # postprocessing that would write files


def bundle_files(folder: Path) -> dict:
    """The bundle's metadata and inference config as JSON, checked to be one."""
    need = [folder / "configs" / "metadata.json", folder / "configs" / "inference.json", folder / "models" / "model.pt"]
    missing = [str(p.relative_to(folder)) for p in need if not p.is_file()]
    if missing:
        raise ValueError(f"{folder} is not a MONAI bundle: no {', '.join(missing)} (a bundle has configs/metadata.json, "
                         "configs/inference.json and models/model.pt)")
    try:
        meta = json.loads(need[0].read_text())
        config = json.loads(need[1].read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder}: configs/metadata.json or inference.json is not JSON ({e}; YAML configs are not "
                         "read)") from None
    for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
        if key not in config:
            raise ValueError(f"{folder}/configs/inference.json has no {key!r}: not a segmentation bundle kneebatch "
                             "can run")
    fmt = meta.get("network_data_format", {})
    if "channel_def" not in fmt.get("outputs", {}).get("pred", {}):
        raise ValueError(f"{folder}/configs/metadata.json: network_data_format.outputs.pred.channel_def (its labels) "
                         "is missing")
    return {"metadata": meta, "inference": config, "files": need}


def declared_channels(folder) -> dict:
    """``{index: name}`` of the bundle's input channels."""
    image = bundle_files(Path(folder))["metadata"]["network_data_format"].get("inputs", {}).get("image", {})
    names = image.get("channel_def") or {str(i): f"channel {i}" for i in range(int(image.get("num_channels", 1)))}
    return {str(k): v for k, v in names.items()}


def study_nifti(image: np.ndarray, grid):
    """The study ``[C, Z, Y, X]`` as the NIfTI ``kneebatch export --images`` writes of it (channels
    last when several), through its bytes: nibabel's reading of that file, without the file."""
    import nibabel as nib

    from kneebatch.geometry import affine_to_nifti

    data = np.asarray(image).transpose(3, 2, 1, 0)
    img = nib.Nifti1Image(data[..., 0] if data.shape[-1] == 1 else data, affine_to_nifti(grid.affine))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return nib.Nifti1Image.from_bytes(img.to_bytes())


class MonaiBundle(ExternalModel):
    """A loaded MONAI bundle, run by its own evaluator one study at a time."""

    kind = "monai_bundle"

    def __init__(self, folder: Path, bundle: dict, roles: list[str], lut: np.ndarray, device: str = "cpu",
                 threads: int | None = None):
        super().__init__(roles, lut, device, threads)
        self.folder, self.bundle = Path(folder), bundle
        self.hashes = {str(p.relative_to(self.folder)): sha256_file(p) for p in bundle["files"]}
        self.name = f"monai_bundle:{bundle['metadata'].get('name') or self.folder.name}"
        self._evaluator = None
        self._reader = None

    @classmethod
    def open(cls, path, roles=None, label_map=None, device="cpu", threads=None, tta=False, axis_order="store"):
        if tta:
            raise ValueError("--tta: a MONAI bundle's inference is its own (its inferer and postprocessing); "
                             "leave --tta out")
        if axis_order != "store":
            raise ValueError("--axis-order: a MONAI bundle orients images itself (Orientationd); leave it out")
        folder = Path(path)
        bundle = bundle_files(folder)
        labels = {name: int(i) for i, name in bundle["metadata"]["network_data_format"]["outputs"]["pred"]
                  ["channel_def"].items()}
        roles = roles or [str(n).upper() for _, n in sorted(declared_channels(folder).items(), key=lambda kv: int(kv[0]))]
        return cls(folder, bundle, roles, label_lut(labels, label_map), device, threads)

    def evaluator(self):
        if self._evaluator is None:
            self._evaluator, self._reader = build_evaluator(self.folder, self.bundle, self.device_name)
        return self._evaluator

    def verify(self) -> None:
        self.evaluator()

    def describe(self) -> dict:
        return {**super().describe(), "bundle": self.bundle["metadata"].get("name"),
                "version": self.bundle["metadata"].get("version")}

    def segment(self, image: np.ndarray, grid) -> np.ndarray:
        """The bundle's labels of the study on its grid (it orients and resamples itself)."""
        with self._exclusive():
            evaluator = self.evaluator()
            self._reader.study = study_nifti(image, grid)
            try:
                evaluator.run()
                pred = evaluator.state.output[0]["pred"]
            finally:
                self._reader.study = None
        seg = np.asarray(pred.detach().cpu().numpy() if hasattr(pred, "detach") else pred)
        seg = np.rint(seg[0]).astype(np.int64).transpose(2, 1, 0)  # [1, i, j, k] -> (z, y, x)
        if seg.shape != grid.shape:
            raise ValueError(f"the bundle gave labels of shape {seg.shape} for a study of {grid.shape}: its "
                             "postprocessing must invert its preprocessing (Invertd)")
        return self._translated(seg)


def build_evaluator(folder: Path, bundle: dict, device: str = "cpu"):
    """The bundle's evaluator, as ``python -m monai.bundle run`` builds it, over one study that
    :class:`StudyReader` supplies (returned with it)."""
    import importlib.util

    if importlib.util.find_spec("ignite") is None:
        raise ValueError("--model with a MONAI bundle needs pytorch-ignite (its evaluator is an ignite engine): "
                         "pip install 'kneebatch[bundle]' torch==2.13.0 (or your own torch)")
    import torch
    from monai.bundle import ConfigParser
    from monai.data import NibabelReader
    from monai.data.utils import correct_nifti_header_if_necessary
    from monai.utils import ensure_tuple

    class StudyReader(NibabelReader):
        """MONAI's nibabel reader, reading the study in memory instead of the file :data:`TOKEN`."""

        study = None

        def verify_suffix(self, filename) -> bool:
            return all(Path(str(f)).name == TOKEN for f in ensure_tuple(filename))

        def read(self, data, **kwargs):  # NibabelReader.read, the study for the file
            self.filenames = ensure_tuple(data)
            return correct_nifti_header_if_necessary(self.study)

    config = json.loads(json.dumps(bundle["inference"]))
    post = config["postprocessing"]
    if isinstance(post, dict) and isinstance(post.get("transforms"), list):
        post["transforms"] = [t for t in post["transforms"]
                              if not (isinstance(t, dict) and str(t.get("_target_", "")).split(".")[-1] in LEFT_OUT)]
    parser = ConfigParser(config)
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    parser["device"] = f"$torch.device('{device}')"
    parser["datalist"] = [TOKEN]
    parser["dataset"] = {"_target_": "Dataset", "data": [{"image": TOKEN}], "transform": "@preprocessing"}
    parser["dataloader"] = {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                            "num_workers": 0}
    evaluator = parser.get_parsed_content("evaluator")
    state = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # saved as {"model": state_dict}, as MONAI's CheckpointSaver does
    evaluator.network.load_state_dict(state)
    reader = StudyReader()
    loaded = 0
    for transform in parser.get_parsed_content("preprocessing").transforms:
        if hasattr(transform, "register") and type(transform).__name__ in ("LoadImaged", "LoadImage"):
            loader = getattr(transform, "_loader", transform)
            own = [r for r in getattr(loader, "readers", []) if isinstance(r, NibabelReader)]
            if own:  # the bundle's reader options (as_closest_canonical, channel_dim ...)
                reader.__dict__.update({k: v for k, v in own[-1].__dict__.items() if k != "study"})
            reader.to_gpu = False  # the study is in memory, not a file for GPU direct storage
            transform.register(reader)
            loaded += 1
    if not loaded:
        raise ValueError(f"{folder}: the bundle's preprocessing does not start with LoadImaged; kneebatch hands it "
                         "each study there")
    return evaluator, reader
