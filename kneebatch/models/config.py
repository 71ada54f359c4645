"""Network and preprocessing configuration (JSON), and the networks it builds.

One file describes both stages of the coarse-to-fine method, so training,
inference, ONNX export and benchmarks all build exactly the same networks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kneebatch import labels as L


@dataclass
class NetConfig:
    channels: list
    strides: list  # per level, (z, y, x) or an int
    num_res_units: int = 1
    norm: str = "INSTANCE"

    def divisor(self) -> tuple[int, int, int]:
        """Input sizes must be multiples of this (product of the strides per axis)."""
        d = [1, 1, 1]
        for s in self.strides:
            s = (s, s, s) if isinstance(s, int) else s
            d = [a * b for a, b in zip(d, s)]
        return tuple(d)


@dataclass
class ModelConfig:
    coarse: NetConfig = field(default_factory=lambda: NetConfig([8, 16, 32, 64], [2, 2, 2]))
    # batch norm: its statistics do not depend on the input's extent, so the fine net runs on
    # the whole crop in one call (no overlapping windows) and folds into the convolutions
    fine: NetConfig = field(default_factory=lambda: NetConfig(
        [16, 32, 64, 128, 128], [[1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], norm="BATCH"))
    coarse_shape: list = field(default_factory=lambda: [32, 64, 64])  # whole field of view
    fine_spacing_mm: list = field(default_factory=lambda: [2.0, 0.8, 0.8])  # working grid: finest spacing kept
    fine_patch: list = field(default_factory=lambda: [16, 128, 128])  # training patch
    crop_margin_mm: float = 12.0
    sw_overlap: float = 0.25  # windows of instance-norm nets (same context as in training) overlap this much
    keep_sides: bool = True  # medial/lateral labels only on their side (inference/laterality.py)
    mirror_tta: bool = False  # fine logits averaged with the left-right mirrored crop's (2x the fine net)
    in_channels: int = 2  # T1, T2
    n_classes: int = L.N_CLASSES
    # contrast roles (kneebatch.ingest.roles) each input channel accepts, in order of preference:
    # the demo engines were trained on T1 + fat-suppressed T2 and take a T2 without FS for it
    input_roles: list = field(default_factory=lambda: [["T1"], ["T2FS", "T2"]])
    # one-channel nets trained on many contrasts: every sagittal series of a study goes through
    # the nets on its own and their logits are averaged (input_roles is then unused)
    per_series: bool = False

    @property
    def fine_whole_crop(self) -> bool:
        """Whether the fine net may see a whole crop at once (statistics independent of extent)."""
        return self.fine.norm.upper().startswith("BATCH")

    def input_channels(self, channels) -> list[int]:
        """Indices of the store's ``channels`` (roles) to feed the nets, one per input; raises
        ``unsupported_contrast`` when the study lacks one: never feed a net the wrong contrast."""
        if self.per_series:
            if not channels:
                from kneebatch.errors import StudyError

                raise StudyError("unsupported_contrast", "no sagittal series")
            return list(range(len(channels)))
        chosen = []
        for accepted in self.input_roles:
            found = next((channels.index(r) for r in accepted if r in channels), None)
            if found is None:
                from kneebatch.errors import StudyError

                raise StudyError("unsupported_contrast", f"found {', '.join(channels) or 'none'}; engines need "
                                                         f"{self.needs()}")
            chosen.append(found)
        return chosen

    def needs(self) -> str:
        """The series the nets take, e.g. ``T1 + T2FS|T2``."""
        return "any sagittal series" if self.per_series else " + ".join("|".join(a) for a in self.input_roles)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["coarse"] = NetConfig(**d["coarse"])
        d["fine"] = NetConfig(**d["fine"])
        return cls(**d)

    @classmethod
    def load(cls, path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_network(net: NetConfig, in_channels: int, out_channels: int):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, channels=list(net.channels),
                strides=[tuple(s) if isinstance(s, list) else s for s in net.strides],
                num_res_units=net.num_res_units, norm=net.norm)
